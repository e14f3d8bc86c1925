"""A CUDA out-of-memory error as the user reads it: what was asked, what was free, and what to change.

:func:`out_of_memory_message` turns PyTorch's error into one paragraph: the numbers PyTorch gives (the allocation
it tried, the GPU's free and total memory; the wording differs between torch versions, both are read) and, when
PyTorch can still say, the device's free memory now; then only the changes that apply to this run's settings
(gradient checkpointing when it is off, a smaller batch or resolution, an 8-bit optimizer or Adafactor instead of a
32-bit one, latents cached, the VAE moved off the GPU).
"""

from __future__ import annotations

import re
from typing import Any

from ..config import TrainConfig, label

_ASKED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")
_TOTAL_NEW = re.compile(r"total capacity of ([\d.]+ [KMGT]?i?B) of which ([\d.]+ [KMGT]?i?B) is free")
_TOTAL_OLD = re.compile(r"([\d.]+ [KMGT]?i?B) total capacity;.*?([\d.]+ [KMGT]?i?B) free")
_EIGHT_BIT = ("adamw8bit", "lion8bit", "adafactor")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch's CUDA out-of-memory error (a RuntimeError with that text in older versions)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and "cuda" in str(exc).lower())


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _numbers(exc: BaseException, device: Any) -> str:
    text = " ".join(str(exc).split())
    parts = []
    asked = _ASKED.search(text)
    if asked:
        parts.append(f"it asked for {asked.group(1)}")
    total = _TOTAL_NEW.search(text)
    if total:
        parts.append(f"{total.group(2)} of {total.group(1)} was free")
    else:
        old = _TOTAL_OLD.search(text)
        if old:
            parts.append(f"{old.group(2)} of {old.group(1)} was free")
    now = _free_now(device)
    if now:
        parts.append(now)
    return "; ".join(parts)


def _free_now(device: Any) -> str:
    import torch

    try:
        if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
            return ""
        free, total = torch.cuda.mem_get_info(torch.device(device))
        peak = torch.cuda.max_memory_allocated(torch.device(device))
    except Exception:  # noqa: BLE001 - the numbers are a courtesy; a broken context must not hide the message
        return ""
    return f"now {_gib(free)} of {_gib(total)} is free (this run's peak: {_gib(peak)})"


def suggestions(cfg: TrainConfig) -> list[str]:
    """The changes that lower this run's GPU memory, most effective first; only those not in effect already."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    found = []
    if not t.gradient_checkpointing:
        found.append(f"turn on gradient checkpointing: {label('train.gradient_checkpointing')} on (much less memory, "
                     "~25 % slower)")
    if t.batch_size > 1:
        found.append(f"lower the batch size: {label('train.batch_size')} {t.batch_size} → {max(1, t.batch_size // 2)}, "
                     f"and raise {label('optim.grad_accum')} to keep the effective batch")
    if d.resolution > 512:
        found.append(f"lower the resolution: {label('data.resolution')} {d.resolution} → {d.resolution - 256}")
    if o.optimizer.lower() not in _EIGHT_BIT:
        found.append(f"use an 8-bit optimizer or Adafactor: {label('optim.optimizer')} AdamW8bit or Adafactor")
    if d.cache_latents == "off":
        found.append(f"cache the latents: {label('data.cache_latents')} memory (the VAE then leaves the GPU)")
    elif not t.offload_vae:
        found.append(f"move the VAE to the CPU after caching: {label('train.offload_vae')} on")
    found.append("close other programs that use the GPU")
    return found


def out_of_memory_message(exc: BaseException, cfg: TrainConfig, device: Any = None) -> str:
    """The user's message for a CUDA out-of-memory error ``exc`` during a run of ``cfg`` on ``device``."""
    numbers = _numbers(exc, device)
    return ("Out of GPU memory" + (f" ({numbers})" if numbers else "") + ". To fit, "
            + "; ".join(suggestions(cfg)) + ". Files saved so far are kept.")
