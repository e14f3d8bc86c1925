"""Saves that fail: a full disk during a save (the real safetensors writer hitting a full device, and a real small
tmpfs where the tests may mount one) rescues the weights and the resume state into a fallback folder that the one
message names, and a resume from there ends where an uninterrupted run ends; a read-only or blocked output folder is
refused before the model loads; too little room for the final file is refused before the first step."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import make_bundle, make_images, run_cli, tiny_config

from lib_train.errors import TrainerError
from lib_train.network.kohya_file import read_lora_file
from lib_train.train import storage
from lib_train.train.lora_trainer import prepare_data, train_lora
from lib_train.train.state import load_state

FAST = ["--resolution", "64", "--min-bucket", "64", "--max-bucket", "128", "--rank", "4", "--alpha", "4"]


def _run(cfg, **kw):
    return train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), **kw)


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A real tmpfs of ``size`` at ``path`` (skips the test where this process may not mount one)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    except OSError:
        pytest.skip("no mount command here")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _full_disk_after(monkeypatch, folder: Path, good_saves: int) -> list[str]:
    """Every LoRA file written into ``folder`` after the first ``good_saves`` goes through the real writer to
    ``/dev/full`` (the device that answers every write with ENOSPC); returns the list of failed targets."""
    real = safetensors.torch.save_file
    count, failed = {"n": 0}, []

    def save_file(tensors, filename, metadata=None):
        if Path(filename).parent == folder:
            count["n"] += 1
            if count["n"] > good_saves:
                failed.append(str(filename))
                return real(tensors, "/dev/full", metadata=metadata)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return failed


def _assert_same_weights(a: Path, b: Path) -> None:
    ta, _ = read_lora_file(a)
    tb, _ = read_lora_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture
def dataset(tmp_path):
    make_images(tmp_path / "data" / "2_thing", n=2)
    return tmp_path


COMMON = dict(train__epochs=2, output__save_every_steps=2, output__save_precision="fp32")


def test_full_disk_during_a_save_rescues_the_weights_and_the_run_resumes_to_the_same_result(dataset, monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    ref = _run(tiny_config(dataset, output__name="ref", **COMMON))
    rescue_root = dataset / "rescue"
    monkeypatch.setenv(storage.RESCUE_ENV, str(rescue_root))
    out = dataset / "out"
    failed = _full_disk_after(monkeypatch, out, good_saves=1)  # step 2's file is written, step 4's hits a full disk
    cfg = tiny_config(dataset, output__name="res", **COMMON)
    with pytest.raises(TrainerError) as info:
        _run(cfg)
    message = str(info.value)
    assert failed and failed[0].startswith(str(out / ".tmp-res-step00000004.safetensors."))
    (rescued,) = rescue_root.glob("res-*")
    assert message.startswith(f"Could not save the LoRA into {out}: the disk is full. The run stopped at step 4/8; "
                              f"its LoRA at step 4 is saved as {rescued / 'res-step00000004.safetensors'} instead, "
                              f"with the resume state in {rescued / '.res-state'}. Free some space on that disk or "
                              f"choose another output folder, then resume from {rescued / '.res-state'}"), message
    assert "Traceback" not in message and "\n" not in message
    assert not list(out.glob(".tmp-*")), "the failed write left its temporary file"
    assert not (out / "res-step00000004.safetensors").exists()
    monkeypatch.undo()  # the disk has room again
    resumed = _run(cfg, resume=load_state(rescued / ".res-state"))
    assert resumed.status == "finished" and resumed.final_file == str(out / "res.safetensors")
    _assert_same_weights(out / "res.safetensors", Path(ref.final_file))


def test_a_full_real_file_system_rescues_the_weights(dataset, monkeypatch):
    out = dataset / "small"
    with tmpfs(out, "3m"):
        monkeypatch.setenv(storage.RESCUE_ENV, str(dataset / "rescue"))
        monkeypatch.setattr(storage, "SAVE_MARGIN", 0)  # no room kept: the real write is what fails
        monkeypatch.setattr(storage, "ensure_space", lambda *a: None)  # and nothing refuses it before
        (out / "filler").write_bytes(b"\0" * (2 << 20))  # 1 MB left: one 0.7 MB LoRA file fits, a second does not
        cfg = tiny_config(dataset, output__output_dir=str(out), output__name="big", train__epochs=2,
                          output__save_every_steps=1, output__save_precision="fp32")
        with pytest.raises(TrainerError) as info:
            _run(cfg)
        message = str(info.value)
        assert message.startswith(f"Could not save the LoRA into {out}: the disk is full."), message
        saved = re.search(r"saved as (\S+) instead", message).group(1)
        tensors, _ = read_lora_file(saved)
        assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors.values())
        assert Path(saved).name == "big-step00000002.safetensors"
        assert not list(out.glob(".tmp-*")), "the failed write left its temporary file"
        assert [p.name for p in out.glob("*.safetensors")] == ["big-step00000001.safetensors"]
        assert load_state(Path(saved).parent / ".big-state").state.step == 2


def test_too_little_room_for_the_final_file_is_refused_before_the_first_step(dataset, monkeypatch):
    free = {"bytes": 10_000}
    monkeypatch.setattr(storage, "free_bytes", lambda folder: free["bytes"])
    with pytest.raises(TrainerError, match=r"has only 0\.0 MB free; the LoRA file alone needs about \d+\.\d MB\. "
                                           "Free some space on that disk or choose another output folder"):
        _run(tiny_config(dataset))
    assert not list((dataset / "out").glob("*.safetensors"))


def test_room_for_fewer_saves_than_planned_is_a_warning(dataset, monkeypatch):
    from helpers import Recorder

    monkeypatch.setattr(storage, "free_bytes", lambda folder: 3 * storage.SAVE_MARGIN)
    rec = Recorder()
    result = _run(tiny_config(dataset, train__epochs=2, output__save_every_steps=1), events=rec)
    assert result.status == "finished"
    (warning,) = [w for w in rec.warnings if "planned save" in w]
    written = len(list((dataset / "out").glob("*.safetensors")))  # 7 step files, 1 epoch file, the final one
    assert f"this run's {written} planned save(s) and its resume state need about" in warning
    assert "output.save_every_steps (--save-every-steps)" in warning


def _refused_before_loading(tmp_path, monkeypatch, capsys, output: Path, checkpoint) -> str:
    import lib_train.models.load as load

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(load, "load_bundle", no_load)
    make_images(tmp_path / "data" / "1_x", n=1)
    code, text = run_cli("lora", ["--checkpoint", checkpoint, "--data", tmp_path / "data", "--output", output,
                                  "--name", "n", *FAST], capsys)
    assert code == 2, text
    assert "Traceback" not in text, text
    error = text.strip().splitlines()[-1]  # after the dataset summary, one line
    assert error.startswith("error: Cannot write into the output folder"), text
    return error


def test_read_only_output_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, tiny_checkpoint):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        text = _refused_before_loading(tmp_path, monkeypatch, capsys, ro / "out", tiny_checkpoint)
    assert f"{ro / 'out'} (checked in {ro}, where it would be created), output.output_dir: it is on a read-only " \
           "file system. Choose an output folder on a writable disk" in text


def test_unwritable_output_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, tiny_checkpoint):
    """Root ignores permission bits, so the fault is injected where the probe creates its file."""
    out = tmp_path / "out"
    out.mkdir()
    real = storage.tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and Path(dir) == out:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(storage.tempfile, "mkstemp", mkstemp)
    text = _refused_before_loading(tmp_path, monkeypatch, capsys, out, tiny_checkpoint)
    assert f"the output folder {out}, output.output_dir: permission denied. Make the folder writable" in text


def test_a_file_in_the_way_of_the_output_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys,
                                                                                   tiny_checkpoint):
    (tmp_path / "blocker").write_text("x")
    text = _refused_before_loading(tmp_path, monkeypatch, capsys, tmp_path / "blocker" / "out", tiny_checkpoint)
    assert "a file is in the way of that folder" in text


def test_write_errors_of_other_libraries_become_os_errors(tmp_path):
    from lib_train.atomic import atomic_write

    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "x.safetensors",
                     lambda tmp: safetensors.torch.save_file({"a": torch.zeros(4)}, "/dev/full"))
    assert info.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())
