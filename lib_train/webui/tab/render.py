"""HTML the Trainer tab shows: the dataset report, a job's status, errors. Every text from files or users is
escaped. No gradio, no WebUI imports."""

from __future__ import annotations

import html
import math
import time
from typing import Any, Iterable

from ...data import DatasetScan
from ...errors import Problem, ProblemsError, TrainerError
from ...train.lr_history import EFFECTIVE, LRHistory, format_rate
from ...train.prepare import PreparedData


def _e(value: Any) -> str:
    return html.escape(str(value))


def _list(items: Iterable[str], cls: str) -> str:
    rows = "".join(f"<li>{item}</li>" for item in items)
    return f"<ul class='{cls}'>{rows}</ul>" if rows else ""


def _problems(problems: list[Problem]) -> list[str]:
    return [f"<code>{_e(p.where)}</code>: {_e(p.message)}" for p in problems]


def message(text: str, kind: str = "info") -> str:
    """One line of text; ``kind`` is "info", "ok" or "error" (a CSS class)."""
    return f"<p class='sd-trainer-{kind}'>{_e(text)}</p>"


def error(err: TrainerError) -> str:
    """A user-facing error: a problem list (every setting or file named) or the message."""
    if isinstance(err, ProblemsError):
        return (f"<div class='sd-trainer-error'><p>{_e(err.title)}</p>"
                f"{_list(_problems(err.problems), 'sd-trainer-problems')}</div>")
    return f"<div class='sd-trainer-error'>{''.join(f'<p>{_e(line)}</p>' for line in str(err).splitlines())}</div>"


def _folders(scan: DatasetScan) -> str:
    rows = "".join(f"<tr><td>{'reg' if s.is_reg else 'train'}</td><td><code>{_e(s.key)}</code></td>"
                   f"<td>{s.img_count}</td><td>{s.repeats}</td><td>{s.img_count * s.repeats}</td></tr>"
                   for s in scan.folders)
    if not rows:
        return ""
    return ("<table class='sd-trainer-folders'><tr><th></th><th>folder</th><th>images</th><th>repeats</th>"
            f"<th>samples</th></tr>{rows}</table>")


def scan_report(scan: DatasetScan, prep: PreparedData | None) -> str:
    """Everything a scan found: problems (training cannot start), warnings, the folder structure with counts and,
    when the dataset is usable, buckets and the step formula."""
    parts = [f"<p>Dataset <code>{_e(scan.train_dir)}</code>"
             + (f", regularization <code>{_e(scan.reg_dir)}</code>" if scan.reg_dir else "") + "</p>"]
    if scan.problems:
        n = len(scan.problems)
        parts.append(f"<div class='sd-trainer-error'><p>{n} problem{'s' if n != 1 else ''}: training cannot start "
                     f"until {'they are' if n != 1 else 'it is'} fixed.</p>"
                     f"{_list(_problems(scan.problems), 'sd-trainer-problems')}</div>")
    if scan.warnings:
        parts.append(f"<div class='sd-trainer-warning'><p>{len(scan.warnings)} warning(s):</p>"
                     f"{_list(_problems(scan.warnings), 'sd-trainer-problems')}</div>")
    parts.append(_folders(scan))
    if prep is not None:
        buckets = prep.bucket_info.get("buckets", {})
        if buckets:
            sizes = ", ".join(f"{b['resolution'][0]}×{b['resolution'][1]} ({b['count']})" for b in buckets.values())
            parts.append(f"<p>Buckets: {_e(sizes)}</p>")
        parts.append(f"<p class='sd-trainer-ok'>Steps: {_e(prep.formula)}</p>")
    return "<div class='sd-trainer-report'>" + "".join(parts) + "</div>"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def job_outcome(s: dict[str, Any]) -> str:
    """What a Train / Resume click ended with, in one line under the buttons (the job panel below has the details: it
    is not repeated here): the file written, where to resume from, or the error."""
    state, name = s.get("state"), f"{s.get('method', '')} run {s.get('name', '')}".strip()
    if state == "finished":
        written = s.get("final_file") or (s.get("saved") or ["no file"])[-1]
        return message(f"Finished the {name}: {written}", "ok")
    if state == "interrupted":
        where = f"; resume from {s['state_dir']}" if s.get("state_dir") else ""
        return message(f"Interrupted the {name} at step {s.get('step', 0)}{where}", "info")
    if state == "error":
        return message(f"The {name} failed: {s.get('error') or s.get('phase') or 'see the job panel'}", "error")
    return message(f"The {name} is {state}", "info")


