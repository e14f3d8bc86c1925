"""Can the checkpoint loaded in this WebUI be trained here? If not, say why in words a user can act on.

Detection is by attributes, never by version strings (WEBUI.md §11, FORMATS.md §E.1):

- AUTOMATIC1111 and reForge keep an ldm ``LatentDiffusion`` as ``shared.sd_model`` (reForge also attaches
  ``forge_objects``): SD1 (HF CLIP text encoder) and SD2 (OpenCLIP) with cross-attention conditioning train here.
- Forge's model has ``forge_objects`` but no ldm modules; SD.Next's diffusers backend sets ``shared.native``;
  SDXL (``conditioner``, also refiner and SSD-1B), SD3, inpainting/depth/unCLIP models (conditioning key other than
  ``crossattn``) and other text encoders (Alt-Diffusion) are refused with a reason.
- Preconditions of training in place (FORMATS.md §E.2): no ``--lowvram``/``--medvram`` (the model's modules are moved
  by hooks), no FP8 weight storage, no replacement UNet (``modules.sd_unet.current_unet``).

:func:`classify_model` looks only at the model object (it imports nothing from the WebUI);
:func:`inspect_host` adds the WebUI's state; :func:`require_trainable_model` raises instead of reporting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import TrainerError
from ..models.families import FAMILIES, family_from_live, labels_text

FAMILY_LABELS = {name: f.label for name, f in FAMILIES.items()}
_LOAD = f"load an {labels_text()} checkpoint to train"
_FILES_NOTE = "The LoRA files this extension writes still load there for generation."


@dataclass(frozen=True)
class HostReport:
    supported: bool
    family: str | None  # a family name (lib_train.models.families) when supported
    checkpoint: str  # the loaded checkpoint's title ("" when none)
    reason: str  # why training cannot run here ("" when supported)


def classify_model(model: Any) -> tuple[str | None, str]:
    """``(family name, "")`` for a trainable SD1/SD2 ldm model, else ``(None, reason)``."""
    if model is None:
        return None, (f"No checkpoint is loaded. Pick an {labels_text()} checkpoint in the checkpoint list, then "
                      "start again.")
    ldm_like = (hasattr(model, "cond_stage_model") and hasattr(model, "model")
                and hasattr(model.model, "diffusion_model"))
    if getattr(model, "is_sd3", False):
        return None, f"SD3 models cannot be trained here yet; {_LOAD}."
    if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
        kind = "SSD-1B" if getattr(model, "is_ssd", False) else "SDXL (base or refiner)"
        return None, f"{kind} models cannot be trained here yet; {_LOAD}."
    if not ldm_like:
        if hasattr(model, "forge_objects"):
            return None, ("This is WebUI Forge: its model backend is not the ldm one this trainer needs, so training "
                          "on the loaded model is not supported on Forge yet. " + _FILES_NOTE)
        return None, (f"The loaded model ({type(model).__name__}) is not an ldm LatentDiffusion model; training "
                      f"supports AUTOMATIC1111/reForge with {labels_text()} checkpoints.")
    key = getattr(model.model, "conditioning_key", "crossattn")
    if key != "crossattn":
        return None, (f"The loaded checkpoint is an inpainting, depth or unCLIP model (conditioning '{key}'); "
                      f"only plain text-to-image {labels_text('/')} checkpoints can be trained.")
    encoder = getattr(model.cond_stage_model, "wrapped", model.cond_stage_model)
    family = family_from_live(encoder)
    if family is not None:
        return family.name, ""
    return None, (f"The loaded checkpoint's text encoder ({type(encoder).__name__}) is neither SD1's CLIP nor SD2's "
                  "OpenCLIP (e.g. Alt-Diffusion); it cannot be trained here.")


def environment_problem(model: Any) -> str:
    """Why the WebUI's current mode forbids training in place ("" when it does not)."""
    from modules import devices, sd_unet, shared

    opts = shared.cmd_opts
    if getattr(opts, "lowvram", False):
        return ("The WebUI runs with --lowvram, which moves model parts on and off the GPU during every call; "
                "training cannot run that way. Restart the WebUI without --lowvram to train.")
    if getattr(opts, "medvram", False) or getattr(model, "lowvram", False):
        return ("The WebUI runs with --medvram (model parts are moved between CPU and GPU by hooks); training "
                "cannot run that way. Restart the WebUI without --medvram to train.")
    if getattr(devices, "fp8", False):
        return ("FP8 weight storage is on (Settings → Optimizations → FP8 weight); weights stored in FP8 cannot be "
                "trained through. Set it to Disable, reload the checkpoint, then start again.")
    unet = getattr(sd_unet, "current_unet", None)
    if unet is not None:
        label = getattr(getattr(unet, "option", None), "label", type(unet).__name__)
        return (f"A replacement UNet is active ({label}, Settings → Stable Diffusion → SD Unet); it bypasses the "
                "model being trained. Set SD Unet to None, then start again.")
    return ""


def inspect_host() -> HostReport:
    """What the loaded checkpoint and the WebUI's mode allow right now."""
    from modules import shared

    model = shared.sd_model
    info = getattr(model, "sd_checkpoint_info", None)
    title = getattr(info, "title", "") or ""
    if getattr(shared, "native", False):
        return HostReport(False, None, title, "This is SD.Next with the diffusers backend: training on the loaded "
                                              "model is supported on AUTOMATIC1111 and reForge only. " + _FILES_NOTE)
    family, reason = classify_model(model)
    if family is None:
        return HostReport(False, None, title, reason)
    reason = environment_problem(model)
    return HostReport(not reason, family if not reason else None, title, reason)


def require_trainable_model() -> tuple[Any, str]:
    """``(shared.sd_model, family)`` or :class:`TrainerError` with the reason."""
    from modules import shared

    report = inspect_host()
    if not report.supported:
        raise TrainerError(report.reason)
    return shared.sd_model, report.family
