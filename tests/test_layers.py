"""The layering rules of docs/architecture.md, read from the source so they stay true.

``sequencer/`` is the core; fixtures, phases, reports and the web stack build
on it, and only the command line (``sequencer/cli.py``) imports upward. Every
``import`` counts, also one inside a function or under ``TYPE_CHECKING``: a
deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The project's own top-level packages; every other import is the standard library or a dependency.
PROJECT = frozenset({"sequencer", "fixtures", "phases", "reports", "web", "products"})

#: What each layer may import from the project (a module matches its longest listed prefix).
ALLOWED: dict[str, frozenset[str]] = {
    "sequencer": frozenset({"sequencer"}),
    "reports.quality": frozenset({"sequencer", "reports.quality"}),
    "reports.render": frozenset({"sequencer", "reports.quality", "reports.render"}),
    # Storage answers find by the units quality defines (which runs are one device): arithmetic over records.
    "reports.storage": frozenset({"sequencer", "reports.quality", "reports.storage"}),
    "web": frozenset({"sequencer", "reports", "web"}),
    # The simulated station serves the real provisioning service and keeps its devices where records go;
    # a station checks a build against the registry's own manifest format.
    "fixtures": frozenset({"sequencer", "fixtures", "reports.storage", "web.provisioning", "web.builds.model"}),
    # The register phase checks the claim code against the service's own format.
    "phases": frozenset({"sequencer", "fixtures", "phases", "web.provisioning.model"}),
}

#: The command line: the one place that imports upward from the core.
COMMAND_MODULES = frozenset({"sequencer.cli"})


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every project module ``source`` imports, with its line (relative imports resolved)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            # ``from reports.render import html`` imports reports.render.html.
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] in PROJECT]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> str | None:
    matches = [layer for layer in ALLOWED if _within(module, layer)]
    return max(matches, key=len) if matches else None


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` its layer does not allow, as ``line: name``."""
    layer = layer_of(module)
    if layer is None or module in COMMAND_MODULES:
        return []
    allowed = ALLOWED[layer]
    return [f"{line}: {name}" for line, name in imported(source, module, is_package)
            if not any(_within(name, prefix) for prefix in allowed)]


def project_modules() -> list[Path]:
    return sorted(p for top in PROJECT for p in (ROOT / top).rglob("*.py"))


def test_every_module_imports_only_what_its_layer_allows() -> None:
    broken = {}
    for path in project_modules():
        found = violations(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")
        if found:
            broken[str(path.relative_to(ROOT))] = found
    assert broken == {}


def test_the_rules_cover_the_tree() -> None:
    # Every package of the project but products (which only the user's command loads) is in a layer,
    # so a new folder cannot slip past the rules unnoticed.
    layered = {module_name(p) for p in project_modules() if layer_of(module_name(p)) is not None}
    unlayered = {module_name(p) for p in project_modules()} - layered
    assert {m for m in unlayered if not _within(m, "products") and m != "reports"} == set()
    assert {"sequencer.session", "reports.storage.store", "reports.render.html", "reports.quality.yields",
            "web.server", "web.provisioning.app"} <= layered


@pytest.mark.parametrize(("source", "module", "bad"), [
    ("from reports.storage.mongo_cli import station_shipping", "sequencer.session", True),
    ("def f():\n    import fixtures.station\n", "sequencer.engine", True),
    ("from reports.storage import store", "sequencer.cli", False),  # the command line may
    ("from reports.render import html", "reports.storage.mongo", True),
    ("from reports.quality.yields import batch_summary", "reports.render.html", False),
    ("from . import svg", "reports.render.html", False),
    ("from ..storage import store", "reports.render.html", True),
    ("from web.server import serve_app", "reports.render.export", True),
    ("from fixtures.station import open_hardware", "web.provisioning.app", True),
    ("import trio, attrs", "sequencer.engine", False),
])
def test_a_forbidden_import_is_found(source: str, module: str, bad: bool) -> None:
    assert bool(violations(source, module)) is bad