def job_status(s: dict[str, Any]) -> str:
    """A job's status (a :class:`~lib_train.webui.jobs.JobStatus` as a dict): state, progress, loss, files, notes,
    error, and what to do with an interrupted run."""
    loss = f"{s['loss']:.4f}" if s.get("loss") is not None else "–"
    rows = [("Job", f"{_e(s['id'])} ({_e(s['method'])}, <code>{_e(s['name'])}</code>)"),
            ("State", f"<b class='sd-trainer-state-{_e(s['state'])}'>{_e(s['state'])}</b>"
                      + (f" — {_e(s['phase'])}" if s.get("phase") else "")),
            ("Step", f"{s['step']}/{s['total_steps']}, epoch {s['epoch']}/{s['total_epochs']}"),
            ("Loss", loss),
            ("Elapsed / ETA", f"{_duration(s.get('elapsed_s'))} / {_duration(s.get('eta_s'))}"),
            ("Output folder", f"<code>{_e(s['output_dir'])}</code>")]
    if s.get("final_file"):
        rows.append(("File", f"<code>{_e(s['final_file'])}</code>"))
    if s.get("state_dir"):
        rows.append(("Resume state", f"<code>{_e(s['state_dir'])}</code> (paste into Resume to continue)"))
    if s.get("resumed_from"):
        rows.append(("Resumed from", f"<code>{_e(s['resumed_from'])}</code>"))
    if s.get("ended_at"):
        rows.append(("Ended", _e(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["ended_at"])))))
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    parts = [f"<table class='sd-trainer-status'>{table}</table>"]
    if s.get("error"):
        parts.append(error(TrainerError(s["error"])))
    if s.get("saved"):
        parts.append("<p>Saved:</p>" + _list((f"<code>{_e(p)}</code>" for p in s["saved"]), "sd-trainer-files"))
        if s.get("state") == "finished" and len(s["saved"]) > 1:
            parts.append(message("Compare the saved files in txt2img → Script → Epoch × weight grid (training run: "
                                 f"{s['name']}).", "ok"))
    if s.get("notes"):
        parts.append("<p>Notes:</p>" + _list((_e(n) for n in s["notes"]), "sd-trainer-notes"))
    charts = []
    if len(s.get("loss_history") or []) >= 2:
        charts.append(loss_curve_svg(s["loss_history"]))
    if len(s.get("lr_history") or []) >= 2 and s.get("lr_series"):
        charts.append(lr_chart_svg(s["lr_series"], s["lr_history"]))
    if charts:
        parts.append(_charts(charts))
    if s.get("lr_note"):
        parts.append(f"<p class='sd-trainer-lr-note'>{_e(s['lr_note'])}</p>")
    if s.get("samples"):
        parts.append(f"<p>Samples of step {_e(s.get('sample_step'))}: "
                     + ", ".join(f"<code>{_e(p)}</code>" for p in s["samples"]) + "</p>")
    return "<div class='sd-trainer-job'>" + "".join(parts) + "</div>"


