"""Per-prompt sample options (kohya's ``--n --w --h --s --l --d --ss``): the parser, its errors by line, the check
before a run (config validation, the command line), and headless samples made with each line's own settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_bundle, make_images, run_cli, tiny_config
from PIL import Image

from lib_train import sample_prompts as sp
from lib_train.config import SETTINGS, default_config, from_dict, sample_prompt_lines, validate
from lib_train.errors import ConfigError
from lib_train.train import sampling
from lib_train.train.lora_trainer import prepare_data, train_lora


def _one(line: str) -> sp.PromptLine:
    record, problems = sp.parse_line(line)
    assert problems == [], problems
    return record


def _problems(text: str) -> list[str]:
    return sp.parse_prompts(text)[1]


# ---- the parser


def test_every_option_is_read():
    r = _one("a photo of [name], smiling --n blurry, lowres --w 512 --h 768 --s 28 --l 7.5 --d 42 --ss k_euler_a")
    assert r == sp.PromptLine(line=1, prompt="a photo of [name], smiling", negative="blurry, lowres", width=512,
                              height=768, steps=28, cfg_scale=7.5, seed=42, sampler="Euler a")


def test_a_line_without_options_sets_nothing():
    assert _one("  [name] in a garden,   watercolor ") == sp.PromptLine(line=1, prompt="[name] in a garden, watercolor")


def test_the_negative_prompt_runs_to_the_next_option_with_its_commas_and_words():
    r = _one("cat --w 64 --n low quality, worst quality, bad   anatomy,bad composition --h 96")
    assert r.negative == "low quality, worst quality, bad anatomy,bad composition"
    assert (r.width, r.height) == (64, 96)
    assert _one("cat --n ugly, extra fingers, (blurry:1.2)").negative == "ugly, extra fingers, (blurry:1.2)"


def test_options_in_any_order_and_case_with_tabs():
    r = _one("cat\t--D 3  --L 4\t--N  dark,  noisy   --W 128")
    assert (r.seed, r.cfg_scale, r.negative, r.width) == (3, 4.0, "dark, noisy", 128)


def test_quoted_values_and_an_empty_negative():
    r = _one("""cat --n "blurry, lowres" --ss 'Euler a'""")
    assert (r.negative, r.sampler) == ("blurry, lowres", "Euler a")
    assert _one('cat --n ""').negative == ""  # this line: no negative prompt, whatever sample.negative says
    assert _one("cat").negative is None


def test_double_dashes_inside_text_are_not_options():
    r = _one("a well--lit room -- at night --n over--exposed")
    assert (r.prompt, r.negative) == ("a well--lit room -- at night", "over--exposed")


def test_samplers_kohya_names_are_mapped_and_webui_names_kept():
    assert {_one(f"x --ss {k}").sampler for k in ("euler_a", "K_EULER_A")} == {"Euler a"}
    assert _one("x --ss ddim").sampler == "DDIM" and _one("x --ss dpmsolver++").sampler == "DPM++ 2M"
    assert _one("x --ss DPM++ 2M SDE").sampler == "DPM++ 2M SDE"
    assert set(sp.KOHYA_SAMPLERS.values()) <= {"DDIM", "PLMS", "LMS", "Euler", "Euler a", "Heun", "DPM2", "DPM2 a",
                                               "DPM++ 2M"}


def test_comments_and_blank_lines_are_skipped_and_lines_keep_their_numbers():
    text = "# prompt 1\n\na cat --w 64\n   # another comment\n  a dog --d 5  \n"
    records, problems = sp.parse_prompts(text)
    assert problems == []
    assert [(r.line, r.prompt) for r in records] == [(3, "a cat"), (5, "a dog")]
    assert sample_prompt_lines(text) == ["a cat --w 64", "a dog --d 5"]


@pytest.mark.parametrize("line, message", [
    ("cat --w 513", "sample prompt line 2: --w 513 is not a multiple of 8 (use 512 or 520)"),
    ("cat --h 2056", "sample prompt line 2: --h 2056 is outside 64-2048 (the height)"),
    ("cat --w 32", "sample prompt line 2: --w 32 is outside 64-2048 (the width)"),
    ("cat --w abc", "sample prompt line 2: --w abc is not a whole number (the width, e.g. --w 512)"),
    ("cat --s 2.5", "sample prompt line 2: --s 2.5 is not a whole number (the sampling steps, e.g. --s 28)"),
    ("cat --s 0", "sample prompt line 2: --s 0 is outside 1-150 (the sampling steps)"),
    ("cat --s 151", "sample prompt line 2: --s 151 is outside 1-150"),
    ("cat --l seven", "sample prompt line 2: --l seven is not a number (the CFG scale, e.g. --l 7)"),
    ("cat --l nan", "sample prompt line 2: --l nan is not a number"),
    ("cat --l 0.5", "sample prompt line 2: --l 0.5 is outside 1-30 (the CFG scale; 7 is typical)"),
    ("cat --d x1", "sample prompt line 2: --d x1 is not a whole number (the seed, e.g. --d 42)"),
    ("cat --d -1", "sample prompt line 2: --d -1: a random seed is not possible here"),
    ("cat --d 4294967296", "sample prompt line 2: --d 4294967296 is outside 0-4294967295 (the seed)"),
    ("cat --w", "sample prompt line 2: --w has no value; write the width after it (e.g. --w 512)"),
    ("cat --w --h 64", "sample prompt line 2: --w has no value"),
    ("cat --n --w 64", "sample prompt line 2: --n has no value; write the negative prompt after it"),
    ("cat --ss ''", "sample prompt line 2: --ss has no value"),
    ("cat --w 64 --W 96", "sample prompt line 2: --w is given twice; keep one"),
    ("cat --ar 16:9", "sample prompt line 2: unknown option --ar; the options are --n (negative prompt), --w (width)"),
    ("cat --cn pose.png", "sample prompt line 2: --cn is kohya's option for a ControlNet image"),
    ("cat --g 3.5", "sample prompt line 2: --g is kohya's option for the distilled guidance"),
    ("cat --w512", "sample prompt line 2: --w512: put a space between the option and its value (--w 512)"),
])
def test_each_bad_option_is_named_with_its_line(line, message):
    problems = _problems(f"fine --w 64\n{line}\nalso fine --d 1")
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_every_problem_of_every_line_is_reported():
    problems = _problems("a --w 513 --zz 1\n# comment\nb --s x\nc --d 1 --d 2")
    assert [p.split(":")[0] for p in problems] == ["sample prompt line 1"] * 2 + ["sample prompt line 3",
                                                                                  "sample prompt line 4"]
    with pytest.raises(sp.SamplePromptError) as e:
        sp.parse_prompts_strict("a --w 513")
    assert e.value.problems == ["sample prompt line 1: --w 513 is not a multiple of 8 (use 512 or 520)"]


def test_the_bounds_are_the_sample_settings_own():
    assert SETTINGS["sample.steps"].range == sp.STEPS_RANGE
    assert SETTINGS["sample.cfg_scale"].range == sp.CFG_RANGE
    cfg = default_config()
    cfg.sample.width, cfg.sample.height = sp.SIZE_RANGE  # the setting's own bounds accept the same sizes
    validate_sample_only(cfg)
    cfg.sample.width = sp.SIZE_RANGE[1] + sp.SIZE_MULTIPLE
    with pytest.raises(ConfigError, match="sample.width"):
        validate_sample_only(cfg)


def validate_sample_only(cfg) -> None:
    """validate(), keeping only the sample settings' problems."""
    try:
        validate(cfg, headless=False)
    except ConfigError as e:
        mine = [p for p in e.problems if p.where.startswith("sample.")]
        if mine:
            raise ConfigError(mine) from None


