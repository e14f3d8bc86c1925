"""Textual-inversion runs on tiny real-code models: only the vectors change, files, restore, resume, overfit."""

from __future__ import annotations

import pytest
import torch
from helpers import Recorder, apply_overrides, fail_on_predict_call, make_bundle, make_images, module_flags, state_hash
from safetensors import safe_open

from lib_train.config import default_config
from lib_train.embedding.files import load_embedding
from lib_train.embedding.inject import Injection
from lib_train.embedding.vectors import init_vectors
from lib_train.errors import DatasetError, TrainerError
from lib_train.train.events import Commands, Events
from lib_train.train.state import load_state
from lib_train.train.ti_trainer import EmbeddingSession, prepare_embedding_data, train_embedding

INIT = "man in a leather jacket"


def ti_config(tmp_path, **overrides):
    """A small, fast embedding config over a 64-px dataset in ``tmp_path/data``."""
    cfg = default_config("embedding")
    cfg.data.train_dir = str(tmp_path / "data")
    cfg.data.resolution = 64
    cfg.data.min_bucket_side = 64
    cfg.data.max_bucket_side = 128
    cfg.embedding.init_text = INIT
    cfg.embedding.vectors = 3
    cfg.train.epochs = 1
    cfg.output.output_dir = str(tmp_path / "out")
    cfg.output.name = "laohuang"
    return apply_overrides(cfg, overrides)


def _run(cfg, bundle, **kw):
    return train_embedding(cfg, bundle, prepare_embedding_data(cfg), **kw)


def _vectors(path) -> torch.Tensor:
    return load_embedding(path).vectors


