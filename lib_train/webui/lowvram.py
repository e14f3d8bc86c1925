"""Training with the WebUI's ``--medvram`` / ``--medvram-sdxl``: the model out of its memory hooks for one run.

With those flags the WebUI (``modules/lowvram.py``, ``setup_for_low_vram``) keeps the UNet wrapper
(``sd_model.model``), the text-encoder part (SDXL: ``conditioner``; SD1/SD2: the text transformer) and the VAE
(``first_stage_model``) on the CPU and moves one of them at a time to the GPU when it is called:

- a forward pre-hook ``send_me_to_gpu`` on each of those parts (``register_forward_pre_hook``);
- the VAE's ``encode``/``decode`` replaced on the instance by wrappers that do the same (they are not ``forward``);
- the module on the GPU is remembered in ``modules.lowvram.module_in_gpu``; ``sd_model.lowvram`` is True.

Training cannot run that way: every call would move a whole part across (the UNet at every step, forwards and
backward), and a text encoder called by our conditioning would push the UNet out. :func:`out_of_lowvram_hooks`
therefore, for the duration of a run:

1. records the device of every parameter and buffer of the model, ``module_in_gpu`` and each removed hook's place;
2. takes the WebUI's hooks and ``encode``/``decode`` wrappers out (recognised as functions of ``modules.lowvram``,
   whatever part they sit on), and sets ``module_in_gpu`` to None;
3. puts the UNet wrapper and the text-encoder part on the training device (``devices.device``): the UNet trains
   there, and the text encoders condition each step unless the trainer caches their outputs and moves them out.
   The VAE stays on the CPU and is moved in only while it is needed — latent caching
   (:meth:`lib_train.webui.model.WebUIModelBundle.encode_pixels`) and sample images
   (:mod:`lib_train.webui.sampling`) — the trainer moves it out again after caching;

and afterwards puts back exactly what it found: each tensor on its recorded device, each hook at its place in its
module's hook dictionary (same handle id, same order), the ``encode``/``decode`` wrappers, ``module_in_gpu``.
``sd_model.lowvram`` stays True throughout (the WebUI's own code then only calls ``send_everything_to_cpu``,
which finds nothing on the GPU to move while the hooks are out). dtypes are never changed here.

``--lowvram`` (one UNet block on the GPU at a time) stays refused (:func:`lib_train.webui.host.environment_problem`).
On a CPU-only WebUI the same hooks exist and are taken out and put back; the "devices" are then all the CPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..train.placement import Placement

WRAPPED_METHODS = ("encode", "decode")  # instance-level wrappers the WebUI puts on the VAE


def _is_lowvram_function(fn: Any, module_name: str) -> bool:
    return getattr(fn, "__module__", None) == module_name


@dataclass
class LowvramState:
    """What :func:`take_out_hooks` removed and recorded, for :func:`put_back`."""

    module_in_gpu: Any = None
    hooks: list[tuple[torch.nn.Module, list[int], dict[int, Any]]] = field(default_factory=list)
    methods: list[tuple[torch.nn.Module, str, Any]] = field(default_factory=list)
    placement: Placement | None = None  # the device of every parameter and buffer, as found

    @property
    def hook_count(self) -> int:
        return sum(len(removed) for _m, _order, removed in self.hooks)


def take_out_hooks(model: torch.nn.Module, lowvram_module: Any) -> LowvramState:
    """Remove the WebUI's lowvram hooks and wrappers from ``model`` (``lowvram_module`` is ``modules.lowvram``) and
    record what :func:`put_back` needs (every tensor's device first); the part the WebUI had on the GPU then goes
    back to the CPU through the WebUI's own ``send_everything_to_cpu``."""
    state = LowvramState(module_in_gpu=lowvram_module.module_in_gpu, placement=Placement(model))
    name = lowvram_module.__name__
    for m in model.modules():
        hooks = m._forward_pre_hooks
        removed = {k: fn for k, fn in hooks.items() if _is_lowvram_function(fn, name)}
        if removed:
            state.hooks.append((m, list(hooks.keys()), removed))
            for k in removed:
                del hooks[k]
        for method in WRAPPED_METHODS:
            fn = m.__dict__.get(method)
            if fn is not None and _is_lowvram_function(fn, name):
                state.methods.append((m, method, fn))
                del m.__dict__[method]
    lowvram_module.send_everything_to_cpu()
    return state


def put_back(state: LowvramState, lowvram_module: Any) -> None:
    """Undo :func:`take_out_hooks`: devices, hooks (same keys, same order), wrappers, ``module_in_gpu``."""
    if state.placement is not None:
        state.placement.restore()
    for m, order, removed in state.hooks:
        hooks = m._forward_pre_hooks
        current = dict(hooks)
        hooks.clear()
        for k in order:  # the original order; hooks removed meanwhile by someone else stay removed
            if k in removed:
                hooks[k] = removed[k]
            elif k in current:
                hooks[k] = current.pop(k)
        hooks.update(current)  # hooks added meanwhile (none after a run: the trainer restores its own) go last
    for m, method, fn in state.methods:
        m.__dict__[method] = fn
    lowvram_module.module_in_gpu = state.module_in_gpu


def text_encoder_part(model: Any) -> torch.nn.Module | None:
    """The module holding the model's text encoders: sgm's ``conditioner`` (SDXL), else ``cond_stage_model``."""
    return getattr(model, "conditioner", None) or getattr(model, "cond_stage_model", None)


@contextmanager
def out_of_lowvram_hooks(model: Any, note=lambda text: None) -> Iterator[bool]:
    """For a model under the WebUI's ``--medvram``/``--medvram-sdxl`` (``model.lowvram``): the hooks out and the
    UNet and text encoders on the training device for the block, everything put back afterwards (see the module
    docstring). Yields whether the model was under the hooks; a no-op otherwise."""
    if not getattr(model, "lowvram", False):
        yield False
        return
    from modules import devices
    from modules import lowvram as lowvram_module

    state = take_out_hooks(model, lowvram_module)
    try:
        note(f"The WebUI runs with --medvram/--medvram-sdxl: for this run the model is taken out of its memory "
             f"hooks ({state.hook_count} hooks, {len(state.methods)} VAE wrappers); the UNet and the text "
             f"encoders stay on {devices.device}, the VAE is moved there only to encode images and make samples. "
             "Everything is put back afterwards.")
        model.model.to(devices.device)
        part = text_encoder_part(model)
        if part is not None:
            part.to(devices.device)
        yield True
    finally:
        put_back(state, lowvram_module)
        if devices.device.type == "cuda":
            torch.cuda.empty_cache()


def hook_summary(model: torch.nn.Module) -> dict[str, Any]:
    """The WebUI's lowvram state of ``model`` (for the model-hash diagnostics): its flag, the hooks and wrappers of
    ``modules.lowvram`` by module path, and which part ``module_in_gpu`` is."""
    import sys

    lowvram_module = sys.modules.get("modules.lowvram")
    name = getattr(lowvram_module, "__name__", "modules.lowvram")
    hooks, methods = [], []
    for path, m in model.named_modules():
        for k, fn in m._forward_pre_hooks.items():
            if _is_lowvram_function(fn, name):
                hooks.append(f"{path or '<model>'}#{list(m._forward_pre_hooks).index(k)}")
        methods += [f"{path}.{meth}" for meth in WRAPPED_METHODS
                    if _is_lowvram_function(m.__dict__.get(meth), name)]
    in_gpu = getattr(lowvram_module, "module_in_gpu", None)
    in_gpu_path = next((p or "<model>" for p, m in model.named_modules() if m is in_gpu), None) if in_gpu else None
    devices_seen = sorted({str(t.device) for t in model.state_dict(keep_vars=True).values()})
    return {"lowvram": bool(getattr(model, "lowvram", False)), "hooks": hooks, "wrapped_methods": methods,
            "module_in_gpu": in_gpu_path, "devices": devices_seen}
