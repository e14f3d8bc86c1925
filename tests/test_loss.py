"""Noise, timesteps, targets and loss: shapes, fp32 math, v identity, min-SNR values, offset noise, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib_train.errors import TrainerError
from lib_train.train.loss import (
    add_noise,
    ddpm_alphas_cumprod,
    diffusion_loss,
    make_noise,
    min_snr_weights,
    sample_timesteps,
    snr,
    target_for,
)

ABAR = ddpm_alphas_cumprod()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def latents(dtype=torch.float32, shape=(3, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=gen(123)).to(dtype)


def test_schedule_matches_ldm():
    util = pytest.importorskip("ldm.modules.diffusionmodules.util")
    betas = util.make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    expected = np.cumprod(1.0 - betas, axis=0)
    assert ABAR.dtype == torch.float32 and ABAR.shape == (1000,)
    torch.testing.assert_close(ABAR, torch.from_numpy(expected).float(), rtol=1e-6, atol=1e-7)


def test_schedule_known_values():
    assert ABAR[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert ABAR[-1].item() == pytest.approx(0.0046600, rel=1e-3)  # SD's final ā
    assert bool((ABAR[1:] < ABAR[:-1]).all())


def test_sample_timesteps_range_dtype_and_determinism():
    t = sample_timesteps(2000, gen(1), "cpu", min_t=10, max_t=20)
    assert t.dtype == torch.int64 and t.shape == (2000,)
    assert int(t.min()) == 10 and int(t.max()) == 19
    assert torch.equal(sample_timesteps(16, gen(5), "cpu"), sample_timesteps(16, gen(5), "cpu"))
    assert not torch.equal(sample_timesteps(16, gen(5), "cpu"), sample_timesteps(16, gen(6), "cpu"))
    full = sample_timesteps(4000, gen(2), "cpu")
    assert int(full.min()) == 0 and int(full.max()) == 999


@pytest.mark.parametrize("lo,hi", [(5, 5), (-1, 10), (20, 10)])
def test_sample_timesteps_bad_range(lo, hi):
    with pytest.raises(TrainerError, match="timestep range"):
        sample_timesteps(2, gen(), "cpu", min_t=lo, max_t=hi)


def test_make_noise_shape_dtype_determinism():
    x = latents(torch.float16)
    n = make_noise(x, gen(7))
    assert n.shape == x.shape and n.dtype == torch.float16
    assert torch.equal(n, make_noise(x, gen(7)))
    assert not torch.equal(n, make_noise(x, gen(8)))
    # without offset it is a plain standard normal draw
    torch.testing.assert_close(make_noise(latents(), gen(7)), torch.randn((3, 4, 8, 8), generator=gen(7)))


def test_noise_offset_shifts_each_channel_by_a_constant():
    x = latents(shape=(2, 4, 32, 32))
    plain = make_noise(x, gen(3))
    offset = make_noise(x, gen(3), noise_offset=0.5)
    shift = offset - plain
    # the extra term is one constant per (sample, channel) ...
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))
    # ... with the requested scale: 0.5 · N(0,1)[B, C, 1, 1] from the same generator after the full-size draw
    g = gen(3)
    torch.randn(x.shape, generator=g)
    torch.testing.assert_close(shift[:, :, 0, 0], 0.5 * torch.randn((2, 4, 1, 1), generator=g)[:, :, 0, 0])
    # so the per-channel means move far more than the ~1/32 sampling noise
    moved = (offset.mean(dim=(2, 3)) - plain.mean(dim=(2, 3))).abs()
    assert float(moved.max()) > 0.1


def test_add_noise_formula_and_fp32_math_with_fp16_latents():
    t = torch.tensor([0, 500, 999])
    x32 = latents()
    n32 = make_noise(x32, gen(4))
    abar = ABAR.double()[t].view(-1, 1, 1, 1)
    ref = abar.sqrt() * x32.double() + (1 - abar).sqrt() * n32.double()
    out32 = add_noise(x32, n32, t, ABAR)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-6, atol=1e-6)

    x16, n16 = x32.half(), n32.half()
    out16 = add_noise(x16, n16, t, ABAR)
    assert out16.dtype == torch.float16
    # computed in fp32 from the fp16 inputs, rounded to fp16 only at the end
    expected = (abar.float().sqrt() * x16.float() + (1 - abar.float()).sqrt() * n16.float()).half()
    assert torch.equal(out16, expected)


def test_half_precision_schedule_is_refused():
    x = latents()
    with pytest.raises(ValueError, match="alphas_cumprod_original"):
        add_noise(x, x, torch.tensor([1, 2, 3]), ABAR.half())


def test_eps_target_is_the_noise_in_fp32():
    x = latents(torch.float16)
    n = make_noise(x, gen(9))
    target = target_for(x, n, torch.tensor([1, 2, 3]), ABAR, "eps")
    assert target.dtype == torch.float32
    assert torch.equal(target, n.float())


def test_v_target_identities():
    t = torch.tensor([3, 400, 990])
    x0 = latents()
    eps = make_noise(x0, gen(10))
    x_t = add_noise(x0, eps, t, ABAR)
    v = target_for(x0, eps, t, ABAR, "v")
    assert v.shape == x0.shape and v.dtype == torch.float32
    a = ABAR[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.sqrt() * v + (1 - a).sqrt() * x_t, eps, rtol=1e-5, atol=1e-5)


def test_unknown_prediction():
    x = latents()
    with pytest.raises(ValueError, match="x0"):
        target_for(x, x, torch.tensor([0, 0, 0]), ABAR, "x0")
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(torch.tensor([0]), ABAR, 5.0, "sample")


KNOWN_ABAR = torch.tensor([0.5, 0.8, 0.2])  # SNR = 1, 4, 0.25
KNOWN_T = torch.tensor([0, 1, 2])


def test_snr_values():
    torch.testing.assert_close(snr(KNOWN_T, KNOWN_ABAR), torch.tensor([1.0, 4.0, 0.25]))


def test_min_snr_weights_known_values():
    # γ = 2: min(SNR, γ) = 1, 2, 0.25
    torch.testing.assert_close(min_snr_weights(KNOWN_T, KNOWN_ABAR, 2.0, "eps"), torch.tensor([1.0, 0.5, 1.0]))
    torch.testing.assert_close(min_snr_weights(KNOWN_T, KNOWN_ABAR, 2.0, "v"), torch.tensor([0.5, 0.4, 0.2]))


@pytest.mark.parametrize("gamma", [None, 0, 0.0])
def test_min_snr_disabled_gives_ones(gamma):
    w = min_snr_weights(KNOWN_T, KNOWN_ABAR, gamma, "eps")
    assert w.dtype == torch.float32 and torch.equal(w, torch.ones(3))


def test_min_snr_on_sd_schedule_is_bounded():
    t = torch.arange(1000)
    w_eps = min_snr_weights(t, ABAR, 5.0, "eps")
    w_v = min_snr_weights(t, ABAR, 5.0, "v")
    assert float(w_eps.max()) == pytest.approx(1.0) and float(w_eps[0]) == pytest.approx(5.0 / snr(t, ABAR)[0])
    assert bool((w_v <= w_eps).all()) and bool((w_v > 0).all())


def test_diffusion_loss_per_sample_mean_and_weights():
    pred = torch.zeros(2, 4, 3, 3, dtype=torch.float16)
    target = torch.cat([torch.ones(1, 4, 3, 3), 2 * torch.ones(1, 4, 3, 3)]).half()
    loss = diffusion_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(2.5)  # (1 + 4) / 2
    assert diffusion_loss(pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx(1.5)  # (1 + 2) / 2


def test_diffusion_loss_gradient_flows_in_fp32():
    pred = torch.zeros(2, 4, 2, 2, requires_grad=True)
    target = torch.ones(2, 4, 2, 2)
    diffusion_loss(pred, target).backward()
    torch.testing.assert_close(pred.grad, torch.full_like(pred, -2.0 / 32))
