"""The model-family table (lib_train/models/families.py): each record holds the rules the files, conditioning, LoRA
naming and estimate use, and no other module branches on a family name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model, tiny_state_dict

from lib_train import estimate
from lib_train.models.conditioning import TextConditioner
from lib_train.models.families import (DEFAULT, FAMILIES, SD1, SD2, SDXL, family_from_live, family_from_state_dict,
                                       family_name_from_metadata, family_or_default, get_family, labels_text)
from lib_train.network.naming import te_key_stems
from lib_train.train.sidecar import SD_VERSIONS

LIB = Path(__file__).resolve().parent.parent / "lib_train"

# name: (label, sidecar, ss_base_model_version eps / v, ss_v2, modelspec eps / v, native eps / v, clip skip applies)
EXPECTED = {
    "sd1": ("SD1.x", "SD1", "sd_v1", "sd_v1_v", False, "stable-diffusion-v1", "stable-diffusion-v1",
            512, 512, True),
    "sd2": ("SD2.x", "SD2", "sd_v2", "sd_v2_v", True, "stable-diffusion-v2-512", "stable-diffusion-v2-768-v",
            512, 768, False),
}


def test_the_table_holds_the_families_in_detection_order():
    assert list(FAMILIES) == ["sd1", "sd2", "sdxl"] and FAMILIES["sd1"] is SD1 and FAMILIES["sd2"] is SD2
    assert FAMILIES["sdxl"] is SDXL
    assert DEFAULT is SD1 and labels_text() == "SD1.x or SD2.x or SDXL" and labels_text("/") == "SD1.x/SD2.x/SDXL"


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_each_record_reproduces_the_file_strings(name):
    label, sidecar, base, base_v, v2, arch, arch_v, native, native_v, clip_skip = EXPECTED[name]
    fam = get_family(name)
    assert (fam.name, fam.label, fam.sidecar_sd_version, SD_VERSIONS[name]) == (name, label, sidecar, sidecar)
    assert (fam.ss_base_model_version("eps"), fam.ss_base_model_version("v")) == (base, base_v)
    assert fam.ss_v2 is v2
    assert fam.modelspec_architecture("eps") == f"{arch}/lora"
    assert fam.modelspec_architecture("v", "textual-inversion") == f"{arch_v}/textual-inversion"
    assert (fam.native_resolution("eps"), fam.native_resolution("v")) == (native, native_v)
    assert fam.clip_skip_applies is clip_skip
    assert fam.clip_skip(2) == (2 if clip_skip else 1) and fam.clip_skip(1) == 1
    assert fam.encoder_layer(2) == (2 if clip_skip else None) and fam.encoder_layer(1) is None
    assert fam.te_prefixes == ("lora_te_",) and fam.latent_scale == 0.18215 and fam.default_prediction == "eps"


def test_sdxl_files_keep_their_sidecar_version():
    assert SD_VERSIONS["sdxl"] == "SDXL"
    assert family_name_from_metadata({"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}) == "sdxl"
    assert family_name_from_metadata({"ss_v2": "True"}) == "sd2"
    assert family_name_from_metadata({"ss_v2": "False"}) == "sd1"
    assert family_name_from_metadata({}) == "unknown"


def test_lookup_names_the_known_families():
    with pytest.raises(ValueError, match="'sd1' or 'sd2' or 'sdxl'"):
        get_family("sd3")
    assert family_or_default(None) is DEFAULT and family_or_default("sd3") is DEFAULT
    assert family_or_default("sd2") is SD2 and family_or_default("sdxl") is SDXL


def test_the_estimate_reads_its_counts_from_the_records():
    """tests/test_estimate.py counts the real module layouts against these tables."""
    for name, fam in FAMILIES.items():
        assert estimate.MODEL_PARAMS[name] == {"unet": fam.params.unet, "text_encoder": fam.params.text_encoder,
                                               "vae": fam.params.vae}
        per = fam.lora_params_per_rank
        assert estimate.LORA_PARAMS_PER_RANK[name] == {"unet": per.unet, "text_encoder": per.text_encoder,
                                                       "locon_linear": per.locon_linear, "conv": per.conv}


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_detection_from_a_state_dict_and_a_live_model(name):
    assert family_from_state_dict(tiny_state_dict(name)) is FAMILIES[name]
    assert family_from_state_dict({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}) is None
    model = make_tiny_model(name)
    assert family_from_live(model.cond_stage_model) is FAMILIES[name]
    assert family_from_live(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_the_text_encoder_kind_reaches_the_tokenizer_and_the_token_table(name):
    fam = FAMILIES[name]
    embedder = make_tiny_model(name).cond_stage_model
    kind = fam.text_encoder.kind
    table = kind.token_embedding(embedder)
    assert isinstance(table, torch.nn.Embedding) and table.weight.shape == (49408, 32)
    encode, ids = kind.tokenizer(embedder)
    assert list(encode("a cat, a dog")) == [320, 2368, 267, 320, 1929] and (ids.bos, ids.eos, ids.comma) == (
        49406, 49407, 267)
    assert ids.pad == (49407 if name == "sd1" else 0)
    cond = TextConditioner(embedder, name, clip_skip=2)
    assert cond.kind is kind and cond.token_embedding is table and cond.clip_skip == fam.clip_skip(2)
    assert kind.num_layers(embedder) == kind.tiny_text["layers"]
    path = {"sd1": "transformer.text_model.encoder.layers.0.mlp.fc1", "sd2": "model.transformer.resblocks.0.mlp.c_fc"}
    assert te_key_stems(name, path[name]) == [f"{fam.te_prefixes[0]}text_model_encoder_layers_0_mlp_fc1"]


def test_no_module_outside_the_table_names_a_family():
    """The family names and comparisons on them live in families.py only (grep -rn '"sd1"\\|"sd2"' lib_train)."""
    literal = re.compile(r"""["'](sd[12]|sdxl)["']|family\s*[!=]=""")
    found = [f"{path.relative_to(LIB.parent)}:{n}: {line.strip()}"
             for path in sorted(LIB.rglob("*.py")) if path.name != "families.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if literal.search(line)]
    assert not found, "family names outside lib_train/models/families.py:\n" + "\n".join(found)
