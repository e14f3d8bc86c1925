"""A GPU run's frozen weights are loaded straight into 16 bits: ``load_checkpoint(frozen_dtype=torch.float16)`` (what
``load_bundle`` passes on CUDA) never creates an fp32 copy of the UNet, not even for a moment, and gives bit for bit
what loading in fp32 and casting afterwards gives. Proved on the CPU with the tiny real-code models: every float32
CPU tensor an operation creates during the load is counted (a dispatch mode sees every allocation that goes through
an operator; views and in-place results are not new tensors)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_state_dict
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lib_train.errors import TrainerError
from lib_train.models.build import build_latent_diffusion, tiny_spec
from lib_train.models.checkpoint import load_checkpoint
from lib_train.models.load import resolve_precision


class NewFloat32(TorchDispatchMode):
    """Counts the elements of every new float32 CPU tensor an operator returns (not views, not results that share an
    input's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
            for t in tree_flatten(out)[0]:
                if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
                        and t.untyped_storage().data_ptr() not in inputs):
                    self.elements += t.numel()
        return out


def _fp16_file(tmp_path, family: str):
    """The tiny model's weights as an fp16 .safetensors file (as SD checkpoints are shipped)."""
    sd = {k: v.half() if v.is_floating_point() else v for k, v in tiny_state_dict(family).items()}
    path = tmp_path / f"{family}-fp16.safetensors"
    save_file(sd, str(path))
    return path


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_16_bit_load_never_makes_an_fp32_unet(tmp_path, family):
    path = _fp16_file(tmp_path, family)
    half = NewFloat32()
    with half:
        model, _ = load_checkpoint(path, frozen_dtype=torch.float16)
    unet, te, vae = model.model, model.cond_stage_model, model.first_stage_model
    assert {p.dtype for p in unet.parameters()} == {p.dtype for p in te.parameters()} == {torch.float16}
    assert {p.dtype for p in vae.parameters()} == {torch.float32}  # the VAE stays fp32
    # The only float32 tensors made are the VAE's weights and the text encoder's (built, then cast before its
    # weights are copied in) and the noise schedule: fewer elements in all than the UNet has, so no fp32 copy of
    # the UNet existed at any moment.
    schedule = sum(b.numel() for n, b in model.named_buffers(recurse=False))
    assert half.elements <= _numel(vae) + _numel(te) + 20 * schedule < _numel(unet)
    full = NewFloat32()  # the same count for an fp32 load sees the UNet: the check can fail
    with full:
        ref, _ = load_checkpoint(path)
    assert full.elements >= _numel(ref.model) + _numel(ref.first_stage_model)
    # bit for bit what loading in fp32 and casting gives
    ref.model.to(torch.float16)
    ref.cond_stage_model.to(torch.float16)
    mine = model.state_dict()
    for k, v in ref.state_dict().items():
        assert mine[k].dtype == v.dtype and torch.equal(mine[k], v), k


def test_an_unfilled_build_allocates_nothing_for_the_unet_and_vae():
    model = build_latent_diffusion(tiny_spec("sd1"), init=False)
    assert all(p.is_meta for p in model.model.parameters())
    assert all(p.is_meta for p in model.first_stage_model.parameters())
    assert not any(p.is_meta for p in model.cond_stage_model.parameters())


def test_cuda_asks_for_16_bit_frozen_weights_and_the_cpu_for_fp32():
    """The dtype load_bundle passes as ``frozen_dtype``: fp16/bf16 on CUDA (as set, or "auto"), None (fp32) on the
    CPU whatever the setting."""
    assert resolve_precision("fp16", "cuda") is torch.float16
    assert resolve_precision("bf16", "cuda") is torch.bfloat16
    assert resolve_precision("no", "cuda") is None
    assert all(resolve_precision(s, "cpu") is None for s in ("auto", "fp16", "bf16", "no"))


def test_a_16_bit_load_still_refuses_a_truncated_or_misshapen_file(tmp_path):
    sd = {k: v.half() if v.is_floating_point() else v for k, v in tiny_state_dict("sd1").items()
          if "output_blocks.11" not in k}
    path = tmp_path / "cut.safetensors"
    save_file(sd, str(path))
    with pytest.raises(TrainerError, match="missing weights.*output_blocks.11"):
        load_checkpoint(path, frozen_dtype=torch.float16)
    sd = dict(tiny_state_dict("sd1"))
    key = "first_stage_model.encoder.conv_in.bias"
    sd[key] = torch.zeros(sd[key].shape[0] + 1)
    save_file(sd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(TrainerError, match="another shape.*conv_in.bias"):
        load_checkpoint(tmp_path / "odd.safetensors", frozen_dtype=torch.float16)


def test_the_v_prediction_probe_runs_on_16_bit_weights(tmp_path, monkeypatch):
    """SD2 full-size files without a yaml or marker are probed (the WebUI's heuristic); with the UNet already in 16
    bits the probe computes in them and decides as in fp32."""
    from lib_train.models import checkpoint

    path = _fp16_file(tmp_path, "sd2")
    calls = []
    real = checkpoint._probe_v_prediction

    def probe(unet, context_dim):
        calls.append(next(unet.parameters()).dtype)
        return real(unet, context_dim)

    monkeypatch.setattr(checkpoint, "_probe_v_prediction", probe)
    monkeypatch.setattr(type(checkpoint.infer_spec(tiny_state_dict("sd2"))), "is_full_size", property(lambda s: True))
    half, info_half = load_checkpoint(path, frozen_dtype=torch.float16)
    full, info_full = load_checkpoint(path)
    assert calls == [torch.float16, torch.float32]
    assert info_half.prediction == info_full.prediction and info_half.prediction_source == info_full.prediction_source


def test_an_sdxl_16_bit_load_never_makes_an_fp32_unet(tmp_path):
    """The same for SDXL (sgm tier: sgm from the WebUI's checkout): the UNet is made in 16 bits from the file."""
    from sdxl_models import sgm_root, tiny_sgm_sdxl

    sgm_root()
    from lib_train.models.sdxl_load import REQUIRED

    original = tiny_sgm_sdxl(seed=11)
    sd = {k: (t.half() if t.is_floating_point() else t).contiguous() for k, t in original.state_dict().items()
          if k.startswith(REQUIRED)}
    path = tmp_path / "tiny-sdxl-fp16.safetensors"
    save_file(sd, str(path))
    half = NewFloat32()
    with half:
        model, _ = load_checkpoint(path, frozen_dtype=torch.float16)
    assert {p.dtype for p in model.model.parameters()} == {torch.float16}
    assert {p.dtype for p in model.first_stage_model.parameters()} == {torch.float32}
    full = NewFloat32()
    with full:
        ref, _ = load_checkpoint(path)
    # the fp32 tensors made are the VAE's and the text encoders' (built, then cast); the fp32 load makes the UNet too
    assert half.elements <= 1.01 * (_numel(model.first_stage_model) + _numel(model.conditioner))
    assert full.elements - half.elements >= _numel(ref.model)