def test_the_help_of_the_setting_documents_the_syntax():
    spec = SETTINGS["sample.prompts"]
    for needle in ("--n", "--w", "--h", "--s", "--l", "--d", "--ss"):
        assert needle in spec.help, needle


# ---- checked before a run starts


def test_validation_names_the_setting_and_the_line(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = tiny_config(tmp_path, sample__prompts="a photo --w 512\nsecond --w 513 --s x\n", sample__every_epochs=1)
    with pytest.raises(ConfigError) as e:
        validate(cfg, headless=False)
    found = [str(p) for p in e.value.problems if p.where.startswith("sample.prompts")]
    assert found == ["sample.prompts (--sample-prompts): sample prompt line 2: --w 513 is not a multiple of 8 "
                     "(use 512 or 520)",
                     "sample.prompts (--sample-prompts): sample prompt line 2: --s x is not a whole number (the "
                     "sampling steps, e.g. --s 28)"]


def test_a_config_body_with_a_bad_line_is_refused_by_name(tmp_path):
    """What the API and the tab do with a body: coerce it, then validate (no WebUI needed for this part)."""
    (tmp_path / "data").mkdir()
    body = {"data": {"train_dir": str(tmp_path / "data"), "resolution": 64},
            "output": {"output_dir": str(tmp_path / "out"), "name": "n"},
            "sample": {"prompts": "# kohya file\nok --w 64 --h 96\nbad --n ugly --cn x.png", "every_epochs": 1}}
    with pytest.raises(ConfigError) as e:
        validate(from_dict(body), headless=False)
    assert any("sample prompt line 3: --cn is kohya's option for a ControlNet image" in str(p)
               for p in e.value.problems)
    body["sample"]["prompts"] = "# kohya file\nok --w 64 --h 96\nfine --n ugly, blurry"
    cfg = from_dict(body)
    validate_sample_only(cfg)
    assert [(i.width, i.height, i.negative) for i in sampling.request_for(cfg, "").images] == [
        (64, 96, ""), (64, 64, "ugly, blurry")]


def test_the_command_line_refuses_a_bad_line_before_loading(tmp_path, tiny_checkpoint, capsys):
    make_images(tmp_path / "data" / "2_x", n=1)
    code, text = run_cli("lora", ["--checkpoint", tiny_checkpoint, "--data", tmp_path / "data", "--output",
                                  tmp_path / "out", "--name", "n", "--resolution", "64", "--min-bucket", "64",
                                  "--max-bucket", "128", "--sample-prompts", "a cat --w 64 | a dog --w 100 --q 1",
                                  "--dry-run"], capsys)
    assert code == 2 and text.startswith("error: ") and "Traceback" not in text
    assert "sample prompt line 2: --w 100 is not a multiple of 8 (use 96 or 104)" in text
    assert "sample prompt line 2: unknown option --q" in text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    code, text = run_cli("lora", ["--checkpoint", tiny_checkpoint, "--data", tmp_path / "data", "--output",
                                  tmp_path / "out", "--name", "n", "--resolution", "64", "--min-bucket", "64",
                                  "--max-bucket", "128", "--sample-prompts", "a cat --w 64 | a dog --w 96 --d 3",
                                  "--dry-run"], capsys)
    assert code == 0, text


# ---- what a set is made of


def test_a_line_s_options_override_the_settings_and_the_settings_fill_the_rest():
    cfg = default_config()
    cfg.data.resolution = 64
    cfg.sample.negative, cfg.sample.steps, cfg.sample.cfg_scale, cfg.sample.seed = "bad [name]", 20, 7.0, 100
    cfg.sample.height, cfg.sample.sampler = 128, "Euler a"
    cfg.sample.prompts = ("# header\n[name] plain\n[name] own --n not [name], blurry --w 96 --h 64 --s 3 --l 2.5 --d 9 "
                          "--ss k_lms\n[name] third --n \"\"")
    r = sampling.request_for(cfg, "zq")
    a, b, c = r.images
    assert a == sampling.SampleImage("zq plain", "bad zq", 20, 7.0, 100, 64, 128, "Euler a")
    assert b == sampling.SampleImage("zq own", "not zq, blurry", 3, 2.5, 9, 96, 64, "LMS")
    assert c == sampling.SampleImage("zq third", "", 20, 7.0, 102, 64, 128, "Euler a")  # seed + its index
    assert r.prompts == ("zq plain", "zq own", "zq third")
    assert r.texts == ["zq plain", "bad zq", "zq own", "not zq, blurry", "zq third", ""]


def _context(tmp_path, bundle):
    return sampling.SampleContext(cfg=tiny_config(tmp_path), bundle=bundle, device=torch.device("cpu"),
                                  autocast=None, name_text="", embedding=None, condition=bundle.conditioning)


def _spec(**kw) -> sampling.SampleImage:
    base = dict(prompt="a cat", negative="", steps=2, cfg_scale=5.0, seed=1, width=64, height=64, sampler="DDIM")
    return sampling.SampleImage(**{**base, **kw})


def test_headless_samples_have_each_line_s_size_and_seed_decides_the_image(tmp_path):
    bundle = make_bundle("sd1")
    ctx = _context(tmp_path, bundle)
    specs = (_spec(width=64, height=96, seed=7), _spec(width=96, height=64, seed=8),
             _spec(seed=7), _spec(seed=8), _spec(seed=7))
    images = sampling.ddim_sampler(ctx, sampling.SampleRequest(specs))
    assert [im.size for im in images] == [(64, 96), (96, 64), (64, 64), (64, 64), (64, 64)]
    # 96 px is no multiple of the tiny UNet's downsampling (64 px): ldm's UNet alone refuses it; the sampler resized
    # the skip connections as the WebUI does, and put ldm's torch back
    from ldm.modules.diffusionmodules import openaimodel

    assert openaimodel.th is torch
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        bundle.predict(torch.zeros(1, 4, 12, 8), torch.tensor([10]), bundle.conditioning(["a cat"]))
    pix = [np.asarray(im, dtype=np.int16) for im in images]
    assert np.array_equal(pix[2], pix[4])  # same prompt, same seed: the same image
    assert np.abs(pix[2] - pix[3]).max() > 0  # same prompt, another seed: another image
    again = sampling.ddim_sampler(ctx, sampling.SampleRequest(specs[2:3]))
    assert np.array_equal(np.asarray(again[0], dtype=np.int16), pix[2])  # alone or in a set: the seed decides
    # the line's own negative prompt and CFG scale are used
    for other in (_spec(seed=7, negative="blurry"), _spec(seed=7, cfg_scale=2.0), _spec(seed=7, steps=3)):
        assert np.abs(np.asarray(sampling.ddim_sampler(ctx, sampling.SampleRequest((other,)))[0],
                                 dtype=np.int16) - pix[2]).max() > 0, other


def test_the_sampler_conditions_each_image_on_its_own_negative_and_size(tmp_path):
    from lib_train.models.conditioning import ImageSize

    bundle, calls = make_bundle("sd1"), []

    def condition(prompts, sizes=None):
        calls.append((list(prompts), sizes))
        return bundle.conditioning(prompts, sizes)

    ctx = sampling.SampleContext(cfg=tiny_config(tmp_path), bundle=bundle, device=torch.device("cpu"), autocast=None,
                                 name_text="", embedding=None, condition=condition)
    sampling.ddim_sampler(ctx, sampling.SampleRequest((_spec(negative="ugly", width=96), _spec(cfg_scale=1.0))))
    assert calls == [(["a cat"], [ImageSize.plain(96, 64)]), (["ugly"], [ImageSize.plain(96, 64)]),
                     (["a cat"], [ImageSize.plain(64, 64)])]  # CFG 1: no unconditional half


def test_a_run_writes_each_line_s_size_and_same_text_lines_do_not_overwrite(tmp_path):
    make_images(tmp_path / "data" / "2_thing", n=2)
    cfg = tiny_config(tmp_path, train__max_steps=2, sample__steps=2, sample__every_steps=2,
                      sample__prompts="thing --w 64 --h 96 --d 7\nthing --w 96 --h 64 --d 8 --n blurry --l 3\n"
                                      "thing --d 1\nthing --d 2")
    result = train_lora(cfg, make_bundle("sd1"), prepare_data(cfg))
    assert result.status == "finished"
    folder = tmp_path / "out" / "samples"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"tiny-000002-{i}.png" for i in range(4)]
    images = [Image.open(folder / n) for n in names]
    assert [im.size for im in images] == [(64, 96), (96, 64), (64, 64), (64, 64)]
    assert np.abs(np.asarray(images[2], dtype=np.int16) - np.asarray(images[3], dtype=np.int16)).max() > 0
    params = [im.text["parameters"] for im in images]  # the WebUI's PNG Info reads this text
    assert params[0] == "thing\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 7, Size: 64x96"
    assert params[1] == "thing\nNegative prompt: blurry\nSteps: 2, Sampler: DDIM, CFG scale: 3, Seed: 8, Size: 96x64"
    assert "Seed: 1," in params[2] and "Seed: 2," in params[3]
    assert (tmp_path / "out" / "tiny.preview.png").read_bytes() == (folder / names[0]).read_bytes()


def test_per_line_samples_are_the_same_in_two_runs(tmp_path):
    out = []
    for run in ("a", "b"):
        root = tmp_path / run
        make_images(root / "data" / "1_thing", n=1)
        cfg = tiny_config(root, train__max_steps=1, sample__steps=2,
                          sample__prompts="thing --w 96 --h 64 --d 11\nthing --n dark --d 12 --l 4")
        train_lora(cfg, make_bundle("sd1"), prepare_data(cfg))
        out.append([p.read_bytes() for p in sorted((root / "out" / "samples").iterdir())])
    assert len(out[0]) == 2 and out[0] == out[1]
