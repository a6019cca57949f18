"""The Helm chart and manifests/, checked offline: lint, render, validate every object
against Kubernetes' own schemas, and keep the generated files current."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from convostore_operator.inject import METRICS_PORT, SidecarTelemetry
from convostore_operator.manifests import crd_yaml, rules_yaml
from convostore_operator.rbac import RULES

from tests.chart.tools import ROOT, checkov_binary, helm_binary

CHART = ROOT / "charts" / "convostore"
VALUE_FILES = [None, *sorted((CHART / "ci").glob("*.yaml"))]
KUBERNETES = "1.37"
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConversationStore"}


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    binary = helm_binary()
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home),
        "HELM_CONFIG_HOME": str(home),
        "HELM_DATA_HOME": str(home),
    }

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binary), *args], env=env, capture_output=True, text=True, check=check
        )

    return run


def render(helm: Any, values: Path | None, *extra: str) -> list[dict[str, Any]]:
    args = ["template", "convostore", str(CHART), "-n", "convostore-system", "--include-crds"]
    if values is not None:
        args += ["-f", str(values)]
    output = helm(*args, *extra).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


@pytest.mark.parametrize("values", VALUE_FILES, ids=lambda v: v.stem if v else "defaults")
def test_lint_strict(helm: Any, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUE_FILES, ids=lambda v: v.stem if v else "defaults")
def test_every_rendered_object_is_valid_kubernetes(helm: Any, values: Path | None) -> None:
    objects = render(helm, values)
    assert {"Deployment", "ServiceAccount"} <= {o["kind"] for o in objects}
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_operator_and_sidecar_run_locked_down(helm: Any) -> None:
    objects = render(helm, None)
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    [container] = spec["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["memory"]
    [pdb] = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1


@pytest.mark.parametrize(
    ("sets", "budget"),
    [
        ((), 1),
        (("operator.replicas=1",), None),
        (("operator.replicas=3", "podDisruptionBudget.minAvailable=3"), None),
        (("operator.replicas=3", "podDisruptionBudget.minAvailable=2"), 2),
        (("operator.replicas=1", "podDisruptionBudget.minAvailable=50%"), "50%"),
    ],
)
def test_the_disruption_budget_never_blocks_a_drain(
    helm: Any, sets: tuple[str, ...], budget: int | str | None
) -> None:
    """A budget that allows no disruption (replicas at or below minAvailable) would keep
    every node drain waiting for ever: then there is none."""
    extra = [arg for value in sets for arg in ("--set", value)]
    budgets = [o for o in render(helm, None, *extra) if o["kind"] == "PodDisruptionBudget"]
    assert [pdb["spec"]["minAvailable"] for pdb in budgets] == ([] if budget is None else [budget])


def test_webhook_only_touches_opted_in_pods(helm: Any) -> None:
    [hooks] = [o for o in render(helm, None) if o["kind"] == "MutatingWebhookConfiguration"]
    [hook] = hooks["webhooks"]
    assert hook["objectSelector"] == {"matchLabels": {"convostore.dev/inject": "true"}}
    excluded = hook["namespaceSelector"]["matchExpressions"][0]
    assert excluded["operator"] == "NotIn"
    assert {"kube-system", "convostore-system"} <= set(excluded["values"])
    assert hook["failurePolicy"] == "Fail"
    assert hook["clientConfig"]["service"]["path"] == "/inject-sidecar"
    ignore = render(helm, None, "--set", "webhook.failurePolicy=Ignore")
    [hooks] = [o for o in ignore if o["kind"] == "MutatingWebhookConfiguration"]
    assert hooks["webhooks"][0]["failurePolicy"] == "Ignore"


@pytest.mark.parametrize(
    "selector",
    [
        None,
        "webhook.namespaceSelector.matchLabels.team=agents",
        "webhook.namespaceSelector.matchExpressions[0].key=tier,"
        "webhook.namespaceSelector.matchExpressions[0].operator=Exists",
    ],
)
def test_kube_system_and_the_release_namespace_are_always_excluded(
    helm: Any, selector: str | None
) -> None:
    objects = render(helm, None, *(["--set", selector] if selector else []))
    [hooks] = [o for o in objects if o["kind"] == "MutatingWebhookConfiguration"]
    chosen = hooks["webhooks"][0]["namespaceSelector"]
    exclusion = {
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": ["kube-system", "convostore-system"],
    }
    assert exclusion in chosen["matchExpressions"]
    if selector and "matchLabels" in selector:
        assert chosen["matchLabels"] == {"team": "agents"}, "the user's selector is kept"
    if selector and "matchExpressions" in selector:
        assert {"key": "tier", "operator": "Exists"} in chosen["matchExpressions"]


def test_a_network_policy_and_spread_replicas_by_default(helm: Any) -> None:
    objects = render(helm, None)
    [policy] = [o for o in objects if o["kind"] == "NetworkPolicy"]
    ports = [rule["ports"][0]["port"] for rule in policy["spec"]["ingress"]]
    assert ports == [9443, 8080], "ingress to the webhook and /healthz only"
    narrowed = render(
        helm,
        None,
        "--set",
        "networkPolicy.apiServerCIDRs[0]=172.20.0.0/16",
        "--set",
        "networkPolicy.healthFrom[0].namespaceSelector.matchLabels.name=monitoring",
    )
    [policy] = [o for o in narrowed if o["kind"] == "NetworkPolicy"]
    webhook, health = policy["spec"]["ingress"]
    assert webhook["from"] == [{"ipBlock": {"cidr": "172.20.0.0/16"}}]
    assert health["from"] == [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    spread = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    [term] = spread["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_store_rules_go_cluster_wide_or_into_each_watched_namespace(helm: Any) -> None:
    cluster_wide = render(helm, None, "--set", "operator.clusterWide=true")
    [cluster_role] = [
        o
        for o in cluster_wide
        if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "convostore"
    ]
    assert cluster_role["rules"] == RULES
    namespaced = render(helm, None, "--set", "operator.watchNamespaces={agents,research}")
    roles = {
        o["metadata"]["namespace"]: o["rules"]
        for o in namespaced
        if o["kind"] == "Role" and o["metadata"]["name"] == "convostore"
    }
    assert roles == {"agents": RULES, "research": RULES}
    [only_cluster_role] = [o for o in namespaced if o["kind"] == "ClusterRole"]
    assert only_cluster_role["rules"] == [
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": ["convostore"],
            "verbs": ["get", "patch"],
        }
    ], "in namespaced mode the one cluster-wide grant is the webhook configuration, by name"
    [hooks] = [o for o in namespaced if o["kind"] == "MutatingWebhookConfiguration"]
    watched = {
        "key": "kubernetes.io/metadata.name",
        "operator": "In",
        "values": ["agents", "research"],
    }
    assert watched in hooks["webhooks"][0]["namespaceSelector"]["matchExpressions"]


def test_the_default_install_has_rights_in_its_watched_namespaces_alone(helm: Any) -> None:
    """Cluster-wide rights to Secrets are a choice a release makes, not a default."""
    objects = render(helm, None)
    roles = {o["metadata"].get("namespace") for o in objects if o["kind"] == "Role"}
    assert roles == {"agents", "convostore-system"}
    cluster_rules = [r for o in objects if o["kind"] == "ClusterRole" for r in o["rules"]]
    assert all(rule.get("resourceNames") for rule in cluster_rules), cluster_rules
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    assert "--namespace=agents" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    result = helm(
        "template", "x", str(CHART), "--set", "operator.watchNamespaces=null", check=False
    )
    assert result.returncode != 0
    assert "operator.clusterWide=true" in result.stderr


@pytest.mark.parametrize(
    "setting",
    [
        "operator.replicas=0",
        "webhook.failurePolicy=Sometimes",
        "operator.watchNamespaces[0]=Not_A_Namespace",
        "webhook.port=80",
        "unknownKey=1",
    ],
)
def test_values_schema_refuses_bad_values(helm: Any, setting: str) -> None:
    result = helm("template", "x", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr


def test_generated_files_are_current(helm: Any) -> None:
    assert (CHART / "crds" / "conversationstores.yaml").read_text() == crd_yaml()
    assert (CHART / "files" / "operator-rules.yaml").read_text() == rules_yaml()
    rendered = helm(
        "template",
        "convostore",
        str(CHART),
        "-n",
        "convostore-system",
        "--include-crds",
        "--skip-tests",
        "--set",
        "createNamespace=true",
    ).stdout
    assert (ROOT / "manifests" / "install.yaml").read_text() == INSTALL_HEADER + rendered, (
        "regenerate with scripts/render-manifests.sh"
    )


INSTALL_HEADER = (
    "# Generated by scripts/render-manifests.sh: "
    "helm template convostore charts/convostore -n convostore-system --include-crds "
    "--skip-tests --set createNamespace=true\n"
)


@pytest.mark.parametrize(
    "name", ["agent-deployment.yaml", "pod-manual-sidecar.yaml"], ids=lambda n: n[:-5]
)
def test_workload_examples_are_valid_kubernetes(name: str) -> None:
    for obj in yaml.safe_load_all((ROOT / "manifests" / "examples" / name).read_text()):
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


@pytest.mark.parametrize("values", VALUE_FILES, ids=lambda v: v.stem if v else "defaults")
def test_checkov_finds_nothing_beyond_the_justified_skips(
    helm: Any, values: Path | None, tmp_path: Path
) -> None:
    args = ["template", "convostore", str(CHART), "-n", "convostore-system"]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(helm(*args, *(["-f", str(values)] if values else [])).stdout)
    result = subprocess.run(
        [
            str(checkov_binary()),
            "-f",
            str(rendered),
            "--config-file",
            str(CHART / ".checkov.yaml"),
            "--quiet",
            "--compact",
            "--skip-download",
        ],
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout
    assert "Failed checks: 0" in result.stdout


def test_observability_renders_what_the_files_hold_and_tells_the_operator(helm: Any) -> None:
    """The alerts and the dashboard are rendered as they are in files/ (where promtool and
    the metric-name test check them); the PodMonitor scrapes the pods the webhook
    injects, on the port it names; the operator learns to inject metrics and traces."""
    objects = render(helm, CHART / "ci" / "observability-values.yaml")
    by_kind = {obj["kind"]: obj for obj in objects if obj["kind"] != "ConversationStore"}
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert by_kind["PrometheusRule"]["spec"] == alerts
    assert by_kind["PrometheusRule"]["metadata"]["labels"]["release"] == "prometheus"
    dashboards = [
        o for o in objects if o["kind"] == "ConfigMap" and "convostore.json" in o.get("data", {})
    ]
    [dashboard] = dashboards
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    on_disk = json.loads((CHART / "files" / "dashboard.json").read_text())
    assert json.loads(dashboard["data"]["convostore.json"]) == on_disk
    monitor = by_kind["PodMonitor"]["spec"]
    assert monitor["selector"] == {"matchLabels": {"convostore.dev/inject": "true"}}
    assert monitor["podMetricsEndpoints"][0]["port"] == METRICS_PORT
    assert by_kind["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"
    [operator] = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in operator["env"]}
    told = SidecarTelemetry.from_environment({k: v for k, v in env.items() if v is not None})
    assert told == SidecarTelemetry("http://otel-collector.observability:4318", metrics=True)
    plain = render(helm, None)
    assert not {"PodMonitor", "PrometheusRule", "ServiceMonitor"} & {o["kind"] for o in plain}
