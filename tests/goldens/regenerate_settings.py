"""Rewrite settings_before.json from the declared settings, after a deliberate change of a flag's help, a field's
label or help, or the tab's groups: ``.venv/bin/python tests/goldens/regenerate_settings.py``, then read the diff
(``git diff tests/goldens``): every change in it must be one you meant. tests/test_settings.py compares the
generated flags and fields with this file; its one kept quirk is the flag order from before issue 9 (``--trigger``
before ``--overwrite``), which the test undoes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lib_train import cli, methods  # noqa: E402
from lib_train.webui.tab import fields as ui_fields  # noqa: E402

GOLDEN = Path(__file__).with_name("settings_before.json")


def _flag(f: cli.Flag) -> dict:
    choices = list(f.choices) if f.choices else None
    derived = "{" + ",".join(map(str, choices)) + "}" if choices else f.key.split(".")[1].upper()
    return {"key": f.key, "help": f.help, "choices": choices, "metavar": None if f.metavar == derived else f.metavar}


def golden() -> dict:
    old = json.loads(GOLDEN.read_text(encoding="utf-8"))
    flags, order = {}, {}
    for name, method in methods.METHODS.items():
        made = {f.flag: f for f in cli.flags_for(method)}
        order[name] = list(made)
        if "--trigger" in order[name]:  # stored in the order before issue 9 (the test swaps it back)
            i = order[name].index("--overwrite")
            order[name][i:i + 2] = order[name][i + 1], order[name][i]
        flags[name] = {flag: _flag(made[flag]) for flag in order[name]}
    specs = {key: {"key": key, "kind": s.kind.__name__, "default": s.default, "label": s.label, "info": s.info,
                   "choices": list(s.choices) if s.choices else None} for key, s in ui_fields.SPECS.items()}
    return {"_about": old["_about"], "flags": flags, "flag_order": order, "specs": specs, "keys": ui_fields.KEYS,
            "groups": [list(g) for g in ui_fields.GROUPS], "method_groups": ui_fields.METHOD_GROUPS,
            "not_in_ui": ui_fields.NOT_IN_UI}


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(golden(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}")
