"""SDXL LoRA naming (FORMATS §A.3.2-3, §A.5) on full-size layouts: the UNet's modules derived from the architecture
rules (CI) and built from sgm's own classes (sgm tier), the text encoders built on the meta device from transformers
and open_clip; counts per WEBUI.md §8b (what the WebUI's Lora loader matches for kohya's SDXL LoRA)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from sdxl_models import Target, meta_sdxl_text_encoders, meta_sgm_unet, sdxl_unet_targets
from torch import nn

from lib_train.models.families import SD1, SDXL
from lib_train.network.lora import LoRANetwork
from lib_train.network.naming import encoder_key_stems, sgm_unet_key_stem, unet_stem, unet_stem_is_locon

# FORMATS §A.5, SDXL table rows 1-11: sgm module → kohya stem
WORKED = [
    ("input_blocks.4.1.proj_in", "lora_unet_input_blocks_4_1_proj_in"),
    ("input_blocks.4.1.transformer_blocks.1.attn1.to_q", "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"),
    ("input_blocks.7.1.transformer_blocks.9.attn2.to_k", "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k"),
    ("middle_block.1.transformer_blocks.5.ff.net.0.proj",
     "lora_unet_middle_block_1_transformer_blocks_5_ff_net_0_proj"),
    ("output_blocks.0.1.transformer_blocks.0.attn1.to_out.0",
     "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0"),
    ("output_blocks.5.1.proj_out", "lora_unet_output_blocks_5_1_proj_out"),
    ("input_blocks.1.0.in_layers.2", "lora_unet_input_blocks_1_0_in_layers_2"),
    ("input_blocks.4.0.skip_connection", "lora_unet_input_blocks_4_0_skip_connection"),
    ("input_blocks.4.0.emb_layers.1", "lora_unet_input_blocks_4_0_emb_layers_1"),
    ("input_blocks.3.0.op", "lora_unet_input_blocks_3_0_op"),
    ("output_blocks.2.2.conv", "lora_unet_output_blocks_2_2_conv"),
]


@pytest.mark.parametrize("path, stem", WORKED)
def test_worked_examples(path, stem):
    assert sgm_unet_key_stem(path) == unet_stem(SDXL, path) == stem
    assert unet_stem_is_locon(stem) == path.endswith(("in_layers.2", "skip_connection", "emb_layers.1", "op", "conv"))


@pytest.mark.parametrize("path", ["input_blocks.0.0", "time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2",
                                  "out.2", "input_blocks.4.1.norm", "input_blocks.4.1.transformer_blocks.0.norm1",
                                  "input_blocks.4.1.transformer_blocks.0.attn1", "input_blocks.1.0.in_layers.0"])
def test_untargeted_paths(path):
    assert sgm_unet_key_stem(path) is None


def _kinds(targets: list[Target]) -> tuple[dict, Counter]:
    stems, kinds = {}, Counter()
    for t in targets:
        stem = sgm_unet_key_stem(t.path)
        if stem is None:
            continue
        stems[t.path] = stem
        if not unet_stem_is_locon(stem):
            kinds["transformer"] += 1
        elif t.kind == "linear":
            kinds["emb_layers"] += 1
        elif t.kernel == 1:
            kinds["skip_connection"] += 1
        else:
            kinds["conv3x3"] += 1
    return stems, kinds


def test_full_size_unet_names_and_counts_from_the_layout_rules():
    targets = list(sdxl_unet_targets())
    stems, kinds = _kinds(targets)
    assert len(stems) == len(targets) == len(set(stems.values()))  # every child of a block is a (LoCon) target
    assert all(s == "lora_unet_" + p.replace(".", "_") for p, s in stems.items())
    # 70 transformer blocks × 10 + 11 transformers × (proj_in, proj_out); LoCon: 17 ResBlocks × 2 + 2 op + 2 conv
    assert kinds == {"transformer": 722, "conv3x3": 38, "emb_layers": 17, "skip_connection": 11}
    # the estimate's LoRA parameters per unit of rank (Linear/1x1: in + out; 3x3: 9·in + out)
    per = Counter()
    for t in targets:
        group = ("unet" if not unet_stem_is_locon(stems[t.path]) else "conv" if t.kernel == 3 else "locon_linear")
        per[group] += t.kernel * t.kernel * t.c_in + t.c_out
    lp = SDXL.lora_params_per_rank
    assert dict(per) == {"unet": lp.unet, "locon_linear": lp.locon_linear, "conv": lp.conv}


def test_full_size_text_encoder_names_and_counts():
    root = meta_sdxl_text_encoders()
    counts, per_rank = {}, 0
    for encoder in SDXL.text_encoders:
        embedder = encoder.module(root)
        n = encoder.kind.num_layers(embedder)
        stems = [s for path, _ in embedder.named_modules() for s in encoder_key_stems(encoder, path, n)]
        assert len(stems) == len(set(stems))
        layers = {int(re.search(r"layers_(\d+)_", s)[1]) for s in stems}
        assert layers == set(range(n))  # clip_l 0..11, clip_g 0..31 (kohya writes the last layers too)
        per_layer = Counter(re.sub(r"layers_\d+_", "layers_N_", s) for s in stems)
        assert set(per_layer) == {f"{encoder.lora_prefix}text_model_encoder_layers_N_{p}" for p in (
            "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}
        counts[encoder.lora_prefix] = len(stems)
    assert counts == {"lora_te1_": 72, "lora_te2_": 192}
    # FORMATS §A.5 rows 12-15
    clip_l, clip_g = SDXL.text_encoders
    assert encoder_key_stems(clip_l, "transformer.text_model.encoder.layers.3.self_attn.k_proj", 12) == [
        "lora_te1_text_model_encoder_layers_3_self_attn_k_proj"]
    assert encoder_key_stems(clip_g, "model.transformer.resblocks.7.attn", 32) == [
        f"lora_te2_text_model_encoder_layers_7_self_attn_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert encoder_key_stems(clip_g, "model.transformer.resblocks.31.mlp.c_fc", 32) == [
        "lora_te2_text_model_encoder_layers_31_mlp_fc1"]
    assert encoder_key_stems(clip_g, "model.transformer.resblocks.31.mlp.c_proj", 32) == [
        "lora_te2_text_model_encoder_layers_31_mlp_fc2"]
    assert encoder_key_stems(clip_g, "model.text_projection", 32) == []
    for encoder, module in zip(SDXL.text_encoders, root.embedders):
        per_rank += sum(2 * m.embed_dim * 4 if isinstance(m, nn.MultiheadAttention) else m.in_features + m.out_features
                        for path, m in module.named_modules() if encoder_key_stems(encoder, path, 32 if encoder.key
                                                                                   == "clip_g" else 12))
    assert per_rank == SDXL.lora_params_per_rank.text_encoder
    assert sum(p.numel() for p in root.parameters()) == SDXL.params.text_encoder


def test_lora_network_on_the_full_size_text_encoders():
    """kohya's default SDXL text-encoder targets, built as LoRA modules (on the meta device)."""
    net = LoRANetwork.for_model(None, meta_sdxl_text_encoders(), family=SDXL, rank=4, alpha=1.0)
    prefixes = Counter(s.split("text_model")[0] for s in net.stems())
    assert prefixes == {"lora_te1_": 72, "lora_te2_": 192}
    with pytest.raises(Exception, match="sdxl"):
        LoRANetwork.for_model(None, meta_sdxl_text_encoders().embedders[0], family=SDXL, rank=4, alpha=1.0)
    # the SD1 record on an SDXL root finds nothing either
    with pytest.raises(Exception, match="SD1"):
        LoRANetwork.for_model(None, meta_sdxl_text_encoders(), family=SD1, rank=4, alpha=1.0)


# ---- sgm tier (SD_WEBUI_DIR)

def test_sgm_unet_matches_the_layout_rules_and_the_counts():
    unet = meta_sgm_unet()
    real = [Target(p, "linear" if isinstance(m, nn.Linear) else "conv", m.weight.shape[1], m.weight.shape[0],
                   1 if isinstance(m, nn.Linear) else m.kernel_size[0])
            for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    untargeted = {t.path for t in real if sgm_unet_key_stem(t.path) is None}
    assert untargeted == {"time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2", "input_blocks.0.0",
                          "out.2"}
    assert sorted(t for t in real if t.path not in untargeted) == sorted(sdxl_unet_targets())  # module order differs
    assert sum(p.numel() for p in unet.parameters()) == SDXL.params.unet
    net = LoRANetwork.for_model(unet, None, family=SDXL, rank=4, alpha=1.0, conv_rank=2)
    locon = [s for s in net.stems() if unet_stem_is_locon(s)]
    assert len(net.stems()) - len(locon) == 722 and len(locon) == 66
