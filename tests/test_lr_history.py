"""The learning-rate chart: the rates of every step recorded in the run (tiny real-code models), shown in the job
status during and after a run, kept across a resume, written into each saved file's metadata, shown when a finished
run is loaded in the tab; the downsampling of long runs; the chart's HTML."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
from helpers import Recorder, apply_overrides, make_bundle, make_images, tiny_config

from lib_train.config import default_config
from lib_train.train.events import Commands
from lib_train.train.lora_trainer import prepare_data, train_lora
from lib_train.train.lr_history import FILE_POINTS, GroupRate, LRHistory, format_rate
from lib_train.train.metadata import LR_FINAL_KEY, LR_HISTORY_KEY, lr_from_metadata, lr_metadata, read_lr_history
from lib_train.train.schedule import lr_factor
from lib_train.train.state import load_state
from lib_train.train.ti_trainer import prepare_embedding_data, train_embedding
from lib_train.webui.jobs import JobStatus, record_end, record_progress
from lib_train.webui.tab import render


class StatusRecorder(Recorder):
    """A run's events into a job status (the WebUI job's own code, without ``shared.state``), with a snapshot of the
    status as a client reads it (``GET /trainer/v1/jobs/{id}``) after every step."""

    def __init__(self, stop_at: int | None = None, commands: Commands | None = None):
        super().__init__(stop_at, commands)
        self.job = JobStatus(id="j", method="lora", name="tiny", output_dir="/out", state="running")
        self.snapshots: dict[int, dict] = {}
        self.history: LRHistory | None = None

    def progress(self, p):
        record_progress(self.job, p)
        self.history = p.lr_history
        self.snapshots[p.step] = json.loads(json.dumps(dataclasses.asdict(self.job)))  # as the API sends it
        super().progress(p)

    def end(self, state: str) -> dict:
        self.job.state = state
        record_end(self.job, self.history)
        return dataclasses.asdict(self.job)


@pytest.fixture
def dataset(tmp_path):
    make_images(tmp_path / "data" / "3_thing", n=2)  # 6 steps an epoch at batch 1
    return tmp_path


def _scheduled(base: float, step: int, cfg, total: int) -> float:
    """The schedule's rate for optimizer step ``step`` (1-based: the scheduler has stepped ``step - 1`` times)."""
    o = cfg.optim
    return base * lr_factor(step - 1, total_steps=total, kind=o.scheduler, warmup_steps=o.warmup_steps,
                            num_cycles=o.num_cycles, power=o.power)


