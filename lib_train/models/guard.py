"""Leave the loaded model exactly as it was found.

:class:`ModelGuard` records, for every module of a model, its ``training`` flag, any instance-level ``forward``
override and its hook dictionaries, and every parameter's ``requires_grad``; :meth:`ModelGuard.restore` puts all of
that back. The trainer uses it around a run so that success, an error, an interrupt or an out-of-memory failure all
end with the host model unchanged (the weights themselves are never written by LoRA training).
"""

from __future__ import annotations

import torch

_HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
               "_load_state_dict_pre_hooks")
_MISSING = object()


class ModelGuard:
    def __init__(self, *modules: torch.nn.Module):
        self._modules = [m for m in modules if m is not None]
        self._training: list[tuple[torch.nn.Module, bool]] = []
        self._forward: list[tuple[torch.nn.Module, object]] = []
        self._hooks: list[tuple[torch.nn.Module, str, dict]] = []
        self._grad: list[tuple[torch.nn.Parameter, bool]] = []
        seen: set[int] = set()
        for root in self._modules:
            for m in root.modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                self._training.append((m, m.training))
                self._forward.append((m, m.__dict__.get("forward", _MISSING)))
                for attr in _HOOK_ATTRS:
                    hooks = getattr(m, attr, None)
                    if hooks is not None:
                        self._hooks.append((m, attr, dict(hooks)))
            for p in root.parameters():
                self._grad.append((p, p.requires_grad))

    def restore(self) -> None:
        for m, training in self._training:
            m.training = training
        for m, fwd in self._forward:
            if fwd is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = fwd
        for m, attr, hooks in self._hooks:
            current = getattr(m, attr)
            current.clear()
            current.update(hooks)
        for p, rg in self._grad:
            p.requires_grad_(rg)
            p.grad = None

    def __enter__(self) -> "ModelGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
