"""Captions in bulk (lib_train/data/caption_edit.py): the pure actions, their composition, the tag table, preview,
and Apply / Undo on real files (bytes compared, other encodings, missing captions, refusals)."""

from __future__ import annotations

import json
import os
import re

import pytest

from helpers import save_image, write_caption
from lib_train.atomic import TMP_PREFIX
from lib_train.data import caption_edit as ce
from lib_train.data.caption_edit import CaptionEditError, CaptionPlan, add_tags, apply_plan, compose, dedupe_tags, \
    load_captions, plan_from_dict, preview, put_first, remove_tags, replace_regex, replace_tag, replace_text, \
    sort_by_frequency, undo_last
from lib_train.data.dataset import confined_to, scan_dataset
from lib_train.errors import ConfigError, DatasetError


# ------------------------------------------------------------------------------------------------ the actions
def test_put_first_moves_and_adds_trigger_words():
    assert put_first("1girl, sks, red hair", ["sks"]) == "sks, 1girl, red hair"
    assert put_first("1girl", ["sks", "mychar"]) == "sks, mychar, 1girl"
    assert put_first("", ["sks"]) == "sks"
    assert put_first("SKS,  1girl", ["sks"]) == "sks, 1girl"  # the given spelling wins
    same = "sks,1girl ,  red hair"
    assert put_first(same, ["sks"]) is same  # already first: untouched, spacing kept


def test_remove_tags_ignores_case_and_spacing():
    assert remove_tags("a, Red  Hair, b, red hair", ["red hair"]) == "a, b"
    assert remove_tags("a, b", ["c"]) == "a, b"
    assert remove_tags("x", ["x"]) == ""
    assert remove_tags("", ["x"]) == ""


def test_replace_tag_text_and_regex():
    assert replace_tag("1girl, blonde hair, smile", "blonde hair", "yellow hair") == "1girl, yellow hair, smile"
    assert replace_tag("1girl, blonde hair", "BLONDE  hair", "") == "1girl"
    assert replace_tag("a, b", "b", "c, d") == "a, c, d"
    assert replace_tag("blonde hair ribbon", "blonde hair", "x") == "blonde hair ribbon"  # whole tags only
    assert replace_text("blonde hair, blonde eyes", "blonde", "gold") == "gold hair, gold eyes"
    assert replace_text("a, b", "a, ", "") == "b"
    pattern = re.compile(r"(\w+) hair")
    assert replace_regex("1girl, red hair, blue hair", pattern, r"hair (\1)") == "1girl, hair (red), hair (blue)"
    assert replace_regex("x", re.compile(r"(?P<n>x)"), r"\g<n>\g<n>") == "xx"
    with pytest.raises(ConfigError) as e:
        replace_regex("red hair", pattern, r"\2")
    assert e.value.problems[0].where == "replace_with"


def test_add_dedupe_sort():
    assert add_tags("a, b", ["b", "c"]) == "a, b, c"
    assert add_tags("", ["c"]) == "c"
    assert dedupe_tags("red hair,red  hair, Red Hair , smile, smile") == "red hair, smile"
    unchanged = "a,b"
    assert dedupe_tags(unchanged) is unchanged
    freq = {"a": 1, "b": 5, "c": 3, "d": 3}
    assert sort_by_frequency("a, c, d, b", freq) == "b, c, d, a"  # equal counts keep their order
    assert sort_by_frequency("a, c, d, b", freq, keep_first=1) == "a, b, c, d"
    assert sort_by_frequency("", freq, 2) == ""


def test_unicode_tags():
    assert put_first("café, 日本語, ünïcode", ["日本語"]) == "日本語, café, ünïcode"
    assert remove_tags("Ünïcode, x", ["ünïcode"]) == "x"


def test_composition_order_and_one_function():
    plan = CaptionPlan(trigger="sks", remove="blurry, watermark", find="blonde hair", replace_with="yellow hair",
                       add="solo", dedupe=True)
    run = compose(plan)
    assert run("1girl, blonde hair, sks, blurry, 1girl") == "sks, 1girl, yellow hair, solo"
    assert run("") == "sks, solo"
    # sort uses the frequencies given, then the trigger goes first whatever the sort did
    run = compose(CaptionPlan(trigger="sks", sort=True, keep_first=0), {"a": 1, "b": 9, "sks": 0})
    assert run("a, sks, b") == "sks, b, a"


