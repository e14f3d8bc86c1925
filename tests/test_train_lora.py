"""Training runs on tiny real-code models: what changes, what is saved, what is restored, resume."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import Recorder, fail_on_predict_call, make_bundle, make_images, module_flags, state_hash, tiny_config

from lib_train.network.kohya_file import read_lora_file
from lib_train.safetensors_io import data_section_sha256
from lib_train.train.events import Commands
from lib_train.train.lora_trainer import prepare_data, train_lora
from lib_train.train.state import load_state


def _run(cfg, bundle, **kw):
    return train_lora(cfg, bundle, prepare_data(cfg), **kw)


@pytest.fixture
def dataset(tmp_path):
    make_images(tmp_path / "data" / "2_thing", n=3)
    make_images(tmp_path / "data" / "1_wide", n=1, size=(192, 64), prefix="wide")
    return tmp_path


def test_run_trains_only_lora_and_restores_the_model(dataset):
    cfg = tiny_config(dataset, train__epochs=2, output__save_every_epochs=1, data__resolution=128,
                      data__max_bucket_side=256, output__trigger_words="mychar")
    bundle = make_bundle("sd1")
    before_hash, before_flags = state_hash(bundle.model), module_flags(bundle.model)
    rec = Recorder()
    result = _run(cfg, bundle, events=rec)

    assert result.status == "finished"
    prep = prepare_data(cfg)
    assert result.step == prep.total_steps == 2 * (3 * 2 + 1)  # 7 samples/epoch, batch 1, two buckets
    assert rec.steps == list(range(1, result.step + 1))
    assert all(v is not None and torch.isfinite(torch.tensor(v)) for v in rec.losses)
    assert state_hash(bundle.model) == before_hash
    assert module_flags(bundle.model) == before_flags

    out = dataset / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["tiny-000001.safetensors", "tiny.safetensors"]
    tensors, meta = read_lora_file(out / "tiny.safetensors")
    stems = {k.split(".")[0] for k in tensors}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert len(stems) == 192 + 6 * 2  # SD1 UNet (FORMATS.md §A.2) + 6 per text-encoder layer (2 in the tiny model)
    for stem in stems:
        assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= set(tensors)
    assert len(tensors) == 3 * len(stems)
    # the LoRA learned something: up weights start at zero
    assert any(tensors[k].abs().max() > 0 for k in tensors if k.endswith("lora_up.weight"))
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["sshs_model_hash"] == data_section_sha256(out / "tiny.safetensors")
    assert meta["ss_output_name"] == "tiny"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_thing": {"n_repeats": 2, "img_count": 3},
                                                   "1_wide": {"n_repeats": 1, "img_count": 1}}
    assert json.loads(meta["ss_tag_frequency"])["2_thing"]["thing"] == 3
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sorted(tuple(b["resolution"]) for b in buckets.values()) == [(128, 128), (192, 64)]
    assert meta["ss_sd_model_name"] == "tiny-sd1" and meta["ss_clip_skip"] == "None"
    assert float(meta["ss_training_started_at"]) > 0
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    _, meta1 = read_lora_file(out / "tiny-000001.safetensors")
    assert meta1["ss_output_name"] == "tiny-000001" and meta1["ss_epoch"] == "1"
    assert not list(out.glob(".tmp-*")), "temporary files left behind"
    assert json.loads((out / "tiny.json").read_text()) == {"sd version": "SD1", "activation text": "mychar"}


def test_exception_mid_step_restores_the_model(dataset):
    cfg = tiny_config(dataset)
    bundle = make_bundle("sd1")
    before_hash, before_flags = state_hash(bundle.model), module_flags(bundle.model)
    fail_on_predict_call(bundle, 3)
    with pytest.raises(RuntimeError, match="boom"):
        _run(cfg, bundle)
    assert state_hash(bundle.model) == before_hash
    assert module_flags(bundle.model) == before_flags
    assert not (dataset / "out" / "tiny.safetensors").exists()


def test_interrupt_saves_lora_and_state_and_restores_the_model(dataset):
    cfg = tiny_config(dataset)
    bundle = make_bundle("sd1")
    before_hash, before_flags = state_hash(bundle.model), module_flags(bundle.model)
    commands = Commands()
    result = _run(cfg, bundle, events=Recorder(stop_at=3, commands=commands), commands=commands)
    assert result.status == "interrupted" and result.step == 3
    assert result.final_file.endswith("tiny-step00000003.safetensors")
    state = load_state(result.state_dir)
    assert state.state.step == 3 and state.state.epoch == 0 and state.state.batch == 3
    assert not (dataset / "out" / "tiny.safetensors").exists()
    assert state_hash(bundle.model) == before_hash
    assert module_flags(bundle.model) == before_flags


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_equals_uninterrupted_run(tmp_path, accum):
    make_images(tmp_path / "data" / "3_thing", n=3)
    common = dict(train__epochs=2, optim__grad_accum=accum, output__save_precision="fp32", data__flip=True,
                  data__shuffle_caption=True, optim__scheduler="cosine", output__save_every_epochs=0)
    ref_cfg = tiny_config(tmp_path, output__name="ref", **common)
    ref = _run(ref_cfg, make_bundle("sd1"))
    ref_tensors, _ = read_lora_file(ref.final_file)

    cfg = tiny_config(tmp_path, output__name="res", **common)
    commands = Commands()
    first = _run(cfg, make_bundle("sd1"), events=Recorder(stop_at=3, commands=commands), commands=commands)
    assert first.status == "interrupted"
    resumed = _run(cfg, make_bundle("sd1"), resume=load_state(first.state_dir))
    assert resumed.status == "finished" and resumed.step == ref.step
    tensors, meta = read_lora_file(resumed.final_file)
    assert tensors.keys() == ref_tensors.keys()
    for k in tensors:
        assert torch.equal(tensors[k], ref_tensors[k]), k
    assert meta["ss_steps"] == str(ref.step)


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    make_images(tmp_path / "data" / "1_thing", n=2)
    results = []
    for flag in (False, True):
        cfg = tiny_config(tmp_path, output__name=f"gc{int(flag)}", train__gradient_checkpointing=flag,
                          output__save_precision="fp32")
        bundle = make_bundle("sd1")
        before = module_flags(bundle.model)
        results.append(read_lora_file(_run(cfg, bundle).final_file)[0])
        assert module_flags(bundle.model) == before
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-6)


def test_sd2_v_prediction_with_text_encoder_lora(tmp_path):
    make_images(tmp_path / "data" / "1_thing", n=2)
    cfg = tiny_config(tmp_path, train__min_snr_gamma=5.0, train__noise_offset=0.05, network__conv_rank=2)
    bundle = make_bundle("sd2", "v")
    before = state_hash(bundle.model)
    result = _run(cfg, bundle)
    assert state_hash(bundle.model) == before
    tensors, meta = read_lora_file(result.final_file)
    stems = {k.split(".")[0] for k in tensors}
    # SD2 text encoder: q/k/v/out + fc1/fc2 per layer, layers 0..n-2 (the last resblock is unused)
    assert any(s.endswith("_self_attn_q_proj") for s in stems)
    assert not any("encoder_layers_2_" in s for s in stems)  # the tiny SD2 text model has 3 layers
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.prediction_type"] == "v"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}


def test_unet_only_training_writes_no_text_encoder_keys(tmp_path):
    make_images(tmp_path / "data" / "1_thing", n=2)
    cfg = tiny_config(tmp_path, optim__te_lr=0.0)
    bundle = make_bundle("sd1")
    result = _run(cfg, bundle)
    tensors, _ = read_lora_file(result.final_file)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)


def test_training_lowers_the_loss_on_a_fixed_evaluation(tmp_path):
    """Overfit one image: the loss at fixed (t, noise) falls once the trained LoRA is applied."""
    from lib_train.network.lora import LoRANetwork
    from lib_train.train import loss as L

    make_images(tmp_path / "data" / "20_thing", n=1)
    cfg = tiny_config(tmp_path, optim__lr=3e-3, optim__te_lr=0.0, network__rank=8, network__alpha=8.0)
    bundle = make_bundle("sd1")
    prep = prepare_data(cfg)
    from lib_train.data.latent_cache import load_pixels

    x0 = bundle.encode_pixels(load_pixels(prep.items[0].path, prep.plans[0], False)[None]).repeat(8, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(50, 950, 8).long()
    ac = bundle.alphas_cumprod
    cond = bundle.encode_text([prep.items[0].caption] * 8)

    def eval_loss():
        with torch.no_grad():
            return float(L.diffusion_loss(bundle.predict(L.add_noise(x0, noise, t, ac), t, cond), noise))

    base = eval_loss()
    result = train_lora(cfg, bundle, prep)
    tensors, _ = read_lora_file(result.final_file)
    net = LoRANetwork.for_model(bundle.unet, None, family="sd1", rank=8, alpha=8.0, train_text_encoder=False)
    net.load_kohya_state_dict(tensors)
    with net.apply():
        trained = eval_loss()
    assert trained < 0.9 * base, (base, trained)
