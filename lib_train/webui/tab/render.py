"""HTML the Trainer tab shows: the dataset report, a job's status, errors. Every text from files or users is
escaped. No gradio, no WebUI imports."""

from __future__ import annotations

import html
import time
from typing import Any, Iterable

from ...data import DatasetScan
from ...errors import Problem, ProblemsError, TrainerError
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
    if len(s.get("loss_history") or []) >= 2:
        parts.append(loss_curve_svg(s["loss_history"]))
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
