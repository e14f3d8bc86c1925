"""Resume state files: pickle-free round trip of optimizer/scheduler state; hidden folder; file permissions."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from lib_train.atomic import UMASK, atomic_write_bytes
from lib_train.train.optim import build_optimizer
from lib_train.train.schedule import make_scheduler
from lib_train.train.state import RunState, load_state, load_tree, save_state, save_tree, state_dir_for


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Prodigy", "Lion"])
def test_optimizer_and_scheduler_state_round_trip_without_pickle(tmp_path, name):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 128))
    opt = build_optimizer(name, [{"params": [w]}], 1.0 if name == "Prodigy" else 1e-3, {})
    sched = make_scheduler(opt, total_steps=10, kind="cosine", warmup_steps=2)
    for _ in range(2):
        (w ** 2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    save_tree(tmp_path, "opt", opt.state_dict())
    save_tree(tmp_path, "sched", sched.state_dict())
    assert not list(tmp_path.glob("*.pt"))
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = build_optimizer(name, [{"params": [w2]}], 1.0 if name == "Prodigy" else 1e-3, {})
    sched2 = make_scheduler(opt2, total_steps=10, kind="cosine", warmup_steps=2)
    opt2.load_state_dict(load_tree(tmp_path, "opt"))
    sched2.load_state_dict(load_tree(tmp_path, "sched"))
    for o, s, p in ((opt, sched, w), (opt2, sched2, w2)):
        (p ** 2).mean().backward()
        o.step()
        s.step()
    assert torch.equal(w, w2)
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_tree_keeps_types(tmp_path):
    obj = {"a": (0.9, 0.99), 3: [1, None, float("inf")], "t": torch.arange(3), "nested": {"b": True}}
    save_tree(tmp_path, "x", obj)
    back = load_tree(tmp_path, "x")
    assert back["a"] == (0.9, 0.99) and back[3][:2] == [1, None] and back[3][2] == float("inf")
    assert torch.equal(back["t"], torch.arange(3)) and back["nested"] == {"b": True}


def test_state_folder_is_hidden_and_replaced_atomically(tmp_path):
    folder = state_dir_for(tmp_path, "run")
    assert folder.name == ".run-state"
    state = RunState(step=3, epoch=0, batch=3, config={}, session_id=1, started_at=0.0, optimizer="AdamW",
                     dataset_fingerprint="x")
    for step in (3, 4):
        state.step = step
        save_state(folder, state, {"a": torch.zeros(2)}, {"state": {}, "param_groups": []}, {"last_epoch": step},
                   None)
    loaded = load_state(tmp_path)  # the output folder is accepted too
    assert loaded.state.step == 4 and loaded.scheduler == {"last_epoch": 4} and loaded.scaler is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run-state"]


def test_written_files_get_normal_permissions(tmp_path):
    path = atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~UMASK
