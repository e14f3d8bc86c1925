"""The epoch × weight grid on an SDXL run: files written by the trainer's own writers with the SDXL record's
metadata (``ss_base_model_version`` "sdxl_base_v1-0", ``modelspec.architecture`` "stable-diffusion-xl-v1-base/lora",
kohya SDXL key names) are found, planned, kept and promoted; every family decision goes through the family records.

The SDXL record is used whether or not this version trains SDXL yet (``families.TRAINS_SDXL``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lib_train.config import default_config
from lib_train.grid.keep import keep_choice, write_preferred_weight
from lib_train.grid.plan import plan_grid
from lib_train.grid.runs import discover_runs, find_run
from lib_train.models.families import RECORDS, SDXL, SIDECAR_SD_VERSIONS, family_name_from_metadata
from lib_train.network.kohya_file import save_lora_file
from lib_train.safetensors_io import read_metadata
from lib_train.train import metadata as metadata_mod
from lib_train.train.metadata import RunFacts, lora_metadata
from lib_train.train.sidecar import write_lora_sidecar

# a few kohya SDXL LoRA keys (FORMATS §A.3.2-3): sgm UNet names, both text encoders
STEMS = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_output_blocks_5_1_proj_out",
         "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_31_mlp_fc1")


@pytest.fixture
def records_by_name(monkeypatch):
    """The metadata writer resolves the run's family by name; give it every record (SDXL before the switch too)."""
    monkeypatch.setattr(metadata_mod, "get_family", lambda name: RECORDS[name])


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for stem in STEMS:
        out[f"{stem}.lora_down.weight"] = torch.randn(4, 8, generator=g).to(torch.float16)
        out[f"{stem}.lora_up.weight"] = torch.randn(8, 4, generator=g).to(torch.float16)
        out[f"{stem}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    return out


def sdxl_run(folder: Path, name: str = "xl", epochs: int = 3, prediction: str = "eps") -> None:
    """What an SDXL run leaves: ``NAME-000001`` … epoch saves and the final ``NAME`` with the trainer's metadata,
    ``NAME.config.json`` and the final's Lora-card sidecar."""
    cfg = default_config()
    cfg.data.resolution, cfg.optim.te_lr = 1024, 1e-5
    facts = RunFacts(session_id=1, started_at=1.7e9, family=SDXL.name, prediction=prediction,
                     checkpoint_name="sd_xl_base_1.0.safetensors", checkpoint_hashes={}, optimizer="AdamW",
                     num_train_images=4, num_reg_images=0, batches_per_epoch=4, total_steps=4 * epochs,
                     total_epochs=epochs, dataset_dirs={"4_xl": {"n_repeats": 4, "img_count": 4}},
                     reg_dataset_dirs={}, tag_frequency={}, bucket_info=None)
    for e in range(1, epochs + 1):
        stem = name if e == epochs else f"{name}-{e:06d}"
        meta = lora_metadata(cfg, facts, stem=stem, epoch=e, step=4 * e)
        save_lora_file(folder / f"{stem}.safetensors", _tensors(e), meta)
    write_lora_sidecar(folder / f"{name}.safetensors", family=SDXL.name)
    (folder / f"{name}.config.json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")


def _is_sdxl(meta: dict[str, str], resolution: str = "1024x1024") -> bool:
    return (meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
            and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
            and meta["modelspec.resolution"] == resolution)


def test_an_sdxl_run_is_found_and_planned(tmp_path, records_by_name):
    root = tmp_path / "Lora"
    sdxl_run(root / "xl")
    runs = discover_runs(root, "lora")
    assert [r.label for r in runs] == ["LoRA: xl/xl"]
    run = find_run(runs, "xl")
    assert [(f.stem, f.label) for f in run.files] == [("xl-000001", "epoch 1"), ("xl-000002", "epoch 2"),
                                                      ("xl", "epoch 3 (final)")]
    assert all(_is_sdxl(read_metadata(f.path)) for f in run.files)
    plan = plan_grid(run, files=None, weights="0.5, 1", prompt="a photo of xl <lora:xl:0.8>", seed=7)
    assert (plan.cols, plan.rows) == (3, 2)
    assert [c.prompt for c in plan.cells[:2]] == ["a photo of xl <lora:xl-000001:0.5>",
                                                  "a photo of xl <lora:xl-000001:1>"]


def test_keeping_a_choice_on_an_sdxl_run_keeps_it_sdxl(tmp_path, records_by_name):
    root = tmp_path / "Lora"
    sdxl_run(root / "xl")
    run = find_run(discover_runs(root, "lora"), "xl")
    result = keep_choice(run, "xl-000002", 0.75, promote=True)
    folder = root / "xl"
    assert result.kept_aside == folder / "xl-000003.safetensors"  # the old final under its own epoch name
    for stem in ("xl-000002", "xl"):  # the Lora card shows the file for SDXL models
        card = json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))
        assert card == {"sd version": "SDXL", "preferred weight": 0.75}
    final, aside = read_metadata(folder / "xl.safetensors"), read_metadata(result.kept_aside)
    chosen = read_metadata(folder / "xl-000002.safetensors")
    assert _is_sdxl(final) and _is_sdxl(aside)
    assert final["ss_output_name"] == final["modelspec.title"] == "xl" and final["ss_epoch"] == "2"
    assert aside["ss_output_name"] == "xl-000003" and aside["ss_epoch"] == "3"
    assert final["sshs_model_hash"] == chosen["sshs_model_hash"]  # the tensors byte for byte


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_card_version_comes_from_the_family_records(tmp_path, prediction, records_by_name):
    """Without a sidecar, the preferred weight's card takes ``sd version`` from the file's metadata through
    ``families.family_name_from_metadata``: for every record's own metadata, that record's version."""
    for family in RECORDS.values():
        meta = {"ss_base_model_version": family.ss_base_model_version(prediction), "ss_v2": str(family.ss_v2),
                "modelspec.architecture": family.modelspec_architecture(prediction)}
        assert family_name_from_metadata(meta) == family.name
        path = tmp_path / f"{family.name}-{prediction}.safetensors"
        save_lora_file(path, _tensors(1), meta)
        card = json.loads(write_preferred_weight(path, 0.5).read_text(encoding="utf-8"))
        assert card["sd version"] == SIDECAR_SD_VERSIONS[family.name]
    # a v-prediction SDXL run (NoobAI-v-pred and the like): still SDXL, no "_v" suffix
    sdxl_run(tmp_path / "vpred", name="vp", prediction=prediction)
    meta = read_metadata(tmp_path / "vpred" / "vp.safetensors")
    assert _is_sdxl(meta) and meta["modelspec.prediction_type"] == ("v" if prediction == "v" else "epsilon")


@pytest.mark.parametrize("version", ["sdxl_base_v1-0", "sdxl_base_v0-9"])
def test_other_trainers_sdxl_files_are_sdxl(tmp_path, version):
    path = tmp_path / "theirs.safetensors"
    save_lora_file(path, _tensors(2), {"ss_base_model_version": version, "ss_v2": "False",
                                       "ss_output_name": "theirs"})
    assert json.loads(write_preferred_weight(path, 1.0).read_text(encoding="utf-8"))["sd version"] == "SDXL"


def test_a_file_with_only_modelspec_is_sdxl(tmp_path):
    path = tmp_path / "spec.safetensors"
    save_lora_file(path, _tensors(3), {"modelspec.sai_model_spec": "1.0.0",
                                       "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    assert json.loads(write_preferred_weight(path, 1.0).read_text(encoding="utf-8"))["sd version"] == "SDXL"
