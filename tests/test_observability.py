"""What the chart ships for watching convostore: the alert rules pass `promtool check
rules` and their unit tests, and every metric the dashboard and the alerts query is one
that a running sidecar (scraped on its health port, as the PodMonitor does) or the
operator's health listener exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from convostore import SidecarSession
from convostore_operator.main import Reconciler, ReplicaSettings, serve_health
from convostore_operator.metrics import OperatorMetrics

from tests.servers import free_port, require
from tests.support import SidecarProcess, unique

FILES = Path(__file__).parents[1] / "charts" / "convostore" / "files"
METRIC = re.compile(r"\bconvostore_[a-z0-9_]+\b")
SAMPLES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        require("promtool (Debian's prometheus package)")
    assert binary is not None
    return subprocess.run(
        [binary, *args], cwd=FILES, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_alert_rules_are_valid_and_pass_their_unit_tests() -> None:
    checked = promtool("check", "rules", "alerts.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout
    tested = promtool("test", "rules", "alerts-test.yaml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((FILES / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_has_a_severity_and_a_section_saying_what_to_do() -> None:
    guide = (Path(__file__).parents[1] / "docs" / "observability.md").read_text()
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert f"### {rule['alert']}" in guide
        assert rule["annotations"]["runbook"].endswith("#" + rule["alert"].lower())


def exported(exposition: str) -> set[str]:
    """The sample names an exposition's families give (a histogram's _bucket, ...)."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name + suffix for suffix in SAMPLES[kind]}
    return names


def queried() -> set[str]:
    dashboard = json.loads((FILES / "dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    variables = dashboard["templating"]["list"]
    exprs += [v["query"]["query"] for v in variables if isinstance(v.get("query"), dict)]
    exprs += [rule["expr"] for rule in alert_rules()]
    return {name for expr in exprs for name in METRIC.findall(expr)}


async def scraped(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, url
        return await resp.text()


async def test_the_dashboard_and_alerts_query_only_metrics_that_are_exported(
    store_config: Callable[..., dict[str, Any]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    sidecar = sidecar_process({"stores": {"chat": store_config("sqlite")}})
    health = free_port()
    sidecar.start("--health-port", str(health), "--health-metrics")
    chat = SidecarSession(unique(), "chat", sidecar.url)
    await chat.add_items([{"role": "user", "content": "x"}])
    from_sidecar = await scraped(f"http://127.0.0.1:{health}/metrics")
    replica = Reconciler(ReplicaSettings([], "convostore-sidecar:test", None, None))
    metrics = OperatorMetrics(lambda: replica.running, lambda: replica.failed)
    port = free_port()
    runner = await serve_health(("127.0.0.1", port), replica, lambda: True, metrics)
    try:
        from_operator = await scraped(f"http://127.0.0.1:{port}/metrics")
    finally:
        await runner.cleanup()
    assert "convostore_operator_leader 0.0" in from_operator, "a replica not leading"
    missing = queried() - exported(from_sidecar) - exported(from_operator)
    assert not missing, f"queried but exported by nothing: {sorted(missing)}"
    assert len(queried()) >= 15