def test_adamw_constant_rates_in_the_status_during_and_after_the_run_and_in_the_files(dataset):
    cfg = tiny_config(dataset, optim__lr=2e-3, optim__te_lr=5e-4, output__save_every_steps=3)
    rec = StatusRecorder()
    result = train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), events=rec)
    assert result.status == "finished" and result.step == 6
    final = rec.end("finished")

    mid = rec.snapshots[3]  # what a client saw while the run was at step 3 of 6
    assert mid["lr_series"] == ["UNet", "Text encoder"]
    assert mid["lr_history"] == [[1, 2e-3, 5e-4], [2, 2e-3, 5e-4], [3, 2e-3, 5e-4]]
    assert mid["lr"] == 2e-3 and mid["lr_note"] == "Learning rate at step 3: 0.002 for the UNet and 5e-4 for " \
                                                   "the text encoder"
    assert [r[0] for r in final["lr_history"]] == list(range(1, 7))
    assert final["lr_note"] == ("Learning rate at the last step (6): 0.002 for the UNet and 5e-4 for the text "
                                "encoder")  # no hint: AdamW's rate is the schedule's

    out = dataset / "out"
    step_file = read_lr_history(out / "tiny-step00000003.safetensors")
    assert step_file is not None and step_file.points() == mid["lr_history"]  # the history up to that save
    from safetensors import safe_open

    with safe_open(str(out / "tiny.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta[LR_FINAL_KEY]) == {
        "optimizer": "AdamW", "step": 6,
        "groups": {"UNet": {"lr": 2e-3, "base_lr": 2e-3, "d": None, "d_lr": None},
                   "Text encoder": {"lr": 5e-4, "base_lr": 5e-4, "d": None, "d_lr": None}}}
    assert json.loads(meta[LR_HISTORY_KEY]) == {"series": ["UNet", "Text encoder"], "rows": final["lr_history"]}
    assert {k for k in meta if k.startswith("sd_trainer_")} == {LR_FINAL_KEY, LR_HISTORY_KEY}
    assert set(lr_metadata(step_file)) == {LR_FINAL_KEY, LR_HISTORY_KEY}  # nothing in kohya's ss_/sshs_/modelspec.
    assert meta["ss_learning_rate"] == "0.002"  # kohya's keys unchanged


def test_cosine_with_warmup_equals_the_scheduler_and_goes_on_after_a_resume(dataset):
    cfg = tiny_config(dataset, optim__scheduler="cosine", optim__warmup_steps=2, optim__lr=1e-3, optim__te_lr=0,
                      train__epochs=2)
    total = prepare_data(cfg).total_steps
    assert total == 12
    commands = Commands()
    first = StatusRecorder(stop_at=5, commands=commands)
    result = train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), events=first, commands=commands)
    assert result.status == "interrupted" and result.step == 5

    resume = load_state(result.state_dir)
    assert resume.state.lr_history["rows"][-1][0] == 5
    second = StatusRecorder()
    result = train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), events=second, resume=resume)
    assert result.status == "finished" and result.step == total
    status = second.end("finished")

    assert status["lr_series"] == ["UNet"]  # te_lr 0: the text encoder is no group
    rows = status["lr_history"]
    assert [r[0] for r in rows] == list(range(1, total + 1))  # one chart across both sessions
    expected = [_scheduled(1e-3, step, cfg, total) for step in range(1, total + 1)]
    assert [r[1] for r in rows] == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert rows[0][1] == 0.0 and rows[2][1] == 1e-3  # warm-up from 0, then the peak
    assert rows[-1][1] < rows[6][1] < 1e-3  # decaying
    assert status["lr_note"] == f"Learning rate at the last step ({total}): {format_rate(expected[-1])} for the UNet"
    assert read_lr_history(dataset / "out" / "tiny.safetensors").points() == rows


# Prodigy's d leaves d0 only once its estimate exceeds it (after about 7 steps on the tiny model); d_coef=100 scales
# the estimate, so it moves within the 6 steps
@pytest.mark.parametrize("name,args", [("Prodigy", "d_coef=100"), ("DAdaptAdam", "")])
def test_adaptive_optimizers_record_d_lr_and_the_hint(dataset, name, args):
    # both groups at 1.0: Prodigy and DAdaptAdam refuse different rates per group (0 aside)
    cfg = tiny_config(dataset, optim__optimizer=name, optim__lr=1.0, optim__te_lr=1.0, optim__optimizer_args=args)
    rec = StatusRecorder()
    result = train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), events=rec)
    assert result.status == "finished"
    status = rec.end("finished")

    assert status["lr_series"] == ["UNet", "UNet d·lr", "Text encoder", "Text encoder d·lr"]
    rows = status["lr_history"]
    assert [r[0] for r in rows] == list(range(1, 7))
    assert all(r[1] == 1.0 and r[3] == 1.0 for r in rows)  # the (constant) schedule
    # d starts at d0 = 1e-6 (both libraries' default) and the first step used it: the rates are read before the step
    assert rows[0][2] == pytest.approx(1e-6) and rows[0][4] == pytest.approx(1e-6)
    assert rows[-1][2] > rows[0][2] and rows[-1][2] != 1.0  # d adapted; d·lr is not the scheduled lr
    assert rows[-1][4] == rows[-1][2]  # one d for both groups
    assert status["lr"] == rows[-1][2]  # the progress bar's rate is the effective one
    d = rows[-1][2]
    assert status["lr_note"] == (f"{name} settled at {format_rate(d)} for the UNet and the text encoder: a starting "
                                 "point for AdamW")
    assert re.fullmatch(rf"{name} is at .+ \(d × learning rate\) at step 3", rec.snapshots[3]["lr_note"])

    final = json.loads(read_lr_file_meta(dataset / "out" / "tiny.safetensors")[LR_FINAL_KEY])
    assert final["optimizer"] == name and final["groups"]["UNet"]["d"] == pytest.approx(d)
    assert final["groups"]["Text encoder"]["d_lr"] == pytest.approx(d)
    loaded = read_lr_history(dataset / "out" / "tiny.safetensors")
    assert loaded.summary() == status["lr_note"]  # a finished run loaded later says the same


