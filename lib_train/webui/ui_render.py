"""HTML the Trainer tab shows: the dataset report, a job's status, errors. Every text from files or users is
escaped. No gradio, no WebUI imports."""

from __future__ import annotations

import html
import time
from typing import Any, Iterable

from ..data import DatasetScan
from ..errors import Problem, ProblemsError, TrainerError
from ..train.prepare import PreparedData


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
    if s.get("notes"):
        parts.append("<p>Notes:</p>" + _list((_e(n) for n in s["notes"]), "sd-trainer-notes"))
    return "<div class='sd-trainer-job'>" + "".join(parts) + "</div>"
