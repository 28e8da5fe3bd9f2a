"""Every example in the README and docs/ runs, and every doctest in the package passes."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import ratekeeper

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Only blocks fenced exactly as ```python run; ```text, ```bash or ```python-norun are prose.
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(path: Path) -> list[str]:
    return FENCE.findall(path.read_text(encoding="utf-8"))


def test_docs_exist() -> None:
    assert (ROOT / "README.md").is_file()
    assert len(DOCS) > 1


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)], ids=lambda p: p.name)
def test_doc_examples_run(path: Path) -> None:
    # Blocks of one document share a namespace: later blocks build on earlier ones.
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    for number, block in enumerate(python_blocks(path), start=1):
        code = compile(block, f"{path.name} block {number}", "exec")
        exec(code, namespace)


def _modules() -> list[str]:
    names = ["ratekeeper"]
    for info in pkgutil.walk_packages(ratekeeper.__path__, prefix="ratekeeper."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_doctests(name: str) -> None:
    # the dev install has every extra, so an ImportError here is a real failure
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
