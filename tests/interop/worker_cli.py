"""The command-line shell shared by the interop workers (each runs in its own environment as a subprocess).

A worker's ``run(*args, step)`` updates ``step[0]`` as it goes; on failure the traceback is printed and the last line
of stderr is ``<worker>: <step> failed: <error>`` on one line, which the calling test shows alone.
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable


def worker_main(name: str, usage: str, run: Callable[..., None], argv: list[str], convert=None) -> int:
    """Call ``run(*converted args, step)``; ``usage`` names the positional arguments (their count is checked)."""
    expected = usage.count("<")  # one <placeholder> per argument
    if len(argv) != expected + 1:
        print(f"usage: {name}.py {usage}", file=sys.stderr)
        return 2
    args = convert(argv[1:]) if convert else argv[1:]
    step = ["starting"]
    try:
        run(*args, step)
    except Exception as err:  # noqa: BLE001 - the caller reads the last line
        traceback.print_exc()
        print(f"{name}: {step[0]} failed: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0
