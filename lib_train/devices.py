"""``--device``: the devices this machine can train on, checked before anything loads.

:func:`check_device` turns the flag's text into a ``torch.device`` or raises one :class:`TrainerError` that lists
the real choices here (``auto``, ``cpu``, ``cuda`` and ``cuda:N`` for each GPU PyTorch sees, ``mps`` on Apple
silicon): a typo such as ``gpu``, ``cuda`` on a machine where PyTorch finds no CUDA GPU, or ``cuda:3`` on a
two-GPU machine is reported in one line, with what to do, before the checkpoint is read.
"""

from __future__ import annotations

import re

from .errors import TrainerError
from .settings import quote

AUTO = "auto"
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def device_choices() -> list[str]:
    """What ``--device`` accepts on this machine, as messages list it."""
    count = _cuda_count()
    found = [AUTO, "cpu"]
    if count:
        found += ["cuda"] + [f"cuda:{i}" for i in range(count)]
    if _mps():
        found.append("mps")
    return found


def _no_cuda_reason() -> str:
    import torch

    if not torch.backends.cuda.is_built():
        return (f"this PyTorch ({torch.__version__}) is built without CUDA; install a CUDA build of PyTorch "
                "(pytorch.org, \"Get started\")")
    return ("PyTorch finds no usable NVIDIA GPU here (no GPU, no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides it); "
            "check `nvidia-smi`")


def check_device(text: str):
    """``--device`` as a ``torch.device`` ("auto": the first CUDA GPU if there is one, else the CPU; as
    :func:`lib_train.models.load.resolve_device`); TrainerError naming
    the choices when ``text`` is none of them here."""
    import torch

    value = (text or "").strip().lower()
    choices = ", ".join(device_choices())
    if value == AUTO:
        return torch.device("cuda" if _cuda_count() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    m = _CUDA.match(value)
    if m:
        count = _cuda_count()
        if not count:
            raise TrainerError(f"--device {value}: {_no_cuda_reason()}; or train on the CPU with --device cpu (slow), "
                               "or leave --device out (auto).")
        index = int(m.group(1) or 0)
        if index >= count:
            raise TrainerError(f"--device {value}: this machine has {count} CUDA GPU{'s' if count > 1 else ''} "
                               f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); choose one of {choices}.")
        return torch.device("cuda", index)
    if value == "mps":
        if not _mps():
            raise TrainerError(f"--device mps: Apple's Metal (MPS) backend is not available here; choose one of "
                               f"{choices}.")
        return torch.device("mps")
    raise TrainerError(f"--device {quote(text)} is not a device; the choices are auto (the GPU if there is one, else "
                       "the CPU), cpu, cuda or cuda:N (the GPU numbered N) and mps (Apple silicon); available here: "
                       f"{choices}.")
