"""The import rule between ratekeeper's layers, read from the source with ``ast``.

Each package is a layer; lowest first: ``errors`` and the pure ``core`` (takes ``now``,
no event loop, no I/O), ``estimate`` (pure too), the ``gate`` (``Limiter``, its
permits, queue, clock and engines), the ``redis`` backend, the integrations
(``anthropic``, ``otel``), the jobs built on them (``run``, ``simulate``) and the
``cli``. A module may import its own layer and the ones below it, never one above.
The emulator stands apart: it models the server, so it may use the core's tables and
errors but nothing of the client it is there to test, and only the jobs and the CLI
may use it. ``docs/architecture.md`` draws the same picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "ratekeeper"

#: Each top-level module or package of ratekeeper, and its rank (what it may import: its own
#: rank and below). ``__init__`` (the public re-exports) and ``__main__`` sit above everything.
RANK = {
    "errors": 0,
    "core": 0,
    "estimate": 1,
    "gate": 2,
    "redis": 3,
    "anthropic": 4,
    "otel": 4,
    "run": 5,
    "simulate": 5,
    "cli": 6,
    "__main__": 7,
}
#: The pure layers: they take time as an argument and touch no event loop and no I/O.
PURE = {"errors", "core", "estimate"}
# Libraries that mean an event loop or I/O: never in a pure layer.
IMPURE = {
    "anyio",
    "sniffio",
    "asyncio",
    "trio",
    "redis",
    "httpx",
    "httpx2",
    "socket",
    "socketserver",
    "anthropic",
    "time",
}
# Known crossings, to be removed; listed so that no new one can appear unnoticed (none left).
KNOWN: set[tuple[str, str]] = set()
#: Who may import the emulator (it is the server's model, not the client's).
EMULATOR_USERS = {"simulate", "cli", "__main__", "emulator"}


def _layer(module: str) -> str:
    return module.split(".")[0]


def _modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in PACKAGE.rglob("*.py")
        if p.relative_to(PACKAGE) != Path("__init__.py")
    )


def _source(module: str) -> Path:
    path = PACKAGE / (module.replace(".", "/") + ".py")
    return path if path.exists() else PACKAGE / module.replace(".", "/") / "__init__.py"


def _imports(module: str) -> set[str]:
    """Every module the file imports, at the top or inside a function (``ratekeeper.`` kept)."""
    tree = ast.parse(_source(module.removesuffix(".__init__")).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "ratekeeper":  # `from ratekeeper import otel` names a module
                found.update(
                    f"ratekeeper.{alias.name}"
                    for alias in node.names
                    if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").exists()
                )
    return found


def _internal(name: str) -> str | None:
    if name == "ratekeeper":
        return "__init__"
    return name.removeprefix("ratekeeper.") if name.startswith("ratekeeper.") else None


def _violations(module: str, imported: set[str]) -> list[str]:
    here = _layer(module)
    wrong = []
    for name in imported:
        target = _internal(name)
        if target is None or (module, target) in KNOWN:
            continue
        there = _layer(target)
        if there == "__init__":
            ok = here in ("cli", "__main__")  # the public facade re-exports every layer
        elif here == "emulator":
            ok = there in ("emulator", "core", "errors")
        elif there == "emulator":
            ok = here in EMULATOR_USERS
        else:
            ok = RANK[there] <= RANK[here]
        if not ok:
            wrong.append(f"{target} ({there})")
    return sorted(wrong)


def test_every_package_has_a_layer() -> None:
    unknown = {_layer(m) for m in _modules()} - set(RANK) - {"emulator"}
    assert not unknown, f"give these a rank in RANK (and a paragraph in docs/architecture.md): {unknown}"


@pytest.mark.parametrize("module", _modules())
def test_no_module_imports_a_layer_above_it(module: str) -> None:
    wrong = _violations(module, _imports(module))
    assert not wrong, f"{module} ({_layer(module)}) imports a layer above it: {', '.join(wrong)}"


@pytest.mark.parametrize("module", [m for m in _modules() if _layer(m) in PURE])
def test_the_pure_layers_use_no_event_loop_and_no_io(module: str) -> None:
    libraries = {name.split(".")[0] for name in _imports(module)}
    assert not libraries & IMPURE, f"{module} is pure but imports {sorted(libraries & IMPURE)}"


def test_no_cycle_between_modules() -> None:
    graph = {m: {t for n in _imports(m) if (t := _internal(n)) and t != "__init__"} for m in _modules()}
    known = set(graph)

    def resolve(target: str) -> str | None:
        # `from ratekeeper.gate import _limiter` names a module; `ratekeeper.gate` a package
        for name in (target, target + ".__init__"):
            if name in known:
                return name
        return None

    edges = {
        m: {r for t in targets if (r := resolve(t)) and r != m and (m, r) not in KNOWN}
        for m, targets in graph.items()
    }
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycle = [*path[path.index(n) :], n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


@pytest.mark.parametrize(
    ("module", "imported", "wrong"),
    [
        ("core._bucket", {"ratekeeper.gate._limiter"}, ["gate._limiter (gate)"]),
        ("gate._limiter", {"ratekeeper.redis._backend"}, ["redis._backend (redis)"]),
        ("redis._backend", {"ratekeeper.anthropic._middleware"}, ["anthropic._middleware (anthropic)"]),
        ("estimate._estimator", {"ratekeeper.gate._limiter"}, ["gate._limiter (gate)"]),
        ("emulator._state", {"ratekeeper.gate._limiter"}, ["gate._limiter (gate)"]),
        ("gate._limiter", {"ratekeeper.emulator"}, ["emulator (emulator)"]),
        ("anthropic._middleware", {"ratekeeper"}, ["__init__ (__init__)"]),
        ("cli._main", {"ratekeeper"}, []),
        ("core._pool", {"ratekeeper.core._bucket", "ratekeeper.errors", "math"}, []),
        ("simulate._run", {"ratekeeper.emulator", "ratekeeper.gate._limiter"}, []),
    ],
)
def test_the_rule_flags_what_it_should(module: str, imported: set[str], wrong: list[str]) -> None:
    # Without this, a rule that found nothing would pass every test above.
    assert _violations(module, imported) == wrong


def test_the_walk_finds_imports_inside_functions_too() -> None:
    assert "ratekeeper.core._bucket" in _imports("core._pool")
    assert "anyio" in _imports("gate._acquire")
