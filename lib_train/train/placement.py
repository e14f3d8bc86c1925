"""Where a run's model parts sit: parts moved off the GPU for the loop and back, and the devices restored exactly.

A run moves frozen parts it does not need every step to the CPU (the VAE once latents are cached, the text encoders
once their outputs are), brings them back for a block that needs them (:func:`on_device`: sampling, a text not in the
cache), and at the end puts every parameter and buffer of the model back on the device it was found on
(:class:`Placement`), however the run ended.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextmanager
def on_device(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """``module`` on ``device`` for the block when it is elsewhere, then back where it was."""
    before = device_of(module)
    if before == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(before)
        if device.type == "cuda":
            torch.cuda.empty_cache()


class Placement:
    """The device of every parameter and buffer under ``modules``, recorded now; :meth:`restore` moves each one that
    is elsewhere back (parameters keep their identity: their ``data`` moves)."""

    def __init__(self, *modules: torch.nn.Module | None):
        self._where: list[tuple[torch.nn.Module, str, bool, torch.device]] = []
        seen: set[int] = set()
        for root in modules:
            if root is None:
                continue
            for m in root.modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                for table, is_param in ((m._parameters, True), (m._buffers, False)):
                    for name, t in table.items():
                        if t is not None:
                            self._where.append((m, name, is_param, t.device))

    def restore(self) -> bool:
        """Put everything back; True when anything had moved."""
        moved = False
        for m, name, is_param, device in self._where:
            table = m._parameters if is_param else m._buffers
            t = table.get(name)
            if t is None or t.device == device:
                continue
            moved = True
            if is_param:
                t.data = t.data.to(device)
            else:
                table[name] = t.to(device)
        return moved