def _smooth(values: list[float], window: int) -> list[float]:
    """A trailing moving average (the loss of single steps is noisy: the timestep is random)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve_svg(points: list[list[float]] | list[tuple[float, float]], width: int = 520, height: int = 170) -> str:
    """An inline SVG of ``[step, loss]`` points: the raw loss (light) and a moving average (bold), with the step
    and loss ranges on the axes."""
    steps = [float(p[0]) for p in points]
    losses = [float(p[1]) for p in points]
    smooth = _smooth(losses, max(1, len(losses) // 20))
    left, right, top, bottom = 52, 8, 8, 22
    w, h = width - left - right, height - top - bottom
    s0, s1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1
    lo, hi = min(losses), max(losses)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5

    def xy(step: float, loss: float) -> str:
        return f"{left + (step - s0) / (s1 - s0) * w:.1f},{top + (hi - loss) / (hi - lo) * h:.1f}"

    raw = " ".join(xy(a, b) for a, b in zip(steps, losses))
    avg = " ".join(xy(a, b) for a, b in zip(steps, smooth))
    label = "font-size='11' fill='currentColor'"
    return (f"<svg class='sd-trainer-loss' viewBox='0 0 {width} {height}' width='{width}' height='{height}' "
            f"role='img' aria-label='loss curve'>"
            f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='currentColor' "
            f"stroke-opacity='0.3'/>"
            f"<polyline points='{raw}' fill='none' stroke='currentColor' stroke-opacity='0.35' stroke-width='1'/>"
            f"<polyline points='{avg}' fill='none' stroke='#e8743b' stroke-width='2'/>"
            f"<text x='{left - 4}' y='{top + 10}' text-anchor='end' {label}>{hi:.3f}</text>"
            f"<text x='{left - 4}' y='{top + h}' text-anchor='end' {label}>{lo:.3f}</text>"
            f"<text x='{left}' y='{height - 6}' {label}>step {int(s0)}</text>"
            f"<text x='{left + w}' y='{height - 6}' text-anchor='end' {label}>step {int(steps[-1])} · "
            f"loss {smooth[-1]:.4f} (avg)</text></svg>")


def _charts(svgs: list[str]) -> str:
    """Charts side by side where the column is wide enough, else one under the other."""
    return ("<div class='sd-trainer-charts' style='display:flex;flex-wrap:wrap;gap:8px 16px;align-items:flex-start'>"
            + "".join(svgs) + "</div>")


# a color per parameter group (by position), the same for its scheduled and its effective (d·lr) series
_GROUP_COLORS = ("#e8743b", "#3b82e8", "#2e9e5b", "#a25ddc")


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten inside [lo, hi] (at most 6: every other one on a wide range)."""
    first, last = math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9)
    exps = list(range(first, last + 1))
    while len(exps) > 6:
        exps = exps[::2]
    return [10.0 ** e for e in exps]


LR_DECADES = 7  # the chart shows at most this many decades below the highest rate (Prodigy's d0·lr is 1e-6)


