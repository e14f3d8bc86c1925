"""Read-only checks on the loaded model, served by the API's diagnostics routes (and used by the real-WebUI tests).

- :func:`state_dict_hash` and :func:`module_flags`: sha256 over every tensor of the loaded model (name, dtype,
  shape, bytes) and counts of its flags, the evidence that a run left it exactly as it was (DESIGN.md §3 "Train in
  place");
- :func:`compare_conditioning`: the WebUI's prompt wrapper and the headless
  :class:`~lib_train.models.conditioning.TextConditioner` on the same plain prompts with the options a run pins,
  the evidence that headless training conditions like the WebUI does (DESIGN.md §3 "Text conditioning");
  :func:`compare_sdxl_conditioning` the same for SDXL: the WebUI's ``get_learned_conditioning`` against the
  library's SDXL conditioning (context and vector ``y``) at given image sizes.

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


def _difference(webui: torch.Tensor, library: torch.Tensor) -> dict[str, Any]:
    """Both tensors' shapes, whether they are bit-identical, and their largest absolute difference (fp32)."""
    same_shape = webui.shape == library.shape
    return {"webui_shape": list(webui.shape), "library_shape": list(library.shape),
            "equal": bool(same_shape and torch.equal(webui, library)),
            "max_abs_diff": float((webui.float() - library.float()).abs().max()) if same_shape else None,
            "max_abs_value": float(webui.float().abs().max())}


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
            results.append({"prompt": prompt, **_difference(webui, library)})
    return results


def compare_sdxl_conditioning(model: Any, prompts: list[str], sizes: list[tuple[int, int]], clip_skip: int = 1
                              ) -> list[dict[str, Any]]:
    """For each (width, height) in ``sizes``, each prompt alone and all of them as one batch: the WebUI's
    ``get_learned_conditioning`` (as txt2img calls it: original = target = (height, width), crop from the options
    ``sdxl_crop_top``/``sdxl_crop_left``) against what a run conditions with — the SDXL bundle's
    :meth:`~lib_train.models.bundle.ModelBundle.conditioning` over the conditioner's raw embedders — at the same
    sizes;
    per output (``crossattn``, ``vector``) the shapes, whether they are bit-identical, and the largest difference.
    Both sides run under the WebUI's ``devices.autocast()`` and the options a run pins."""
    from modules import devices, prompt_parser, sd_hijack, shared

    from ..models.bundle import ModelBundle
    from ..models.conditioning import ImageSize
    from ..models.sdxl import text_root
    from .model import conditioning_options, pinned_options

    ours = ModelBundle.from_sgm(model, text_root=text_root(model.conditioner), max_chunks=64)
    batches = [[p] for p in prompts] + ([list(prompts)] if len(prompts) > 1 else [])
    results = []
    with pinned_options(conditioning_options(clip_skip)), torch.no_grad(), devices.autocast():
        crop = (int(shared.opts.sdxl_crop_top), int(shared.opts.sdxl_crop_left))
        for width, height in sizes:
            for batch in batches:
                webui = model.get_learned_conditioning(prompt_parser.SdConditioning(batch, width=width,
                                                                                    height=height))
                sd_hijack.model_hijack.fixes = None  # the raw encoders below must not see the wrapper's leftovers
                library = ours.conditioning(batch, ImageSize((height, width), crop, (height, width)))
                for key in ("crossattn", "vector"):
                    results.append({"prompts": batch, "size": [width, height], "key": key,
                                    **_difference(webui[key], library[key])})
    return results
