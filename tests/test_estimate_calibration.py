"""The live estimate's GPU calibration: a gpu_check.py measurement turned into a calibration point (bench/calibrate.py)
corrects the estimate of a run like it and labels it "calibrated" (and from what); without a near point the estimate
is "uncalibrated", and the tab says which next to the figure. The measurement file here is synthetic (a gpu_check.py
row as a CUDA card would write it): no GPU measurement exists yet."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from lib_train.config import default_config
from lib_train.errors import TrainerError
from lib_train.estimate import (
    CALIBRATION_FILE,
    CUDA_RESERVE_GIB,
    UNCALIBRATED,
    CalibrationPoint,
    estimate,
    load_calibration,
    nearest_point,
    parse_calibration,
)
from lib_train.webui.tab import render

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import calibrate  # noqa: E402
import gpu_check as gc  # noqa: E402

SD1_ROW = "sd1-lora-512-b1-bf16"
SDXL_ROW = "sdxl-lora-1024-b1-bf16"


def _row(cid: str, allocated: float, status: str = "finished", device: str = "cuda", tiny: bool = False) -> dict:
    cc = next(c for c in gc.plan(15, device, tiny, None, None) if c.id == cid)
    return {"id": cid, "config": asdict(cc), "status": status, "peak_allocated_gib": allocated,
            "peak_reserved_gib": allocated + 0.5, "s_per_step": 0.2,
            "machine": {"device": device, "device_name": "NVIDIA H200" if device == "cuda" else None,
                        "torch": "2.14.1"}}


def _check(*rows: dict, tiny: bool = False) -> dict:
    """A gpu_check.py JSON document as a CUDA run writes it (the fields calibrate.py reads)."""
    return {"machine": rows[0]["machine"] if rows else {}, "device": "cuda", "tiny": tiny, "results": list(rows)}


def _points(doc: dict) -> list[CalibrationPoint]:
    points, _ = calibrate.points_from_check(doc, "2026-12-02")
    return points


def test_a_point_reproduces_its_measurement_and_labels_the_estimate():
    measured = 6.25
    (point,) = _points(_check(_row(SD1_ROW, measured)))
    cfg = point.config()
    assert (point.family, point.method, point.precision) == ("sd1", "lora", "bf16")
    assert cfg.data.resolution == 512 and cfg.train.batch_size == 1 and not cfg.train.gradient_checkpointing
    assert cfg.optim.te_lr > 0 and cfg.optim.optimizer == "AdamW"  # the row's text encoders are trained
    raw = estimate(cfg, None, "sd1", calibration=())
    cal = estimate(cfg, None, "sd1", calibration=[point])
    assert not raw.calibrated and raw.calibration_label == UNCALIBRATED
    assert cal.calibrated and "NVIDIA H200" in cal.calibration_label and SD1_ROW in cal.calibration_label
    assert "2026-12-02" in cal.calibration_label and cal.calibration_label.startswith("calibrated on ")
    # at the point's own settings the allocator-visible parts equal the measurement; the CUDA reserve is on top
    assert cal.vram_gib == pytest.approx(measured + CUDA_RESERVE_GIB)
    assert cal.vram_gib != pytest.approx(raw.vram_gib)
    assert {k: v for k, v in cal.parts.items() if "activations" not in k} == \
        {k: v for k, v in raw.parts.items() if "activations" not in k}  # only the activations are corrected


def test_a_point_corrects_near_runs_only():
    (point,) = _points(_check(_row(SD1_ROW, 6.25)))
    factor = calibrate.activation_factor(point)
    assert factor > 1  # 6.25 GiB is more than the formula's figure for that run
    near = point.config()
    near.data.resolution, near.network.rank, near.optim.optimizer = 768, 32, "AdamW8bit"  # 2.25× the pixels
    raw, cal = estimate(near, None, "sd1", calibration=()), estimate(near, None, "sd1", calibration=[point])
    assert cal.calibrated and cal.parts["activations"] == pytest.approx(factor * raw.parts["activations"])
    far = [("data.resolution", 1088), ("train.gradient_checkpointing", True), ("optim.te_lr", 0.0),
           ("data.cache_latents", "off"), ("train.mixed_precision", "no")]
    for key, value in far:
        cfg = point.config()
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        if key == "optim.te_lr":
            cfg.data.shuffle_caption = False  # cached text outputs: another text-encoder mode
        assert nearest_point(cfg, "sd1", [point]) is None, key
        assert estimate(cfg, None, "sd1", calibration=[point]).calibration_label == UNCALIBRATED, key
    assert not estimate(point.config(), None, "sd2", calibration=[point]).calibrated  # another family
    emb = default_config("embedding")
    emb.data.resolution = 512
    assert not estimate(emb, None, "sd1", calibration=[point]).calibrated  # another method


def test_the_nearest_point_wins_and_a_wild_one_is_clamped():
    low, high = _points(_check(_row(SD1_ROW, 5.0), _row("sd1-lora-512-b4-bf16", 20.0)))
    cfg = low.config()
    cfg.train.batch_size = 3  # nearer to batch 4 than to batch 1 on a log scale
    assert nearest_point(cfg, "sd1", [low, high]) is high
    cfg.train.batch_size = 1
    assert nearest_point(cfg, "sd1", [low, high]) is low
    (absurd,) = _points(_check(_row(SD1_ROW, 500.0)))
    assert calibrate.activation_factor(absurd) == 4.0  # CALIBRATION_FACTOR_RANGE


def test_rows_that_measured_nothing_give_no_point():
    doc = _check(_row(SD1_ROW, 6.0, status="failed"), _row(SDXL_ROW, 9.0, device="cpu"))
    points, skipped = calibrate.points_from_check(doc, "2026-12-02")
    assert points == [] and len(skipped) == 2 and "status 'failed'" in skipped[0] and "CUDA" in skipped[1]
    points, skipped = calibrate.points_from_check(_check(_row(SD1_ROW, 6.0, tiny=True), tiny=True), "x")
    assert points == [] and "tiny" in skipped[0]


def test_the_import_script_writes_a_table_the_estimate_reads(tmp_path):
    check = tmp_path / "gpu_check.json"
    check.write_text(json.dumps(_check(_row(SD1_ROW, 6.25), _row(SDXL_ROW, 9.5))))
    table = tmp_path / "table.json"
    table.write_text(CALIBRATION_FILE.read_text())  # the shipped table as the starting point
    assert calibrate.main([str(check), "--table", str(table), "--date", "2026-12-02"]) == 0
    assert load_calibration(table) == load_calibration(CALIBRATION_FILE)  # without --write nothing changes
    assert calibrate.main([str(check), "--table", str(table), "--date", "2026-12-02", "--write"]) == 0
    points = load_calibration(table)
    assert [p.extra["row"] for p in points] == [SD1_ROW, SDXL_ROW] and points[1].family == "sdxl"
    sdxl = points[1].config()
    assert estimate(sdxl, None, "sdxl", calibration=points).vram_gib == pytest.approx(9.5 + CUDA_RESERVE_GIB)
    # a newer measurement of the same card and row replaces the older one
    check.write_text(json.dumps(_check(_row(SD1_ROW, 7.0))))
    assert calibrate.main([str(check), "--table", str(table), "--date", "2026-12-03", "--write"]) == 0
    points = load_calibration(table)
    assert len(points) == 2 and [p.peak_allocated_gib for p in points] == [9.5, 7.0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": [_row(SD1_ROW, 1.0, status="failed")]}))
    assert calibrate.main([str(bad), "--table", str(table)]) == 1


def test_the_shipped_table_is_valid_and_every_estimate_without_a_point_is_uncalibrated():
    points = load_calibration()
    for point in points:  # each shipped point calibrates its own run
        assert estimate(point.config(), None, point.family).calibrated
    cfg = default_config()
    cfg.data.resolution = 512
    est = estimate(cfg, 100, "sd1")
    assert est.calibrated == (nearest_point(cfg, "sd1", points) is not None)
    assert estimate(cfg, 100, "sd1", calibration=()).calibration_label == UNCALIBRATED


def test_a_malformed_table_is_named():
    good = {"family": "sd1", "method": "lora", "precision": "bf16", "settings": {"data.resolution": 512},
            "peak_allocated_gib": 5.0, "source": "x"}
    assert parse_calibration({"points": [good]}, "t.json")[0].config().data.resolution == 512
    for change, words in (({"family": "sd9"}, "unknown family"), ({"precision": "fp8"}, "precision"),
                          ({"settings": {"output.name": "x"}}, "output.name"),
                          ({"peak_allocated_gib": -1}, "peak_allocated_gib"), ({"card": "x"}, "unknown card")):
        with pytest.raises(TrainerError, match="t.json: points\\[0\\]") as err:
            parse_calibration({"points": [{**good, **change}]}, "t.json")
        assert words in str(err.value)
    with pytest.raises(TrainerError, match="list \"points\""):
        parse_calibration([], "t.json")


def test_the_tab_says_calibrated_or_uncalibrated_next_to_the_figure():
    cfg = default_config()
    cfg.data.resolution = 512
    html = render.estimate_html(estimate(cfg, 100, "sd1", calibration=()), 100, None)
    figure = html.split("GPU memory", 1)[1].split("</p>", 1)[0]
    assert "(uncalibrated)" in figure and "no GPU measurement" in html
    (point,) = _points(_check(_row(SD1_ROW, 6.25)))
    html = render.estimate_html(estimate(point.config(), 100, "sd1", calibration=[point]), 100, None)
    figure = html.split("GPU memory", 1)[1].split("</p>", 1)[0]
    assert "(calibrated)" in figure and "uncalibrated" not in html and "NVIDIA H200" in html
