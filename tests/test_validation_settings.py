"""Issue 12: every setting's shared limits (lib_train.settings.coerce, lib_train.config.shape_problems): NaN and
infinities refused for every float setting by name, ints in 64 bits, short texts without NUL, paths the file system
can hold, the output name's length limit, the config version and method checked, and the bucket sides that follow
the resolution unless set."""

from __future__ import annotations

import math

import pytest

from lib_train import cli, methods
from lib_train.config import (MAX_NAME_BYTES, SECTIONS, SETTINGS, bucket_sides, default_config, from_dict, label,
                              shape_problems, validate)
from lib_train.errors import ConfigError
from lib_train.settings import MAX_TEXT, NAME_MAX, coerce, declared, path_problem, quote

from helpers import make_images, tiny_config

FLOATS = [d for d in declared(SECTIONS) if d.type is float]
NOT_FINITE = ["nan", "NaN", "inf", "-inf", "Infinity", float("nan"), float("inf"), float("-inf")]


def _problems(data: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        validate(from_dict(data), headless=False)
    return {p.where: p.message for p in e.value.problems}


def test_there_are_float_settings_to_walk():
    assert len(FLOATS) >= 10 and {"train.noise_offset", "train.min_snr_gamma"} <= {d.key for d in FLOATS}


@pytest.mark.parametrize("d", FLOATS, ids=lambda d: d.key)
def test_every_float_setting_refuses_nan_and_infinity_by_name(d):
    for value in NOT_FINITE:
        problems = _problems({d.section: {d.name: value}})
        assert list(problems) == [label(d.key)], (value, problems)
        assert "finite number" in problems[label(d.key)]
    # a config changed in code is caught too, before any other check
    cfg = default_config(d.spec.methods[0] if d.spec.methods else "lora")
    setattr(getattr(cfg, d.section), d.name, math.nan)
    assert [p.where for p in shape_problems(cfg)] == [label(d.key)]
    with pytest.raises(ConfigError, match="finite number"):
        validate(cfg, headless=False)


@pytest.mark.parametrize("d", [d for d in FLOATS if d.spec.flag], ids=lambda d: d.key)
def test_every_float_flag_refuses_nan_on_the_command_line(d):
    method = next(m for m in methods.METHODS.values()
                  if d.spec.applies_to(m.name) and methods.method_of(d.section) in (None, m))
    args = cli._parser().parse_args([method.name, d.spec.flag, "nan"])
    with pytest.raises(ConfigError) as e:
        cli.build_config(args)
    assert [p.where for p in e.value.problems] == [label(d.key)]


def test_noise_offset_nan_on_the_command_line_is_one_clear_error(capsys):
    code = cli.main(["lora", "--noise-offset", "nan", "--min-snr-gamma", "inf", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "train.noise_offset (--noise-offset): must be a finite number, got nan" in err
    assert "train.min_snr_gamma (--min-snr-gamma): must be a finite number, got inf" in err


def test_ints_must_fit_in_64_bits_and_texts_have_limits():
    problems = _problems({"train": {"seed": 2**70}, "output": {"comment": "x" * (MAX_TEXT + 1)},
                          "sample": {"negative": "a\x00b"}})
    assert "too large" in problems[label("train.seed")]
    assert f"at most {MAX_TEXT} characters" in problems[label("output.comment")]
    assert "NUL" in problems[label("sample.negative")]


def test_a_huge_wrong_value_is_quoted_shortened():
    huge = "y" * 20_000_000
    with pytest.raises(ConfigError) as e:
        from_dict({"network": {"rank": huge}, "data": {"train_dir": huge}})
    assert len(str(e.value)) < 1000
    assert "20000000 characters" in str(e.value)
    assert len(quote(list(range(100_000)))) < 100


def test_unknown_keys_are_named_shortened():
    with pytest.raises(ConfigError) as e:
        from_dict({"k" * 5000: {}, "data": {"z" * 5000: 1}})
    assert all(len(p.where) < 80 for p in e.value.problems)


@pytest.mark.parametrize("version", [0, -1, -3, True, "3", 2.5, None, [3]])
def test_bad_config_versions_are_named(version):
    with pytest.raises(ConfigError) as e:
        from_dict({"version": version})
    assert [p.where for p in e.value.problems] == ["version"]
    assert "versions are whole numbers from 1 to" in str(e.value)


def test_a_newer_version_asks_for_an_update():
    with pytest.raises(ConfigError, match="newer than this trainer"):
        from_dict({"version": 99})


@pytest.mark.parametrize("method", [["lora"], {}, 3, None])
def test_a_method_that_is_no_name_is_refused(method):
    with pytest.raises(ConfigError) as e:
        from_dict({"method": method})
    assert [p.where for p in e.value.problems] == ["method"]
    assert "lora, embedding" in str(e.value)


@pytest.mark.parametrize("length", [5000, 250, MAX_NAME_BYTES + 1])
def test_an_output_name_past_the_file_system_limit_is_refused_up_front(length):
    problems = _problems({"output": {"name": "n" * length}})
    msg = problems[label("output.name")]
    assert f"at most {MAX_NAME_BYTES} bytes" in msg and str(NAME_MAX) in msg and len(msg) < 400


def test_the_longest_name_allowed_passes_and_counts_bytes():
    cfg = default_config()
    cfg.output.name = "n" * MAX_NAME_BYTES
    assert shape_problems(cfg) == []
    cfg.output.name = "é" * (MAX_NAME_BYTES // 2 + 1)  # two bytes each in UTF-8
    assert [p.where for p in shape_problems(cfg)] == [label("output.name")]


@pytest.mark.parametrize("ext", ["/x", "./x", ".t/x", ".t\\x", ". txt", "." + "a" * 40])
def test_caption_extensions_with_separators_are_refused(ext):
    problems = _problems({"data": {"caption_extension": ext}})
    assert label("data.caption_extension") in problems


@pytest.mark.parametrize("value, needle", [("a\x00b", "NUL"), ("d/" + "x" * 300, "255 bytes"),
                                           ("/x" * 2100, "4096 bytes"), ("\ud800", "surrogates")])
def test_paths_the_file_system_cannot_hold_are_refused_before_the_disk_is_asked(value, needle):
    path_keys = [key for key, spec in SETTINGS.items() if spec.path]
    assert len(path_keys) >= 7
    for key in path_keys:
        cfg = default_config("embedding" if key.startswith("embedding.") else "lora")
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        problems = {p.where: p.message for p in shape_problems(cfg)}
        assert needle in problems[label(key)], (key, problems)
        with pytest.raises(ConfigError):  # never OSError / ValueError from a path check
            validate(cfg, headless=True)
    assert path_problem("/tmp/data") is None


def test_coerce_keeps_its_rules():
    assert coerce("1e-4", float) == 1e-4 and coerce(3.0, int) == 3
    with pytest.raises(ValueError, match="finite"):
        coerce("nan", float)


# ------------------------------------------------------------------------------------------------ bucket sides

def test_bucket_sides_follow_the_resolution_unless_set():
    d = default_config().data
    assert (d.min_bucket_side, d.max_bucket_side) == (0, 0)
    for res, sides in ((64, (64, 1024)), (512, (256, 1024)), (2048, (256, 2048))):
        d.resolution = res
        assert bucket_sides(d) == sides
    d.min_bucket_side, d.max_bucket_side = 128, 512
    assert bucket_sides(d) == (128, 512)


def _valid(tmp_path, **overrides):
    make_images(tmp_path / "data" / "2_x", n=1)
    cfg = tiny_config(tmp_path, data__min_bucket_side=0, data__max_bucket_side=0)
    for key, value in overrides.items():
        setattr(cfg.data, key, value)
    validate(cfg, headless=False)
    return cfg


def test_resolution_64_alone_is_accepted(tmp_path):
    _valid(tmp_path, resolution=64)


def test_buckets_off_ignores_the_bucket_sides(tmp_path):
    _valid(tmp_path, enable_buckets=False, resolution=128, min_bucket_side=256)
    _valid(tmp_path, enable_buckets=False, resolution=64, min_bucket_side=256, max_bucket_side=64)


def test_an_explicit_min_bucket_above_the_resolution_is_still_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        _valid(tmp_path, resolution=64, min_bucket_side=256)
    assert "set it to 0 (auto)" in str(e.value) and label("data.min_bucket_side") in str(e.value)


def test_the_run_and_its_metadata_use_the_effective_bucket_sides(tmp_path):
    from lib_train.train.prepare import prepare_data

    cfg = _valid(tmp_path, resolution=64)
    prep = prepare_data(cfg)
    assert {tuple(b["resolution"]) for b in prep.bucket_info["buckets"].values()} == {(64, 64)}


def test_an_unreadable_path_is_a_message_not_a_crash(tmp_path, monkeypatch):
    import os

    from lib_train.settings import missing

    locked = str(tmp_path / "locked" / "data")
    real_stat = os.stat

    def stat(path, *a, **k):
        if str(path).startswith(str(tmp_path / "locked")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    assert "permission denied" in missing(locked, "folder")
    assert missing(str(tmp_path / "nothing"), "file") == f"file not found: {tmp_path / 'nothing'}"
    cfg = default_config()
    cfg.data.train_dir, cfg.network.init_from = locked, locked + ".safetensors"
    cfg.output.output_dir, cfg.output.name = str(tmp_path / "out"), "n"
    with pytest.raises(ConfigError) as e:
        validate(cfg, headless=False)
    problems = {p.where: p.message for p in e.value.problems}
    assert "permission denied" in problems[label("data.train_dir")]
    assert "permission denied" in problems[label("network.init_from")]


@pytest.mark.parametrize("optimizer", ["Prodigy", "DAdaptAdam"])
def test_adaptive_optimizers_need_one_learning_rate_for_unet_and_text_encoder(optimizer):
    """DAdaptation and Prodigy refuse, at their first step, parameter groups whose rates differ (other than 0): the
    config check says so before any model work, and accepts the two settings that run."""
    import torch

    from lib_train.train.optim import build_optimizer

    where = label("optim.te_lr")
    problems = _problems({"optim": {"optimizer": optimizer, "lr": 1.0, "te_lr": 5e-5}})
    assert where in problems and "1.0 is usual" in problems[where] and optimizer in problems[where]
    for te_lr in (0.0, 1.0):
        try:
            validate(from_dict({"optim": {"optimizer": optimizer, "lr": 1.0, "te_lr": te_lr}}), headless=False)
        except ConfigError as e:
            assert where not in {p.where for p in e.problems}, e.problems
    # the refusal is the optimizer's own: two groups with different rates fail at the first step
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(optimizer, [{"params": [a], "lr": 1.0}, {"params": [b], "lr": 5e-5}], 1.0, {})
    (a.sum() + b.sum()).backward()
    with pytest.raises(RuntimeError):
        opt.step()
    # AdamW is not affected
    assert where not in _problems_or_none({"optim": {"optimizer": "AdamW", "lr": 1e-4, "te_lr": 5e-5}})


def _problems_or_none(data: dict) -> dict[str, str]:
    try:
        validate(from_dict(data), headless=False)
    except ConfigError as e:
        return {p.where: p.message for p in e.problems}
    return {}


def test_adaptive_optimizers_get_their_rates_by_default_and_given_rates_stay():
    """`--optimizer Prodigy` alone is a valid command: the rates not given become 1.0 (the text encoder's the learning
    rate); rates the user gives are kept, and `--te-lr 0` still trains the UNet only."""
    from lib_train.config import adaptive_rates

    cfg = from_dict({}, overrides={"optim.optimizer": "Prodigy"})
    assert (cfg.optim.lr, cfg.optim.te_lr) == (1.0, 1.0)
    cfg = from_dict({}, overrides={"optim.optimizer": "DAdaptAdam", "optim.lr": 0.5})
    assert (cfg.optim.lr, cfg.optim.te_lr) == (0.5, 0.5)
    cfg = from_dict({"optim": {"optimizer": "Prodigy", "te_lr": 0}})
    assert (cfg.optim.lr, cfg.optim.te_lr) == (1.0, 0.0)
    emb = from_dict({"method": "embedding", "optim": {"optimizer": "Prodigy"}})
    assert emb.optim.lr == 1.0
    assert from_dict({}, overrides={"optim.optimizer": "AdamW"}).optim.lr == 1e-4  # others keep their defaults
    # a config that sets both (a saved run, a resume state) is taken as written
    cfg = from_dict({"optim": {"optimizer": "Prodigy", "lr": 1e-4, "te_lr": 5e-5}})
    assert (cfg.optim.lr, cfg.optim.te_lr) == (1e-4, 5e-5) and adaptive_rates(cfg, {"lr", "te_lr"}) == {}


def test_the_tab_sets_the_rates_when_the_optimizer_switches():
    from lib_train.webui.tab.build import _Handlers

    to_prodigy = _Handlers.optimizer_changed("lora", "Prodigy", 1e-4, 5e-5)
    assert [u.get("value") for u in to_prodigy] == [1.0, 1.0]
    assert "value" not in _Handlers.optimizer_changed("lora", "Prodigy", 1e-4, 0)[1]  # UNet only stays
    assert not any("value" in u for u in _Handlers.optimizer_changed("lora", "Prodigy", 0.5, 0.5))  # typed: kept
    back = _Handlers.optimizer_changed("lora", "AdamW", 1.0, 1.0)
    assert [u.get("value") for u in back] == [1e-4, 5e-5]
    assert _Handlers.optimizer_changed("embedding", "AdamW", 1.0, 5e-5)[0]["value"] == 5e-3
