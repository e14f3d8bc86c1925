"""Headless model loading and the one rule for mixed precision.

:func:`load_bundle` turns ``model.checkpoint`` into a :class:`~lib_train.models.bundle.ModelBundle` on a device, as
``python -m lib_train`` trains it; :func:`bundle_from_ldm` is its second half for an ldm model built another way (the
benchmark's random-weight model). :func:`resolve_precision` is the rule for ``train.mixed_precision``: the dtype the
frozen weights are cast to and the training step's autocast computes in.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..config import TrainConfig, label
from ..errors import TrainerError
from .bundle import ModelBundle
from .families import RECORDS

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(setting: str, device: torch.device | str) -> torch.dtype | None:
    """The half dtype of ``train.mixed_precision`` on ``device``; None = fp32.

    CUDA: "fp16"/"bf16" as named, "auto" bf16 where the GPU supports it, else fp16, "no" fp32. Any other device
    trains in fp32, whatever the setting."""
    if torch.device(device).type != "cuda" or setting == "no":
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return HALF_DTYPES[setting]


def resolve_device(setting: str) -> torch.device:
    """``--device``: "auto" = the GPU if there is one, else the CPU; anything else as torch names it."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def bundle_from_ldm(model, *, family: str, device: torch.device | str, precision: str,
                    prediction: str | None = None, clip_skip: int = 1, max_chunks: int = 3,
                    checkpoint_name: str = "", checkpoint_hashes=None) -> ModelBundle:
    """An ldm ``LatentDiffusion`` made ready for training on ``device``: fused attention, the frozen UNet and text
    encoder in the half dtype of ``precision`` (the VAE and what is trained stay fp32), wrapped in a bundle."""
    from .attention import use_sdpa

    use_sdpa(model.model.diffusion_model)  # fused attention (the WebUI installs its own; headless we do)
    return _ready(model, family=family, device=device, precision=precision, prediction=prediction,
                  clip_skip=clip_skip, max_chunks=max_chunks, checkpoint_name=checkpoint_name,
                  checkpoint_hashes=checkpoint_hashes)


def _ready(model, *, family: str, device: torch.device | str, precision: str, **bundle_args) -> ModelBundle:
    half = resolve_precision(precision, device)
    if half is not None:
        model.model.to(half)  # frozen weights in half precision; LoRA/embedding stay fp32, the VAE fp32
        model.cond_stage_model.to(half)
    model.to(device)
    return ModelBundle.from_ldm(model, family=family, **bundle_args)


def bundle_from_sgm(model, *, device: torch.device | str, precision: str, prediction: str | None = None,
                    max_chunks: int = 3, checkpoint_name: str = "", checkpoint_hashes=None) -> ModelBundle:
    """An sgm ``DiffusionEngine`` (SDXL) made ready for training on ``device``: the frozen UNet and text encoders in
    the half dtype of ``precision``, wrapped in a bundle. The VAE stays fp32 (headless every family's does; SDXL's
    must never encode in fp16, :attr:`.families.Family.vae_fp16_safe`, which the bundle's encoding enforces for a
    VAE held in fp16 elsewhere), and so does what is trained. Its attention is sgm's softmax mode, which already runs
    PyTorch's fused kernel."""
    half = resolve_precision(precision, device)
    if half is not None:
        model.model.to(half)
        model.conditioner.to(half)
    model.to(device)
    return ModelBundle.from_sgm(model, prediction=prediction, max_chunks=max_chunks, checkpoint_name=checkpoint_name,
                                checkpoint_hashes=checkpoint_hashes)


def load_bundle(cfg: TrainConfig, device: torch.device | str, say: Callable[[str], None] | None = None,
                webui_dir: str | None = None) -> ModelBundle:
    """Load ``cfg.model.checkpoint`` and make it ready for training on ``device`` (see :func:`bundle_from_ldm`; an
    SDXL file: :func:`bundle_from_sgm`, sgm found in ``webui_dir`` or ``model.webui_dir`` (``--webui-dir``), else as
    :mod:`.sgm_import` finds it). ``say`` gets the progress lines ("Loading …", then the family, prediction type and
    load time)."""
    from .attention import use_sdpa
    from .checkpoint import load_checkpoint
    from .sgm_import import NOT_FOUND
    from .spec import SDXLSpec

    say = say or (lambda line: None)
    say(f"Loading {cfg.model.checkpoint} ...")
    t0 = time.perf_counter()
    webui = webui_dir or cfg.model.webui_dir or None
    try:
        model, info = load_checkpoint(cfg.model.checkpoint, prediction=cfg.model.prediction, webui_dir=webui,
                                      frozen_dtype=resolve_precision(cfg.train.mixed_precision, device))
    except TrainerError as e:
        if str(e).startswith(NOT_FOUND):  # name the setting too (the command line's flag)
            raise TrainerError(f"{cfg.model.checkpoint} is an SDXL checkpoint. {e} Or set {label('model.webui_dir')} "
                               "to the WebUI folder.") from None
        raise
    sgm = isinstance(info.spec, SDXLSpec)
    if not sgm:
        use_sdpa(model.model.diffusion_model)  # fused attention (the WebUI installs its own; headless we do)
    say(f"  {RECORDS[info.spec.family].short} model, {info.prediction}-prediction ({info.prediction_source}), "
        f"loaded in {time.perf_counter() - t0:.1f}s")
    common = dict(device=device, precision=cfg.train.mixed_precision, prediction=info.prediction,
                  max_chunks=cfg.data.max_token_length // 75, checkpoint_name=info.name,
                  checkpoint_hashes=lambda: {"legacy": info.legacy_hash(), "sha256": info.sha256()})
    if sgm:
        return bundle_from_sgm(model, **common)
    return _ready(model, family=info.spec.family, clip_skip=cfg.model.clip_skip, **common)
