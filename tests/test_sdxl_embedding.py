"""SDXL textual-inversion embeddings without sgm (tiny transformers CLIP + open_clip towers, SDXL's conditioning from
lib_train/models/sdxl.py): vectors per encoder from each encoder's own token table, injection into both encoders at
the name's slots (checked against the same vectors written into spare rows of each token table), the pooled output
moved by the clip_g vectors, slot moves at a chunk's end, the file layout and its round trip. The training run itself
(needs sgm's UNet) is in tests/test_sdxl_train.py."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from sdxl_models import tiny_sdxl_text_encoders

from lib_train.embedding.files import EMB_KEY, embedding_keys, embedding_metadata, load_embedding, save_safetensors
from lib_train.embedding.inject import Injection
from lib_train.embedding.vectors import init_vectors
from lib_train.errors import TrainerError
from lib_train.models.bundle import SDXLText
from lib_train.models.conditioning import CHUNK, chunk_ids
from lib_train.models.families import SD1, SDXL

NAME = "laohuang"
SPARE = 4000  # token ids whose table rows stand in for the vectors in the reference (never in these captions)


@pytest.fixture(scope="module")
def text():
    return SDXLText(tiny_sdxl_text_encoders(seed=11))


def _vectors(text, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c.token_embedding.weight.shape[1], generator=g) for c in text.encoders]


def _reference(text, before: str, after: str, vectors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Context and pooled output for ``before NAME after`` computed without any injection: the vectors are written
    into spare rows of each encoder's token table and those ids stand where the name's slots are."""
    n = vectors[0].shape[0]
    outputs, saved = [], []
    try:
        for cond, vec in zip(text.encoders, vectors):
            table = cond.token_embedding.weight
            saved.append(table[SPARE:SPARE + n].clone())
            with torch.no_grad():
                table[SPARE:SPARE + n] = vec
            body = cond.text_ids(before) + list(range(SPARE, SPARE + n)) + cond.text_ids(after)
            assert len(body) <= CHUNK
            outputs.append(cond.encode_ids_pooled(torch.tensor([[chunk_ids(body, cond.ids)]])))
    finally:
        with torch.no_grad():
            for cond, rows in zip(text.encoders, saved):
                cond.token_embedding.weight[SPARE:SPARE + rows.shape[0]] = rows
    context = torch.cat([z for z, _ in outputs], dim=-1)
    pooled = [p for _, p in outputs if p is not None][0][:, 0]
    return context, pooled


def test_embedding_keys_follow_the_family_records():
    assert embedding_keys(SDXL) == ["clip_l", "clip_g"] and embedding_keys(SD1) == [EMB_KEY]


