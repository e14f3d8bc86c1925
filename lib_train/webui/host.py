"""Can the checkpoint loaded in this WebUI be trained here? If not, say why in words a user can act on.

Detection is by attributes, never by version strings (WEBUI.md §11, FORMATS.md §E.1):

- AUTOMATIC1111 and reForge keep an ldm ``LatentDiffusion`` as ``shared.sd_model`` (reForge also attaches
  ``forge_objects``): SD1 (HF CLIP text encoder) and SD2 (OpenCLIP) with cross-attention conditioning train here.
- SDXL is an sgm ``DiffusionEngine`` (it has a ``conditioner``). The base layout — text embedders CLIP ViT-L
  (transformers) and OpenCLIP ViT-bigG, then the original-size, crop and target-size embedders, a UNet taking 4
  latent channels — trains here once the SDXL record is among the trained families
  (:data:`lib_train.models.families.FAMILIES`); until then every SDXL-like model is refused as before. The refiner
  (one text embedder, an aesthetic-score input), SSD-1B (UNet blocks removed) and SDXL inpainting (9 input channels)
  are refused with the reason.
- Forge's model has ``forge_objects`` but no ldm modules; SD.Next's diffusers backend sets ``shared.native``;
  SD3, inpainting/depth/unCLIP models (conditioning key other than ``crossattn``) and other text encoders
  (Alt-Diffusion) are refused with a reason.
- Preconditions of training in place (FORMATS.md §E.2): no ``--lowvram`` (every UNet block is moved on and off the
  GPU by hooks), no FP8 weight storage, no replacement UNet (``modules.sd_unet.current_unet``), and no WebUI option
  that changes SDXL's conditioning away from the layers it is trained with ("Clip skip SDXL"). ``--medvram`` /
  ``--medvram-sdxl`` are fine: a run takes the model out of their hooks and puts them back (:mod:`.lowvram`).

:func:`classify_model` looks only at the model object (it imports nothing from the WebUI);
:func:`inspect_host` adds the WebUI's state; :func:`require_trainable_model` raises instead of reporting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import TrainerError
from ..models.families import FAMILIES, SDXL, family_from_live, labels_text

FAMILY_LABELS = {name: f.label for name, f in FAMILIES.items()}
_LOAD = f"load an {labels_text()} checkpoint to train"
_FILES_NOTE = "The LoRA files this extension writes still load there for generation."


# sgm conditioner inputs after the text embedders of SDXL base (configs/inference/sd_xl_base.yaml), in order: what
# the library's SDXL conditioning computes (lib_train.models.sdxl: pooled text ‖ these three size embeddings)
SDXL_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class HostReport:
    supported: bool
    family: str | None  # a family name (lib_train.models.families) when supported
    checkpoint: str  # the loaded checkpoint's title ("" when none)
    reason: str  # why training cannot run here ("" when supported)


def classify_model(model: Any) -> tuple[str | None, str]:
    """``(family name, "")`` for a trainable model (SD1/SD2 ldm; SDXL base sgm when that family trains), else
    ``(None, reason)``."""
    if model is None:
        return None, (f"No checkpoint is loaded. Pick an {labels_text()} checkpoint in the checkpoint list, then "
                      "start again.")
    ldm_like = (hasattr(model, "cond_stage_model") and hasattr(model, "model")
                and hasattr(model.model, "diffusion_model"))
    if getattr(model, "is_sd3", False):
        return None, f"SD3 models cannot be trained here yet; {_LOAD}."
    if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
        if SDXL.name not in FAMILIES:  # the SDXL record is not switched on for training in this version
            kind = "SSD-1B" if getattr(model, "is_ssd", False) else "SDXL (base or refiner)"
            return None, f"{kind} models cannot be trained here yet; {_LOAD}."
        reason = sgm_problem(model)
        return (None, reason) if reason else (SDXL.name, "")
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


def _unet_in_channels(model: Any) -> int | None:
    try:
        return int(model.model.diffusion_model.input_blocks[0][0].in_channels)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def sgm_problem(model: Any) -> str:
    """Why an sgm ``DiffusionEngine`` is not SDXL base's layout ("" when it is)."""
    conditioner = getattr(model, "conditioner", None)
    embedders = list(getattr(conditioner, "embedders", None) or [])
    keys = [getattr(e, "input_key", None) for e in embedders]
    base = (f"Load an SDXL base checkpoint (SDXL 1.0 or a fine-tune of it such as Pony, Illustrious or NoobAI), "
            f"or an {labels_text(' or ')} checkpoint, to train.")
    ssd = getattr(model, "is_ssd", False)
    if ssd or not hasattr(getattr(model, "model", None), "diffusion_model"):
        what = "SSD-1B (a distilled SDXL whose UNet has blocks removed)" if ssd else (
            f"The loaded sgm model ({type(model).__name__}) has no UNet at model.diffusion_model; it")
        return f"{what} cannot be trained here: its layout is not SDXL's, so its LoRA files would not match. {base}"
    channels = _unet_in_channels(model)
    if getattr(model, "is_sdxl_inpaint", False) or (channels is not None and channels != LATENT_CHANNELS):
        return ("The loaded checkpoint is an SDXL inpainting model (its UNet takes a masked image as extra input "
                f"channels, {channels} in all); only plain text-to-image SDXL checkpoints can be trained. {base}")
    if conditioner is None:
        return f"The loaded model is marked as SDXL but has no sgm conditioner (text encoders). {base}"
    text = [k for k in keys if k == "txt"]
    if "aesthetic_score" in keys or len(text) == 1:
        return ("The loaded checkpoint is the SDXL refiner (one text encoder, OpenCLIP ViT-bigG, and an aesthetic-"
                "score input); it refines other models' images and LoRAs are not trained on it. " + base)
    layout = tuple(keys[len(SDXL.text_encoders):])
    from ..models.sdxl import text_root  # torch: only reached with a live sgm model

    if keys[:len(SDXL.text_encoders)] != ["txt"] * len(SDXL.text_encoders) or layout != SDXL_SIZE_KEYS or \
            not SDXL.matches_live(text_root(conditioner)):
        names = ", ".join(f"{type(getattr(e, 'wrapped', e)).__name__}({k})" for e, k in zip(embedders, keys))
        return (f"The loaded SDXL-type model's conditioning is not SDXL base's (CLIP ViT-L and OpenCLIP ViT-bigG "
                f"text encoders, then original size, crop and target size; found: {names}). " + base)
    return ""


