"""kohya LoRA .safetensors files: metadata, sshs hashes (FORMATS.md §B.3), key checks, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import safetensors.torch
import torch

from lib_train.errors import TrainerError
from lib_train.network.kohya_file import kohya_hashes, read_lora_file, save_lora_file
from lib_train.safetensors_io import data_section_sha256

META = {"ss_output_name": "mychar", "ss_network_dim": "16", "ss_network_alpha": "8.0", "ss_v2": "False",
        "modelspec.title": "mychar", "modelspec.architecture": "stable-diffusion-v1/lora"}


def _tensors(rank: int = 16, width: int = 640) -> dict[str, torch.Tensor]:
    """A few kohya stems, > 1.1 MiB in fp16 so the legacy-hash window (0x100000:0x110000) lies in the data."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(4):
        stem = f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_{i}"
        out[f"{stem}.lora_down.weight"] = torch.randn(rank, width * 8, generator=g).half()
        out[f"{stem}.lora_up.weight"] = torch.randn(width * 8, rank, generator=g).half()
        out[f"{stem}.alpha"] = torch.tensor(8.0, dtype=torch.float16)
    out["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(rank, 768, generator=g).half()
    out["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(3072, rank, generator=g).half()
    out["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(8.0, dtype=torch.float16)
    return out


def _raw_header(path) -> tuple[int, dict]:
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n])


def test_save_and_read_round_trip(tmp_path):
    tensors = _tensors()
    path = save_lora_file(tmp_path / "mychar.safetensors", tensors, META)
    assert path == tmp_path / "mychar.safetensors"
    assert os.listdir(tmp_path) == ["mychar.safetensors"]  # no temp file left behind
    loaded, metadata = read_lora_file(path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert loaded["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].dim() == 0
    assert {k: metadata[k] for k in META} == META
    assert set(metadata) == set(META) | {"sshs_model_hash", "sshs_legacy_hash"}
    assert all(isinstance(v, str) for v in _raw_header(path)[1]["__metadata__"].values())


def test_model_hash_is_the_data_section_hash(tmp_path):
    path = save_lora_file(tmp_path / "a.safetensors", _tensors(), META)
    _, metadata = read_lora_file(path)
    n, _ = _raw_header(path)
    data_section = open(path, "rb").read()[8 + n:]
    assert metadata["sshs_model_hash"] == hashlib.sha256(data_section).hexdigest() == data_section_sha256(path)
    # Independent of metadata: another title or dim string gives the same model hash.
    other = save_lora_file(tmp_path / "b.safetensors", _tensors(), dict(META, ss_network_dim="32", **{
        "modelspec.title": "x"}))
    assert read_lora_file(other)[1]["sshs_model_hash"] == metadata["sshs_model_hash"]


def test_legacy_hash_follows_the_kohya_rule(tmp_path):
    """sha256 of bytes 0x100000:0x110000 of the file written with only the ss_* metadata, first 8 hex."""
    tensors = _tensors()
    path = save_lora_file(tmp_path / "a.safetensors", tensors, META)
    legacy = read_lora_file(path)[1]["sshs_legacy_hash"]
    reference = tmp_path / "ss_only.safetensors"
    safetensors.torch.save_file(tensors, str(reference), metadata={k: v for k, v in META.items()
                                                                   if k.startswith("ss_")})
    assert os.path.getsize(reference) > 0x110000
    assert legacy == hashlib.sha256(open(reference, "rb").read()[0x100000:0x110000]).hexdigest()[:8]
    assert len(legacy) == 8
    # It depends on the ss_* header (it shifts the window) but not on modelspec.* keys.
    assert kohya_hashes(tensors, dict(META, **{"modelspec.title": "other"}))[1] == legacy
    assert kohya_hashes(tensors, dict(META, ss_output_name="a-much-longer-output-name"))[1] != legacy


def test_old_hashes_are_replaced(tmp_path):
    stale = dict(META, sshs_model_hash="0" * 64, sshs_legacy_hash="00000000")
    _, metadata = read_lora_file(save_lora_file(tmp_path / "a.safetensors", _tensors(), stale))
    assert metadata["sshs_model_hash"] == data_section_sha256(tmp_path / "a.safetensors")
    assert metadata["sshs_legacy_hash"] != "00000000"


@pytest.mark.parametrize("metadata", [dict(META, ss_network_dim=16), dict(META, ss_v2=False), {1: "x"}])
def test_non_string_metadata_is_refused(tmp_path, metadata):
    with pytest.raises(TypeError, match="str"):
        save_lora_file(tmp_path / "a.safetensors", _tensors(), metadata)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("key", ["unet_down.lora_down.weight", "bundle_emb.x.string_to_param.*",
                                 "lora_unet_x.dora_scale", "diffusion_model.lora_unet_x.alpha"])
def test_bad_keys_are_refused(tmp_path, key):
    tensors = dict(_tensors(), **{key: torch.zeros(2)})
    with pytest.raises(ValueError, match="not kohya LoRA keys"):
        save_lora_file(tmp_path / "a.safetensors", tensors, META)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "a.safetensors"
    save_lora_file(target, _tensors(), META)
    before = target.read_bytes()
    shared = torch.zeros(4, 8)
    tensors = {"lora_unet_x.lora_down.weight": shared, "lora_unet_x.lora_up.weight": shared}
    with pytest.raises(RuntimeError):  # safetensors refuses tensors that share storage
        save_lora_file(target, tensors, META)
    with pytest.raises(RuntimeError):
        save_lora_file(tmp_path / "new.safetensors", tensors, META)
    assert os.listdir(tmp_path) == ["a.safetensors"] and target.read_bytes() == before


def test_read_refuses_what_is_not_a_lora(tmp_path):
    with pytest.raises(TrainerError, match="does not exist"):
        read_lora_file(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(TrainerError, match="garbage.safetensors"):
        read_lora_file(garbage)
    embedding = tmp_path / "emb.safetensors"
    safetensors.torch.save_file({"emb_params": torch.zeros(2, 768)}, str(embedding))
    with pytest.raises(TrainerError, match="emb_params"):
        read_lora_file(embedding)
    checkpoint = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.out.2.weight": torch.zeros(2)}, str(checkpoint))
    with pytest.raises(TrainerError, match="not a kohya LoRA"):
        read_lora_file(checkpoint)


def test_data_section_hash_of_a_truncated_file(tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(TrainerError, match="cut.safetensors"):
        data_section_sha256(bad)
