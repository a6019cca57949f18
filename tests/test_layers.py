"""The sidecar's shape, beside the import contracts that `lint-imports` checks
(`pyproject.toml`): only its HTTP layer speaks HTTP to clients."""

from __future__ import annotations

import ast
from pathlib import Path

SIDECAR = Path(__file__).resolve().parents[1] / "sidecar" / "convostore_sidecar"
SERVER_MODULES = ("aiohttp.web", "aiohttp.web_", "aiohttp.typedefs", "aiohttp.http_exceptions")


def server_imports(path: Path) -> list[str]:
    """The aiohttp server modules `path` imports (its client, `aiohttp.ClientSession`,
    is not one of them)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [name for name in names if name.startswith(SERVER_MODULES)]
    return found


def test_only_the_http_layer_imports_aiohttps_server() -> None:
    outside = {
        str(path.relative_to(SIDECAR)): imports
        for path in SIDECAR.rglob("*.py")
        if "http" not in path.relative_to(SIDECAR).parts and (imports := server_imports(path))
    }
    assert outside == {}
    inside = [path for path in (SIDECAR / "http").glob("*.py") if server_imports(path)]
    assert len(inside) >= 5, "the check finds the HTTP layer's own imports"
