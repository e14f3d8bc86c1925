"""Noise, timesteps, training target and loss of the DDPM objective (FORMATS.md §E.5), as pure torch functions.

Notation: ``x0`` are the scaled latents [B, C, H, W]; ``t`` are integer timesteps [B] (int64); ``ε`` is the noise;
``ā = alphas_cumprod[t]``. All schedule arithmetic happens in fp32 from an fp32 ``alphas_cumprod`` (A1111's
``sd_model.alphas_cumprod_original``), never from the fp16 buffers that ``model.half()`` leaves behind.
"""

from __future__ import annotations

import torch

from lib_train.errors import TrainerError

PREDICTIONS = ("eps", "v")


def _generator_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    """Draw on the generator's own device (a CPU generator cannot draw on CUDA), then move the result."""
    return generator.device if generator is not None else torch.device(device)


def sample_timesteps(
    batch: int,
    generator: torch.Generator | None,
    device: torch.device | str,
    *,
    min_t: int = 0,
    max_t: int = 1000,
) -> torch.Tensor:
    """Timesteps ``t ~ U{min_t, ..., max_t - 1}`` as int64 [batch] on ``device`` (§E.5: t ~ U{0..999})."""
    if not 0 <= min_t < max_t:
        raise TrainerError(
            f"The timestep range [{min_t}, {max_t}) is empty or negative: the minimum timestep must be 0 or more "
            "and smaller than the maximum timestep."
        )
    t = torch.randint(min_t, max_t, (batch,), generator=generator, device=_generator_device(generator, device))
    return t.to(device)


def make_noise(latents: torch.Tensor, generator: torch.Generator | None, *, noise_offset: float = 0.0) -> torch.Tensor:
    """Noise ``ε = N(0, I) + noise_offset · N(0, I)[B, C, 1, 1]`` with the shape, dtype and device of ``latents``.

    The second term is the "offset noise" trick (N. Guttenberg, "Diffusion with Offset Noise", Crosslabs, 2023):
    a random constant per sample and channel, which lets the model learn to change an image's mean brightness.
    Both draws are fp32 from ``generator`` (the full-size draw first), so a seeded generator gives the same noise.
    """
    device = _generator_device(generator, latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    if noise_offset:
        b, c = latents.shape[:2]
        offset = torch.randn((b, c) + (1,) * (latents.ndim - 2), generator=generator, device=device)
        noise = noise + noise_offset * offset
    return noise.to(device=latents.device, dtype=latents.dtype)


def _abar(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """ā = alphas_cumprod[t] in fp32, shaped [B, 1, ..., 1] to broadcast over a tensor of ``ndim`` dims."""
    if alphas_cumprod.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"alphas_cumprod is {alphas_cumprod.dtype}; pass the fp32 schedule (sd_model.alphas_cumprod_original), "
            "not the half-precision buffers."
        )
    abar = alphas_cumprod.to(device=t.device, dtype=torch.float32)[t]
    return abar.view(-1, *([1] * (ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion ``x_t = √ā·x0 + √(1−ā)·ε`` (DDPM, Ho et al. 2020, eq. 4).

    Computed in fp32 and returned in ``x0``'s dtype.
    """
    abar = _abar(alphas_cumprod, t, x0.ndim)
    x_t = abar.sqrt() * x0.float() + (1.0 - abar).sqrt() * noise.float()
    return x_t.to(x0.dtype)


def target_for(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str
) -> torch.Tensor:
    """The fp32 regression target: ``eps`` → ε; ``v`` → ``v = √ā·ε − √(1−ā)·x0``.

    v-prediction is from Salimans & Ho 2022 ("Progressive Distillation", arXiv:2202.00512) and matches ldm's
    ``get_v``; it satisfies ``x0 = √ā·x_t − √(1−ā)·v``. Any other ``prediction`` raises ``ValueError``.
    """
    if prediction == "eps":
        return noise.float()
    if prediction == "v":
        abar = _abar(alphas_cumprod, t, x0.ndim)
        return abar.sqrt() * noise.float() - (1.0 - abar).sqrt() * x0.float()
    raise ValueError(f"Unknown prediction type {prediction!r}; expected one of {PREDICTIONS}.")


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``SNR(t) = ā / (1 − ā)`` in fp32, shape [B]."""
    abar = _abar(alphas_cumprod, t, 1)
    return abar / (1.0 - abar)


def min_snr_weights(
    t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float | None, prediction: str
) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023, arXiv:2303.09556), fp32 [B].

    The paper weights the x0-loss by ``min(SNR, γ)``; expressed on the ε-loss this is ``min(SNR, γ) / SNR``, and on
    the v-loss ``min(SNR, γ) / (SNR + 1)``. ``gamma`` None or 0 disables the weighting (all ones).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"Unknown prediction type {prediction!r}; expected one of {PREDICTIONS}.")
    if not gamma:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    s = snr(t, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    return clipped / s if prediction == "eps" else clipped / (s + 1.0)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar fp32 loss: per-sample MSE (mean over all but the batch dim), times ``weights`` [B], batch mean."""
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean()


def ddpm_alphas_cumprod(
    num_steps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> torch.Tensor:
    """ā for the SD "scaled linear" schedule: β linear in √β from ``linear_start`` to ``linear_end``; fp32 [num_steps].

    Same as ldm ``make_beta_schedule("linear", ...)`` followed by ``cumprod(1 − β)`` (computed in fp64, as ldm does
    with numpy, then stored in fp32); SDXL's LegacyDDPMDiscretization uses the same numbers (FORMATS.md §E.1).
    """
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
