"""The Trainer axes of the built-in X/Y/Z plot: "Trainer: run epoch" (values: file stems of any run) and "Trainer:
LoRA weight". :func:`register_xyz_axes` runs ``on_before_ui``, before the built-in script snapshots its axis list.

Imported only inside the WebUI (it uses ``modules`` inside functions).
"""

from __future__ import annotations

import os

from ...errors import TrainerError
from ...grid.axes import format_weight
from ...grid.prompts import cell_prompt, set_last_lora_weight
from ...grid.runs import Run
from .script import list_runs

XYZ_FILE_AXIS = "Trainer: run epoch"
XYZ_WEIGHT_AXIS = "Trainer: LoRA weight"


def _xyz_runs(p) -> dict[str, Run]:
    runs = getattr(p, "_trainer_xyz_runs", None)
    if runs is None:
        runs = {f.stem: r for r in list_runs() for f in r.files}
    return runs


def _xyz_confirm_files(p, xs) -> None:
    runs = {f.stem: r for r in list_runs() for f in r.files}
    unknown = [x for x in xs if x not in runs]
    if unknown:
        raise TrainerError(f"{XYZ_FILE_AXIS}: no run has a file {', '.join(map(str, unknown))}; give file stems "
                           "such as mychar-000002 (the dropdown lists them)")
    p._trainer_xyz_runs = runs  # the cells are copies of p: they find the runs here


def _xyz_render(p) -> None:
    state = p._trainer_xyz
    stem = state.get("file")
    if stem is not None:
        run = _xyz_runs(p).get(stem)
        if run is None:
            raise TrainerError(f"{XYZ_FILE_AXIS}: no run has a file {stem}")
        p.prompt = cell_prompt(run, p.prompt, stem, state.get("weight"))


def _xyz_apply_file(p, x, xs) -> None:
    p._trainer_xyz = {**getattr(p, "_trainer_xyz", {}), "file": x}
    _xyz_render(p)


def _file_axis_in_use() -> bool:
    from modules import shared

    axes = [getattr(shared.state, f"xyz_plot_{k}", None) for k in "xyz"]
    return any(a is not None and getattr(a.axis, "label", None) == XYZ_FILE_AXIS for a in axes)


def _xyz_apply_weight(p, x, xs) -> None:
    p._trainer_xyz = {**getattr(p, "_trainer_xyz", {}), "weight": float(x)}
    if "file" in p._trainer_xyz:
        _xyz_render(p)
    elif not _file_axis_in_use():  # (with the file axis, its apply comes later and uses this weight)
        p.prompt = set_last_lora_weight(p.prompt, float(x))


def _xyz_format_file(p, opt, x) -> str:
    run = _xyz_runs(p).get(x)
    if run is None:
        return str(x)
    return f"{run.name} {run.file(x).label}"


def _xyz_format_weight(p, opt, x) -> str:
    return f"weight {format_weight(x)}"


def _xyz_choices() -> list[str]:
    try:
        return [f.stem for r in list_runs() for f in r.files]
    except Exception:  # noqa: BLE001 - a choices callback must not break the X/Y/Z UI
        return []


def find_xyz_module():
    """The loaded built-in X/Y/Z plot script module (None when it is disabled)."""
    from modules import scripts

    for data in scripts.scripts_data:
        if os.path.basename(data.path) == "xyz_grid.py" and hasattr(data.module, "AxisOption"):
            return data.module
    return None


def register_xyz_axes(*_args) -> None:
    """Add the Trainer axes to the X/Y/Z plot (``on_before_ui``: its UI copies the axis list when built). A
    failure is reported in the log, never raised: the rest of the WebUI must come up."""
    from modules import errors

    try:
        xyz = find_xyz_module()
        if xyz is None:
            return
        known = {opt.label for opt in xyz.axis_options}
        axes = [
            xyz.AxisOption(XYZ_FILE_AXIS, str, _xyz_apply_file, format_value=_xyz_format_file,
                           confirm=_xyz_confirm_files, cost=0.5, choices=_xyz_choices),
            xyz.AxisOption(XYZ_WEIGHT_AXIS, float, _xyz_apply_weight, format_value=_xyz_format_weight),
        ]
        xyz.axis_options.extend(a for a in axes if a.label not in known)
    except Exception:  # noqa: BLE001
        errors.report("sd-webui-trainer: could not add the Trainer axes to the X/Y/Z plot", exc_info=True)