def clip_l_skip_problem(model: Any, opts: Any) -> str:
    """Why the WebUI's "Clip skip SDXL" option (``sdxl_clip_l_skip``) forbids training ("" when it does not).

    With the option on, the WebUI conditions SDXL with CLIP-L's ``hidden_states[-N]`` (N = the clip skip setting)
    instead of the layer sgm's config names (``layer_idx`` 11, the penultimate of 12); the library trains with the
    latter (as kohya does: clip skip does not apply to SDXL). The two are the same layer only for N = 2.
    """
    if not getattr(opts, "sdxl_clip_l_skip", False) or not hasattr(model, "conditioner"):
        return ""
    from ..models.sdxl import text_root

    clip_l = text_root(model.conditioner).embedders[0]
    n = int(getattr(opts, "CLIP_stop_at_last_layers", 1) or 1)
    layers = getattr(getattr(getattr(clip_l, "transformer", None), "config", None), "num_hidden_layers", None)
    same = (getattr(clip_l, "layer", "hidden") == "hidden" and layers is not None
            and layers + 1 - n == getattr(clip_l, "layer_idx", None))
    if same:
        return ""
    return (f"Settings → Stable Diffusion → \"Clip skip SDXL\" is on with Clip skip {n}: the WebUI then conditions "
            "SDXL's CLIP-L text encoder with another layer than the penultimate one SDXL was trained with, which is "
            "the layer this trainer trains with (clip skip does not apply to SDXL LoRAs). Turn \"Clip skip SDXL\" "
            "off (or set Clip skip to 2, which is the same layer), then start again.")


def environment_problem(model: Any) -> str:
    """Why the WebUI's current mode forbids training in place ("" when it does not)."""
    from modules import devices, sd_unet, shared

    opts = shared.cmd_opts
    if getattr(opts, "lowvram", False):
        return ("The WebUI runs with --lowvram, which keeps only one UNet block at a time on the GPU (moved in by "
                "hooks on every call); a training step needs the whole UNet there for its backward pass, more than "
                "--lowvram is meant to fit. Restart the WebUI with --medvram (or --medvram-sdxl) instead of "
                "--lowvram to train.")
    if getattr(devices, "fp8", False):
        return ("FP8 weight storage is on (Settings → Optimizations → FP8 weight); weights stored in FP8 cannot be "
                "trained through. Set it to Disable, reload the checkpoint, then start again.")
    problem = clip_l_skip_problem(model, shared.opts)
    if problem:
        return problem
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
