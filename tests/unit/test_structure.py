"""The layout keeps the architecture: modules small enough to read in one sitting, no import cycles, imports that
only run down the layers (api -> services -> transfer -> attestation/backends -> storage), the server never using
the client's private modules, and a reason beside every suppressed warning."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
PACKAGE = SRC / "keybroker"
SOURCE_LIMIT, BENCH_LIMIT = 450, 600

IMPLEMENTATIONS = ("registry", "embedded", "local_kek", "transit", "vault", "kmip", "pkcs11")
# Package -> packages it must never import (directly or in a function). "keys" below the transfer service means
# the key service and its outbox: backends may use the key models, material checks and ids.
FORBIDDEN = {
    "storage": {"api", "cli", "services", "transfer", "keys", "backends", "attestation", "auth", "audit", "policy"},
    "backends": {"api", "cli", "services", "transfer", "keys.service", "keys.outbox", "keys.certificates", "auth"},
    # (the attestation service wraps its token keys with a KeyWrapper: the Protocol, never an implementation)
    "attestation": {"api", "cli", "services", "transfer", "keys", *(f"backends.{m}" for m in IMPLEMENTATIONS)},
    "policy": {"api", "cli", "services", "transfer", "keys", "backends"},
    "transfer": {"api", "cli", "services"},
    "keys": {"api", "cli", "services", "transfer"},
    "auth": {"api", "cli", "services", "transfer", "keys", "backends"},
    "audit": {"cli", "services", "transfer", "keys", "backends", "auth"},
    "services": {"api", "cli"},
    "api": {"cli"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every keybroker module ``name`` imports, at module level or in a function; not under ``TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            named.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            named.add(base)
            named.update(f"{base}.{alias.name}" for alias in node.names)

    Visitor().visit(tree)
    resolved = set()
    for imported in named:
        target = imported
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_source_modules_fit_in_one_sitting() -> None:
    roots = [PACKAGE, REPO / "client" / "src"]
    long = {
        str(path.relative_to(REPO)): _lines(path)
        for root in roots
        for path in root.rglob("*.py")
        if "migrations" not in path.parts and _lines(path) > SOURCE_LIMIT
    }
    assert long == {}


def test_benchmarks_fit_too() -> None:
    long = {path.name: _lines(path) for path in (REPO / "bench").glob("*.py") if _lines(path) > BENCH_LIMIT}
    assert long == {}


def test_there_are_no_import_cycles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in GRAPH[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert cycles == []


def test_the_cycle_finder_finds_cycles() -> None:
    """(The test above must be able to fail: a graph with a cycle in it.)"""
    saved = dict(GRAPH)
    try:
        GRAPH["keybroker.ids"] = GRAPH["keybroker.ids"] | {"keybroker.errors"}
        GRAPH["keybroker.errors"] = GRAPH["keybroker.errors"] | {"keybroker.ids"}
        with pytest.raises(AssertionError):
            test_there_are_no_import_cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_run_down_the_layers(layer: str) -> None:
    prefix = f"keybroker.{layer}"
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if name == prefix or name.startswith(prefix + ".")
        for target in targets
        for forbidden in FORBIDDEN[layer]
        if target == f"keybroker.{forbidden}" or target.startswith(f"keybroker.{forbidden}.")
    )
    assert upward == []


def test_the_server_uses_only_the_clients_public_modules() -> None:
    private = re.compile(r"^\s*(from|import) keybroker_client\._", re.M)
    assert [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if private.search(p.read_text())] == []


SUPPRESSION = re.compile(r"#\s*(type:\s*ignore(\[[^\]]*\])?|noqa(:\s*[A-Z0-9, ]+)?)(?P<rest>.*)$")


def test_every_suppression_says_why() -> None:
    """A ``# type: ignore[...]`` or ``# noqa: ...`` is followed by its reason on the same line, or the comment line
    right above it gives one."""
    missing = []
    for root in (PACKAGE, REPO / "client" / "src", REPO / "bench", REPO / "tests"):
        for path in root.rglob("*.py"):
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines):
                match = SUPPRESSION.search(line)
                if match is None or "SUPPRESSION" in line:
                    continue
                reason = match.group("rest").strip(" -—#()")
                above = lines[number - 1].strip() if number else ""
                if not reason and not above.startswith("#"):
                    missing.append(f"{path.relative_to(REPO)}:{number + 1}")
    assert missing == []
