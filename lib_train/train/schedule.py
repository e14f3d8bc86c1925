"""Learning-rate schedules as pure functions of the step (nanoGPT style), plus a ``LambdaLR`` adapter.

``lr_factor`` returns the multiplier applied to every parameter group's base learning rate. The names and shapes
are those of the well-known transformers/diffusers schedulers (``get_scheduler``):

1. Warm-up (every kind except ``constant``): for ``step < warmup_steps`` the factor rises linearly from 0 to 1,
   ``factor = step / warmup_steps``. As in transformers, step 0 of a warm-up has factor 0.
2. Decay: with ``progress = clamp((step - warmup_steps) / max(1, total_steps - warmup_steps), 0, 1)`` each kind
   defines ``decay(progress)`` in [0, 1]:

   - ``constant``: 1 (no warm-up: ``warmup_steps`` is ignored, like transformers' ``get_constant_schedule``)
   - ``constant_with_warmup``: 1
   - ``linear``: ``1 - progress``
   - ``cosine``: ``0.5 * (1 + cos(pi * progress))`` (one half cosine from 1 to 0; ``num_cycles`` is ignored)
   - ``cosine_with_restarts``: ``0.5 * (1 + cos(pi * ((num_cycles * progress) % 1)))`` for ``progress < 1``, else 0
     (``num_cycles`` hard restarts back to 1)
   - ``polynomial``: ``(1 - progress) ** power``

3. Floor: ``factor = min_factor + (1 - min_factor) * decay(progress)``, so every decaying kind ends at ``min_factor``
   (0 by default, which gives exactly the transformers curves). For ``polynomial`` this equals transformers'
   ``lr_end / lr_init`` with ``min_factor = lr_end / lr_init``. Steps past ``total_steps`` keep the final value.

Adaptive optimizers (DAdaptation, Prodigy) are run with ``lr = 1.0`` and the schedule still multiplies it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from lib_train.errors import TrainerError

if TYPE_CHECKING:
    import torch


def _flat(progress: float, num_cycles: int, power: float) -> float:
    return 1.0


def _linear(progress: float, num_cycles: int, power: float) -> float:
    return 1.0 - progress


def _cosine(progress: float, num_cycles: int, power: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _cosine_with_restarts(progress: float, num_cycles: int, power: float) -> float:
    if progress >= 1.0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))


def _polynomial(progress: float, num_cycles: int, power: float) -> float:
    return (1.0 - progress) ** power


# name -> (has warm-up, decay(progress, num_cycles, power))
_KINDS: dict[str, tuple[bool, Callable[[float, int, float], float]]] = {
    "constant": (False, _flat),
    "constant_with_warmup": (True, _flat),
    "linear": (True, _linear),
    "cosine": (True, _cosine),
    "cosine_with_restarts": (True, _cosine_with_restarts),
    "polynomial": (True, _polynomial),
}

SCHEDULERS: tuple[str, ...] = tuple(_KINDS)


def _check(kind: str, total_steps: int, warmup_steps: int, num_cycles: int, power: float, min_factor: float) -> None:
    """Raise :class:`TrainerError` naming the setting when the schedule cannot be built."""
    if kind not in _KINDS:
        raise TrainerError(f"Unknown learning-rate scheduler {kind!r}. Choose one of: {', '.join(SCHEDULERS)}.")
    if total_steps < 1:
        raise TrainerError(f"The schedule needs at least 1 training step (total steps is {total_steps}).")
    if warmup_steps < 0:
        raise TrainerError(f"Warm-up steps must be 0 or more (got {warmup_steps}).")
    if warmup_steps > total_steps:
        raise TrainerError(
            f"Warm-up steps ({warmup_steps}) exceed the total number of training steps ({total_steps}): "
            "lower the warm-up steps or train for more steps."
        )
    if num_cycles < 1:
        raise TrainerError(f"The number of cosine restart cycles must be 1 or more (got {num_cycles}).")
    if power <= 0:
        raise TrainerError(f"The polynomial power must be greater than 0 (got {power}).")
    if not 0.0 <= min_factor <= 1.0:
        raise TrainerError(f"The minimum learning-rate factor must be between 0 and 1 (got {min_factor}).")


def lr_factor(
    step: int,
    *,
    total_steps: int,
    kind: str,
    warmup_steps: int = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    min_factor: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based); formulas in the module docstring.

    Raises :class:`TrainerError` for an unknown ``kind`` (listing :data:`SCHEDULERS`), ``warmup_steps > total_steps``,
    ``total_steps < 1``, ``num_cycles < 1``, ``power <= 0`` or ``min_factor`` outside [0, 1].
    """
    _check(kind, total_steps, warmup_steps, num_cycles, power, min_factor)
    has_warmup, decay = _KINDS[kind]
    # 1) linear warm-up from 0 to 1
    if has_warmup and step < warmup_steps:
        return step / warmup_steps
    # 2) decay over the remaining steps, 3) lifted onto the floor min_factor
    start = warmup_steps if has_warmup else 0
    progress = min(max((step - start) / max(1, total_steps - start), 0.0), 1.0)
    return min_factor + (1.0 - min_factor) * decay(progress, num_cycles, power)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    kind: str,
    warmup_steps: int = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    min_factor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to ``optimizer``; call ``scheduler.step()`` after each optimizer step.

    The arguments are checked here, so a bad setting fails before training starts. ``state_dict()`` /
    ``load_state_dict()`` round-trip (the factor function is a ``functools.partial``, which LambdaLR can save).
    To resume: build the optimizer and this scheduler with the same settings, then load the optimizer's state
    dict, then the scheduler's.
    """
    from torch.optim.lr_scheduler import LambdaLR

    _check(kind, total_steps, warmup_steps, num_cycles, power, min_factor)
    factor = functools.partial(
        lr_factor,
        total_steps=total_steps,
        kind=kind,
        warmup_steps=warmup_steps,
        num_cycles=num_cycles,
        power=power,
        min_factor=min_factor,
    )
    return LambdaLR(optimizer, factor)