def test_run_trains_only_the_vectors_and_restores_the_model(tmp_path):
    make_images(tmp_path / "data" / "2_thing", n=2)
    cfg = ti_config(tmp_path, train__epochs=2, output__save_every_epochs=1, embedding__write_pt=True)
    bundle = make_bundle("sd1")
    before_hash, before_flags = state_hash(bundle.model), module_flags(bundle.model)
    start = init_vectors(bundle.encode_text, INIT, 3)
    rec = Recorder()
    result = _run(cfg, bundle, events=rec)

    assert result.status == "finished" and result.step == 8 and rec.steps == list(range(1, 9))
    assert state_hash(bundle.model) == before_hash  # every weight, every token-embedding row
    assert module_flags(bundle.model) == before_flags
    assert bundle.encode_text.placeholders is None
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "laohuang-000004.pt", "laohuang-000004.safetensors", "laohuang.pt", "laohuang.safetensors"]
    final = _vectors(out / "laohuang.safetensors")
    assert final.shape == (3, 32) and not torch.equal(final, start)  # trained from the init text's rows
    assert not torch.equal(_vectors(out / "laohuang-000004.safetensors"), final)
    pt = torch.load(out / "laohuang-000004.pt", weights_only=True)
    assert (pt["name"], pt["step"], pt["sd_checkpoint_name"]) == ("laohuang-000004", 4, "tiny-sd1")
    assert torch.equal(pt["string_to_param"]["*"], _vectors(out / "laohuang-000004.safetensors"))
    with safe_open(str(out / "laohuang.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["modelspec.title"] == "laohuang"
    assert [k for k, _ in rec.files] == ["epoch", "epoch", "final", "final"] and not rec.warnings


def test_prompts_draw_a_template_line_per_sample_and_step(tmp_path):
    make_images(tmp_path / "data" / "8_thing", n=1)
    cfg = ti_config(tmp_path)
    prep = prepare_embedding_data(cfg)
    session = EmbeddingSession(cfg, make_bundle("sd1"), prep, None)
    from lib_train.data import plan_epoch

    batches = [b for e in range(3) for b in plan_epoch(prep.entries, batch_size=1, seed=cfg.train.seed, epoch=e)]
    prompts = [session.prompts(b)[0] for b in batches]
    assert all("laohuang" in p and "thing, tag0, red" in p and "[" not in p for p in prompts)
    assert len(set(prompts)) > 3  # the same image, many template lines
    assert prompts == [session.prompts(b)[0] for b in batches]  # drawn from the sample seeds: reproducible


def test_exception_mid_step_restores_the_model(tmp_path):
    make_images(tmp_path / "data" / "3_thing", n=1)
    cfg = ti_config(tmp_path)
    bundle = make_bundle("sd1")
    before_hash, before_flags = state_hash(bundle.model), module_flags(bundle.model)
    fail_on_predict_call(bundle, 2)
    with pytest.raises(RuntimeError, match="boom"):
        _run(cfg, bundle)
    assert state_hash(bundle.model) == before_hash and module_flags(bundle.model) == before_flags
    assert bundle.encode_text.placeholders is None
    assert not (tmp_path / "out" / "laohuang.safetensors").exists()


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_equals_uninterrupted_run(tmp_path, accum):
    make_images(tmp_path / "data" / "3_thing", n=2)
    common = dict(train__epochs=2, optim__grad_accum=accum, data__flip=True, data__shuffle_caption=True,
                  optim__scheduler="cosine", output__save_every_epochs=0, embedding__template="style")
    ref = _run(ti_config(tmp_path, output__name="ref", **common), make_bundle("sd1"))

    cfg = ti_config(tmp_path, output__name="res", **common)
    bundle = make_bundle("sd1")
    before = state_hash(bundle.model), module_flags(bundle.model)
    commands = Commands()
    first = _run(cfg, bundle, events=Recorder(stop_at=2, commands=commands), commands=commands)
    assert first.status == "interrupted" and first.final_file.endswith("res-000002.safetensors")
    assert not (tmp_path / "out" / "res.safetensors").exists()
    assert (state_hash(bundle.model), module_flags(bundle.model)) == before and bundle.encode_text.placeholders is None
    state = load_state(first.state_dir)
    assert state.state.step == 2 and state.state.config["method"] == "embedding"
    resumed = _run(cfg, make_bundle("sd1"), resume=state)
    assert resumed.status == "finished" and resumed.step == ref.step
    assert torch.equal(_vectors(resumed.final_file), _vectors(ref.final_file))


def test_gradient_checkpointing_gives_the_same_vectors_on_sd2_v(tmp_path):
    make_images(tmp_path / "data" / "2_thing", n=1)
    results = []
    for flag in (False, True):
        cfg = ti_config(tmp_path, output__name=f"gc{int(flag)}", train__gradient_checkpointing=flag,
                        train__min_snr_gamma=5.0, embedding__vectors=2)
        bundle = make_bundle("sd2", "v")
        before = module_flags(bundle.model), state_hash(bundle.model)
        result = _run(cfg, bundle)
        assert (module_flags(bundle.model), state_hash(bundle.model)) == before
        results.append(_vectors(result.final_file))
        with safe_open(result.final_file, "pt") as f:
            assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v2-768-v/textual-inversion"
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_steps_whose_prompts_lack_the_name_do_not_move_the_vectors(tmp_path):
    make_images(tmp_path / "data" / "3_laohuang", n=1, captions=False)  # caption = folder name = "laohuang"
    cfg = ti_config(tmp_path, embedding__template="none", data__caption_dropout=0.99, optim__max_grad_norm=0.0)
    bundle = make_bundle("sd1")
    start = init_vectors(bundle.encode_text, INIT, 3)
    result = _run(cfg, bundle)  # with this seed every one of the 3 captions is dropped
    assert result.status == "finished" and torch.equal(_vectors(result.final_file), start)


def test_template_none_needs_the_name_in_every_caption(tmp_path):
    make_images(tmp_path / "data" / "2_thing", n=2)
    with pytest.raises(DatasetError) as err:
        prepare_embedding_data(ti_config(tmp_path, embedding__template="none"))
    text = str(err.value)
    assert "img0.png" in text and "img1.png" in text and "--template" in text
    (tmp_path / "data" / "2_thing" / "img0.txt").write_text("laohuang, red", encoding="utf-8")
    (tmp_path / "data" / "2_thing" / "img1.txt").write_text("[name] at home", encoding="utf-8")
    assert prepare_embedding_data(ti_config(tmp_path, embedding__template="none")).total_steps == 4


def test_continue_from_a_file_and_a_wrong_vector_count(tmp_path):
    make_images(tmp_path / "data" / "1_thing", n=1)
    first = _run(ti_config(tmp_path, output__name="a", embedding__write_pt=True), make_bundle("sd1"))
    cfg = ti_config(tmp_path, output__name="b", embedding__init_from=str(tmp_path / "out" / "a.pt"), train__epochs=1)
    bundle = make_bundle("sd1")
    start = _vectors(first.final_file)
    second = _run(cfg, bundle)
    assert not torch.equal(_vectors(second.final_file), start)
    cfg = ti_config(tmp_path, output__name="c", embedding__init_from=first.final_file, embedding__vectors=5)
    before = state_hash(bundle.model), module_flags(bundle.model)
    with pytest.raises(TrainerError, match=r"holds 3 vectors of width .*needs 5 vectors.*set embedding.vectors \(--vectors\) to 3"):
        _run(cfg, bundle)
    assert (state_hash(bundle.model), module_flags(bundle.model)) == before


def test_training_lowers_the_loss_on_a_fixed_evaluation(tmp_path):
    """Overfit one image: the loss at fixed (t, noise) for the training prompt falls with the trained vectors, below
    the loss with random vectors of the same norms (the tiny random model responds weakly to its conditioning)."""
    from lib_train.data.latent_cache import load_pixels
    from lib_train.train import loss as L

    make_images(tmp_path / "data" / "24_thing", n=1)
    (tmp_path / "data" / "24_thing" / "img0.txt").write_text("[name]", encoding="utf-8")
    cfg = ti_config(tmp_path, optim__lr=0.1, embedding__template="none", embedding__init_text="",
                    embedding__vectors=4, optim__max_grad_norm=0.0, train__epochs=2)
    bundle = make_bundle("sd1")
    prep = prepare_embedding_data(cfg)
    x0 = bundle.encode_pixels(load_pixels(prep.items[0].path, prep.plans[0], False)[None]).repeat(8, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(50, 950, 8).long()
    ac = bundle.alphas_cumprod

    def eval_loss(vectors):
        injection = Injection(bundle.encode_text, "laohuang", vectors)
        try:
            with torch.no_grad():
                cond = bundle.encode_text(["laohuang"] * 8)
                return float(L.diffusion_loss(bundle.predict(L.add_noise(x0, noise, t, ac), t, cond), noise))
        finally:
            injection.remove()

    base = eval_loss(torch.zeros(4, 32))  # empty init text: zero vectors
    vectors = _vectors(train_embedding(cfg, bundle, prep).final_file)
    trained = eval_loss(vectors)
    norms = vectors.norm(dim=1, keepdim=True)
    random_dirs = [eval_loss(r / r.norm(dim=1, keepdim=True) * norms)
                   for r in torch.randn((4, *vectors.shape), generator=g)]
    assert trained < 0.97 * base and trained < min(random_dirs) - 0.02, (base, trained, random_dirs)
