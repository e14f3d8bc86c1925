"""The speed switches of a run (issue 13): which are on, and the reversible changes to the UNet they make.

Each switch is a setting in :mod:`lib_train.config` with the values ``auto`` / ``on`` / ``off``; ``auto`` is on only
where the switch was measured (or is known) to win, which :data:`AUTO_ON` holds in one place:

- ``train.compile``: ``torch.compile`` of the UNet's repeated blocks (:class:`RegionalCompile`), each ``ResBlock`` and
  ``SpatialTransformer`` instance through a per-run wrapper of its ``forward`` (removed afterwards: the loaded model
  is left exactly as it was). Compiling block by block keeps the compile time in seconds (one graph per block shape,
  not one for the whole UNet), and torch's inductor cache (``TORCHINDUCTOR_CACHE_DIR``, on by default) serves the
  next run. Where it cannot run (no triton for CUDA, e.g. Windows; no C++ compiler for the CPU; MPS; a torch without
  Dynamo for this Python) it is off with a one-line notice, and a compile that fails at the first step falls back to
  the blocks' own forward with a notice, never a traceback. ``auto`` = off everywhere until a GPU run of
  ``bench/gpu_check.py`` shows it faster: on the CPU here it is slower (bench/README.md, "Speed switches").
- ``train.channels_last``: the UNet's 4-D convolution weights in channels-last memory format for the run
  (:class:`ChannelsLast`; every weight's original strides are put back afterwards, values untouched). ``auto`` = on
  CUDA (tensor-core convolutions want NHWC); off on the CPU, where it measured slower.
- ``optim.fused``: AdamW's fused kernel (``fused=True``): ``auto`` = on CUDA, where torch's fused AdamW is its fastest
  implementation, and on the CPU where torch has it (2.4 and later; the optimizer step measured 0.5-0.6× of the
  default foreach one here). A torch without it for the device (the WebUI's 2.1 on the CPU) runs unfused.
- ``data.prefetch``: with latents not cached, the next micro-batches' images are decoded and augmented by a
  background thread while a step runs (:mod:`lib_train.data.prefetch`); ``auto`` = on a GPU whenever latents are not
  cached; off on the CPU, where the thread only takes its time from the cores the step runs on (measured no faster).

:func:`plan_speed` turns the settings into a :class:`SpeedPlan` (pure: the device and what the host offers are its
arguments), with a notice for each switch asked for but not possible here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .checkpointing import ForwardWrappers

# Where ``auto`` turns a switch on: device types ("cuda", "cpu", "mps"). Change an entry only with a measurement
# (bench/bench_train.py on the CPU, bench/gpu_check.py on a GPU) that shows the switch faster there.
AUTO_ON: dict[str, frozenset[str]] = {
    "train.compile": frozenset(),  # not measured on a GPU yet; slower on the CPU here
    "train.channels_last": frozenset({"cuda"}),
    "optim.fused": frozenset({"cuda", "cpu"}),  # the CPU: torch >= 2.4 (fused_problem finds out); 0.5-0.6x step
    # a GPU only: on the CPU the decoding thread takes its time from the same cores the step runs on
    "data.prefetch": frozenset({"cuda", "mps"}),
}

COMPILE_CLASSES = ("ResBlock", "SpatialTransformer")  # ldm's and sgm's repeated UNet blocks (sgm keeps ldm's names)
COMPILE_BACKEND = "inductor"  # torch.compile's backend ("aot_eager" compiles nothing: the tests' stand-in)
COMPILE_RECOMPILE_LIMIT = 64  # one graph per block shape: SD1.5 has ~14 ResBlock and ~7 SpatialTransformer shapes
_MISSING = object()


@dataclass(frozen=True)
class SpeedPlan:
    """What a run turns on, and the notices for switches asked for but not possible here."""

    compile: bool = False
    channels_last: bool = False
    fused: bool = False
    prefetch: bool = False
    notices: tuple[str, ...] = ()

    def summary(self) -> str:
        on = [name for name in ("compile", "channels_last", "fused", "prefetch") if getattr(self, name)]
        return ", ".join(on) if on else "none"


def switch_on(value: str, key: str, device_type: str) -> bool:
    """``on`` / ``off`` as given; ``auto`` from :data:`AUTO_ON`."""
    if value == "auto":
        return device_type in AUTO_ON[key]
    return value == "on"


def compile_problem(device_type: str, *, platform: str | None = None, has_triton: bool | None = None,
                    compiler: Any = _MISSING, dynamo_ok: bool | None = None) -> str | None:
    """Why ``torch.compile`` cannot run for ``device_type`` here, or None. The keyword arguments stand in for what
    the host offers (tests); by default they are looked up."""
    platform = sys.platform if platform is None else platform
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if dynamo_ok is None:
        try:
            import torch._dynamo as dynamo

            dynamo_ok = bool(getattr(dynamo, "is_dynamo_supported", lambda: True)())
        except Exception:  # noqa: BLE001 - an import failure of torch's compiler means: not available
            dynamo_ok = False
    if not dynamo_ok:
        return f"torch {torch.__version__} cannot compile under Python {sys.version.split()[0]}"
    if device_type == "mps":
        return "torch.compile does not train on MPS (Apple GPUs)"
    if device_type == "cuda":
        if has_triton is None:
            has_triton = importlib.util.find_spec("triton") is not None
        if not has_triton:
            where = " (Windows has no triton)" if platform == "win32" else ""
            return f"torch.compile needs the 'triton' package for CUDA, which is not installed{where}"
        return None
    if device_type == "cpu":
        if compiler is _MISSING:
            compiler = next((shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++", "cl")
                             if c and shutil.which(c)), None)
        if not compiler:
            return "torch.compile needs a C++ compiler for the CPU (g++, clang++ or MSVC's cl), and none was found"
        return None
    return f"torch.compile is not supported on {device_type}"


def fused_problem(device: torch.device | str) -> str | None:
    """Why torch's fused AdamW cannot run on ``device`` (torch before 2.4 has it for CUDA only), or None: one step
    on a one-element parameter tells."""
    device = torch.device(device)
    try:
        p = torch.nn.Parameter(torch.zeros(1, device=device))
        p.grad = torch.zeros(1, device=device)
        torch.optim.AdamW([p], lr=1e-3, fused=True).step()
    except Exception as e:  # noqa: BLE001 - any refusal means: not here
        return f"torch {torch.__version__} has no fused AdamW for {device.type} ({str(e).splitlines()[0][:120]})"
    return None


def plan_speed(cfg: Any, device: torch.device | str, *, latents_cached: bool, optimizer: str,
               problem: Callable[[str], str | None] | None = None,
               fused_problem: Callable[[torch.device | str], str | None] | None = None) -> SpeedPlan:
    """The switches of a run of ``cfg`` on ``device``: ``latents_cached`` (whether every latent is cached before
    step 1), ``optimizer`` (the one used, after a fallback), ``problem`` (:func:`compile_problem`),
    ``fused_problem`` (:func:`fused_problem`)."""
    kind = torch.device(device).type
    problem = problem or globals()["compile_problem"]
    fused_problem = fused_problem or globals()["fused_problem"]
    notices: list[str] = []

    def unless(on: bool, value: str, what: str, why: str | None) -> bool:
        """``on``, unless there is a reason (``why``) it cannot be; then off, with a notice when asked for explicitly."""
        if on and why:
            if value == "on":
                notices.append(f"{what} {why}.")
            return False
        return on

    compile_on = switch_on(cfg.train.compile, "train.compile", kind)
    compile_on = unless(compile_on, cfg.train.compile, "train.compile (--compile) is off for this run:",
                        problem(kind) if compile_on else None)
    fused = switch_on(cfg.optim.fused, "optim.fused", kind)
    fused = unless(fused, cfg.optim.fused, "optim.fused (--fused-optimizer) applies to AdamW only;",
                   f"{optimizer} runs unfused" if optimizer != "AdamW" else None)
    fused = unless(fused, cfg.optim.fused, "optim.fused (--fused-optimizer) is off for this run:",
                   fused_problem(device) if fused else None)
    prefetch = switch_on(cfg.data.prefetch, "data.prefetch", kind)
    return SpeedPlan(compile=compile_on, channels_last=switch_on(cfg.train.channels_last, "train.channels_last", kind),
                     fused=fused, prefetch=prefetch and not latents_cached, notices=tuple(notices))


# ------------------------------------------------------------------------------------------------ channels-last

class ChannelsLast:
    """The frozen 4-D weights of every ``Conv2d`` under ``root`` in channels-last format until :meth:`restore`, which
    gives each its standard (contiguous) format back: the parameter objects and their values are unchanged, only
    the strides move. Trained weights (a LoRA's) are left alone: files are written from contiguous tensors."""

    def __init__(self, root: torch.nn.Module):
        self._changed: list[torch.nn.Parameter] = []
        for m in root.modules():
            w = getattr(m, "weight", None) if isinstance(m, torch.nn.Conv2d) else None
            if w is None or w.dim() != 4 or w.requires_grad or not w.is_contiguous():
                continue
            converted = w.data.contiguous(memory_format=torch.channels_last)
            if converted.data_ptr() == w.data.data_ptr():
                continue  # both formats at once (1×1 kernels): nothing to change
            w.data = converted
            self._changed.append(w)

    @property
    def count(self) -> int:
        return len(self._changed)

    def restore(self) -> None:
        for w in reversed(self._changed):
            w.data = w.data.contiguous()
        self._changed.clear()


# ---------------------------------------------------------------------------------------------- regional compile

def _dynamo_config():
    try:
        import torch._dynamo as dynamo

        return dynamo.config
    except Exception:  # noqa: BLE001
        return None


class RegionalCompile(ForwardWrappers):
    """``torch.compile`` of each ``ResBlock`` / ``SpatialTransformer`` instance under ``root``, as a per-run wrapper
    of the instance's ``forward`` (its earlier instance ``forward``, if any, is put back by :meth:`remove`). Dynamo's
    recompile limit is raised for the run (one graph per block shape) and restored afterwards. A block whose compile
    fails runs its own forward from then on, and ``notice`` is told once."""

    def __init__(self, root: torch.nn.Module, notice: Callable[[str], None], *,
                 classes: tuple[str, ...] = COMPILE_CLASSES, backend: str | None = None):
        super().__init__()
        self._backend = backend or COMPILE_BACKEND
        self._notice = notice
        self.failed: str | None = None
        self._limits: list[tuple[str, Any]] = []
        config = _dynamo_config()
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if config is not None and hasattr(config, name):
                self._limits.append((name, getattr(config, name)))
                setattr(config, name, max(getattr(config, name), COMPILE_RECOMPILE_LIMIT * (
                    8 if name.startswith("accumulated") else 1)))
        for m in root.modules():
            if type(m).__name__ in classes:
                self._wrap(m)

    def _wrap(self, m: torch.nn.Module) -> None:
        self._install(m, self._compiled)

    def _compiled(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        compiled = torch.compile(inner, backend=self._backend, dynamic=False)

        def forward(*args, **kwargs):
            if self.failed is None:
                try:
                    return compiled(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - a compiler failure turns compile off, never ends the run
                    if not _is_compile_error(e):
                        raise
                    self.failed = _one_line(e)
                    self._notice(f"torch.compile failed and is off for the rest of this run ({self.failed}); the "
                                 "UNet runs uncompiled.")
            return inner(*args, **kwargs)

        return forward

    def remove(self) -> None:
        super().remove()
        config = _dynamo_config()
        for name, value in self._limits:
            setattr(config, name, value)
        self._limits.clear()


def _one_line(e: BaseException) -> str:
    """The root cause of a compiler failure in one line: Dynamo wraps a backend's error (``inner_exception``)."""
    while True:
        inner = getattr(e, "inner_exception", None) or e.__cause__
        if inner is None or inner is e:
            break
        e = inner
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _is_compile_error(e: Exception) -> bool:
    """An exception raised by torch's compiler stack (Dynamo, inductor, a C++/triton build), not by the model: the
    class comes from a ``torch._dynamo`` / ``torch._inductor`` module, or it is a compiler subprocess failure."""
    import subprocess

    if isinstance(e, (subprocess.CalledProcessError, FileNotFoundError)):
        return True
    return any(getattr(c, "__module__", "").startswith(("torch._dynamo", "torch._inductor", "triton"))
               for c in type(e).__mro__)
