"""The model bundle: the one seam between the trainer and a live SD model.

A :class:`ModelBundle` wraps an ldm ``LatentDiffusion`` — the WebUI's ``shared.sd_model`` or one loaded headless —
and exposes what training needs: the UNet and text-encoder modules (for LoRA), text conditioning, VAE encoding, the
noise schedule and the prediction type. The trainer never reaches into the model object itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .conditioning import TextConditioner
from .families import Family, get_family


@dataclass
class ModelBundle:
    model: Any  # ldm LatentDiffusion
    family: str  # a family name (families.FAMILIES)
    prediction: str  # "eps" | "v"
    text_encoder: torch.nn.Module  # the ldm embedder (FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder)
    encode_text: Callable[[list[str]], torch.Tensor]  # captions → [B, 77·k, width]
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

    @property
    def family_rules(self) -> Family:
        """The record of :attr:`family` (every rule that differs between model families)."""
        return get_family(self.family)

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
            ac = self.model.alphas_cumprod
        return ac.detach().to("cpu", torch.float32).clone()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's output (ε or v) for noisy latents ``x_t`` at integer timesteps ``t``."""
        return self.unet(x_t, t, context=cond)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``[B,3,H,W]`` → scaled latents ``[B,4,H/8,W/8]`` (the posterior mean, so cached latents
        are deterministic)."""
        vae = self.vae
        p = next(vae.parameters())
        posterior = vae.encode(pixels.to(p.device, p.dtype))
        return posterior.mode().float() * self.scale_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B,4,h,w]`` → images in [-1, 1] ``[B,3,8h,8w]`` (fp32, on the VAE's device)."""
        vae = self.vae
        p = next(vae.parameters())
        return vae.decode(latents.to(p.device, p.dtype) / self.scale_factor).float()
