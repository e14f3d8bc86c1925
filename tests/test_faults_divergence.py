"""Divergence never leaves a non-finite file or a resume state that resumes into NaN: the loss is checked every
step, the trained tensors before every save; the one message names the settings to lower and the last good file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import Recorder, make_bundle, make_images, run_cli, tiny_config
from safetensors.torch import load_file

from lib_train.errors import TrainerError
from lib_train.train.events import Commands
from lib_train.train.lora_trainer import prepare_data, train_lora

FAST = ["--resolution", "64", "--min-bucket", "64", "--max-bucket", "128", "--rank", "2"]


def _non_finite_files(folder: Path) -> list[str]:
    """Every safetensors file below ``folder`` (resume states included) holding an inf/nan tensor."""
    bad = []
    for path in folder.rglob("*.safetensors"):
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in load_file(str(path)).values()):
            bad.append(str(path))
    return bad


@pytest.fixture
def dataset(tmp_path):
    make_images(tmp_path / "data" / "2_thing", n=2)
    return tmp_path


def test_the_issue_case_on_the_command_line_leaves_no_non_finite_file(dataset, tiny_checkpoint, capsys):
    """``--lr 1e6 --te-lr 1e6 --save-every-steps 1 --max-grad-norm 0``: the step-1 update is too large for fp16,
    and nothing is written."""
    out = dataset / "out"
    code, text = run_cli("lora", ["--checkpoint", tiny_checkpoint, "--data", dataset / "data", "--output", out,
                                  "--name", "case", "--lr", "1e6", "--te-lr", "1e6", "--save-every-steps", "1",
                                  "--max-grad-norm", "0", *FAST], capsys)
    assert code == 2 and "Traceback" not in text, text
    error = text.strip().splitlines()[-1]
    assert error.startswith("error: Training diverged at step 1: "), error
    assert "hold values too large for output.save_precision (--save-precision) fp16" in error
    assert "optim.lr (--lr) is 1e+06, optim.te_lr (--te-lr) is 1e+06, optim.max_grad_norm (--max-grad-norm) is 0" \
           in error
    assert "Nothing with inf/nan was written. No file was saved before it." in error
    assert not list(out.glob("*.safetensors")) and not (out / ".case-state").exists()


def test_a_nan_loss_stops_at_once_and_names_the_last_finite_file(dataset):
    cfg = tiny_config(dataset, optim__lr=1e6, optim__te_lr=1e6, optim__max_grad_norm=0.0, train__epochs=3,
                      output__save_every_steps=1, output__save_precision="fp32")
    rec = Recorder()
    with pytest.raises(TrainerError) as info:
        train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), events=rec)
    message = str(info.value)
    out = dataset / "out"
    files = sorted(out.glob("*.safetensors"))
    assert files, "the finite step-1 file should be there"
    assert _non_finite_files(dataset) == []
    assert message.startswith(f"Training diverged at step {len(files) + 1}: the loss became nan."), message
    assert message.endswith(f"The last good file is kept: {files[-1]}."), message
    assert rec.steps == list(range(1, len(files) + 1)), "the diverged step was reported as progress"


def _overflow_at(monkeypatch, step: int) -> None:
    """The optimizer update of ``step`` overflows: one trained tensor becomes inf (its loss was still finite)."""
    from lib_train.train import loop

    real, count = loop.Optim.step, {"n": 0}

    def step_then_overflow(self, max_grad_norm):
        real(self, max_grad_norm)
        count["n"] += 1
        if count["n"] == step:
            with torch.no_grad():
                self.params[0].fill_(float("inf"))

    monkeypatch.setattr(loop.Optim, "step", step_then_overflow)


def test_non_finite_weights_are_never_saved_nor_a_resume_state(dataset, monkeypatch):
    """Weights that went inf in an update whose loss was finite: the stop requested after that step writes neither
    the file nor the state."""
    _overflow_at(monkeypatch, 1)
    cfg = tiny_config(dataset, output__save_precision="fp32")
    commands = Commands()
    with pytest.raises(TrainerError) as info:
        train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), events=Recorder(stop_at=1, commands=commands),
                   commands=commands)
    message = str(info.value)
    assert message.startswith("Training diverged at step 1: 1 of the "), message
    assert "trained tensors hold inf/nan" in message and "No file was saved before it." in message
    out = dataset / "out"
    assert not list(out.glob("*.safetensors")) and not list(out.glob(".tiny-state*"))
    assert not list(out.glob(".tmp-*"))


def test_a_diverged_run_keeps_the_earlier_resume_state_and_says_so(dataset, monkeypatch):
    """An interrupted finite run, resumed, diverges: the earlier state stays untouched and the message says so."""
    from lib_train.train.state import load_state

    cfg = tiny_config(dataset, train__epochs=2, output__save_precision="fp32")
    commands = Commands()
    first = train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), events=Recorder(stop_at=2, commands=commands),
                       commands=commands)
    assert first.status == "interrupted"
    before = (Path(first.state_dir) / "network.safetensors").read_bytes()
    _overflow_at(monkeypatch, 1)  # the resumed session's first update: step 3
    commands = Commands()
    with pytest.raises(TrainerError) as info:
        train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), resume=load_state(first.state_dir),
                   events=Recorder(stop_at=3, commands=commands), commands=commands)
    message = str(info.value)
    assert message.startswith("Training diverged at step 3: "), message
    assert message.endswith(f"The last good file is kept: {first.final_file}. The resume state in "
                            f"{first.state_dir} (step 2) is from before it."), message
    assert (Path(first.state_dir) / "network.safetensors").read_bytes() == before
    assert _non_finite_files(dataset) == []
