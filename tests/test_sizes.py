"""Sizes a newcomer can read: modules to ~600 lines, classes to ~400, functions to ~60.

Read from the source with ``ast``. What is over today is listed with its size now, as a
ceiling: it may shrink (then lower or drop its entry), never grow, and nothing new may
join it. ``python tests/test_sizes.py`` prints every entry over its limit.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "ratekeeper"
LIMITS = {"module": 600, "class": 400, "function": 60}

#: Over the limit today, and why it is left: (kind, "path:name") -> lines now.
KNOWN: dict[tuple[str, str], int] = {
    # the fast path, unrolled: its equivalence test holds it to the general one
    ("function", "core/_bucket.py:take_request"): 73,
}


def sizes() -> dict[tuple[str, str], int]:
    """Every module, class and function of the package over its limit, with its length."""
    out: dict[tuple[str, str], int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        source = path.read_text(encoding="utf-8")
        lines = len(source.splitlines())
        if lines > LIMITS["module"]:
            out["module", rel] = lines
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                kind = "class"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "function"
            else:
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > LIMITS[kind]:
                out[kind, f"{rel}:{node.name}"] = length
    return out


def test_nothing_new_is_over_its_size_and_nothing_listed_grew() -> None:
    found = sizes()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    grew = {k: (KNOWN[k], v) for k, v in found.items() if k in KNOWN and v > KNOWN[k]}
    assert not new, f"over the size limit {LIMITS}: {new}"
    assert not grew, f"grew past their listed size (listed, now): {grew}"


def test_the_list_holds_only_what_is_still_over() -> None:
    """An entry that shrank under its limit leaves the list, so the list says what is left."""
    assert set(KNOWN) <= set(sizes())


if __name__ == "__main__":
    for (kind, name), length in sorted(sizes().items(), key=lambda kv: -kv[1]):
        print(f"{kind:8} {length:5}  {name}  (limit {LIMITS[kind]})")
