"""``python -m ratekeeper``: the ``ratekeeper`` command, for when its script is not on PATH."""

from __future__ import annotations

from ratekeeper.cli._main import main

if __name__ == "__main__":  # importing the module (doctest collection) runs nothing
    raise SystemExit(main())
