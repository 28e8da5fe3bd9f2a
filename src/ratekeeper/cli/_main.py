"""The ``ratekeeper`` command line.

Each subcommand is one :class:`Command` in ``COMMANDS``: a name, a help line,
a function that adds its arguments and a function that runs it. To add one,
write those two functions and append a ``Command`` to the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs

from ratekeeper.errors import RateKeeperError

if TYPE_CHECKING:
    from ratekeeper.emulator import EmulatorConfig

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@attrs.frozen
class Command:
    """One subcommand: ``configure`` adds its arguments, ``run`` returns the exit code."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- emulate


def _foreign(text: str) -> tuple[str, float, float, float]:
    parts = text.split(":")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("expected POOL:RPM:ITPM:OTPM, e.g. sonnet-4.x:10:5000:1000")
    try:
        return parts[0], float(parts[1]), float(parts[2]), float(parts[3])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _emulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tier-1", help="tier-1..tier-4, start, build, scale (default: tier-1)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)",
    )
    p.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one (default: 8080)")
    p.add_argument(
        "--mode", choices=["api", "unified", "wallet"], default="api", help="which server to emulate"
    )
    p.add_argument(
        "--enforcement-interval", type=float, default=60.0, help="burst seconds per bucket (default 60)"
    )
    p.add_argument(
        "--token-enforcement-interval", type=float, default=None, help="the same, token buckets only"
    )
    p.add_argument(
        "--otpm-rule", choices=["max_tokens", "actual"], default="max_tokens", help="OTPM accounting"
    )
    p.add_argument(
        "--report-moment",
        choices=["admission", "response", "mixed"],
        default="admission",
        help="when non-streamed headers describe the buckets: at admission (default), at the response "
        "(after its settlement and all admitted meanwhile), or either at random",
    )
    _emulate_world_arguments(p)


def _emulate_world_arguments(p: argparse.ArgumentParser) -> None:
    """The rest of ``emulate``'s arguments: limits, clock, latency, faults, spend and other traffic."""
    p.add_argument(
        "--uplink",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="hold each request up to SECONDS (uniform, seeded) before admitting it, as a slow network",
    )
    p.add_argument("--rpm", type=int, help="explicit RPM for every pool (with --itpm and --otpm)")
    p.add_argument("--itpm", type=int, help="explicit ITPM for every pool")
    p.add_argument("--otpm", type=int, help="explicit OTPM for every pool")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--epoch",
        default="now",
        help="date of server time 0: 'now' (default) or ISO 8601, e.g. 2026-01-05T00:00:00Z",
    )
    p.add_argument("--ttft", type=float, default=0.5, help="time to first token, seconds (default 0.5)")
    p.add_argument("--tokens-per-second", type=float, default=60.0, help="output speed (default 60)")
    p.add_argument("--overload-probability", type=float, default=0.0, help="chance of a 529 per request")
    p.add_argument(
        "--midstream-error-probability", type=float, default=0.0, help="chance a stream breaks off"
    )
    p.add_argument(
        "--spend-cap", type=float, default=None, help="monthly spend cap in USD (default: preset's)"
    )
    p.add_argument("--acceleration", action="store_true", help="enable the acceleration limit")
    p.add_argument(
        "--foreign",
        type=_foreign,
        action="append",
        default=[],
        metavar="POOL:RPM:ITPM:OTPM",
        help="foreign traffic",
    )
    p.add_argument(
        "--wallet-balance", type=int, default=10_000_000, help="wallet mode: credits (default 10M)"
    )
    p.add_argument("--wallet-rpm", type=int, default=100, help="wallet mode: proxy RPM (default 100)")