def test_plan_errors_name_their_field():
    with pytest.raises(ConfigError) as e:
        plan_from_dict({"find": "([a-z", "mode": "regex"})
    assert [p.where for p in e.value.problems] == ["find"] and "regular expression" in str(e.value)
    with pytest.raises(ConfigError) as e:
        plan_from_dict({"mode": "glob", "keep_first": -1, "dedupe": "yes", "colour": 1})
    assert [p.where for p in e.value.problems] == ["colour"]  # unknown fields first, alone
    with pytest.raises(ConfigError) as e:
        plan_from_dict({"mode": "glob", "keep_first": -1, "sort": True})
    assert sorted(p.where for p in e.value.problems) == ["keep_first", "mode"]
    with pytest.raises(ConfigError) as e:
        plan_from_dict({"dedupe": "yes"})
    assert e.value.problems[0].where == "dedupe"
    with pytest.raises(ConfigError) as e:
        plan_from_dict({})
    assert e.value.problems[0].where == "plan"
    assert plan_from_dict({"remove": ["a", "b"]}).remove == "a, b"


# ------------------------------------------------------------------------------------------------ a dataset
@pytest.fixture
def dataset(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    save_image(train / "10_sks" / "a.png", seed=1)
    write_caption(train / "10_sks" / "a.txt", "1girl, sks, blurry, red hair")
    save_image(train / "10_sks" / "b.png", seed=2)
    write_caption(train / "10_sks" / "b.txt", "sks,1girl,  red  hair ,1girl", "utf-16")  # UTF-16 with BOM
    save_image(train / "10_sks" / "c.png", seed=3)  # no caption
    save_image(train / "5_other" / "d.png", seed=4)
    write_caption(train / "5_other" / "d.txt", "1girl, café, watermark", "cp1252")  # not UTF-8
    save_image(train / "5_other" / "e.png", seed=5)
    write_caption(train / "5_other" / "e.txt", "\ufeffsolo,\nwatermark\n")  # UTF-8 BOM, two lines
    save_image(reg / "1_person" / "r.png", seed=6)
    write_caption(reg / "1_person" / "r.txt", "1girl, blurry")
    save_image(train / "0_never" / "z.png", seed=7)
    write_caption(train / "0_never" / "z.txt", "never")
    save_image(train / ".hidden" / "h.png", seed=8)
    return train, reg


def _bytes(*roots):
    return {p: p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()
            and ce.BACKUP_DIR not in p.parts}


def test_load_follows_the_scan_rules_and_reports_unreadable_captions(dataset):
    train, reg = dataset
    caps = load_captions(train, reg)
    assert caps.folders == ["10_sks", "5_other", "reg: 1_person"]
    assert [f.image.name for f in caps.files] == ["a.png", "b.png", "c.png", "d.png", "e.png", "r.png"]
    by = {f.image.name: f for f in caps.files}
    assert by["b.png"].encoding == "UTF-16" and by["b.png"].text == "sks,1girl,  red  hair ,1girl"
    assert by["c.png"].raw is None and by["c.png"].text is None
    assert by["d.png"].problem and "not UTF-8" in by["d.png"].problem and by["d.png"].text is None
    assert by["e.png"].encoding == "UTF-8 with BOM" and by["e.png"].text == "solo,, watermark" and by["e.png"].lines == 2
    assert [p.where for p in caps.problems] == [str(train / "5_other" / "d.txt")]
    # the same captions as the scan reads (the scan refuses d.txt alike)
    scan = scan_dataset(train, reg_dir=reg)
    assert {it.path.name: it.caption for it in scan.items if it.has_caption_file} == \
        {f.image.name: f.text for f in caps.files if f.text is not None}
    legacy = load_captions(train, reg, legacy_encoding=True)
    d = next(f for f in legacy.files if f.image.name == "d.png")
    assert d.encoding == "Windows-1252" and d.text == "1girl, café, watermark" and not legacy.problems


def test_tag_table_counts_images_overall_and_per_folder(dataset):
    train, reg = dataset
    caps = load_captions(train, reg, legacy_encoding=True)
    table = {r["tag"]: r for r in caps.tag_table()}
    assert table["1girl"] == {"tag": "1girl", "count": 4, "folders": {"10_sks": 2, "5_other": 1,
                                                                      "reg: 1_person": 1}}
    assert table["red hair"]["count"] == 2  # "red  hair " normalised; b's duplicate 1girl counted once
    assert table["watermark"]["folders"] == {"5_other": 2}
    assert caps.tag_table()[0]["tag"] == "1girl"
    assert {r["tag"] for r in caps.tag_table("5_other")} == {"1girl", "café", "watermark", "solo"}
    with pytest.raises(ConfigError) as e:
        caps.tag_table("nope")
    assert e.value.problems[0].where == "folder"


def test_load_refuses_folders_that_are_no_dataset(tmp_path, dataset):
    train, reg = dataset
    with pytest.raises(DatasetError) as e:
        load_captions(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value)
    with pytest.raises(DatasetError):
        load_captions(train, train / "10_sks")  # overlap
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        load_captions(tmp_path / "empty")
    with pytest.raises(ConfigError):
        load_captions(train, caption_extension=".png")


def test_preview_counts_and_examples(dataset):
    train, reg = dataset
    caps = load_captions(train, reg, legacy_encoding=True)
    p = preview(caps, CaptionPlan(trigger="sks", remove="blurry, watermark"))
    # a: trigger moved, blurry removed; b: trigger already first -> unchanged; d, e: watermark; r: blurry
    assert p["changed"] == 4 and p["created"] == 0 and p["considered"] == 5
    assert p["examples"][0] == {"file": "10_sks/a.txt", "before": "1girl, sks, blurry, red hair",
                                "after": "sks, 1girl, red hair"}
    assert {e["file"] for e in p["examples"]} == {"10_sks/a.txt", "5_other/d.txt", "5_other/e.txt",
                                                  "reg: 1_person/r.txt"}
    assert any("Windows-1252" in n and "UTF-8 with BOM" in n and "written back as UTF-8" in n for n in p["notes"])
    assert any("one line" in n for n in p["notes"])
    assert any("without a caption file are left alone" in n for n in p["notes"])
    one = preview(caps, CaptionPlan(trigger="sks", folder="10_sks", include_uncaptioned=True))
    assert one["changed"] == 2 and one["created"] == 1  # a (moved) and c (new)
    assert one["examples"][1] == {"file": "10_sks/c.txt", "before": None, "after": "sks"}
    with pytest.raises(CaptionEditError) as e:  # d.txt cannot be read without the Windows-1252 option
        preview(load_captions(train, reg), CaptionPlan(trigger="sks"))
    assert str(train / "5_other" / "d.txt") in str(e.value)
    # only the folder that holds no unreadable caption: fine
    assert preview(load_captions(train, reg), CaptionPlan(trigger="sks", folder="10_sks"))["changed"] == 1


def test_apply_then_undo_restores_every_byte(dataset):
    train, reg = dataset
    before = _bytes(train, reg)
    caps = load_captions(train, reg, legacy_encoding=True)
    plan = CaptionPlan(trigger="sks", remove="blurry, watermark", dedupe=True, include_uncaptioned=True)
    result = apply_plan(caps, plan)
    assert result["changed"] == 6 and result["created"] == 1  # b deduped now; c created
    assert (train / "10_sks" / "a.txt").read_bytes() == b"sks, 1girl, red hair"
    assert (train / "10_sks" / "b.txt").read_bytes() == b"sks, 1girl, red hair"  # UTF-16 -> UTF-8
    assert (train / "10_sks" / "c.txt").read_bytes() == b"sks"
    assert (train / "5_other" / "d.txt").read_bytes() == "sks, 1girl, café".encode()
    assert (train / "5_other" / "e.txt").read_bytes() == b"sks, solo"
    assert (reg / "1_person" / "r.txt").read_bytes() == b"sks, 1girl"
    assert not list(train.rglob(TMP_PREFIX + "*")) and not list(reg.rglob(TMP_PREFIX + "*"))
    backup = ce.backup_sets(train)
    assert [str(b) for b in backup] == [result["backup"]]
    manifest = json.loads((backup[0] / ce.MANIFEST).read_text())
    assert {(e["root"], e["path"], e["existed"]) for e in manifest["entries"]} >= {("train", "10_sks/c.txt", False),
                                                                                  ("reg", "1_person/r.txt", True)}
    # the scan sees the new captions, the backups are hidden from it
    scan = scan_dataset(train, reg_dir=reg)
    assert [p.where for p in scan.problems] == [str(train / "0_never")] and scan.tag_frequency()["10_sks"] == {"sks": 3, "1girl": 2, "red hair": 2}
    undone = undo_last(train)
    assert undone == {"restored": 5, "deleted": 1, "backup": result["backup"], "remaining": 0}
    assert _bytes(train, reg) == before
    with pytest.raises(CaptionEditError, match="nothing to undo"):
        undo_last(train)


def test_two_applies_undo_one_at_a_time(dataset):
    train, reg = dataset
    original = _bytes(train, reg)
    apply_plan(load_captions(train, reg), CaptionPlan(trigger="sks", folder="10_sks"))
    first = _bytes(train, reg)
    apply_plan(load_captions(train, reg), CaptionPlan(remove="red hair", folder="10_sks"))
    assert (train / "10_sks" / "a.txt").read_text() == "sks, 1girl, blurry"
    assert undo_last(train)["remaining"] == 1 and _bytes(train, reg) == first
    assert undo_last(train)["remaining"] == 0 and _bytes(train, reg) == original


def test_apply_with_nothing_to_change_writes_nothing(dataset):
    train, reg = dataset
    before = _bytes(train, reg)
    assert apply_plan(load_captions(train, reg), CaptionPlan(remove="not there", folder="10_sks"))["changed"] == 0
    assert _bytes(train, reg) == before and ce.backup_sets(train) == []


def test_undo_refuses_when_a_caption_changed_or_vanished(dataset):
    train, reg = dataset
    apply_plan(load_captions(train, reg), CaptionPlan(trigger="sks", folder="10_sks"))
    a = train / "10_sks" / "a.txt"
    a.write_text("edited by hand")
    with pytest.raises(CaptionEditError) as e:
        undo_last(train)
    assert str(a) in str(e.value) and "changed" in str(e.value) and "Nothing was restored" in str(e.value)
    assert a.read_text() == "edited by hand" and len(ce.backup_sets(train)) == 1
    a.unlink()
    with pytest.raises(CaptionEditError, match="vanished"):
        undo_last(train)


def test_apply_refuses_a_caption_that_changed_or_vanished_since_loading(dataset):
    train, reg = dataset
    caps = load_captions(train, reg)
    (train / "10_sks" / "a.txt").unlink()
    with pytest.raises(CaptionEditError) as e:
        apply_plan(caps, CaptionPlan(trigger="sks", folder="10_sks"))
    assert str(train / "10_sks" / "a.txt") in str(e.value) and "vanished" in str(e.value)
    assert ce.backup_sets(train) == []


def test_a_failed_write_puts_back_what_was_written(dataset, monkeypatch):
    train, reg = dataset
    before = _bytes(train, reg)
    real, calls = ce.atomic_write_bytes, []

    def failing(path, data):
        if path.name == "r.txt":
            raise OSError(28, "No space left on device")
        calls.append(path)
        return real(path, data)

    monkeypatch.setattr(ce, "atomic_write_bytes", failing)
    with pytest.raises(CaptionEditError) as e:
        apply_plan(load_captions(train, reg, legacy_encoding=True), CaptionPlan(trigger="sks"))
    assert "r.txt" in str(e.value) and "restored" in str(e.value)
    assert any(p.name == "a.txt" for p in calls)  # written, then put back
    assert _bytes(train, reg) == before and ce.backup_sets(train) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_folder_is_named_before_anything_is_written(dataset):
    train, reg = dataset
    folder = reg / "1_person"
    folder.chmod(0o555)
    try:
        with pytest.raises(CaptionEditError) as e:
            apply_plan(load_captions(train, reg), CaptionPlan(trigger="sks", folder="reg: 1_person"))
        assert str(folder) in str(e.value) and "not writable" in str(e.value)
    finally:
        folder.chmod(0o755)


def test_links_out_of_the_allowed_folders_are_not_read(tmp_path):
    outside = tmp_path / "outside"
    save_image(outside / "x.png")
    write_caption(outside / "x.txt", "secret")
    train = tmp_path / "allowed" / "train"
    save_image(train / "1_a" / "a.png")
    (train / "1_a" / "x.png").symlink_to(outside / "x.png")
    (train / "1_a" / "x.txt").symlink_to(outside / "x.txt")
    with confined_to([tmp_path / "allowed"]):
        caps = load_captions(train)
    assert [f.image.name for f in caps.files] == ["a.png"]
    assert {p.where for p in caps.problems} == {str(train / "1_a" / "x.png"), str(train / "1_a" / "x.txt")}
    (train / "1_a" / "a.txt").symlink_to(outside / "x.txt")  # an image inside, its caption a link out
    with confined_to([tmp_path / "allowed"]):
        caps = load_captions(train)
    a = caps.files[0]
    assert a.text is None and a.raw is None and "leads out" in a.problem
    with pytest.raises(CaptionEditError, match="a.txt"):
        apply_plan(caps, CaptionPlan(trigger="sks", include_uncaptioned=True))
    assert (outside / "x.txt").read_text() == "secret" and (train / "1_a" / "a.txt").is_symlink()


def test_requests_are_checked_field_by_field(tmp_path):
    dataset, plan = ce.split_request({"train_dir": " /d ", "trigger": "sks", "legacy_encoding": True})
    assert dataset == {"train_dir": "/d", "reg_dir": "", "caption_extension": ".txt", "legacy_encoding": True}
    assert plan.trigger == "sks"
    with pytest.raises(ConfigError) as e:
        ce.split_request({"train_dir": 3, "legacy_encoding": "yes", "mode": "regex", "find": "("})
    assert [p.where for p in e.value.problems] == ["train_dir", "legacy_encoding", "find"]
    with pytest.raises(ConfigError) as e:
        ce.split_request({"trigger": "x"}, with_plan=False)
    assert [p.where for p in e.value.problems] == ["train_dir", "trigger"]
    ce.check_confined({"train_dir": str(tmp_path / "a")}, [str(tmp_path)])
    with pytest.raises(ConfigError) as e:
        ce.check_confined({"train_dir": str(tmp_path / "a"), "reg_dir": "/etc"}, [str(tmp_path)])
    assert [p.where for p in e.value.problems] == ["reg_dir"]
