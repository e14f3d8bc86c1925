"""The training loop's pieces on their own: the decisions after a step, micro-batch positions, the final-file check,
the precision rule and the headless loader, and the import layering of ``lib_train.train``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lib_train.config import TrainConfig, default_config
from lib_train.errors import TrainerError
from lib_train.models.load import load_bundle, resolve_precision
from lib_train.train import loop
from lib_train.train.loop import Point
from lib_train.train.outputs import check_final_free, existing_final, final_paths

from helpers import import_circles, import_graph

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**overrides) -> TrainConfig:
    cfg = TrainConfig()
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _at(step: int, epoch: int = 1, epoch_end: bool = False, final: bool = False) -> Point:
    return Point(step=step, epoch=epoch, epoch_end=epoch_end, final=final)


def test_log_is_due_every_n_steps_and_at_the_last():
    assert [s for s in range(1, 13) if loop.log_due(_at(s), 5, 12)] == [5, 10, 12]
    assert all(loop.log_due(_at(s), 1, 12) for s in range(1, 13))


def test_step_saves_every_n_steps_but_not_at_the_end():
    cfg = _cfg(output__save_every_steps=3)
    assert [s for s in range(1, 10) if loop.step_save_due(cfg, _at(s, final=s == 9))] == [3, 6]
    assert not any(loop.step_save_due(_cfg(), _at(s)) for s in range(1, 10))


def test_epoch_saves_and_states_every_n_epochs_but_not_after_the_last():
    cfg = _cfg(output__save_every_epochs=2, output__save_state_every_epochs=3)
    ends = [_at(4 * e, epoch=e, epoch_end=True, final=e == 6) for e in range(1, 7)]
    assert [p.epoch for p in ends if loop.epoch_save_due(cfg, p, 6)] == [2, 4]
    assert [p.epoch for p in ends if loop.state_save_due(cfg, p, 6)] == [3]
    assert not loop.epoch_save_due(cfg, _at(8, epoch=2), 6)  # not the end of the epoch
    assert not loop.epoch_save_due(_cfg(output__save_every_epochs=1), _at(4, epoch=1, epoch_end=True), 1)


def test_samples_are_due_by_step_by_epoch_and_at_the_end():
    none = _cfg()
    assert not loop.samples_due(none, _at(10, final=True))
    end_only = _cfg(sample__prompts="a cat")
    assert [s for s in range(1, 9) if loop.samples_due(end_only, _at(s, final=s == 8))] == [8]
    steps = _cfg(sample__prompts="a cat", sample__every_steps=3)
    assert [s for s in range(1, 9) if loop.samples_due(steps, _at(s, final=s == 8))] == [3, 6, 8]
    epochs = _cfg(sample__prompts="a cat", sample__every_epochs=2)
    ends = [_at(4 * e, epoch=e, epoch_end=True, final=e == 3) for e in range(1, 4)]
    assert [p.epoch for p in ends if loop.epoch_samples_due(epochs, p)] == [2]  # epoch 3: the run's end instead
    assert not loop.epoch_samples_due(epochs, _at(8, epoch=2))


class _Prep:
    """The fields of PreparedData that micro_batches reads."""

    def __init__(self, entries, total_epochs: int, batches_per_epoch: int):
        self.entries, self.total_epochs, self.batches_per_epoch = entries, total_epochs, batches_per_epoch


def test_micro_batches_resume_at_a_position_and_steps_close_each_epoch():
    from lib_train.data import PlanEntry

    cfg = _cfg(train__batch_size=1, data__flip=False)
    entries = [PlanEntry(samples=1, bucket=(64, 64)) for _ in range(3)]
    prep = _Prep(entries, total_epochs=2, batches_per_epoch=3)
    every = list(loop.micro_batches(cfg, prep))
    assert [(m.epoch, m.k, m.index) for m in every] == [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 3), (1, 1, 4),
                                                        (1, 2, 5)]
    assert [m.ends_step(2) for m in every] == [False, True, True, False, True, True]  # accumulation 2, 3 per epoch
    assert [m.next for m in every[1:3]] == [(0, 2), (1, 0)]
    resumed = list(loop.micro_batches(cfg, prep, 0, 2))
    assert [(m.epoch, m.k) for m in resumed] == [(0, 2), (1, 0), (1, 1), (1, 2)]
    assert [m.samples for m in resumed] == [m.samples for m in every[2:]]  # the same draws


def test_final_files_and_the_check_before_a_new_run(tmp_path):
    lora = _cfg(output__output_dir=str(tmp_path), output__name="x")
    emb = default_config("embedding")
    emb.output.output_dir, emb.output.name, emb.embedding.write_pt = str(tmp_path), "x", True
    assert [p.name for p in final_paths(lora)] == ["x.safetensors"]
    assert [p.name for p in final_paths(emb)] == ["x.safetensors", "x.pt"]
    check_final_free(lora)
    (tmp_path / "x.pt").write_bytes(b"")
    check_final_free(lora)  # a LoRA run writes no .pt
    with pytest.raises(TrainerError, match=re.escape(f"{tmp_path / 'x.pt'} already exists. Choose another "
                                                     "output.name, delete the file, or set output.overwrite "
                                                     "(--overwrite) to replace it.")):
        check_final_free(emb)
    emb.embedding.write_pt = False
    assert existing_final(emb) is None
    (tmp_path / "x.safetensors").write_bytes(b"")
    assert existing_final(lora) == tmp_path / "x.safetensors"
    lora.output.overwrite = True
    assert existing_final(lora) is None


def test_one_precision_rule(monkeypatch):
    for setting in ("auto", "no", "fp16", "bf16"):
        assert resolve_precision(setting, torch.device("cpu")) is None  # the CPU trains in fp32
    assert resolve_precision("no", "cuda") is None
    assert resolve_precision("fp16", "cuda") is torch.float16
    assert resolve_precision("bf16", "cuda:1") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") is torch.float16


def test_load_bundle_reports_and_readies_the_model(tiny_checkpoint):
    cfg = _cfg(model__checkpoint=str(tiny_checkpoint), model__clip_skip=2, data__max_token_length=150)
    lines: list[str] = []
    bundle = load_bundle(cfg, torch.device("cpu"), say=lines.append)
    assert lines[0] == f"Loading {tiny_checkpoint} ..."
    assert re.fullmatch(r"  SD1 model, eps-prediction \(default\), loaded in \d+\.\ds", lines[1])
    assert bundle.family == "sd1" and bundle.prediction == "eps" and bundle.checkpoint_name == tiny_checkpoint.name
    assert bundle.dtype == torch.float32  # CPU: no half weights
    attn = [m for m in bundle.unet.modules() if type(m).__name__ == "CrossAttention"]
    assert attn and all("forward" in m.__dict__ for m in attn)  # the fused attention is installed
    assert set(bundle.checkpoint_hashes()) == {"legacy", "sha256"}


def test_no_import_circle_in_the_training_package():
    graph = import_graph(ROOT / "lib_train" / "train")
    assert import_circles(graph) == []  # no module imports itself through others
    assert "lib_train.train.session" not in graph["lib_train.train.sampling"]
    assert "lib_train.train.sampling" not in graph["lib_train.train.session"]
