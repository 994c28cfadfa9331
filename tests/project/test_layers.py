"""The import graph follows the layers a message flows through: adapter → turn pipeline → engine API → engines, with
the store, the settings, the logs and the metrics beside them. Every import counts, those made inside a function or
for type checking only included: a layer that needs another only for its types still depends on it."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO

PACKAGES = ("bot", "storage", "benchmarks")

# Rank: a module may import its own rank or a higher one, never a lower one. The engines implement the engine API,
# so they sit above it: the API imports no engine, and the layers above reach an engine only through the API.
ENTRY, ADAPTER, PIPELINE, ENGINES, ENGINE_API = range(5)
LAYERS: dict[str, int] = {
    "bot.cli": ENTRY,
    "bot.app": ENTRY,
    "bot.__main__": ENTRY,
    "benchmarks": ENTRY,
    "bot.client": ADAPTER,
    "bot.cogs": ADAPTER,
    "bot.terminal": ADAPTER,
    "bot.replies": ADAPTER,
    "bot.chat": PIPELINE,
    "bot.engine": ENGINE_API,  # the package, api, errors, sampling, templating, token_estimate, neutralize
    "bot.engine.local": ENGINES,
    "bot.engine.remote": ENGINES,
    "bot.engine.backend": ENGINES,  # create_engine: the one way from above to a concrete engine
}
# Beside the layers: anyone may import these, and they import only each other and the engine API's types.
BESIDE = ("storage", "bot", "bot.settings", "bot.logs", "bot.metrics")

# Third-party packages that belong to one layer only.
ONLY_IN = {
    "discord": ("bot.client", "bot.cogs", "bot.app"),
    "torch": ("bot.engine.local", "benchmarks"),
    "transformers": ("bot.engine.local", "bot.engine.remote", "benchmarks"),  # remote: the tokenizer only
    "aiosqlite": ("storage", "benchmarks.store"),
    "sqlite3": ("storage", "benchmarks.store"),
    "asyncpg": ("storage", "benchmarks.store"),
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def imports(path: Path) -> Iterator[str]:
    """Every module `path` imports, named as it would be in sys.modules."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                yield submodule if submodule in MODULES else node.module


def own(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def best_match(name: str, table: dict[str, int] | tuple[str, ...]) -> str | None:
    """The longest key of `table` that is `name` or a package above it."""
    candidates = [key for key in table if name == key or name.startswith(key + ".")]
    return max(candidates, key=len, default=None)


def rank(name: str) -> int | None:
    """The layer of a first-party module, or None when it sits beside the layers."""
    layer = best_match(name, LAYERS)
    beside = best_match(name, BESIDE)
    if beside is not None and (layer is None or len(beside) > len(layer)):
        return None
    return LAYERS[layer] if layer is not None else None


GRAPH = {name: sorted({target for target in imports(path) if own(target)}) for name, path in MODULES.items()}


def test_every_first_party_module_has_a_place() -> None:
    assert all(best_match(name, LAYERS) or best_match(name, BESIDE) for name in MODULES)


def test_there_are_no_import_circles() -> None:
    visiting: list[str] = []
    done: set[str] = set()
    circles: list[list[str]] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            circles.append([*visiting[visiting.index(name) :], name])
            return
        visiting.append(name)
        for target in GRAPH.get(name, []):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in GRAPH:
        visit(name)
    assert circles == []


def test_no_import_runs_back_up_a_layer() -> None:
    upward = []
    for name, targets in GRAPH.items():
        source = rank(name)
        for target in targets:
            destination = rank(target)
            if source is None:  # beside the layers: only other beside modules, and the engine API's types
                if destination is not None and destination != ENGINE_API:
                    upward.append(f"{name} -> {target}")
            elif destination is not None and destination < source:
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_the_adapter_and_the_pipeline_reach_an_engine_only_through_create_engine() -> None:
    direct = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if rank(name) in (ADAPTER, PIPELINE)
        for target in targets
        if rank(target) == ENGINES and target != "bot.engine.backend"
    ]
    assert direct == []


@pytest.mark.parametrize("package", sorted(ONLY_IN))
def test_a_third_party_package_is_imported_only_by_its_layer(package: str) -> None:
    allowed = ONLY_IN[package]
    offenders = [
        name
        for name, path in MODULES.items()
        if any(target.split(".")[0] == package for target in imports(path)) and best_match(name, allowed) is None
    ]
    assert offenders == []


def test_the_remote_backend_and_the_metrics_import_no_torch() -> None:
    code = "import bot.engine.remote, bot.metrics, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