def read_lr_file_meta(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_an_embedding_run_records_its_vectors_group(tmp_path):
    make_images(tmp_path / "data" / "2_thing", n=2)
    cfg = apply_overrides(default_config("embedding"), {
        "data__train_dir": str(tmp_path / "data"), "data__resolution": 64, "data__min_bucket_side": 64,
        "data__max_bucket_side": 128, "embedding__vectors": 2, "embedding__init_text": "a man", "train__epochs": 1,
        "output__output_dir": str(tmp_path / "out"), "output__name": "emb", "optim__optimizer": "Prodigy",
        "optim__lr": 1.0})
    rec = StatusRecorder()
    result = train_embedding(cfg, make_bundle("sd1"), prepare_embedding_data(cfg), events=rec)
    assert result.status == "finished"
    status = rec.end("finished")
    assert status["lr_series"] == ["Embedding vectors", "Embedding vectors d·lr"]
    assert status["lr_note"].startswith("Prodigy settled at ") and "for the embedding's vectors" in status["lr_note"]
    assert read_lr_history(tmp_path / "out" / "emb.safetensors").points() == status["lr_history"]


# ---- the history on its own


def _rates(step: int) -> list[GroupRate]:
    return [GroupRate("UNet", lr=1.0, base_lr=1.0, d=step * 1e-6)]


def test_a_long_run_is_thinned_to_a_uniform_stride_keeping_the_first_and_the_newest_step():
    h = LRHistory("Prodigy", limit=8)
    for step in range(1, 101):
        h.add(step, _rates(step))
        assert len(h.points()) <= 9 + 1
    points = h.points()
    steps = [int(r[0]) for r in points]
    assert steps[0] == 1 and steps[-1] == 100  # the start and the final values
    inner = steps[1:-1]
    assert len({b - a for a, b in zip(inner, inner[1:])}) == 1  # one stride
    assert h.stride == 16 and inner == [16, 32, 48, 64, 80, 96]
    assert points[-1] == [100, 1.0, pytest.approx(1e-4)]
    assert h.summary() == "Prodigy settled at 1e-4 for the UNet: a starting point for AdamW"

    short = h.thinned(3)  # 7 rows at stride 16 → 4 at stride 32 → 2 at stride 64
    assert [int(r[0]) for r in short.points()] == [1, 64, 100] and short.stride == 64
    assert short.summary() == h.summary() and h.stride == 16  # the original is unchanged
    assert LRHistory.from_json(json.loads(json.dumps(h.to_json()))).points() == points  # the resume state


def test_a_long_run_file_keeps_few_rows():
    h = LRHistory("AdamW")
    for step in range(1, 5001):
        h.add(step, [GroupRate("UNet", lr=1e-4, base_lr=1e-4, d=None)])
    assert len(h.points()) <= 1001
    meta = lr_metadata(h)
    rows = json.loads(meta[LR_HISTORY_KEY])["rows"]
    assert len(rows) <= FILE_POINTS + 2 and rows[0][0] == 1 and rows[-1][0] == 5000
    assert len(meta[LR_HISTORY_KEY]) < 20_000  # a small header


def test_other_metadata_holds_no_history():
    assert lr_from_metadata({"ss_learning_rate": "1e-4"}) is None
    assert lr_from_metadata({LR_FINAL_KEY: "{", LR_HISTORY_KEY: "[]"}) is None
    assert lr_from_metadata({LR_FINAL_KEY: '{"groups": []}', LR_HISTORY_KEY: '{"series": ["a"], "rows": [[1]]}'}) \
        is None


def test_format_rate():
    assert [format_rate(v) for v in (8.1e-5, 1e-4, 1e-3, 0.5, 1.0, 0.0, 2.5e-6)] == \
        ["8.1e-5", "1e-4", "0.001", "0.5", "1", "0", "2.5e-6"]


# ---- the chart


def _ys(svg: str, series: str) -> list[float]:
    found = re.findall(rf"<polyline data-series='{re.escape(series)}' points='([^']*)'", svg)
    return [float(p.split(",")[1]) for seg in found for p in seg.split()]


def test_the_chart_draws_each_series_on_a_log_scale_with_a_gap_at_zero():
    series = ["UNet", "UNet d·lr"]
    rows = [[1, 0.0, 0.0], [2, 1.0, 1e-6], [3, 1.0, 1e-5], [4, 1.0, 1e-4]]
    svg = render.lr_chart_svg(series, rows)
    assert "class='sd-trainer-lr'" in svg and "log scale" in svg
    assert "UNet 1</text>" in svg and "UNet d·lr 1e-4</text>" in svg  # legend with the newest values
    flat, eff = _ys(svg, "UNet"), _ys(svg, "UNet d·lr")
    assert len(flat) == len(eff) == 3  # step 1 (rate 0) has no place on a log scale
    assert len(set(flat)) == 1
    assert eff[0] - eff[1] == pytest.approx(eff[1] - eff[2], abs=0.2)  # a decade is a decade
    assert flat[0] < eff[2] < eff[0]  # 1.0 on top, 1e-6 at the bottom
    for tick in ("1e-6", "1e-4", "0.01", "1"):
        assert f">{tick}</text>" in svg
    assert "stroke-dasharray" in svg  # the schedule dashed under the effective rate


def test_the_job_status_shows_both_charts_and_the_note():
    status = dataclasses.asdict(JobStatus(
        id="j", method="lora", name="me", output_dir="/o", state="finished",
        loss_history=[[1, 0.5], [2, 0.25]], lr_series=["UNet", "UNet d·lr"],
        lr_history=[[1, 1.0, 1e-6], [2, 1.0, 3e-5]], lr_note="Prodigy settled at 3e-5 for the UNet: a starting "
                                                              "point for AdamW"))
    html = render.job_status(status)
    charts = html.index("sd-trainer-charts")
    assert charts < html.index("<svg class='sd-trainer-loss'") < html.index("<svg class='sd-trainer-lr'")
    assert "data-series='UNet d·lr'" in html and "data-series='UNet'" in html
    assert "Prodigy settled at 3e-5 for the UNet: a starting point for AdamW" in html
    status.update(lr_history=[[1, 1.0, 1e-6]], lr_note="")  # one step: nothing to draw yet
    assert "sd-trainer-lr" not in render.job_status(status)


def test_a_loaded_run_shows_its_chart_and_hint(dataset):
    gr = pytest.importorskip("gradio")  # noqa: F841
    from test_ui_build import FakeBackend

    from lib_train.train.outputs import save_run_config
    from lib_train.webui.tab import build as ui

    cfg = tiny_config(dataset, optim__optimizer="Prodigy", optim__lr=1.0, optim__te_lr=0,
                      output__save_every_steps=3)
    save_run_config(cfg)
    train_lora(cfg, make_bundle("sd1"), prepare_data(cfg))
    h = ui._Handlers(ui.WebuiInfo(lora_dir="/loras"), FakeBackend().backend())
    out = dataset / "out"
    hint = read_lr_history(out / "tiny.safetensors").summary()
    assert hint.startswith("Prodigy settled at ") and hint.endswith("for the UNet: a starting point for AdamW")
    for given in (out, out / "tiny.safetensors", out / "tiny.config.json"):
        *_, message = h.load_run(str(given))
        assert "Loaded the settings" in message and "<svg class='sd-trainer-lr'" in message
        assert "data-series='UNet d·lr'" in message and hint in message
    *_, message = h.load_run(str(out / "tiny-step00000003.safetensors"))  # an intermediate file: its own history
    assert "step 3 · learning rate" in message and "settled" not in message and "Prodigy is at" in message
    (out / "tiny.safetensors").unlink()  # settings alone (a run that never finished)
    *_, message = h.load_run(str(out))
    assert "Loaded the settings" in message and "sd-trainer-lr" not in message
