"""The model bundle: the one seam between the trainer and a live SD model.

A :class:`ModelBundle` wraps an ldm ``LatentDiffusion`` (SD1/SD2) or an sgm ``DiffusionEngine`` (SDXL) — the
WebUI's ``shared.sd_model`` or one loaded headless — and exposes what training needs: the UNet and text-encoder
modules (for LoRA), text conditioning, VAE encoding, the noise schedule and the prediction type. The trainer never
reaches into the model object itself.

SDXL (:meth:`ModelBundle.from_sgm`): the UNet is ``model.diffusion_model`` (sgm ``OpenAIWrapper``), the text-encoder
root is ``conditioner`` (``embedders.0`` clip_l, ``embedders.1`` clip_g; LoRA targets and conditioning take them from
there), conditioning is a dict ``{"crossattn", "vector"}`` that :meth:`predict` passes as ``context`` and ``y``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .conditioning import TextConditioner
from .families import RECORDS, SDXL, Family, get_family
from .sdxl import SDXLConditioner
from .sdxl import text_root as sdxl_text_root


def sgm_prediction(model) -> str:
    """"eps" or "v" of an sgm ``DiffusionEngine``: the WebUI's ``parameterization`` where it set one, else the
    denoiser's scaling (``VScaling*`` → v), as the WebUI decides it (sd_models_xl.extend_sdxl)."""
    known = getattr(model, "parameterization", None)
    if known in ("eps", "v"):
        return known
    scaling = getattr(getattr(model, "denoiser", None), "scaling", None)
    return "v" if type(scaling).__name__.startswith("VScaling") else "eps"


class SDXLText:
    """Captions (and sizes) → SDXL conditioning ``{"crossattn", "vector"}`` (:class:`.sdxl.SDXLConditioner`).

    Sizes default to what the WebUI uses for a plain prompt list: original = target = the native square, crop (0, 0).
    Training passes each image's original size, applied crop and bucket (kohya's rule)."""

    def __init__(self, root, *, max_chunks: int = 3, native: int = SDXL.native):
        self.conditioner = SDXLConditioner(root, max_chunks=max_chunks)
        self.native = native

    @property
    def truncated_captions(self) -> int:
        return self.conditioner.truncated_captions

    def __call__(self, captions: list[str], original_size=None, crop_top_left=(0, 0), target_size=None) -> dict:
        square = (self.native, self.native)
        return self.conditioner(captions, square if original_size is None else original_size, crop_top_left,
                                square if target_size is None else target_size)


@dataclass
class ModelBundle:
    model: Any  # ldm LatentDiffusion
    family: str  # a family name (families.FAMILIES)
    prediction: str  # "eps" | "v"
    text_encoder: torch.nn.Module  # the ldm embedder (FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder); SDXL: conditioner
    encode_text: Callable[..., Any]  # captions → [B, 77·k, width]; SDXL: → {"crossattn", "vector"} (SDXLText)
    checkpoint_name: str = ""
    checkpoint_hashes: Callable[[], dict[str, str]] = field(default=lambda: {})  # lazily computed (full-file hash)

    @classmethod
    def from_ldm(cls, model, *, family: str, prediction: str | None = None, clip_skip: int = 1,
                 max_chunks: int = 3, checkpoint_name: str = "", checkpoint_hashes=None) -> "ModelBundle":
        """Bundle a plain ldm model, conditioning from the raw text modules (:class:`TextConditioner`)."""
        embedder = model.cond_stage_model
        conditioner = TextConditioner(embedder, family, clip_skip=clip_skip, max_chunks=max_chunks)
        pred = prediction or getattr(model, "parameterization", "eps")
        return cls(model=model, family=family, prediction=pred, text_encoder=embedder, encode_text=conditioner,
                   checkpoint_name=checkpoint_name, checkpoint_hashes=checkpoint_hashes or (lambda: {}))

    @classmethod
    def from_sgm(cls, model, *, prediction: str | None = None, max_chunks: int = 3, text_root=None,
                 checkpoint_name: str = "", checkpoint_hashes=None) -> "ModelBundle":
        """Bundle an sgm ``DiffusionEngine`` (SDXL base layout), conditioning from the raw text modules.
        ``text_root``: what holds the unwrapped embedders at ``embedders.0``/``embedders.1`` (default
        :func:`.sdxl.text_root` of ``model.conditioner``, which also unwraps the WebUI's prompt wrappers).
        ``prediction``: overrides the model's own (:func:`sgm_prediction`)."""
        root = sdxl_text_root(model.conditioner) if text_root is None else text_root
        return cls(model=model, family=SDXL.name, prediction=prediction or sgm_prediction(model), text_encoder=root,
                   encode_text=SDXLText(root, max_chunks=max_chunks), checkpoint_name=checkpoint_name,
                   checkpoint_hashes=checkpoint_hashes or (lambda: {}))

    @property
    def family_rules(self) -> Family:
        """The record of :attr:`family` (every rule that differs between model families; a bundle of a family that
        is not switched on for training yet, SDXL, still has its record)."""
        return RECORDS[self.family] if self.family in RECORDS else get_family(self.family)

    @property
    def resolution(self) -> int:
        """The model's native resolution (modelspec)."""
        return self.family_rules.native_resolution(self.prediction)

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.model.diffusion_model

    @property
    def vae(self) -> torch.nn.Module:
        return self.model.first_stage_model

    @property
    def scale_factor(self) -> float:
        return float(self.model.scale_factor)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """fp32 ``alphas_cumprod`` on the CPU. The WebUI keeps the fp32 original as ``alphas_cumprod_original``
        (its ``alphas_cumprod`` may be downcast or replaced by an inference-only override)."""
        ac = getattr(self.model, "alphas_cumprod_original", None)
        if ac is None:
            ac = getattr(self.model, "alphas_cumprod", None)
        if ac is None:  # a plain sgm DiffusionEngine: its discrete denoiser's σ_t = sqrt((1 - ᾱ_t) / ᾱ_t)
            sigmas = self.model.denoiser.sigmas.detach().to("cpu", torch.float64)
            return (1.0 / (1.0 + sigmas ** 2)).to(torch.float32)
        return torch.as_tensor(ac).detach().to("cpu", torch.float32).clone()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The UNet's output (ε or v) for noisy latents ``x_t`` at integer timesteps ``t``; ``cond`` is the context
        tensor, or SDXL's ``{"crossattn", "vector"}`` (passed as ``context`` and ``y``)."""
        if isinstance(cond, dict):
            return self.unet(x_t, t, context=cond["crossattn"], y=cond["vector"])
        return self.unet(x_t, t, context=cond)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``[B,3,H,W]`` → scaled latents ``[B,4,H/8,W/8]`` (the posterior mean, so cached latents
        are deterministic). The mean is read from the raw modules (``quant_conv(encoder(x))``, first half), which
        ldm's and sgm's ``AutoencoderKL`` share; sgm's inference wrapper's ``encode`` would return a sample."""
        vae = self.vae
        p = next(vae.parameters())
        moments = vae.quant_conv(vae.encoder(pixels.to(p.device, p.dtype)))
        return torch.chunk(moments, 2, dim=1)[0].float() * self.scale_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B,4,h,w]`` → images in [-1, 1] ``[B,3,8h,8w]`` (fp32, on the VAE's device)."""
        vae = self.vae
        p = next(vae.parameters())
        return vae.decode(latents.to(p.device, p.dtype) / self.scale_factor).float()
