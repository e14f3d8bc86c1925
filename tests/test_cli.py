"""The headless command: a real run, bad input (one clear message, no traceback, no output), Ctrl-C and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, make_images, run_bad_input, run_cli, read_stderr_until

from lib_train.network.kohya_file import read_lora_file

FAST = ["--resolution", "64", "--min-bucket", "64", "--max-bucket", "128", "--rank", "4", "--alpha", "4"]


def _cli(args, capsys):
    return run_cli("lora", args, capsys)


def test_cli_trains_a_lora_from_a_checkpoint_file(tmp_path, tiny_checkpoint, capsys):
    make_images(tmp_path / "data" / "2_thing", n=2)
    code, text = _cli(["--checkpoint", tiny_checkpoint, "--data", tmp_path / "data", "--output", tmp_path / "out",
                       "--name", "mychar", "--epochs", "2", "--save-every-epochs", "1", "--trigger", "zqchar",
                       "--sample-prompts", "a photo of [name] | [name], red", "--sample-every-epochs", "2",
                       "--sample-steps", "2", *FAST], capsys)
    assert code == 0, text
    assert "2 images × 2 repeats × 2 epochs ÷ batch 1 = 8 steps" in text
    out = tmp_path / "out"
    assert "samples at step 8: 2 image(s)" in text  # after epoch 2 only (every 2 epochs)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["mychar-000008-0.png", "mychar-000008-1.png"]
    assert (out / "mychar.preview.png").is_file() and not (out / "mychar-000001.preview.png").exists()
    import json

    cfg = json.loads((out / "mychar.config.json").read_text())
    assert cfg["sample"]["prompts"] == "a photo of [name]\n[name], red" and cfg["version"] == 3
    assert (out / "mychar.safetensors").is_file() and (out / "mychar-000001.safetensors").is_file()
    assert (out / "mychar.config.json").is_file()
    _, meta = read_lora_file(out / "mychar.safetensors")
    assert meta["ss_sd_model_name"] == "tiny-sd1.safetensors"
    assert len(meta["ss_new_sd_model_hash"]) == 64 and len(meta["ss_sd_model_hash"]) == 8


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_checkpoint, capsys):
    make_images(tmp_path / "data" / "3_a", n=2)
    make_images(tmp_path / "data" / "plain", n=1, prefix="p")
    code, text = _cli(["--checkpoint", tiny_checkpoint, "--data", tmp_path / "data", "--output", tmp_path / "out",
                       "--name", "x", "--epochs", "3", "--batch-size", "2", "--dry-run", *FAST], capsys)
    assert code == 0, text
    assert "folder 3_a: 2 images × 3 repeats" in text
    assert "N_name" in text  # the plain folder gets the convention explained
    assert "(2 images × 3 repeats + 1 image × 1 repeat) × 3 epochs ÷ batch 2" in text
    assert not (tmp_path / "out").exists()


def _bad_png(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _truncated_png(folder: Path) -> Path:
    p = make_images(folder, n=1, size=(96, 96), prefix="trunc", captions=False)[0]
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


CASES = {
    "empty folder": (lambda d: d.mkdir(parents=True), [], ["no images"]),
    "folder with only captions": (lambda d: (d / "5_x").mkdir(parents=True) or (d / "5_x" / "a.txt").write_text("a"),
                                  [], ["caption"]),
    "unreadable image": (lambda d: make_images(d / "2_x", n=1) and _bad_png(d / "2_x" / "junk.png", b"not a png"),
                         [], ["junk.png"]),
    "truncated image": (lambda d: make_images(d / "2_x", n=1) and _truncated_png(d / "2_x"), [], ["trunc0.png"]),
    "1x1 image": (lambda d: make_images(d / "2_x", n=1) and make_images(d / "2_x", n=1, size=(1, 1), prefix="dot"),
                  [], ["dot0.png"]),
    "image below the minimum": (lambda d: make_images(d / "2_x", n=1) and make_images(d / "2_x", n=1,
                                                                                       size=(40, 200),
                                                                                       prefix="thin"),
                                [], ["thin0.png"]),
    "caption not utf-8": (lambda d: make_images(d / "2_x", n=1) and (d / "2_x" / "img0.txt").write_bytes(
        "caf\xe9, na\xefve".encode("latin-1")), [], ["img0.txt", "UTF-8"]),
    "name escapes the output folder": (lambda d: make_images(d / "2_x", n=1), ["--name", "../x"],
                                       ["output.name (--name)"]),
    "resolution not a multiple of 64": (lambda d: make_images(d / "2_x", n=1), ["--resolution", "500"],
                                        ["--resolution", "500"]),
    "rank 0": (lambda d: make_images(d / "2_x", n=1), ["--rank", "0"], ["--rank", "positive"]),
    "unknown optimizer": (lambda d: make_images(d / "2_x", n=1), ["--optimizer", "SuperAdam"],
                          ["--optimizer", "SuperAdam", "AdamW8bit"]),
    "zero repeats folder": (lambda d: make_images(d / "0_x", n=1), [], ["0_x"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_message(tmp_path, tiny_checkpoint, capsys, case):
    out = run_bad_input("lora", CASES[case], tmp_path, tiny_checkpoint, capsys)
    assert not out.exists() or not any(out.glob("*.safetensors"))


def test_not_a_stable_diffusion_checkpoint(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    make_images(tmp_path / "data" / "2_x", n=1)
    lora = tmp_path / "some_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    code, text = _cli(["--checkpoint", lora, "--data", tmp_path / "data", "--output", tmp_path / "out", "--name", "n",
                       *FAST], capsys)
    assert code == 2 and "not a Stable Diffusion checkpoint" in text and "LoRA file" in text
    assert "Traceback" not in text
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    code, text = _cli(["--checkpoint", junk, "--data", tmp_path / "data", "--output", tmp_path / "out", "--name", "n",
                       *FAST], capsys)
    assert code == 2 and "junk.safetensors" in text and "Traceback" not in text
    assert not any((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True


def test_all_config_problems_are_reported_at_once(tmp_path, capsys):
    code, text = _cli(["--data", tmp_path / "missing", "--output", tmp_path / "out", "--name", "a/b", "--rank", "0",
                       "--lr", "-1", "--resolution", "100"], capsys)
    assert code == 2
    for needle in ("model.checkpoint", "data.train_dir", "output.name", "network.rank", "optim.lr",
                   "data.resolution"):
        assert needle in text, needle




def test_ctrl_c_saves_and_resume_finishes(tmp_path, tiny_checkpoint):
    """A real SIGINT to the command: it saves the LoRA and the state, prints how to resume; --resume finishes."""
    make_images(tmp_path / "data" / "1_x", n=2)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # one torch thread, as in the tests (conftest)
    cmd = [sys.executable, "-m", "lib_train", "lora", "--checkpoint", str(tiny_checkpoint), "--data",
           str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--name", "run", "--epochs", "3", *FAST]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    err = read_stderr_until(proc, r"(?s)Training: 6 steps\n.*\b1/6\b")  # the progress bar shows the first step
    proc.send_signal(signal.SIGINT)  # the run stops after the step it is in, before its 6th and last
    _, rest = proc.communicate(timeout=240)
    err += rest.decode(errors="replace")
    assert proc.returncode == 130, err
    assert "resume with: python -m lib_train lora --resume" in err
    state_dir = tmp_path / "out" / ".run-state"
    assert (state_dir / "state.json").is_file()
    assert list((tmp_path / "out").glob("run-step*.safetensors"))
    assert not (tmp_path / "out" / "run.safetensors").exists()
    done = subprocess.run([sys.executable, "-m", "lib_train", "lora", "--resume", str(state_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "run.safetensors").is_file()
    _, meta = read_lora_file(tmp_path / "out" / "run.safetensors")
    assert meta["ss_steps"] == "6"
