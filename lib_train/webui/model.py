"""``shared.sd_model`` as a :class:`~lib_train.models.bundle.ModelBundle`, for the duration of one run.

:func:`loaded_model_bundle` prepares the loaded checkpoint for training in place (FORMATS.md §E.1-§E.4, §E.6) and
puts back what it changed, however the run ends:

- networks the built-in Lora extension merged into the weights are taken out (weights restored from its backup,
  ``loaded_networks`` emptied): the run trains on the checkpoint's own weights, and they stay that way afterwards;
  the next generation loads whatever ``<lora:…>`` its prompt names. Hypernetworks are set aside and put back;
- the options that shape text conditioning are pinned and restored: clip skip from ``model.clip_skip``
  (``CLIP_stop_at_last_layers``), emphasis "None" (brackets in captions are literal text, as in kohya), the new
  emphasis implementation, comma padding backtrack 20 (the rule the headless conditioner uses), and "Clip skip
  SDXL" off (SDXL's sample images then condition with the layers the run trains with; a value that changes the
  conditioning is refused before the run, :func:`~lib_train.webui.host.clip_l_skip_problem`);
- under ``--medvram``/``--medvram-sdxl`` the model is taken out of the WebUI's memory hooks for the run and put back
  afterwards (:mod:`.lowvram`);
- SD1/SD2 LoRA runs: text goes through the WebUI's own prompt wrapper ``sd_model.cond_stage_model(captions)``
  (chunking, clip skip, the embeddings database: a caption naming a loaded embedding gets it, as at inference).
  Embedding runs: through the library's :class:`~lib_train.models.conditioning.TextConditioner` over the raw text
  encoder (``cond_stage_model.wrapped``), which injects the vectors being trained by the WebUI's rules;
- SDXL (an sgm ``DiffusionEngine``): :meth:`ModelBundle.from_sgm` over the conditioner's raw embedders (the WebUI's
  prompt wrappers looked through, :func:`lib_train.models.sdxl.text_root`): the library's SDXL conditioning, equal
  bit for bit to the WebUI's ``get_learned_conditioning`` for plain captions (``/trainer/v1/diagnostics/
  conditioning``, tests/webui/test_sdxl_webui.py), with each image's own sizes as the trainer passes them. It runs
  under the caller's grad mode — the sgm conditioner's ``no_grad`` for embedders that are not ``is_trainable`` is
  not on that path, so those flags are left as they are. The prediction type is the one the WebUI gave the model
  (``parameterization``: v for v-prediction SDXL fine-tunes). Captions naming a WebUI embedding get the plain
  words (as in kohya);
- the UNet goes through ``sd_model.apply_model`` (the WebUI casts to the model's dtype under ``devices.autocast()``);
- the noise schedule is ``alphas_cumprod_original`` (fp32; see ``ModelBundle.alphas_cumprod``);
- every weight of the model is frozen for the run (the WebUI leaves the UNet's ``requires_grad`` on; a backward
  pass would otherwise compute and hold a gradient for each of its ~860M weights) and its flag put back afterwards;
- other flags, hooks and train/eval modes are restored by the trainer's own ``ModelGuard``; the embeddings
  database is never touched.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .. import methods
from ..config import TrainConfig
from ..errors import TrainerError
from ..models.bundle import ModelBundle, sgm_prediction
from ..models.conditioning import COMMA_BACKTRACK, TextConditioner
from ..models.sdxl import text_root
from .host import require_trainable_model
from .lowvram import out_of_lowvram_hooks

# WebUI model dtype → ``train.mixed_precision`` that computes in it (the session's autocast and grad scaler).
_PRECISION_FOR_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "no"}


class WebUIModelBundle(ModelBundle):
    """A bundle whose UNet call is the WebUI's ``apply_model`` (dtype casts and ``devices.autocast()``)."""

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if isinstance(cond, dict):  # SDXL: the WebUI's cast replaces the dict's entries in place; keep the caller's
            cond = dict(cond)
        return self.model.apply_model(x_t, t, cond)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """As :meth:`ModelBundle.encode_pixels`, with the VAE moved to the training device first when it is elsewhere
        (``--medvram`` keeps it on the CPU; the trainer moves it out again once latents are cached)."""
        vae = self.vae
        if next(vae.parameters()).device != self.device:
            vae.to(self.device)
        return super().encode_pixels(pixels)


