"""The sidecar's shape, beside the import contracts that `lint-imports` checks
(`pyproject.toml`): only its HTTP layer speaks HTTP to clients, and what each backend
can do is declared once, truly."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from convostore_sidecar.drivers import BACKENDS as DECLARED
from convostore_sidecar.drivers import CAPABILITIES

ROOT = Path(__file__).resolve().parents[1]
SIDECAR = ROOT / "sidecar" / "convostore_sidecar"
COMPONENTS = {
    "Client": ROOT / "client" / "convostore",
    "Sidecar": SIDECAR,
    "Operator": ROOT / "operator" / "convostore_operator",
    "Command line": ROOT / "cli" / "convostore_cli",
}
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


@pytest.mark.parametrize("name", list(DECLARED))
def test_each_backends_declared_capabilities_are_what_its_driver_implements(name: str) -> None:
    """`drivers.BACKENDS` is the one declaration everything reads: a backend declared to
    keep structure (and so to compact) has a driver with the structure calls, and one
    declared without has none."""
    backend = DECLARED[name]
    module = importlib.import_module(backend.module)
    [driver] = [
        kind
        for kind in vars(module).values()
        if isinstance(kind, type)
        and kind.__module__.startswith(module.__name__)  # the module, or its package's
        and kind.__name__.endswith("Driver")
    ]
    calls = ("append_to", "latest_in", "create_branch", "usage", "compact", "full_history")
    assert all(hasattr(driver, call) for call in calls) == backend.has("structure")
    assert backend.has("compaction") == backend.has("structure")
    for capability, reason in backend.lacks.items():
        assert capability in CAPABILITIES
        assert len(reason) > 20


def test_the_architecture_page_names_every_module_in_its_components_section() -> None:
    """`docs/architecture.md` is where a reader looks a behaviour up: a module added
    without a line there fails here."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    sections = {part.split(":", 1)[0]: part for part in page.split("\n## ")[1:]}
    assert set(sections) == set(COMPONENTS)
    missing = {
        component: [
            str(path.relative_to(folder))
            for path in sorted(folder.rglob("*.py"))
            if f"`{path.relative_to(folder)}`" not in sections[component]
        ]
        for component, folder in COMPONENTS.items()
    }
    assert missing == {component: [] for component in COMPONENTS}
