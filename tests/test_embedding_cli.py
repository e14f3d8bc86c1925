"""``python -m lib_train embedding``: a real run, bad input (one clear message, no traceback, no output), resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import Recorder, make_bundle, make_images, run_bad_input, run_cli
from safetensors.torch import load_file

from lib_train.train.events import Commands

FAST = ["--resolution", "64", "--min-bucket", "64", "--max-bucket", "128"]


def _cli(args, capsys, command="embedding"):
    return run_cli(command, args, capsys)


def test_cli_trains_an_embedding_from_a_checkpoint_file(tmp_path, tiny_checkpoint, capsys):
    make_images(tmp_path / "data" / "2_thing", n=2)
    code, text = _cli(["--checkpoint", tiny_checkpoint, "--data", tmp_path / "data", "--output", tmp_path / "out",
                       "--name", "laohuang", "--init-text", "man in a leather jacket", "--vectors", "4",
                       "--epochs", "2", "--save-every-epochs", "1", "--template", "style", "--pt", *FAST], capsys)
    assert code == 0, text
    assert "2 images × 2 repeats × 2 epochs ÷ batch 1 = 8 steps" in text
    assert "Final embedding:" in text and "laohuang.safetensors" in text
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir() if p.is_file()} == {
        "laohuang.safetensors", "laohuang.pt", "laohuang-000004.safetensors", "laohuang-000004.pt",
        "laohuang.config.json"}
    assert load_file(str(out / "laohuang.safetensors"))["emb_params"].shape == (4, 32)
    pt = torch.load(out / "laohuang.pt", weights_only=True)
    assert pt["sd_checkpoint_name"] == "tiny-sd1" and len(pt["sd_checkpoint"]) == 10
    saved = json.loads((out / "laohuang.config.json").read_text())
    assert saved["method"] == "embedding" and saved["embedding"]["vectors"] == 4
    assert saved["optim"]["lr"] == 5e-3 and saved["embedding"]["template"] == "style"


def test_dry_run_and_write_config(tmp_path, tiny_checkpoint, capsys):
    make_images(tmp_path / "data" / "3_a", n=2)
    base = ["--checkpoint", tiny_checkpoint, "--data", tmp_path / "data", "--output", tmp_path / "out", "--name", "x",
            *FAST]
    code, text = _cli([*base, "--dry-run"], capsys)
    assert code == 0 and "folder 3_a: 2 images × 3 repeats" in text
    assert not (tmp_path / "out").exists()
    code, _ = _cli([*base, "--vectors", "6", "--write-config", tmp_path / "ti.toml"], capsys)
    assert code == 0
    code, text = _cli(["--config", tmp_path / "ti.toml", "--dry-run"], capsys)
    assert code == 0, text
    code, text = _cli(["--config", tmp_path / "ti.toml", "--dry-run"], capsys, command="lora")
    assert code == 2 and "for 'embedding' training" in text and "python -m lib_train embedding" in text


def _template_without_name(d: Path) -> Path:
    make_images(d / "2_x", n=1)
    (d / "t.txt").write_text("a photo of [name]\njust a photo\n", encoding="utf-8")
    return d / "t.txt"


CASES = {
    "vectors 0": (lambda d: make_images(d / "2_x", n=1), ["--vectors", "0"], ["--vectors", "1-75"]),
    "vectors 76": (lambda d: make_images(d / "2_x", n=1), ["--vectors", "76"], ["--vectors"]),
    "init text longer than 75 tokens": (lambda d: make_images(d / "2_x", n=1), ["--init-text", "word " * 80],
                                        ["--init-text", "80 tokens", "75"]),
    "template file missing": (lambda d: make_images(d / "2_x", n=1), ["--template", "nosuch.txt"],
                              ["--template", "nosuch.txt"]),
    "template line without [name]": (_template_without_name, ["--template", "{data}/t.txt"],
                                     ["--template", "line 2 has no [name]"]),
    "init embedding missing": (lambda d: make_images(d / "2_x", n=1), ["--init-embedding", "gone.pt"],
                               ["--init-embedding", "gone.pt"]),
    "captions without the name, template none": (lambda d: make_images(d / "2_x", n=1), ["--template", "none"],
                                                 ["img0.png", "does not contain the embedding name"]),
    "empty folder": (lambda d: d.mkdir(parents=True), [], ["no images"]),
    "unreadable image": (lambda d: make_images(d / "2_x", n=1) and (d / "2_x" / "junk.png").write_bytes(b"no png"),
                         [], ["junk.png"]),
    "caption not utf-8": (lambda d: make_images(d / "2_x", n=1) and (d / "2_x" / "img0.txt").write_bytes(
        "caf\xe9".encode("latin-1")), [], ["img0.txt", "UTF-8"]),
    "name escapes the output folder": (lambda d: make_images(d / "2_x", n=1), ["--name", "../x"],
                                       ["output.name (--name)"]),
    "resolution not a multiple of 64": (lambda d: make_images(d / "2_x", n=1), ["--resolution", "500"],
                                        ["--resolution", "500"]),
    "unknown optimizer": (lambda d: make_images(d / "2_x", n=1), ["--optimizer", "SuperAdam"],
                          ["--optimizer", "SuperAdam"]),
    "zero repeats folder": (lambda d: make_images(d / "0_x", n=1), [], ["0_x"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_message(tmp_path, tiny_checkpoint, capsys, case):
    out = run_bad_input("embedding", CASES[case], tmp_path, tiny_checkpoint, capsys)
    assert not out.exists()


def test_resume_an_interrupted_run_from_the_command_line(tmp_path, tiny_checkpoint, capsys):
    from lib_train.config import default_config
    from lib_train.train.ti_trainer import prepare_embedding_data, train_embedding

    make_images(tmp_path / "data" / "3_x", n=1)
    cfg = default_config("embedding")
    cfg.model.checkpoint = str(tiny_checkpoint)
    cfg.data.train_dir, cfg.data.resolution = str(tmp_path / "data"), 64
    cfg.data.min_bucket_side, cfg.data.max_bucket_side = 64, 128
    cfg.output.output_dir, cfg.output.name = str(tmp_path / "out"), "run"
    cfg.train.epochs = 2

    commands = Commands()
    first = train_embedding(cfg, make_bundle("sd1"), prepare_embedding_data(cfg),
                            events=Recorder(stop_at=2, commands=commands), commands=commands)
    assert first.status == "interrupted"
    code, text = _cli(["--resume", first.state_dir], capsys, command="lora")
    assert code == 2 and "of a 'embedding' run" in text and "python -m lib_train embedding --resume" in text
    code, text = _cli(["--resume", first.state_dir], capsys)
    assert code == 0, text
    assert "Finished 6 steps" in text and (tmp_path / "out" / "run.safetensors").is_file()
