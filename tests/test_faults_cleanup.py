"""What a killed run leaves: its hidden temporary files and state folders are removed by the next run of the same
name (only its own, only when no other live run may own them), and a resume state left only as ``.NAME-state.old``
(a kill between the two renames of a state save) is recovered by that run or by ``--resume OUTDIR``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from helpers import ROOT, Recorder, make_bundle, make_images, run_cli, tiny_config

from lib_train.train.events import Commands
from lib_train.train.lock import output_lock
from lib_train.train.lora_trainer import prepare_data, train_lora
from lib_train.train.state import load_state
from lib_train.train.storage import clean_stale, owners

ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_owners_of_a_file_name():
    assert owners("a.safetensors") == {"a"}
    assert owners("a-step00000012.safetensors") == {"a-step00000012", "a"}
    assert owners("a-000001.safetensors") == {"a-000001", "a"}
    assert owners("a-000008-0.png") == {"a-000008-0", "a"}
    assert owners("a.preview.png") == {"a"} and owners("a.config.json") == {"a"}
    assert owners("notes.txt") == set()


def test_only_our_stale_temporary_files_are_removed(tmp_path):
    out = tmp_path
    ours = [".tmp-tiny.safetensors.k2j3h4g5", ".tmp-tiny-step00000003.safetensors.a1b2c3d4",
            ".tmp-tiny.config.json.zz9y8x7w", ".tmp-tiny-000002.preview.png.q1w2e3r4"]
    theirs = [".tmp-other.safetensors.k2j3h4g5", ".tmp-tiny2.safetensors.aaaa1111",
              ".tmp-tiny-000001.safetensors.bbbb2222",  # also run "tiny-000001"'s final file: that run is alive
              "tiny.safetensors", ".tmp-write-check.abcd"]
    for name in ours + theirs:
        (out / name).write_bytes(b"x")
    (out / "samples").mkdir()
    (out / "samples" / ".tmp-tiny-000004-0.png.cccc3333").write_bytes(b"x")
    for folder in (".tiny-state.tmp-abc123", "..tiny-state.tmp-def456", ".other-state.tmp-ghi789"):
        (out / folder).mkdir()
        (out / folder / "network.safetensors").write_bytes(b"x")
    with output_lock(out, "tiny-000001", what="another run"):  # alive (in this process)
        notes = clean_stale(out, "tiny")
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted(theirs + [".other-state.tmp-ghi789", "samples"])
    assert not list((out / "samples").iterdir())
    (note,) = notes
    assert note.startswith(f"Removed 7 temporary file(s) an interrupted run of 'tiny' left in {out}: ")
    assert note.endswith(" and 3 more")


def _kill_between_the_renames(state_dir) -> None:
    """A real process re-saves the state in ``state_dir`` and is killed (SIGKILL) right after the first rename (the
    current state moved to ``.old``), before the new one is moved in."""
    code = (
        "import os, signal, sys\n"
        "from lib_train.train.state import load_state, save_state\n"
        f"s = load_state({str(state_dir)!r})\n"
        "real, calls = os.replace, []\n"
        "def replace(a, b):\n"
        "    calls.append(a)\n"
        "    if len(calls) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(a, b)\n"
        "os.replace = replace\n"
        f"save_state({str(state_dir)!r}, s.state, s.network, s.optimizer, s.scheduler, s.scaler)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, timeout=120)
    assert proc.returncode == -signal.SIGKILL


def _interrupted(tmp_path, **over):
    make_images(tmp_path / "data" / "1_x", n=2)
    cfg = tiny_config(tmp_path, train__epochs=2, **over)
    commands = Commands()
    first = train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), events=Recorder(stop_at=2, commands=commands),
                       commands=commands)
    assert first.status == "interrupted"
    return cfg, first


def test_resume_of_the_output_folder_recovers_a_state_left_as_old(tmp_path, tiny_checkpoint, capsys):
    cfg, first = _interrupted(tmp_path)
    out = tmp_path / "out"
    _kill_between_the_renames(first.state_dir)
    assert not (out / ".tiny-state").exists() and (out / ".tiny-state.old" / "state.json").is_file()
    (tmp_dir,) = out.glob(".tiny-state.tmp-*")
    (out / ".tmp-tiny-step00000002.safetensors.deadbeef").write_bytes(b"half a file")
    code, text = run_cli("lora", ["--resume", out, "--checkpoint", tiny_checkpoint], capsys)
    assert code == 0, text
    assert (f"Recovered the resume state {out / '.tiny-state'} from .tiny-state.old (a run was stopped while it "
            "replaced its state).") in text
    assert (f"warning: Removed 2 temporary file(s) an interrupted run of 'tiny' left in {out}: "
            f".tmp-tiny-step00000002.safetensors.deadbeef, {tmp_dir.name}/") in text
    assert (out / "tiny.safetensors").is_file()
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".tiny-state.*"))


def test_the_next_run_of_the_name_recovers_a_state_left_as_old(tmp_path):
    cfg, first = _interrupted(tmp_path)
    out = tmp_path / "out"
    _kill_between_the_renames(first.state_dir)
    cfg.output.overwrite = True
    cfg.train.epochs = 1
    rec = Recorder()
    assert train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), events=rec).status == "finished"
    assert any(w.startswith(f"Recovered the resume state {out / '.tiny-state'} from .tiny-state.old")
               for w in rec.warnings), rec.warnings
    assert load_state(out / ".tiny-state").state.step == 2
    assert not list(out.glob(".tiny-state.*"))
