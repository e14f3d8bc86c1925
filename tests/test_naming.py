"""Module path → kohya stem (FORMATS.md §A.3, worked examples §A.5, counts §A.2)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from torch import nn

from full_size_models import meta_sd1_text_encoder, meta_sd2_text_encoder, meta_sd2_unet, meta_sd15_unet
from lib_train.network.naming import te_key_stems, unet_key_stem, unet_stem_is_locon

# FORMATS §A.5 SD1.5 rows 1-16 (UNet) and rows 17-18 (text encoder).
UNET_EXAMPLES = [
    ("input_blocks.1.1.proj_in", "lora_unet_down_blocks_0_attentions_0_proj_in"),
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("input_blocks.2.1.transformer_blocks.0.attn2.to_k",
     "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k"),
    ("input_blocks.4.1.transformer_blocks.0.ff.net.0.proj",
     "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj"),
    ("input_blocks.8.1.transformer_blocks.0.ff.net.2",
     "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_2"),
    ("middle_block.1.transformer_blocks.0.attn2.to_v",
     "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"),
    ("output_blocks.3.1.transformer_blocks.0.attn1.to_out.0",
     "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"),
    ("output_blocks.11.1.proj_out", "lora_unet_up_blocks_3_attentions_2_proj_out"),
    ("input_blocks.1.0.in_layers.2", "lora_unet_down_blocks_0_resnets_0_conv1"),
    ("input_blocks.4.0.skip_connection", "lora_unet_down_blocks_1_resnets_0_conv_shortcut"),
    ("input_blocks.4.0.emb_layers.1", "lora_unet_down_blocks_1_resnets_0_time_emb_proj"),
    ("input_blocks.3.0.op", "lora_unet_down_blocks_0_downsamplers_0_conv"),
    ("output_blocks.2.1.conv", "lora_unet_up_blocks_0_upsamplers_0_conv"),
    ("output_blocks.5.2.conv", "lora_unet_up_blocks_1_upsamplers_0_conv"),
    ("output_blocks.0.0.out_layers.3", "lora_unet_up_blocks_0_resnets_0_conv2"),
    ("middle_block.2.in_layers.2", "lora_unet_mid_block_resnets_1_conv1"),
]


@pytest.mark.parametrize("path, stem", UNET_EXAMPLES)
def test_unet_worked_examples(path, stem):
    assert unet_key_stem(path) == stem


def test_text_encoder_worked_examples():
    assert te_key_stems("sd1", "transformer.text_model.encoder.layers.0.self_attn.q_proj") == [
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert te_key_stems("sd1", "transformer.text_model.encoder.layers.11.mlp.fc1") == [
        "lora_te_text_model_encoder_layers_11_mlp_fc1"]
    base = "lora_te_text_model_encoder_layers_7_"
    assert te_key_stems("sd2", "model.transformer.resblocks.7.attn") == [
        base + "self_attn_q_proj", base + "self_attn_k_proj", base + "self_attn_v_proj", base + "self_attn_out_proj"]
    assert te_key_stems("sd2", "model.transformer.resblocks.22.mlp.c_fc") == [
        "lora_te_text_model_encoder_layers_22_mlp_fc1"]
    assert te_key_stems("sd2", "model.transformer.resblocks.0.mlp.c_proj") == [
        "lora_te_text_model_encoder_layers_0_mlp_fc2"]
    # A smaller tower (tests' tiny models) also drops its last resblock.
    assert te_key_stems("sd2", "model.transformer.resblocks.2.attn", num_layers=3) == []
    assert len(te_key_stems("sd2", "model.transformer.resblocks.1.attn", num_layers=3)) == 4
    assert len(te_key_stems("sd1", "transformer.text_model.encoder.layers.2.mlp.fc2", num_layers=3)) == 1


@pytest.mark.parametrize("path", [
    "input_blocks.0.0",  # conv_in
    "time_embed.0", "time_embed.2", "out.2", "out.0",
    "input_blocks.1.1.norm", "input_blocks.1.0.in_layers.0", "input_blocks.1.0.emb_layers.0",
    "input_blocks.1.1.transformer_blocks.0.norm1", "input_blocks.1.1.transformer_blocks.0.attn1",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.1",  # Dropout
    "input_blocks.3.0.op.weight", "input_blocks.3.1.op", "input_blocks.12.0.in_layers.2",
    "output_blocks.11.1.conv",  # output block 11 has no upsampler
    "output_blocks.12.0.in_layers.2", "middle_block.3.in_layers.2", "diffusion_model.input_blocks.1.1.proj_in",
])
def test_unet_untargeted_paths(path):
    assert unet_key_stem(path) is None


@pytest.mark.parametrize("family, path", [
    ("sd2", "model.transformer.resblocks.23.attn"),  # SD2 never uses layer 23 (§A.3.3)
    ("sd2", "model.transformer.resblocks.23.mlp.c_fc"),
    ("sd2", "model.transformer.resblocks.3.attn.out_proj"),  # trained through the MHA
    ("sd2", "model.token_embedding"),
    ("sd2", "transformer.text_model.encoder.layers.0.self_attn.q_proj"),
    ("sd1", "model.transformer.resblocks.0.attn"),
    ("sd1", "transformer.text_model.embeddings.token_embedding"),
    ("sd1", "transformer.text_model.encoder.layers.0.layer_norm1"),
    ("sd1", "transformer.text_model.encoder.layers.0.self_attn"),
])
def test_text_encoder_untargeted_paths(family, path):
    assert te_key_stems(family, path) == []


def test_unknown_text_encoder_family():
    with pytest.raises(ValueError, match="unknown text-encoder family 'sd3'; expected 'sd1' or 'sd2' or 'sdxl'"):
        te_key_stems("sd3", "transformer.text_model.encoder.layers.0.self_attn.q_proj")
    with pytest.raises(ValueError, match="SDXL has 2 text encoders"):  # its stems come per encoder record
        te_key_stems("sdxl", "transformer.text_model.encoder.layers.0.self_attn.q_proj")


def test_locon_classification():
    assert unet_stem_is_locon("lora_unet_down_blocks_0_resnets_0_conv1")
    assert unet_stem_is_locon("lora_unet_mid_block_resnets_1_time_emb_proj")
    assert unet_stem_is_locon("lora_unet_down_blocks_2_downsamplers_0_conv")
    assert unet_stem_is_locon("lora_unet_up_blocks_0_upsamplers_0_conv")
    assert not unet_stem_is_locon("lora_unet_down_blocks_0_attentions_0_proj_in")
    assert not unet_stem_is_locon("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v")
    assert not unet_stem_is_locon("lora_te_text_model_encoder_layers_0_mlp_fc1")


def _compvis_path(stem: str) -> str:
    """Independent inverse of FORMATS §A.3.1 (what A1111's converter does): kohya stem → ldm path with "_"."""
    s = stem[len("lora_unet_"):]
    suffix = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection"}
    if m := re.match(r"down_blocks_(\d)_(attentions|resnets)_(\d)_(.+)$", s):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        k = 1 if kind == "attentions" else 0
        return f"input_blocks_{3 * i + j + 1}_{k}_" + (rest if k else suffix[rest])
    if m := re.match(r"down_blocks_(\d)_downsamplers_0_conv$", s):
        return f"input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := re.match(r"mid_block_attentions_0_(.+)$", s):
        return f"middle_block_1_{m[1]}"
    if m := re.match(r"mid_block_resnets_(\d)_(.+)$", s):
        return f"middle_block_{2 * int(m[1])}_{suffix[m[2]]}"
    if m := re.match(r"up_blocks_(\d)_(attentions|resnets)_(\d)_(.+)$", s):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        k = 1 if kind == "attentions" else 0
        return f"output_blocks_{3 * i + j}_{k}_" + (rest if k else suffix[rest])
    if m := re.match(r"up_blocks_(\d)_upsamplers_0_conv$", s):
        i = int(m[1])
        return f"output_blocks_{3 * i + 2}_{1 if i == 0 else 2}_conv"
    raise AssertionError(f"unexpected stem {stem}")


@pytest.mark.parametrize("build", [meta_sd15_unet, meta_sd2_unet], ids=["sd15", "sd2"])
def test_full_size_unet_mapping(build):
    unet = build()
    stems = {}
    kinds = Counter()
    for path, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        stem = unet_key_stem(path)
        if stem is None:
            continue
        stems[path] = stem
        assert stem.startswith("lora_unet_") and "." not in stem
        assert _compvis_path(stem) == path.replace(".", "_")
        if not unet_stem_is_locon(stem):
            kinds["transformer"] += 1
        elif isinstance(module, nn.Linear):
            kinds["time_emb_proj"] += 1
        elif module.kernel_size == (1, 1):
            kinds["conv_shortcut"] += 1
        else:
            kinds["conv3x3"] += 1
    assert len(set(stems.values())) == len(stems)
    assert kinds == {"transformer": 192, "conv3x3": 50, "time_emb_proj": 22, "conv_shortcut": 14}
    untargeted = {p for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))} - set(stems)
    assert untargeted == {"time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2"}


@pytest.mark.parametrize("family, build, expected", [
    ("sd1", meta_sd1_text_encoder, 72), ("sd2", meta_sd2_text_encoder, 138)])
def test_full_size_text_encoder_mapping(family, build, expected):
    stems = [s for path, _ in build().named_modules() for s in te_key_stems(family, path)]
    assert len(stems) == expected == len(set(stems))
    assert all(s.startswith("lora_te_text_model_encoder_layers_") for s in stems)
    layers = {int(re.search(r"layers_(\d+)_", s)[1]) for s in stems}
    assert layers == set(range(12 if family == "sd1" else 23))
    per_layer = Counter(re.sub(r"layers_\d+_", "layers_N_", s) for s in stems)
    assert set(per_layer) == {f"lora_te_text_model_encoder_layers_N_{p}" for p in (
        "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}
