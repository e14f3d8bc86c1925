"""Gradient checkpointing with our own non-reentrant wrappers.

The ldm / sgm ``checkpoint`` helper only differentiates with respect to ``block.parameters()``, so LoRA parameters
kept outside the block get no gradient, and reentrant ``torch.utils.checkpoint`` cuts the graph when no input needs a
gradient (FORMATS.md §E.7). We wrap the instance ``forward`` of each transformer / residual block with
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, which recomputes the block in backward and lets
gradients reach every parameter used inside it, including LoRA's. Removal restores the original instance state.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

# Blocks worth checkpointing: ldm and sgm UNet transformer/residual blocks (sgm keeps ldm's class names), HF CLIP
# encoder layers (SD1, SDXL clip_l), open_clip resblocks (SD2, SDXL clip_g).
BLOCK_CLASSES = ("BasicTransformerBlock", "ResBlock", "CLIPEncoderLayer", "ResidualAttentionBlock")
_MISSING = object()


class ForwardWrappers:
    """Per-run wrappers of some modules' instance ``forward``: :meth:`_install` wraps one module, :meth:`remove` puts
    every instance state back exactly (an earlier instance ``forward`` is restored, none is left where there was none)."""

    def __init__(self) -> None:
        self._patched: list[tuple[torch.nn.Module, object]] = []

    def _install(self, m: torch.nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Wrap ``m``: ``make(inner)`` → the new forward, where ``inner`` is the forward ``m`` has now (bound method or
        an earlier instance override)."""
        before = m.__dict__.get("forward", _MISSING)
        inner = m.forward
        m.forward = functools.wraps(inner)(make(inner))
        self._patched.append((m, before))

    @property
    def count(self) -> int:
        return len(self._patched)

    def remove(self) -> None:
        for m, before in reversed(self._patched):
            if before is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = before
        self._patched.clear()


class GradientCheckpointing(ForwardWrappers):
    def __init__(self, *roots: torch.nn.Module | None):
        super().__init__()
        for root in roots:
            if root is None:
                continue
            for m in root.modules():
                if type(m).__name__ in BLOCK_CLASSES:
                    self._install(m, _checkpointed)


def _checkpointed(inner: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    return forward