def test_vectors_start_from_each_encoders_own_token_table(text):
    l_cond, g_cond = text.encoders
    init = "a man in a leather jacket"  # 6 tokens
    ids = l_cond.text_ids(init)
    assert ids == g_cond.text_ids(init)  # the same BPE: the rows differ, the ids do not
    v_l, v_g = (init_vectors(c, init, 4) for c in text.encoders)
    assert v_l.shape == (4, l_cond.token_embedding.weight.shape[1]) and v_g.shape[1] == 32
    # clip_l (HF tokenizer) keeps the first 4 tokens, clip_g (open_clip) spreads all 6 over 4 vectors
    assert torch.equal(v_l, l_cond.token_embedding.weight[ids[:4]])
    assert torch.equal(v_g, g_cond.token_embedding.weight[[ids[i * 6 // 4] for i in range(4)]])
    assert not torch.equal(l_cond.token_embedding.weight[ids[:4]], g_cond.token_embedding.weight[ids[:4]])


def test_both_encoders_get_their_vectors_at_the_names_slots(text):
    vectors = _vectors(text, 3)
    injection = Injection(text.encoders, NAME, vectors)
    try:
        out = text.text([f"a photo of {NAME} on a beach"])
    finally:
        injection.remove()
    context, pooled = _reference(text, "a photo of", "on a beach", vectors)
    torch.testing.assert_close(out["crossattn"], context, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["pooled"], pooled, rtol=0, atol=1e-6)
    plain = text.text([f"a photo of {NAME} on a beach"])  # removed: the name is plain words again
    assert not torch.allclose(plain["crossattn"], out["crossattn"])


def test_the_clip_g_vectors_move_the_pooled_output_and_clip_l_ones_do_not(text):
    vectors, other = _vectors(text, 2), _vectors(text, 2, seed=1)
    outs = []
    for change in (None, 0, 1):  # (a constant shift of a vector would vanish in the layer norms: use other vectors)
        vecs = [other[i] if i == change else v for i, v in enumerate(vectors)]
        injection = Injection(text.encoders, NAME, vecs)
        try:
            outs.append(text.text([f"{NAME} sitting"]))
        finally:
            injection.remove()
    base, l_changed, g_changed = outs
    assert torch.equal(l_changed["pooled"], base["pooled"])  # y's text part is clip_g's alone
    assert not torch.allclose(g_changed["pooled"], base["pooled"])
    width_l = text.encoders[0].token_embedding.weight.shape[1]
    assert not torch.allclose(l_changed["crossattn"][..., :width_l], base["crossattn"][..., :width_l])
    assert torch.equal(l_changed["crossattn"][..., width_l:], base["crossattn"][..., width_l:])


def test_gradients_reach_both_vector_sets_through_the_frozen_encoders(text):
    vectors = [v.requires_grad_(True) for v in _vectors(text, 2)]
    injection = Injection(text.encoders, NAME, vectors)
    try:
        out = text.text([f"a {NAME}, outdoors"])
        (out["crossattn"].square().mean() + out["pooled"].square().mean()).backward()
    finally:
        injection.remove()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vectors)
    assert all(p.grad is None for c in text.encoders for p in c.embedder.parameters())


def test_a_name_that_does_not_fit_moves_to_the_next_chunk_in_both_encoders(text):
    filler = " ".join(["cat"] * 73)  # 73 single-token words: 73 + 4 slots > 75
    vectors = _vectors(text, 4)
    injection = Injection(text.encoders, NAME, vectors)
    try:
        for cond in text.encoders:
            ids, fixes = cond.tokenize_prompts([f"{filler} {NAME}"])
            assert ids.shape[1] == 2 and fixes == [[], [(0, NAME)]]
        out = text.text([f"{filler} {NAME}"])
    finally:
        injection.remove()
    assert out["crossattn"].shape[1] == 154


def test_the_vector_sets_must_match_the_encoders(text):
    v_l, v_g = _vectors(text, 2)
    with pytest.raises(ValueError):
        Injection(text.encoders, NAME, [v_l, v_g[:1]])  # different vector counts
    with pytest.raises(ValueError):
        Injection(text.encoders, NAME, [v_l])


def test_file_holds_exactly_clip_l_and_clip_g_and_reads_back(tmp_path):
    parts = {"clip_l": torch.randn(3, 768), "clip_g": torch.randn(3, 1280)}
    meta = embedding_metadata(title=NAME, family="sdxl", prediction="eps", resolution=1024, started_at=0.0)
    path = save_safetensors(tmp_path / f"{NAME}.safetensors", parts, meta)
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    loaded = load_embedding(path)
    assert list(loaded.parts) == ["clip_l", "clip_g"]
    assert all(torch.equal(loaded.parts[k], parts[k]) for k in parts)
    assert loaded.describe() == "3 vectors: clip_l width 768, clip_g width 1280"
    with pytest.raises(TrainerError, match="one tensor per text encoder"):
        loaded.vectors  # noqa: B018 - the one-encoder accessor refuses an SDXL file


def test_an_sdxl_file_with_unequal_vector_counts_is_refused(tmp_path):
    path = save_safetensors(tmp_path / "bad.safetensors", {"clip_l": torch.randn(2, 768),
                                                           "clip_g": torch.randn(3, 1280)}, {})
    with pytest.raises(TrainerError, match="different numbers of vectors"):
        load_embedding(path)
