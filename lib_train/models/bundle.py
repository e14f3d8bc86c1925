"""The model bundle: the one seam between the trainer and a live SD model.

A :class:`ModelBundle` wraps an ldm ``LatentDiffusion`` (SD1/SD2) or an sgm ``DiffusionEngine`` (SDXL) — the
WebUI's ``shared.sd_model`` or one loaded headless — and exposes what training needs: the UNet and text-encoder
modules (for LoRA), text conditioning, VAE encoding, the noise schedule and the prediction type. The trainer never
reaches into the model object itself.

SDXL (:meth:`ModelBundle.from_sgm`): the UNet is ``model.diffusion_model`` (sgm ``OpenAIWrapper``), the text-encoder
root is ``conditioner`` (``embedders.0`` clip_l, ``embedders.1`` clip_g; LoRA targets and conditioning take them from
there), conditioning is a dict ``{"crossattn", "vector"}`` that :meth:`predict` passes as ``context`` and ``y``.

Text conditioning comes in two halves for every family: :meth:`ModelBundle.text_outputs` (what depends on the
captions alone — the context, and SDXL's pooled output — so a run can cache it per caption) and
:meth:`ModelBundle.condition` (the UNet's conditioning from those and each image's
:class:`~.conditioning.ImageSize`; families without size conditioning ignore the sizes). The family record's
``size_conditioning`` is the one rule that decides between a context tensor and SDXL's dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .conditioning import ImageSize, TextConditioner
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
    """Captions and sizes → SDXL conditioning ``{"crossattn", "vector"}`` (:class:`.sdxl.SDXLConditioner`), in two
    halves: :meth:`text` (what depends on the captions alone: context and pooled output, cacheable per caption) and
    :meth:`with_sizes` (the vector from the pooled output and each image's :class:`.conditioning.ImageSize`).

    Without sizes the native square is used, as the WebUI conditions a plain prompt list at 1024²: original = target
    = (1024, 1024), crop (0, 0). Training passes each image's original size, applied crop and bucket (kohya's rule,
    :meth:`.conditioning.ImageSize.of_training_image`)."""

    def __init__(self, root, *, max_chunks: int = 3, native: int = SDXL.native):
        self.conditioner = SDXLConditioner(root, max_chunks=max_chunks)
        self.native = native

    @property
    def truncated_captions(self) -> int:
        return self.conditioner.truncated_captions

    @property
    def encoders(self) -> list[TextConditioner]:
        """The conditioner of each text encoder (clip_l, clip_g)."""
        return list(self.conditioner.encoders)

    def text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """``{"crossattn": [B, 77·k, 2048], "pooled": [B, 1280]}`` (under the caller's grad mode)."""
        context, pooled = self.conditioner.text(captions)
        return {"crossattn": context, "pooled": pooled}

    def with_sizes(self, text: dict[str, torch.Tensor], sizes: ImageSize | Sequence[ImageSize] | None = None) -> dict:
        """The UNet's conditioning from :meth:`text`'s outputs and one size for the batch or one per caption."""
        pooled = text["pooled"]
        if sizes is None:
            sizes = ImageSize.plain(self.native, self.native)
        if isinstance(sizes, ImageSize):
            sizes = [sizes] * pooled.shape[0]
        if len(sizes) != pooled.shape[0]:
            raise ValueError(f"{len(sizes)} image sizes for {pooled.shape[0]} captions")
        original, crop, target = ([list(getattr(s, f)) for s in sizes] for f in ImageSize._fields)
        return {"crossattn": text["crossattn"], "vector": self.conditioner.vector(pooled, original, crop, target)}

    def __call__(self, captions: list[str], sizes: ImageSize | Sequence[ImageSize] | None = None) -> dict:
        return self.with_sizes(self.text(captions), sizes)


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

    @property
    def text_conditioners(self) -> list[TextConditioner]:
        """The library's conditioner of each text encoder of the family, in the record's order (what an embedding
        run registers its vectors on): SDXL's two, or the one of SD1/SD2. A bundle whose text goes through something
        else (the WebUI's prompt wrapper in a LoRA run) has none to give."""
        encoders = self.encode_text.encoders if isinstance(self.encode_text, SDXLText) else [self.encode_text]
        if not all(isinstance(c, TextConditioner) for c in encoders):
            raise TypeError("this bundle's text conditioning is not the library's TextConditioner")
        return encoders

    # ---- text conditioning, in two halves: what depends on the captions alone (cacheable per caption), and the
    # conditioning the UNet takes, from those outputs and each image's sizes (families with size conditioning)

    def text_outputs(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The text encoders' outputs for ``captions`` (under the caller's grad mode): ``{"crossattn": [B, 77·k,
        width]}``, plus ``"pooled"`` ``[B, dim]`` for a family with size conditioning (SDXL). Row ``b`` of each
        depends on caption ``b`` alone, apart from ``crossattn``'s padding to the batch's chunk count with empty
        chunks."""
        if self.family_rules.size_conditioning:
            return self.encode_text.text(captions)
        return {"crossattn": self.encode_text(captions)}

    def condition(self, text: dict[str, torch.Tensor], sizes: ImageSize | Sequence[ImageSize] | None = None):
        """The UNet's conditioning from :meth:`text_outputs`: the context tensor, or for a family with size
        conditioning ``{"crossattn", "vector"}`` with the vector from the pooled output and ``sizes`` (one per
        caption, one for all, or None: the native square). Other families ignore ``sizes``."""
        if self.family_rules.size_conditioning:
            return self.encode_text.with_sizes(text, sizes)
        return text["crossattn"]

    def conditioning(self, captions: list[str], sizes: ImageSize | Sequence[ImageSize] | None = None):
        """:meth:`condition` of :meth:`text_outputs`: captions (and sizes) → what :meth:`predict` takes."""
        return self.condition(self.text_outputs(captions), sizes)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The UNet's output (ε or v) for noisy latents ``x_t`` at integer timesteps ``t``; ``cond`` is the context
        tensor, or SDXL's ``{"crossattn", "vector"}`` (passed as ``context`` and ``y``)."""
        if isinstance(cond, dict):
            return self.unet(x_t, t, context=cond["crossattn"], y=cond["vector"])
        return self.unet(x_t, t, context=cond)

    @property
    def vae_compute_dtype(self) -> torch.dtype:
        """The dtype the VAE computes latents in: its own, except fp16 for a family whose VAE overflows in fp16
        (SDXL, :attr:`.families.Family.vae_fp16_safe`), which computes in fp32."""
        dtype = next(self.vae.parameters()).dtype
        return torch.float32 if dtype == torch.float16 and not self.family_rules.vae_fp16_safe else dtype

    @contextmanager
    def _vae_in(self, dtype: torch.dtype, *parts: torch.nn.Module):
        """``parts`` of the VAE in ``dtype`` for the block, then back (fp16 → fp32 → fp16 is exact)."""
        own = next(self.vae.parameters()).dtype
        if dtype != own:
            for m in parts:
                m.to(dtype)
        try:
            yield
        finally:
            if dtype != own:
                for m in parts:
                    m.to(own)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``[B,3,H,W]`` → scaled latents ``[B,4,H/8,W/8]`` (the posterior mean, so cached latents
        are deterministic), computed in :attr:`vae_compute_dtype`. The mean is read from the raw modules
        (``quant_conv(encoder(x))``, first half), which ldm's and sgm's ``AutoencoderKL`` share; sgm's inference
        wrapper's ``encode`` would return a sample."""
        vae, dtype = self.vae, self.vae_compute_dtype
        with self._vae_in(dtype, vae.encoder, vae.quant_conv):
            moments = vae.quant_conv(vae.encoder(pixels.to(next(vae.parameters()).device, dtype)))
        return torch.chunk(moments, 2, dim=1)[0].float() * self.scale_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B,4,h,w]`` → images in [-1, 1] ``[B,3,8h,8w]`` (fp32, on the VAE's device), computed in
        :attr:`vae_compute_dtype`."""
        vae, dtype = self.vae, self.vae_compute_dtype
        with self._vae_in(dtype, vae.decoder, vae.post_quant_conv):
            return vae.decode(latents.to(next(vae.parameters()).device, dtype) / self.scale_factor).float()
