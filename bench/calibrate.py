"""Turn a ``bench/gpu_check.py`` JSON into calibration points of the live estimate (``lib_train/estimate.py``).

Each finished full-size CUDA row of the check becomes one point: the settings of the run it measured (the estimate's
inputs, ``lib_train.estimate.INPUTS``, rebuilt from the row's configuration exactly as ``gpu_check.py`` built the
run), its family, method and precision, the measured ``peak_allocated_gib`` (and ``peak_reserved_gib``) and its
source (card, date, row id). Rows that ran on the CPU, on ``--tiny`` models, failed or were skipped give no point
(they say why). Without ``--write`` the points are only printed, with the estimate before and after; ``--write``
merges them into the table (``lib_train/estimate_calibration.json``, or ``--table``): a point of the same card and
row replaces the older one, others are kept.

Run from the repository root::

    python bench/calibrate.py gpu_check.json                  # what the points would change
    python bench/calibrate.py gpu_check.json --write          # into lib_train/estimate_calibration.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check as gc  # noqa: E402  (puts the repository on sys.path through bench_train)

from lib_train.estimate import (  # noqa: E402
    CALIBRATION_FILE,
    INPUTS,
    CalibrationPoint,
    activation_factor,
    estimate,
    load_calibration,
    parse_calibration,
)


def _get(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def run_config(row: dict):
    """The config ``gpu_check.run_one`` trained for ``row`` (its ``config``: a ``CheckConfig`` as a dict)."""
    cc = gc.CheckConfig(**row["config"])
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        cfg = gc.bt._train_config(cc.bench_config(), data, Path(tmp) / "out")
    gc._apply_settings(cfg, cc.settings())
    cfg.train.mixed_precision = cc.precision
    return cc, cfg


def points_from_check(doc: dict, date: str) -> tuple[list[CalibrationPoint], list[str]]:
    """The points of a gpu_check JSON document (``date``: when it was measured, for the source) and, for each row
    that gives none, why."""
    points, skipped = [], []
    for row in doc.get("results", []):
        rid = row.get("id", "?")
        cfg_row = row.get("config") or {}
        machine = row.get("machine") or doc.get("machine") or {}
        why = None
        if cfg_row.get("tiny") or doc.get("tiny"):
            why = "tiny models (a check of the script; the numbers mean nothing)"
        elif cfg_row.get("device", doc.get("device")) != "cuda":
            why = "not measured on a CUDA card"
        elif row.get("status") != "finished":
            why = f"status {row.get('status')!r}" + (f": {row['error'].splitlines()[0]}" if row.get("error") else "")
        elif not row.get("peak_allocated_gib"):
            why = "no peak_allocated_gib"
        if why:
            skipped.append(f"{rid}: {why}")
            continue
        cc, cfg = run_config(row)
        base = gc.BASES[cc.base]
        card = machine.get("device_name") or "an unnamed CUDA card"
        points.append(CalibrationPoint(
            family=base.family, method=base.method, precision=cc.precision,
            settings={k: _get(cfg, k) for k in INPUTS if k != "train.mixed_precision"},
            peak_allocated_gib=round(float(row["peak_allocated_gib"]), 4),
            peak_reserved_gib=round(float(row["peak_reserved_gib"]), 4) if row.get("peak_reserved_gib") else None,
            source=f"{card}, bench/gpu_check.py {date}, row {rid}",
            extra={"card": card, "date": date, "row": rid, "torch": machine.get("torch"),
                   "s_per_step": row.get("s_per_step")}))
    return points, skipped


def merge(old: tuple[CalibrationPoint, ...], new: list[CalibrationPoint]) -> list[CalibrationPoint]:
    """``old`` with ``new`` added; a new point replaces an old one of the same card and row."""
    def key(p: CalibrationPoint) -> tuple:
        return (p.extra.get("card"), p.extra.get("row")) if p.extra.get("row") else (p.source,)

    replaced = {key(p) for p in new}
    return [p for p in old if key(p) not in replaced] + list(new)


def write_table(path: Path, points: list[CalibrationPoint]) -> None:
    from lib_train.atomic import atomic_write_text

    try:
        about = json.loads(path.read_text(encoding="utf-8")).get("about")
    except (OSError, ValueError):
        about = None
    doc = {"about": about or "GPU calibration points of lib_train/estimate.py (bench/calibrate.py)",
           "points": [p.to_json() for p in points]}
    parse_calibration(json.loads(json.dumps(doc)), str(path))  # what the estimate will read back
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="gpu_check.py JSON → calibration points of the live estimate")
    p.add_argument("check_json", help="a JSON file written by bench/gpu_check.py on a CUDA card")
    p.add_argument("--date", default=None, help="when it was measured (default: the file's modification date)")
    p.add_argument("--write", action="store_true", help="merge the points into the table")
    p.add_argument("--table", default=str(CALIBRATION_FILE), help="the calibration table (default: the library's)")
    args = p.parse_args(argv)
    path = Path(args.check_json)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: {path}: cannot read it as gpu_check.py's JSON ({e})", file=sys.stderr)
        return 2
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        print(f"error: {path}: no \"results\" list; give the JSON bench/gpu_check.py wrote", file=sys.stderr)
        return 2
    date = args.date or datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()
    points, skipped = points_from_check(doc, date)
    for line in skipped:
        print(f"no point from {line}")
    for pt in points:
        cfg = pt.config()
        before = estimate(cfg, None, pt.family, calibration=()).vram_gib
        after = estimate(cfg, None, pt.family, calibration=[pt]).vram_gib
        print(f"{pt.source}: measured {pt.peak_allocated_gib:.2f} GiB allocated; estimate {before:.2f} → "
              f"{after:.2f} GiB (activations ×{activation_factor(pt):.2f})")
    if not points:
        print("error: no usable row (full-size, CUDA, finished) in this file", file=sys.stderr)
        return 1
    if args.write:
        table = Path(args.table)
        old = load_calibration(table) if table.is_file() else ()
        merged = merge(old, points)
        write_table(table, merged)
        print(f"{table}: {len(merged)} point(s) ({len(points)} from {path.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