def lr_chart_svg(series: list[str], rows: list[list[float | None]], width: int = 520, height: int = 170) -> str:
    """An inline SVG of the learning rates, ``rows`` of ``[step, value per series]``, on a log scale (the schedule
    and an adaptive optimizer's d·lr lie decades apart): one line per series (a group's scheduled rate dashed where
    its effective rate d·lr is drawn too), a legend with the newest values, the decades on the axis. Values ≤ 0 (a
    warm-up's first step) have no place on a log scale and leave a gap; values more than :data:`LR_DECADES` decades
    below the highest (the end of a decay to 0) run along the bottom edge."""
    steps = [float(r[0]) for r in rows]
    values = [v for r in rows for v in r[1:] if v is not None and v > 0]
    groups = [name for name in series if not name.endswith(EFFECTIVE)]
    label = "font-size='11' fill='currentColor'"
    left, right, bottom = 52, 8, 22
    legend, row_x, row_y = [], left, 0
    for i, name in enumerate(series):  # legend entries, wrapped into rows above the plot
        group = name[:-len(EFFECTIVE)] if name.endswith(EFFECTIVE) else name
        color = _GROUP_COLORS[groups.index(group) % len(_GROUP_COLORS)] if group in groups else "currentColor"
        dashed = not name.endswith(EFFECTIVE) and group + EFFECTIVE in series
        style = f"stroke='{color}' stroke-width='{1.5 if dashed else 2}'" + (" stroke-dasharray='5 3'" if dashed
                                                                                else "")
        last = next((r[1 + i] for r in reversed(rows) if r[1 + i] is not None), None)
        text = f"{name} {format_rate(last)}" if last is not None else name
        item = 28 + 6.2 * len(text)
        if row_x > left and row_x + item > width - right:
            row_x, row_y = left, row_y + 16
        legend.append((name, style, text, row_x, 10 + row_y))
        row_x += item
    top = 26 + row_y
    height += row_y
    w, h = width - left - right, height - top - bottom
    s0, s1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1
    lo, hi = (min(values), max(values)) if values else (1e-4, 1e-3)
    lo = max(lo, hi / 10 ** LR_DECADES)
    if hi / lo < 1.5:  # a constant rate: half a decade around it
        lo, hi = lo / 3.0, hi * 3.0
    llo, lhi = math.log10(lo), math.log10(hi)

    def x(step: float) -> float:
        return left + (step - s0) / (s1 - s0) * w

    def y(v: float) -> float:
        return top + (lhi - math.log10(max(v, lo))) / (lhi - llo) * h

    parts = [f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='currentColor' "
             f"stroke-opacity='0.3'/>"]
    for tick in _log_ticks(lo, hi):
        parts.append(f"<line x1='{left}' x2='{left + w}' y1='{y(tick):.1f}' y2='{y(tick):.1f}' stroke='currentColor' "
                     f"stroke-opacity='0.12'/><text x='{left - 4}' y='{y(tick) + 4:.1f}' text-anchor='end' {label}>"
                     f"{_e(format_rate(tick))}</text>")
    for i, (name, style, text, lx, ly) in enumerate(legend):
        segments, current = [], []
        for r in rows:
            v = r[1 + i]
            if v is None or v <= 0:
                if current:
                    segments.append(current)
                current = []
            else:
                current.append(f"{x(float(r[0])):.1f},{y(v):.1f}")
        if current:
            segments.append(current)
        for seg in segments:
            points = " ".join(seg if len(seg) > 1 else seg * 2)
            parts.append(f"<polyline data-series='{_e(name)}' points='{points}' fill='none' {style}/>")
        parts.append(f"<line x1='{lx:.0f}' x2='{lx + 16:.0f}' y1='{ly}' y2='{ly}' {style}/>"
                     f"<text x='{lx + 20:.0f}' y='{ly + 4}' {label}>{_e(text)}</text>")
    parts.append(f"<text x='{left}' y='{height - 6}' {label}>step {int(s0)}</text>"
                 f"<text x='{left + w}' y='{height - 6}' text-anchor='end' {label}>step {int(steps[-1])} · "
                 f"learning rate (log scale)</text>")
    return (f"<svg class='sd-trainer-lr' viewBox='0 0 {width} {height}' width='{width}' height='{height}' "
            f"role='img' aria-label='learning-rate chart'>" + "".join(parts) + "</svg>")


def run_lr(history: LRHistory | None, finished: bool) -> str:
    """A loaded run's learning-rate chart and its one line (what an adaptive optimizer settled on); empty when the
    file holds no history."""
    if history is None or not history.rows:
        return ""
    parts = [lr_chart_svg(history.series, history.points())] if len(history.points()) >= 2 else []
    note = history.summary(finished=finished)
    if note:
        parts.append(f"<p class='sd-trainer-lr-note'>{_e(note)}</p>")
    return "<div class='sd-trainer-run-lr'>" + "".join(parts) + "</div>"


def estimate_html(est, steps: int | None, formula: str | None) -> str:
    """The live estimate (:class:`lib_train.estimate.Estimate`) with the step count when the dataset is scanned; the
    memory figure says next to it whether a GPU measurement calibrated it, and from what."""
    parts = []
    if formula:
        parts.append(f"<p class='sd-trainer-ok'>Steps: {_e(formula)}</p>")
    else:
        parts.append("<p>Steps: press Scan to count the dataset's images.</p>")
    breakdown = ", ".join(f"{_e(k)} {v:.1f}" for k, v in est.parts.items())
    state = "calibrated" if est.calibrated else "uncalibrated"
    parts.append(f"<p>GPU memory ≈ <b>{est.vram_gib:.1f} GB</b> <span class='sd-trainer-{state}' "
                 f"title='{_e(est.calibration_label)}'>({state})</span> ({breakdown})</p>"
                 f"<p class='sd-trainer-note'>{_e(est.calibration_label)}</p>")
    if est.seconds is not None:
        parts.append(f"<p>Time ≈ <b>{_duration(est.seconds)}</b> for {steps} steps</p>")
    parts.append(f"<p class='sd-trainer-note'>{_e(est.note)}</p>")
    return "<div class='sd-trainer-estimate'>" + "".join(parts) + "</div>"
