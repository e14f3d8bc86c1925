"""How a run talks to whoever started it: events out, commands in.

The trainer never prints and never reads WebUI globals. It reports through an :class:`Events` object (the command
line maps it to a progress bar, the WebUI to ``shared.state``, the API to a job record) and polls a
:class:`Commands` object (Ctrl-C, the Interrupt button, an API call). A failing event handler is logged and ignored:
a UI glitch must never kill a training run.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from .lr_history import LRHistory

log = logging.getLogger("lib_train")


@dataclass
class Progress:
    step: int  # optimizer steps done
    total_steps: int
    epoch: int  # 1-based epoch being trained
    total_epochs: int
    loss: float | None  # mean loss over the last logging interval (None until the first read)
    lr: float | None  # the step size the step used in the first parameter group (d·lr for DAdaptation/Prodigy)
    elapsed: float  # seconds since the first step of this session
    eta: float | None  # seconds left, from the recent step rate
    lr_history: LRHistory | None = None  # the run's rates up to this step, every group (read-only for handlers)


class Events:
    """Base class: every method is a no-op. Subclass what you need."""

    def status(self, text: str) -> None:
        """A phase change: "Caching latents", "Training", ..."""

    def progress(self, p: Progress) -> None:
        """Called after each optimizer step."""

    def saved(self, path: str, kind: str) -> None:
        """A file was written; ``kind`` is "epoch", "step", "final", "interrupted" or "state"."""

    def warning(self, text: str) -> None:
        """Something the user should know that does not stop the run."""

    def sampled(self, paths: list[str], step: int) -> None:
        """A set of sample images was written (``sample`` settings) after optimizer step ``step``."""


class SafeEvents(Events):
    """Forwards to another :class:`Events`, logging (not raising) its exceptions."""

    def __init__(self, inner: Events):
        self.inner = inner

    def _call(self, name: str, *args) -> None:
        try:
            getattr(self.inner, name)(*args)
        except Exception:  # noqa: BLE001 - a reporting failure must not stop training
            log.exception("event handler %s failed", name)

    def status(self, text: str) -> None:
        self._call("status", text)

    def progress(self, p: Progress) -> None:
        self._call("progress", p)

    def saved(self, path: str, kind: str) -> None:
        self._call("saved", path, kind)

    def warning(self, text: str) -> None:
        self._call("warning", text)

    def sampled(self, paths: list[str], step: int) -> None:
        self._call("sampled", paths, step)


class Commands:
    """Thread-safe requests to a running trainer, polled between steps."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._save = threading.Event()

    def request_stop(self) -> None:
        """Finish the current step, save the LoRA and the resume state, and return."""
        self._stop.set()

    def request_save(self) -> None:
        """Save the LoRA and the resume state after the current step, then go on."""
        self._save.set()

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def take_save_request(self) -> bool:
        if self._save.is_set():
            self._save.clear()
            return True
        return False