class WebUIText:
    """Captions → ``[B, 77·k, width]`` through the WebUI's prompt wrapper, under the WebUI's autocast."""

    def __init__(self, wrapper: torch.nn.Module):
        self.wrapper = wrapper

    def __call__(self, captions: list[str]) -> torch.Tensor:
        from modules import devices

        with devices.autocast():
            return self.wrapper(list(captions))


def conditioning_options(clip_skip: int) -> dict[str, Any]:
    """The WebUI options that decide how a caption is encoded, as a run pins them."""
    return {"CLIP_stop_at_last_layers": clip_skip, "emphasis": "None", "use_old_emphasis_implementation": False,
            "comma_padding_backtrack": COMMA_BACKTRACK, "sdxl_clip_l_skip": False}


@contextmanager
def pinned_options(values: dict[str, Any]) -> Iterator[None]:
    """Set ``shared.opts`` values for the block; afterwards each key is back as it was (or absent again)."""
    from modules import shared

    data = shared.opts.data
    before = {key: (key in data, data.get(key)) for key in values}
    data.update(values)
    try:
        yield
    finally:
        for key, (present, value) in before.items():
            if present:
                data[key] = value
            else:
                data.pop(key, None)


def lora_extension() -> Any | None:
    """The built-in Lora extension's ``networks`` module, or None when that extension is off."""
    module = sys.modules.get("networks")
    needed = ("loaded_networks", "network_restore_weights_from_backup", "list_available_networks")
    return module if module is not None and all(hasattr(module, n) for n in needed) else None


def clear_loaded_networks(model: torch.nn.Module) -> list[str]:
    """Take every network the built-in Lora extension applied out of ``model`` (FORMATS.md §E.2); returns their
    names. Merged weights are copied back from the extension's backup; ``network_current_names = ()`` tells it the
    weights are the originals again."""
    networks = lora_extension()
    if networks is None:
        return []
    names = [getattr(n, "name", "?") for n in networks.loaded_networks]
    networks.loaded_networks.clear()
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "network_current_names", ()):
                networks.network_restore_weights_from_backup(module)
                module.network_current_names = ()
    return names


def match_model_precision(cfg: TrainConfig) -> str:
    """Set ``cfg.train.mixed_precision`` to compute in the loaded model's dtype; returns a note when that replaced
    an explicit setting ("" otherwise)."""
    from modules import devices

    wanted = _PRECISION_FOR_DTYPE.get(devices.dtype_unet, "auto")
    before = cfg.train.mixed_precision
    cfg.train.mixed_precision = wanted
    if before not in ("auto", wanted):
        return (f"train.mixed_precision '{before}' does not apply in the WebUI: the loaded model computes in "
                f"{str(devices.dtype_unet).replace('torch.', '')}, so the run uses '{wanted}'.")
    return ""


def _checkpoint_hashes(info: Any) -> Callable[[], dict[str, str]]:
    def hashes() -> dict[str, str]:
        if info is None:
            return {}
        if not getattr(info, "sha256", None):
            info.calculate_shorthash()  # the WebUI caches it; first time it reads the whole file
        return {k: v for k, v in (("legacy", getattr(info, "hash", None)), ("sha256", info.sha256)) if v}

    return hashes


def _prediction(own: str, cfg: TrainConfig) -> tuple[str, str]:
    """The run's prediction type and a note when ``model.prediction`` overrides the model's own ``own``."""
    prediction = own if cfg.model.prediction == "auto" else cfg.model.prediction
    note = "" if prediction == own else (f"model.prediction '{prediction}' overrides the loaded model's own "
                                         f"'{own}'; generation in the WebUI will still use '{own}'.")
    return prediction, note


