"""The README read where a package index shows it (issue 15): examples say how they run, links say where."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(python[-\w]*)[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
TOP_LEVEL = re.compile(r"^(\w+ = )?await |^async (with|for) ")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_an_example_with_top_level_await_says_so() -> None:
    for match in BLOCK.finditer(README):
        top_level = [line for line in match.group(2).splitlines() if TOP_LEVEL.match(line)]
        if not top_level:
            continue
        before = README[: match.start()].rstrip().rsplit("\n\n", 1)[-1]
        assert "top-level `await`" in before, f"say where this runs: {top_level[0]!r}"


def test_relative_links_resolve_and_the_readme_says_where_they_lead_off_the_repository() -> None:
    relative = [t for t in LINK.findall(README) if not re.match(r"^[a-z]+://", t)]
    assert relative
    for target in relative:
        assert (ROOT / target.split("#")[0]).is_file(), target
    assert "The links are relative to the source tree: on a package index" in README
    # ... where the note sends the reader: the source distribution carries docs/
    assert "graft docs" in (ROOT / "MANIFEST.in").read_text(encoding="utf-8").splitlines()