def _epoch(text: str) -> dt.datetime:
    if text == "now":
        return dt.datetime.now(dt.UTC).replace(microsecond=0)
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _emulate(args: argparse.Namespace) -> int:
    from ratekeeper.emulator import serve
    from ratekeeper.errors import ConfigurationError

    try:
        epoch = _epoch(args.epoch)
    except ValueError as exc:
        print(f"ratekeeper emulate: --epoch: {exc}", file=sys.stderr)
        return 2
    explicit = (args.rpm, args.itpm, args.otpm)
    if any(v is not None for v in explicit) and None in explicit:
        print("ratekeeper emulate: --rpm, --itpm and --otpm go together", file=sys.stderr)
        return 2
    try:
        http = serve(_emulator_config(args, epoch), host=args.host, port=args.port)
    except (ConfigurationError, OSError) as exc:
        print(f"ratekeeper emulate: {exc}", file=sys.stderr)
        return 2
    if not http.loopback:
        print(
            f"ratekeeper emulate: {args.host} is not a loopback address: other machines can reach the "
            "emulator, and it checks no API key",
            file=sys.stderr,
            flush=True,
        )
    # Ctrl-C and SIGTERM both stop it cleanly, even when started as a script's background
    # job (`ratekeeper emulate &`), which inherits SIGINT ignored and so would never stop
    if threading.current_thread() is threading.main_thread():  # (only there can it set them)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        # said inside the try: an interrupt right after the line (a script that waits for it,
        # then stops the server) is a clean stop, not a traceback and exit status -2
        print(f"listening on {http.url}", flush=True)
        while True:
            http.sleep_until(http.now() + 3600)
    except KeyboardInterrupt:
        pass
    finally:
        http.close()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _emulator_config(args: argparse.Namespace, epoch: dt.datetime) -> EmulatorConfig:
    """The emulator's configuration as the arguments give it; raises ``ConfigurationError``."""
    from ratekeeper.emulator import (
        AccelerationLimit,
        EmulatorConfig,
        ForeignTraffic,
        LatencyModel,
        PoolLimits,
        WalletConfig,
    )

    return EmulatorConfig(
        preset=args.preset,
        default_limits=PoolLimits(args.rpm, args.itpm, args.otpm) if args.rpm is not None else None,
        mode=args.mode,
        enforcement_interval=args.enforcement_interval,
        token_enforcement_interval=args.token_enforcement_interval,
        otpm_rule=args.otpm_rule,
        report_moment=args.report_moment,
        seed=args.seed,
        epoch=epoch,
        latency=LatencyModel(ttft=args.ttft, tokens_per_second=args.tokens_per_second, uplink=args.uplink),
        overload_probability=args.overload_probability,
        midstream_error_probability=args.midstream_error_probability,
        monthly_spend_cap_usd=args.spend_cap,
        acceleration=AccelerationLimit() if args.acceleration else None,
        foreign=tuple(ForeignTraffic(pool=f[0], rpm=f[1], itpm=f[2], otpm=f[3]) for f in args.foreign),
        wallet=WalletConfig(balance=args.wallet_balance, rpm=args.wallet_rpm),
    )


# --------------------------------------------------------------------------- simulate


def _simulate_arguments(p: argparse.ArgumentParser) -> None:
    from ratekeeper.cli._simulate import configure  # argparse only: --help needs no extra

    configure(p)


def _simulate(args: argparse.Namespace) -> int:
    from ratekeeper.cli._simulate import run

    return run(args)


# --------------------------------------------------------------------------- run


def _run_arguments(p: argparse.ArgumentParser) -> None:
    from ratekeeper.cli._run import configure  # argparse only: --help needs no extra

    configure(p)


def _run(args: argparse.Namespace) -> int:
    from ratekeeper.cli._run import run

    return run(args)


# --------------------------------------------------------------------------- the table

COMMANDS: list[Command] = [
    Command(
        "emulate",
        "run the rate-limit emulator as an HTTP server (on loopback unless --host says otherwise)",
        _emulate_arguments,
        _emulate,
    ),
    Command(
        "simulate",
        "compare rate-limiting strategies on a simulated workload (emulator, virtual time)",
        _simulate_arguments,
        _simulate,
    ),
    Command(
        "run",
        "send a JSONL file of requests (Batches format) as fast as the rate limits allow; resumable",
        _run_arguments,
        _run,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command of ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="ratekeeper", description="Keep programs inside Claude's rate limits."
    )
    parser.add_argument("--version", action="version", version=f"ratekeeper {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (help and 0 without a command)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        code: int = args.run(args)
    except (RateKeeperError, BaseExceptionGroup) as exc:
        # one clear line, not a traceback of task groups: these are the user's
        # arguments meeting the limits, not a bug
        message = _error_line(exc)
        if message is None:
            raise
        print(f"ratekeeper {args.command}: {message}", file=sys.stderr)
        return 1
    return code


def _error_line(exc: BaseException) -> str | None:
    """The message of a ratekeeper error, also inside (nested) exception groups; None for any other error."""
    if isinstance(exc, RateKeeperError):
        return str(exc)
    if isinstance(exc, BaseExceptionGroup):
        lines = [_error_line(e) for e in exc.exceptions]
        if lines and all(line is not None for line in lines):
            return "; ".join(dict.fromkeys(line for line in lines if line is not None))
    return None


def _version() -> str:
    from ratekeeper import __version__

    return __version__


if __name__ == "__main__":
    raise SystemExit(main())
