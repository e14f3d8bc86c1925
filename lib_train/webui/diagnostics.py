"""Read-only checks on the loaded model, served by the API's diagnostics routes (and used by the real-WebUI tests).

- :func:`state_dict_hash` and :func:`module_flags`: sha256 over every tensor of the loaded model (name, dtype,
  shape, bytes) and counts of its flags, the evidence that a run left it exactly as it was (DESIGN.md §3 "Train in
  place");
- :func:`compare_conditioning`: the WebUI's prompt wrapper and the headless
  :class:`~lib_train.models.conditioning.TextConditioner` on the same plain prompts with the options a run pins,
  the evidence that headless training conditions like the WebUI does (DESIGN.md §3 "Text conditioning").

Callers hold the WebUI's queue lock, so no generation or run changes the model meanwhile.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..models.conditioning import TextConditioner


def state_dict_hash(model: torch.nn.Module) -> dict[str, Any]:
    """``{"sha256", "tensors", "elements"}`` of ``model.state_dict()`` in key order."""
    h = hashlib.sha256()
    count = elements = 0
    for key, value in sorted(model.state_dict().items()):
        t = value.detach()
        h.update(key.encode())
        h.update(f"{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        count += 1
        elements += t.numel()
    return {"sha256": h.hexdigest(), "tensors": count, "elements": elements}


def module_flags(model: torch.nn.Module) -> dict[str, int]:
    """Counts of what a run must also put back: parameters with ``requires_grad``, modules in training mode,
    modules with an instance-level ``forward`` (e.g. a LoRA wrapper left behind) and registered forward hooks."""
    modules = list(model.modules())
    return {
        "requires_grad": sum(1 for p in model.parameters() if p.requires_grad),
        "training_modules": sum(1 for m in modules if m.training),
        "instance_forwards": sum(1 for m in modules if "forward" in m.__dict__),
        "forward_hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules),
    }


def compare_conditioning(model: Any, family: str, prompts: list[str], clip_skip: int = 1) -> list[dict[str, Any]]:
    """For each prompt: both tensors' shapes and their largest absolute difference (fp32).

    The WebUI side runs under the options a run pins (:func:`~lib_train.webui.model.conditioning_options`).
    """
    from modules import sd_hijack

    from .model import conditioning_options, pinned_options

    ours = TextConditioner(model.cond_stage_model.wrapped, family, clip_skip=clip_skip, max_chunks=64)
    results = []
    with pinned_options(conditioning_options(clip_skip)), torch.no_grad():
        for prompt in prompts:
            webui = model.cond_stage_model([prompt]).float()
            sd_hijack.model_hijack.fixes = None  # the raw encoder below must not see the wrapper's leftovers
            library = ours([prompt]).float()
            same_shape = webui.shape == library.shape
            results.append({
                "prompt": prompt,
                "webui_shape": list(webui.shape),
                "library_shape": list(library.shape),
                "max_abs_diff": float((webui - library).abs().max()) if same_shape else None,
                "max_abs_value": float(webui.abs().max()),
            })
    return results
