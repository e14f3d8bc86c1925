"""Stop signals of the command line: Ctrl-C (SIGINT), SIGTERM (``timeout``, ``docker stop``, systemd, Slurm), SIGHUP
(a closing terminal) and, on Windows, Ctrl-Break (SIGBREAK) all mean the same.

While the model loads nothing can be saved yet, so a signal aborts at once. Once training has started
(:meth:`StopSignals.arm`), the first signal asks the run to stop after the current step — it then saves the
LoRA/embedding and the resume state — and a second one aborts without saving. Handlers are installed only from the
main thread (where Python delivers signals); inside the WebUI nothing here is used.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

NAMES = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")  # those this platform has are handled


class SignalAbort(KeyboardInterrupt):
    """A stop signal arrived while nothing could be saved, or a second one arrived: abort without saving."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (Ctrl-C: 130, SIGTERM: 143)."""
    return 128 + int(signum)


class StopSignals:
    """Context manager that installs the handlers (main thread only) and restores the previous ones on exit.

    ``on_first(name)`` is called for the first signal after :meth:`arm`; it should ask the run to stop and say so."""

    def __init__(self, on_first: Callable[[str], None]):
        self.on_first = on_first
        self.armed = False
        self.received: int | None = None  # the first signal after arm()
        self._previous: dict[int, object] = {}

    def arm(self) -> None:
        self.armed = True

    def _handle(self, signum, frame) -> None:
        if not self.armed or self.received is not None:
            raise SignalAbort(signum)
        self.received = signum
        try:
            self.on_first(signal_name(signum))
        except Exception:  # noqa: BLE001 - a closed terminal (SIGHUP) must not turn the stop into a crash
            pass

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in NAMES:
                signum = getattr(signal, name, None)
                if signum is None:
                    continue
                try:
                    self._previous[signum] = signal.signal(signum, self._handle)
                except (OSError, ValueError):  # not catchable here
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
