"""A missing optional dependency fails at the import that needs it, with the install hint."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("blocked", "module", "extra"),
    [
        ("trio", "ratekeeper.simulate", "cli"),
        ("rich", "ratekeeper.simulate", "cli"),
        ("anthropic", "ratekeeper.simulate", "cli"),
        ("anthropic", "ratekeeper.anthropic", "anthropic"),
        ("opentelemetry", "ratekeeper.otel", "otel"),
    ],
)
def test_missing_extra_names_the_install_command(blocked: str, module: str, extra: str) -> None:
    # A None entry in sys.modules makes that import fail as if it were not installed.
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "from ratekeeper import MissingDependency\n"
        f"try:\n    import {module}\nexcept MissingDependency as e:\n    print(e)\n"
        "else:\n    print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{blocked} is not installed; install it with: pip install 'ratekeeper[{extra}]'"


def test_simulate_without_its_extra_says_what_to_install_once() -> None:
    code = (
        "import sys; sys.modules['trio'] = None\n"
        "from ratekeeper.cli._main import main\n"
        "raise SystemExit(main(['simulate']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "ratekeeper simulate: trio is not installed; install it with: pip install 'ratekeeper[cli]'"
    )