def build_bundle(model: Any, family: str, cfg: TrainConfig) -> tuple[WebUIModelBundle, str]:
    """The bundle over the loaded ``model``, and a note when ``model.prediction`` overrides the model's own type."""
    info = getattr(model, "sd_checkpoint_info", None)
    where = dict(checkpoint_name=os.path.basename(getattr(info, "filename", "") or ""),
                 checkpoint_hashes=_checkpoint_hashes(info))
    injects = methods.get(cfg.method).injects_vectors
    if hasattr(model, "conditioner"):  # an sgm DiffusionEngine (SDXL base layout, checked by the host rules)
        prediction, note = _prediction(sgm_prediction(model), cfg)
        return WebUIModelBundle.from_sgm(model, prediction=prediction, text_root=text_root(model.conditioner),
                                         **where), note
    prediction, note = _prediction(getattr(model, "parameterization", "eps"), cfg)
    embedder = model.cond_stage_model.wrapped
    if injects:
        # The vectors being trained are not in the WebUI's embeddings database (which is never touched): the library's
        # conditioner over the raw encoder injects them, under the same rules as the WebUI's prompt wrapper
        # (bit-identical: tests/test_embedding_webui.py, /trainer/v1/diagnostics/conditioning).
        encode_text = TextConditioner(embedder, family, clip_skip=cfg.model.clip_skip)
    else:
        encode_text = WebUIText(model.cond_stage_model)
    bundle = WebUIModelBundle(model=model, family=family, prediction=prediction, text_encoder=embedder,
                              encode_text=encode_text, **where)
    return bundle, note


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """``requires_grad=False`` on every parameter of ``model`` for the block, each flag restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


@contextmanager
def webui_attention(model: Any, note: Callable[[str], None]) -> Iterator[str]:
    """The attention the run uses (:func:`~lib_train.models.attention.choose_attention`: the WebUI's optimisation
    where it is as fast as ours, else ours installed on the UNet for the run and taken out afterwards), named in a
    note; yields its description."""
    from modules import sd_hijack

    from ..models.attention import choose_attention, restore_attention, use_sdpa

    unet = model.model.diffusion_model
    ldm = any(type(m).__name__ == "CrossAttention" and type(m).__module__.startswith("ldm.") for m in unet.modules())
    which, what = choose_attention(getattr(sd_hijack.model_hijack, "optimization_method", None), ldm=ldm)
    installed = use_sdpa(unet) if which == "ours" else 0
    note(f"Attention: {what}.")
    try:
        yield what
    finally:
        if installed:
            restore_attention(unet)


@contextmanager
def loaded_model_bundle(cfg: TrainConfig, note: Callable[[str], None] = lambda text: None
                        ) -> Iterator[WebUIModelBundle]:
    """The loaded checkpoint, prepared for a run of ``cfg`` (see the module docstring); restores on exit.

    Raises :class:`~lib_train.errors.TrainerError` when the checkpoint or the WebUI's mode cannot be trained.
    ``note`` receives what the user should know (networks taken out, overridden settings).
    """
    from modules import sd_hijack, shared

    model, family = require_trainable_model()
    hijack = sd_hijack.model_hijack
    comments, extra_params = list(hijack.comments), dict(hijack.extra_generation_params)
    hypernetworks = shared.loaded_hypernetworks
    hijack.fixes = None  # nothing left over from a prompt wrapper call may reach the raw encoder
    unloaded = clear_loaded_networks(model)
    if unloaded:
        note(f"Took the LoRA networks applied by the last generation out of the weights: {', '.join(unloaded)}.")
    if hypernetworks:
        note("Hypernetworks are left out during training.")
    shared.loaded_hypernetworks = []
    try:
        bundle, prediction_note = build_bundle(model, family, cfg)
        if prediction_note:
            note(prediction_note)
        with pinned_options(conditioning_options(cfg.model.clip_skip)), frozen(model), \
                out_of_lowvram_hooks(model, note), webui_attention(model, note):
            yield bundle
    finally:
        shared.loaded_hypernetworks = hypernetworks
        hijack.fixes = None
        hijack.comments = comments
        hijack.extra_generation_params = extra_params
