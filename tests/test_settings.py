"""Settings declared once (lib_train/settings.py): the command-line flags and the Trainer tab's fields are generated
from the config fields, stay what they were before (tests/goldens/settings_before.json), and the README's option
table agrees with them."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from lib_train import cli, config, methods
from lib_train.config import SECTIONS, SETTINGS, method_default
from lib_train.settings import coerce, declared, format_default, spec_of

ROOT = Path(__file__).resolve().parents[1]
BEFORE = json.loads((ROOT / "tests" / "goldens" / "settings_before.json").read_text(encoding="utf-8"))
COMMAND_FLAGS = {"--config", "--resume", "--device", "--dry-run", "--write-config", "--help"}  # not settings


def _flags(method: str) -> list[cli.Flag]:
    return cli.flags_for(methods.METHODS[method])


def test_every_config_field_is_declared_with_a_flag_or_a_reason():
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            spec = spec_of(f)  # KeyError: declared without setting()
            assert spec.help, f"{section}.{f.name}"
            assert spec.flag or spec.no_flag, f"{section}.{f.name} has no flag and no reason for none"
            assert spec.group or spec.not_in_ui, f"{section}.{f.name} is neither in the tab nor says why not"
    flags = [d.spec.flag for d in declared(SECTIONS) if d.spec.flag]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_every_flag_maps_to_a_field_and_keeps_its_help(method):
    made = {f.flag: f for f in _flags(method)}
    before = BEFORE["flags"][method]
    assert set(made) == set(before)
    for flag, f in made.items():
        assert f.key in SETTINGS
        b = before[flag]
        choices = b["choices"] and "{" + ",".join(b["choices"]) + "}"
        metavar = b["metavar"] or choices or b["key"].split(".")[1].upper()
        assert (f.key, f.help, f.metavar) == (b["key"], b["help"], metavar)
        assert list(f.choices or []) == list(before[flag]["choices"] or [])
    # the same order, except that --overwrite now comes before --trigger (the config's order)
    order = [f for f in BEFORE["flag_order"][method]]
    if "--trigger" in order:
        i = order.index("--trigger")
        order[i:i + 2] = order[i + 1], order[i]
    assert list(made) == order


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_help_shows_every_flag_with_its_help(method, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: no wrapping inside a help text
    with pytest.raises(SystemExit):
        cli.main([method, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in _flags(method):
        assert f.flag in text and " ".join(f.help.replace("%%", "%").split()) in text


def test_the_tab_fields_are_the_declared_settings_as_before():
    from lib_train.webui.tab import fields as ui_fields

    assert ui_fields.KEYS == BEFORE["keys"]  # the order of every handler's inputs
    assert [list(g) for g in json.loads(json.dumps(ui_fields.GROUPS))] == BEFORE["groups"]
    assert ui_fields.METHOD_GROUPS == BEFORE["method_groups"]
    assert ui_fields.NOT_IN_UI == BEFORE["not_in_ui"]
    for key, spec in ui_fields.SPECS.items():
        before = BEFORE["specs"][key]
        assert (spec.kind.__name__, spec.default, spec.label, spec.info) == \
            (before["kind"], before["default"], before["label"], before["info"]), key
        assert list(spec.choices or []) == list(before["choices"] or []), key
    assert set(ui_fields.SPECS) | set(ui_fields.NOT_IN_UI) == set(SETTINGS)


def test_no_source_parsing_and_no_webui_to_cli_import():
    src = (ROOT / "lib_train" / "webui" / "tab" / "fields.py").read_text(encoding="utf-8")
    assert "inspect" not in src and "getsource" not in src
    assert "lib_train.cli" not in src and "..cli" not in src
    assert not hasattr(config, "FLAGS")  # no global filled by importing the CLI


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            out.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_config_imports_no_trainer():
    found = _imports(ROOT / "lib_train" / "config.py") + _imports(ROOT / "lib_train" / "settings.py")
    assert not [m for m in found if re.match(r"(\.|lib_train\.)(train|embedding|models|network)\b", m)]


def test_coerce():
    assert coerce("yes", bool) is True and coerce("0", bool) is False and coerce(3.0, int) == 3
    assert coerce("1e-4", float) == 1e-4 and coerce(2, float) == 2.0 and coerce("a", str) == "a"
    for value, typ in ((True, int), (1.5, int), ("x", float), (3, str), ("maybe", bool)):
        with pytest.raises(ValueError, match=f"expected {typ.__name__}, got"):
            coerce(value, typ)


def test_format_default():
    assert [format_default(v) for v in (1e-4, 5e-3, 5e-5, 8.0, 1.0, True, False, "fp32", 16)] == \
        ["1e-4", "5e-3", "5e-5", "8", "1", "on", "off", "fp32", "16"]


def test_the_config_is_built_once_on_the_command_line(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"method": "lora", "network": {"rank": 4}, "optim": {"lr": 0.5}}), encoding="utf-8")
    calls = []
    real = cli.from_dict
    monkeypatch.setattr(cli, "from_dict", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = cli._parser().parse_args(["lora", "--config", str(path), "--rank", "8", "--sample-prompts", "a | b"])
    cfg = cli.build_config(args)
    assert len(calls) == 1
    assert (cfg.network.rank, cfg.optim.lr, cfg.sample.prompts) == (8, 0.5, "a\nb")
    args = cli._parser().parse_args(["embedding"])
    assert cli.build_config(args).optim.lr == method_default("embedding", "optim.lr") == 5e-3


# ------------------------------------------------------------------------------------------- README's option table

def _readme_option_rows() -> list[tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("| flag | default | meaning |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append((cells[0], cells[1], cells[2]))
    return rows


def _matches(text: str, value) -> bool:
    if text == "off":
        return value in (False, 0, "")
    if text == "on":
        return value is True
    return text == format_default(value)


def test_readme_option_table_agrees_with_the_declared_settings():
    by_flag = {d.spec.flag: d for d in declared(SECTIONS) if d.spec.flag}
    rows = _readme_option_rows()
    assert len(rows) > 10
    for first, default, meaning in rows:
        for flag in re.findall(r"--[a-z][a-z0-9-]*", first + " " + meaning):
            assert flag in by_flag or flag in COMMAND_FLAGS, f"README names {flag}, which is no flag"
        named = re.findall(r"--[a-z][a-z0-9-]*", first)
        values = [v.strip() for v in re.split(r",|/", default) if v.strip()]
        if not values or named[0] in COMMAND_FLAGS:
            continue
        if len(values) == 1:
            values *= len(named)
        assert len(values) == len(named), first
        for flag, text in zip(named, values):
            d = by_flag[flag]
            assert _matches(text, method_default("lora", d.key)), f"README: {flag} defaults to {text}"
