"""A new user's first hour: the names they write, the errors they meet, the install they try."""

from __future__ import annotations

import importlib
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

import ratekeeper
from ratekeeper import ConfigurationError, Demand, Limiter
from ratekeeper.cli._main import main


@pytest.mark.parametrize("key", ["sonnet-4.x", "sonnet-4", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929"])
def test_limits_accept_a_pool_class_or_model_and_the_usual_dimension_names(key: str) -> None:
    limiter = Limiter("tier-1", limits={key: {"rpm": 7, "itpm": 1000, "otpm": 500, "tokens": 1200}})
    limiter.acquire_nowait("claude-sonnet-4-5", input_tokens=10, max_tokens=10).release()
    (pool,) = limiter.statistics().pools.values()
    assert pool.limits["requests"] == 7.0
    assert pool.limits["input_tokens"] == 1000.0
    assert pool.limits["output_tokens"] == 500.0
    assert pool.limits["tokens"] == 1200.0


def test_a_misspelt_pool_is_an_error_listing_the_valid_ones() -> None:
    with pytest.raises(
        ConfigurationError, match=r"^limits: unknown pool or model 'sonet-4'; give a pool \(.*sonnet-4\.x"
    ):
        Limiter(limits={"sonet-4": {"requests": 5}})


def test_a_misspelt_dimension_is_an_error_listing_the_valid_ones() -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"^limits\['sonnet-4'\]: unknown dimension 'rqm'; valid: requests, rpm, input_tokens, itpm, ",
    ):
        Limiter(limits={"sonnet-4": {"rqm": 5}})


def test_acquire_sync_takes_the_same_keywords_as_acquire() -> None:
    limiter = Limiter("tier-1")
    with limiter.acquire_sync("claude-sonnet-4-5", input_tokens=100, max_tokens=200) as permit:
        assert permit.pool == "sonnet-4.x"
    with limiter.acquire_sync("claude-sonnet-4-5", Demand(input_tokens=100, max_tokens=200)):
        pass
    with pytest.raises(
        ConfigurationError, match=r"^acquire_sync: give either a Demand or the token keywords"
    ):
        limiter.acquire_sync("claude-sonnet-4-5", Demand(input_tokens=1), max_tokens=5)


def test_a_cli_error_is_one_line_and_a_non_zero_exit(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--max-tokens", "8192", "--minutes", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert err == (
        "ratekeeper simulate: claude-sonnet-4-5 (sonnet-4.x pool): a request needing 8,192 output_tokens "
        "can never be admitted: the output_tokens bucket holds at most 8,000\n"
    )


def test_version_from_the_installed_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert ratekeeper.__version__ == version("ratekeeper")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"ratekeeper {ratekeeper.__version__}\n"


def test_python_dash_m_ratekeeper() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ratekeeper", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout == f"ratekeeper {ratekeeper.__version__}\n"


def test_simulate_without_its_extra_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.startswith("ratekeeper.simulate")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rich", None)  # what find_spec reports for a missing package
    with pytest.raises(
        ratekeeper.MissingDependency,
        match=r"^rich is not installed; install it with: pip install 'ratekeeper\[cli\]'$",
    ):
        importlib.import_module("ratekeeper.simulate")


def test_check_install_is_run_by_scripts_test_on_ci() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    script = (root / "scripts" / "test").read_text()
    assert 'if [ "${CI:-}" = true ] || [ "${RATEKEEPER_CHECK_INSTALL:-}" = 1 ]; then' in script
    assert "python scripts/check-install" in script
    assert (root / "scripts" / "check-install").stat().st_mode & 0o111


def test_the_distribution_carries_its_license_and_classifiers() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    assert (root / "LICENSE").read_text().startswith("MIT License\n")
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert pyproject["license-files"] == ["LICENSE"]
    assert "Typing :: Typed" in pyproject["classifiers"]


def test_dev_tools_are_a_dependency_group_not_an_extra_users_see() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert "dev" not in pyproject["project"]["optional-dependencies"]
    tools = {re.split(r"[<>=]", r)[0] for r in pyproject["dependency-groups"]["dev"]}
    assert {"pytest", "mypy", "ruff", "hypothesis", "pytest-benchmark"} <= tools
    # scripts/test installs every extra and the group (or, with an old pip, the group's list)
    script = (root / "scripts" / "test").read_text()
    assert """-e ".[$(python scripts/dev-group --extras)]\"""" in script
    assert "--group dev" in script
    run = [sys.executable, str(root / "scripts" / "dev-group")]
    extras = subprocess.run([*run, "--extras"], capture_output=True, text=True, check=True).stdout
    assert extras.strip().split(",") == list(pyproject["project"]["optional-dependencies"])
    listed = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert listed.split() == pyproject["dependency-groups"]["dev"]


@pytest.mark.anyio
async def test_a_sync_client_in_async_code_is_told_to_use_async_anthropic() -> None:
    from anthropic_support import HELLO, MODEL, emulator, sync_client

    client = sync_client(emulator(), Limiter("tier-1"))
    with pytest.raises(
        ConfigurationError,
        match=r"^a sync Anthropic client would block the running event loop while it waits for capacity; "
        r"in async code use anthropic\.AsyncAnthropic \(wrap\(anthropic\.AsyncAnthropic\(\)\)\)$",
    ):
        client.messages.create(model=MODEL, max_tokens=10, messages=HELLO)


def test_wrap_without_a_limiter_shares_one_per_key_and_base_url() -> None:
    import gc

    import anthropic
    from anthropic_support import middleware_of

    from ratekeeper.anthropic import wrap
    from ratekeeper.anthropic._middleware import _shared

    def limiter_of(client: anthropic.Anthropic | anthropic.AsyncAnthropic) -> Limiter:
        return middleware_of(client)._limiter

    a = wrap(anthropic.Anthropic(api_key="key-1", base_url="http://127.0.0.1:9"))
    b = wrap(anthropic.AsyncAnthropic(api_key="key-1", base_url="http://127.0.0.1:9"))
    other_key = wrap(anthropic.Anthropic(api_key="key-2", base_url="http://127.0.0.1:9"))
    other_url = wrap(anthropic.Anthropic(api_key="key-1", base_url="http://127.0.0.1:10"))
    assert limiter_of(a) is limiter_of(b)
    assert limiter_of(other_key) is not limiter_of(a)
    assert limiter_of(other_url) is not limiter_of(a)
    held = len(_shared)
    del a, b
    gc.collect()
    assert len(_shared) == held - 1  # weak: no client of key-1 at that URL is left, nor its budget
