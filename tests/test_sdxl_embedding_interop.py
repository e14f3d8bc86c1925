"""Our SDXL embedding files in diffusers: ``clip_l`` loaded into ``text_encoder`` and ``clip_g`` into
``text_encoder_2`` with ``load_textual_inversion`` (one call per encoder, the documented pattern) reproduce our
conditioning — ``encode_prompt``'s ``prompt_embeds`` (both encoders' penultimate hidden states side by side) equal our
context and its ``pooled_prompt_embeds`` our pooled output, for 1- and 3-vector files and a prompt naming the
embedding twice.

The diffusers side runs in the interop environment (``tests/interop/diffusers_sdxl_ti_worker.py``; ``tests/run.sh``
sets ``TRAINER_INTEROP_PYTHON``) on the same two text towers, handed over as the text-encoder part of an SDXL single
file (``conditioner.embedders.0.transformer.*``, ``conditioner.embedders.1.model.*``) that diffusers' own single-file
converters map; the towers' ``CLIPTextConfig`` come from here (:func:`sdxl_models.diffusers_text_configs`).

- CI tier (no sgm): tiny transformers CLIP (12 layers, so the penultimate is ``hidden_states[11]`` as at full size)
  and open_clip towers (:func:`sdxl_models.tiny_sdxl_text_encoders`), our conditioning from :class:`SDXLText`. The
  UNet needs sgm, so the trainer cannot run here: the files are written by our save path (``save_safetensors`` +
  ``embedding_metadata``) from vectors moved away from each encoder's init rows.
- sgm tier (``SD_WEBUI_DIR``): a file our trainer wrote in a short run on a tiny sgm SDXL, against
  ``bundle.text_outputs`` and the pooled part of ``bundle.conditioning``'s vector.

The comparison can fail: the same file loaded with the two tensors swapped gives another context and pooled output,
and a file loaded under another token leaves the prompt's name as plain words (diffusers then equals our conditioning
WITHOUT the embedding).

End-of-text id (``eos_token_id``): transformers' CLIP pools at the first ``eos_token_id`` position, except for a
config saying the legacy ``2`` (configs written before transformers PR #24773), where it pools at the largest token
id. The configs here say 49407, as SDXL's text encoders should. Copies of
``stabilityai/stable-diffusion-xl-base-1.0``'s ``text_encoder_2/config.json`` seen in other projects say
``bos_token_id 0, eos_token_id 2`` (diffusers issue #10754 reports the same for SD1.5): with such a config the ids
``load_textual_inversion`` adds (≥ 49408) are the largest in any prompt naming the embedding, and diffusers' pooled
output is taken at its first occurrence's last vector instead of the end of the text.
:func:`test_with_the_legacy_eos_token_id_diffusers_pools_at_the_embedding` shows this; it is diffusers'/transformers'
behaviour with that config, not a property of the file (the context is unaffected).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sdxl_models import diffusers_text_configs, tiny_sdxl_text_encoders

from lib_train.embedding.files import embedding_metadata, load_embedding, save_safetensors
from lib_train.embedding.inject import Injection
from lib_train.embedding.vectors import init_vectors
from lib_train.models.build import clip_tokenizer_files
from lib_train.models.bundle import SDXLText
from lib_train.models.conditioning import PLACEHOLDER_ID

HERE = Path(__file__).resolve().parent
WORKER = HERE / "interop" / "diffusers_sdxl_ti_worker.py"
INTEROP_PYTHON = os.environ.get("TRAINER_INTEROP_PYTHON", "")
TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
INIT_TEXT = "a man in a leather jacket"
EOS = 49407  # end-of-text id of both tokenizers
# name -> (vectors, prompts that fit one 77-token chunk: diffusers does not chunk)
EMBEDDINGS = {
    "laohuang": (3, ["a photo of laohuang", "laohuang, laohuang in a garden, watercolor"]),
    "xiaomao": (1, ["xiaomao sitting on a red sofa"]),
}
RTOL, ATOL = 1e-4, 1e-5  # fp32 on both sides; observed: context ≤ 5.3e-6 (values up to ~10), pooled ≤ 7.2e-7
MATTERS = 100 * ATOL  # the embedding (or the mistake) moves the outputs by far more than the tolerance

pytestmark = pytest.mark.skipif(not Path(INTEROP_PYTHON).is_file(),
                                reason="TRAINER_INTEROP_PYTHON is not set: run `bash tests/run.sh`")


# ---- both tiers


def _worker(work: Path) -> subprocess.CompletedProcess:
    return subprocess.run([INTEROP_PYTHON, str(WORKER), str(work)], capture_output=True, text=True, timeout=600)


def _workdir(work: Path, text_weights: dict[str, torch.Tensor], root, files: dict[str, Path], cases: list[dict],
             *, eos_token_id: int | None = None) -> Path:
    """Write the worker's inputs: the text-encoder part of an SDXL single file, the towers' configs (``eos_token_id``
    overrides both), the tokenizer files, the embedding files and the request."""
    (work / "tokenizer").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in text_weights.items() if k.startswith(TEXT_PREFIXES)},
              str(work / "checkpoint.safetensors"))
    clip_l, clip_g = diffusers_text_configs(root)
    if eos_token_id is not None:
        clip_l["eos_token_id"] = clip_g["eos_token_id"] = eos_token_id
    (work / "spec.json").write_text(json.dumps({"text_encoder": clip_l, "text_encoder_2": clip_g}, indent=2))
    for name in ("vocab.json", "merges.txt"):
        (work / "tokenizer" / name).write_bytes((clip_tokenizer_files() / name).read_bytes())
    for name, path in files.items():
        (work / f"{name}.safetensors").write_bytes(path.read_bytes())
    (work / "request.json").write_text(json.dumps({"cases": cases}, indent=2))
    return work


def _case(name: str, *, token: str | None = None, swap: bool = False, prompts: list[str] | None = None) -> dict:
    keys = ("clip_g", "clip_l") if swap else ("clip_l", "clip_g")
    return {"file": f"{name}.safetensors", "token": token or name, "text_encoder": keys[0], "text_encoder_2": keys[1],
            "prompts": prompts or EMBEDDINGS[name][1]}


def _run(work: Path) -> tuple[dict[str, torch.Tensor], dict]:
    proc = _worker(work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return load_file(str(work / "outputs.safetensors")), json.loads((work / "report.json").read_text())


def _ours(encode, conditioners, name: str | None, parts: dict | None, prompts: list[str]) -> list[dict]:
    """Per prompt (one at a time, as ``encode_prompt`` is called): our ``{"crossattn": [1, 77, Σ widths], "pooled":
    [1, dim], "ids": [[77] per encoder]}`` with the embedding registered (``name`` None: plain text)."""
    injection = Injection(conditioners, name, [parts["clip_l"], parts["clip_g"]]) if name else None
    try:
        out = []
        with torch.no_grad():
            for prompt in prompts:
                ids = [c.tokenize_prompts([prompt])[0] for c in conditioners]
                assert all(i.shape == (1, 1, 77) for i in ids)  # one chunk: what diffusers encodes
                out.append(dict(encode([prompt]), ids=[i[0, 0] for i in ids]))
        return out
    finally:
        if injection is not None:
            injection.remove()


def _check_ids(ours: list[torch.Tensor], theirs: list[torch.Tensor], added: list[dict[str, int]], name: str,
               n: int) -> None:
    """diffusers' ids equal ours except at our placeholder slots (before the end of the text), which hold the tokens
    it added for the embedding, in order (``name``, ``name_1``, ...), once per occurrence."""
    for our_ids, their_ids, tokens in zip(ours, theirs, added):
        assert sorted(tokens) == sorted([name] + [f"{name}_{i}" for i in range(1, n)]), tokens
        end = int((our_ids == EOS).nonzero()[0])  # clip_g pads with 0 (the placeholder id) after it
        slots = (our_ids == PLACEHOLDER_ID) & (torch.arange(len(our_ids)) < end)
        assert slots.sum() > 0 and slots.sum() % n == 0, our_ids.tolist()
        order = [tokens[name]] + [tokens[f"{name}_{i}"] for i in range(1, n)]
        occurrences = int(slots.sum()) // n
        assert their_ids[slots].tolist() == order * occurrences
        assert torch.equal(their_ids[~slots], our_ids[~slots])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _compare_cases(theirs, report, cases, expected) -> None:
    """Every case's ids, context and pooled output equal ``expected[i]`` (our per-prompt outputs)."""
    for i, case in enumerate(cases):
        n = EMBEDDINGS[case["token"]][0]
        added = [report["cases"][i]["added_tokens"], report["cases"][i]["added_tokens_2"]]
        for j, ours in enumerate(expected[i]):
            _check_ids(ours["ids"], [theirs[f"ids_l_{i}_{j}"], theirs[f"ids_g_{i}_{j}"]], added, case["token"], n)
            torch.testing.assert_close(theirs[f"embeds_{i}_{j}"], ours["crossattn"][0], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(theirs[f"pooled_{i}_{j}"], ours["pooled"][0], rtol=RTOL, atol=ATOL)


# ---- CI tier: tiny transformers CLIP + open_clip towers, files from our save path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(text conditioning, the towers' root, the embedding files, the vectors read back from them)."""
    root = tiny_sdxl_text_encoders(seed=23, clip_l_layers=12)
    text = SDXLText(root)
    tmp = tmp_path_factory.mktemp("sdxl-ti-files")
    gen = torch.Generator().manual_seed(29)
    files, parts = {}, {}
    for name, (n, _) in EMBEDDINGS.items():
        vectors = {}
        for key, cond in zip(("clip_l", "clip_g"), text.encoders):
            start = init_vectors(cond, INIT_TEXT, n)
            step = torch.randn(start.shape, generator=gen) * cond.token_embedding.weight.std()
            vectors[key] = start + step  # moved away from the init rows, at the table's scale
        meta = embedding_metadata(title=name, family="sdxl", prediction="eps", resolution=1024, started_at=0.0)
        files[name] = save_safetensors(tmp / f"{name}.safetensors", vectors, meta)
        parts[name] = load_embedding(files[name]).parts
        assert all(torch.equal(parts[name][k], vectors[k]) for k in vectors)
    return text, root, files, parts


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    """The worker on the tiny towers: the two files as they should be loaded (cases 0, 1), the 3-vector file with
    its tensors swapped (2) and under another token (3). Returns (theirs, report, cases)."""
    text, root, files, _ = tiny
    cases = [_case(name) for name in EMBEDDINGS] + [_case("laohuang", swap=True),
                                                    _case("laohuang", token="laohuang2")]
    weights = {f"conditioner.{k}": v for k, v in root.state_dict().items()}
    work = _workdir(tmp_path_factory.mktemp("sdxl-ti-interop"), weights, root, files, cases)
    theirs, report = _run(work)
    return theirs, report, cases


def test_diffusers_reproduces_our_sdxl_conditioning_with_our_files(tiny, tiny_run):
    text, _, _, parts = tiny
    theirs, report, cases = tiny_run
    assert report["eos_token_id"] == {"text_encoder": 49407, "text_encoder_2": 49407}
    expected = []
    for case in cases[:2]:
        name = case["token"]
        ours = _ours(text.text, text.encoders, name, parts[name], case["prompts"])
        plain = _ours(text.text, text.encoders, None, None, case["prompts"])
        for o, p in zip(ours, plain):  # the embedding matters: context of both encoders and the pooled output
            assert _max_diff(o["crossattn"], p["crossattn"]) > MATTERS and _max_diff(o["pooled"], p["pooled"]) > MATTERS
        expected.append(ours)
    _compare_cases(theirs, report, cases[:2], expected)


def test_swapped_tensors_or_another_token_do_not_match(tiny, tiny_run):
    """The check can fail. Swapped: clip_g's vectors in clip_l's encoder and the reverse (same width at tiny size,
    so diffusers loads them) — another context in both halves and another pooled output. Another token: the
    prompt's name stays plain words in diffusers, which then equals our conditioning without the embedding."""
    text, _, _, parts = tiny
    theirs, _, cases = tiny_run
    prompts = cases[2]["prompts"]
    ours = _ours(text.text, text.encoders, "laohuang", parts["laohuang"], prompts)
    plain = _ours(text.text, text.encoders, None, None, prompts)
    width_l = text.encoders[0].token_embedding.weight.shape[1]
    for j, (o, p) in enumerate(zip(ours, plain)):
        swapped = theirs[f"embeds_2_{j}"]
        assert _max_diff(swapped[:, :width_l], o["crossattn"][0, :, :width_l]) > MATTERS
        assert _max_diff(swapped[:, width_l:], o["crossattn"][0, :, width_l:]) > MATTERS
        assert _max_diff(theirs[f"pooled_2_{j}"], o["pooled"][0]) > MATTERS
        other = theirs[f"embeds_3_{j}"]
        assert _max_diff(other, o["crossattn"][0]) > MATTERS
        torch.testing.assert_close(other, p["crossattn"][0], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(theirs[f"pooled_3_{j}"], p["pooled"][0], rtol=RTOL, atol=ATOL)
        assert torch.equal(theirs[f"ids_l_3_{j}"], p["ids"][0]) and torch.equal(theirs[f"ids_g_3_{j}"], p["ids"][1])


def test_with_the_legacy_eos_token_id_diffusers_pools_at_the_embedding(tiny, tmp_path):
    """The hub configs' ``eos_token_id`` 2 (see the module docstring): the context still equals ours, the pooled
    output does not when the prompt names the embedding (transformers pools at the largest id, an added one) and
    does when it does not."""
    text, root, files, parts = tiny
    name, (n, prompts) = "laohuang", EMBEDDINGS["laohuang"]
    without = "a red sofa in a garden"
    cases = [_case(name, prompts=[*prompts, without])]
    weights = {f"conditioner.{k}": v for k, v in root.state_dict().items()}
    theirs, report = _run(_workdir(tmp_path / "work", weights, root, files, cases, eos_token_id=2))
    assert report["eos_token_id"] == {"text_encoder": 2, "text_encoder_2": 2}
    ours = _ours(text.text, text.encoders, name, parts[name], [*prompts, without])
    for j, o in enumerate(ours):
        torch.testing.assert_close(theirs[f"embeds_0_{j}"], o["crossattn"][0], rtol=RTOL, atol=ATOL)
        if j < len(prompts):
            assert _max_diff(theirs[f"pooled_0_{j}"], o["pooled"][0]) > MATTERS
        else:
            torch.testing.assert_close(theirs[f"pooled_0_{j}"], o["pooled"][0], rtol=RTOL, atol=ATOL)


# ---- sgm tier: a file our trainer wrote on a tiny sgm SDXL


def test_a_trained_file_reproduces_our_sdxl_conditioning_in_diffusers(tmp_path):
    from helpers import make_images
    from sdxl_models import sgm_root, tiny_sgm_sdxl

    sgm_root()
    from lib_train.config import default_config
    from lib_train.models.bundle import ModelBundle
    from lib_train.models.conditioning import ImageSize
    from lib_train.train.ti_trainer import prepare_embedding_data, train_embedding

    name, (n, prompts) = "laohuang", EMBEDDINGS["laohuang"]
    make_images(tmp_path / "data" / "2_thing", n=2, size=(64, 64))
    cfg = default_config("embedding")
    cfg.data.train_dir, cfg.output.output_dir, cfg.output.name = str(tmp_path / "data"), str(tmp_path / "out"), name
    cfg.data.resolution, cfg.data.min_bucket_side, cfg.data.max_bucket_side = 64, 64, 128
    cfg.embedding.init_text, cfg.embedding.vectors, cfg.train.epochs = INIT_TEXT, n, 1
    cfg.optim.lr = 5e-2
    model = tiny_sgm_sdxl(seed=31)
    bundle = ModelBundle.from_sgm(model, checkpoint_name="tiny-sdxl")
    start = {k: init_vectors(c, INIT_TEXT, n) for k, c in zip(("clip_l", "clip_g"), bundle.text_conditioners)}
    result = train_embedding(cfg, bundle, prepare_embedding_data(cfg))
    assert result.status == "finished"
    trained = Path(result.final_file)
    parts = load_embedding(trained).parts
    assert all(not torch.equal(parts[k], start[k]) for k in start)  # trained: not the init rows

    cases = [_case(name)]
    work = _workdir(tmp_path / "work", model.state_dict(), bundle.text_encoder, {name: trained}, cases)
    theirs, report = _run(work)
    ours = _ours(bundle.text_outputs, bundle.text_conditioners, name, parts, prompts)
    plain = _ours(bundle.text_outputs, bundle.text_conditioners, None, None, prompts)
    for o, p in zip(ours, plain):
        assert _max_diff(o["crossattn"], p["crossattn"]) > MATTERS and _max_diff(o["pooled"], p["pooled"]) > MATTERS
    _compare_cases(theirs, report, cases, [ours])
    # the UNet's vector starts with the same pooled output
    injection = Injection(bundle.text_conditioners, name, [parts["clip_l"], parts["clip_g"]])
    try:
        with torch.no_grad():
            vector = bundle.conditioning(prompts, ImageSize.plain(1024, 1024))["vector"]
    finally:
        injection.remove()
    for j in range(len(prompts)):
        pooled = theirs[f"pooled_0_{j}"]
        torch.testing.assert_close(vector[j, :pooled.shape[0]], pooled, rtol=RTOL, atol=ATOL)
