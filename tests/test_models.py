"""Architecture inference, the offline ldm builder and headless checkpoint loading."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_state_dict
from safetensors.torch import save_file

from lib_train.errors import TrainerError
from lib_train.models.build import ldm_config, tiny_spec
from lib_train.models.checkpoint import load_checkpoint, read_state_dict
from lib_train.models.spec import detect_family, infer_spec, sd2_spec, sd15_spec


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_spec_is_read_back_from_the_tiny_state_dict(family):
    assert infer_spec(tiny_state_dict(family)) == tiny_spec(family)


@pytest.mark.parametrize("spec", [sd15_spec(), sd2_spec()], ids=["sd15", "sd2"])
def test_spec_is_read_back_from_full_size_layouts(spec):
    """Build the full-size model on the meta device (no memory) and infer its spec from the state dict shapes."""
    from ldm.util import instantiate_from_config

    cfg = ldm_config(spec)
    sd = {}
    with torch.device("meta"):
        for prefix, key in (("model.diffusion_model.", "unet_config"), ("first_stage_model.", "first_stage_config"),
                            ("cond_stage_model.", "cond_stage_config")):
            module = instantiate_from_config(cfg[key])
            sd.update({prefix + k: v for k, v in module.state_dict().items()})
            if prefix == "model.diffusion_model.":
                n_unet = sum(p.numel() for p in module.parameters())
    assert infer_spec(sd) == spec
    assert 859e6 < n_unet < 866e6  # SD1.5 UNet 859.5M, SD2 UNet 865.9M parameters


def test_full_size_configs_match_the_official_inference_configs():
    c1, c2 = ldm_config(sd15_spec())["unet_config"]["params"], ldm_config(sd2_spec())["unet_config"]["params"]
    assert (c1["num_heads"], c1["context_dim"], c1["use_linear_in_transformer"]) == (8, 768, False)
    assert (c2["num_head_channels"], c2["context_dim"], c2["use_linear_in_transformer"]) == (64, 1024, True)
    assert ldm_config(sd15_spec())["scale_factor"] == 0.18215


def _with(sd, **extra):
    out = dict(sd)
    out.update(extra)
    return out


def test_family_detection_refuses_what_it_cannot_train():
    sd1 = tiny_state_dict("sd1")
    assert detect_family(sd1) == "sd1" and detect_family(tiny_state_dict("sd2")) == "sd2"
    with pytest.raises(TrainerError, match="SDXL"):
        detect_family(_with(sd1, **{"conditioner.embedders.0.x": torch.zeros(1)}))
    with pytest.raises(TrainerError, match="LoRA file"):
        detect_family({"lora_unet_a.lora_down.weight": torch.zeros(1)})
    inpaint = _with(sd1, **{"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)})
    with pytest.raises(TrainerError, match="inpainting"):
        detect_family(inpaint)


def test_load_checkpoint_round_trip_and_prediction_sources(tmp_path):
    sd = tiny_state_dict("sd2")
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    model, info = load_checkpoint(path)
    assert info.spec.family == "sd2" and info.prediction == "eps" and info.prediction_source == "default"
    for k, v in model.state_dict().items():
        if k in sd:
            assert torch.equal(v, sd[k]), k
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    model, info = load_checkpoint(path)
    assert info.prediction == "v" and model.parameterization == "v" and "yaml" in info.prediction_source
    model, info = load_checkpoint(path, prediction="eps")
    assert info.prediction == "eps" and info.prediction_source == "flag"
    assert len(info.legacy_hash()) == 8 and len(info.sha256()) == 64


def test_ckpt_pickles_are_opened_weights_only(tmp_path):
    sd = {k: v for k, v in tiny_state_dict("sd1").items()}
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": sd, "global_step": 5}, good)
    assert read_state_dict(good).keys() == sd.keys()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": sd, "x": Evil()}, bad)
    with pytest.raises(TrainerError, match="safely"):
        read_state_dict(bad)


def test_truncated_checkpoint_names_the_missing_weights(tmp_path):
    sd = {k: v for k, v in tiny_state_dict("sd1").items() if "output_blocks.11" not in k}
    path = tmp_path / "cut.safetensors"
    save_file(sd, str(path))
    with pytest.raises(TrainerError, match="output_blocks.11"):
        load_checkpoint(path)
