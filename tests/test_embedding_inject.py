"""Embedding injection into the text conditioning: slots, chunking, spliced vectors, gradients (FORMATS.md §C.5)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_tiny_model

from lib_train.embedding.inject import EmbeddingSlots, Injection
from lib_train.models.conditioning import CHUNK, PLACEHOLDER_ID, Fix, TextConditioner, chunk_prompt, chunk_tokens

COMMA = 9
NAME = (500, 501)  # a two-token name


def _find(slots: int):
    registry = EmbeddingSlots()
    registry.add("emb", NAME, torch.zeros(slots, 4))
    return registry.find


def test_name_takes_its_slots_right_where_it_appears():
    chunks, fixes, _ = chunk_prompt([100, 101, *NAME, 102], COMMA, find=_find(3))
    assert chunks == [[100, 101, PLACEHOLDER_ID, PLACEHOLDER_ID, PLACEHOLDER_ID, 102]]
    assert fixes == [[Fix(2, "emb")]]
    chunks, fixes, _ = chunk_prompt([*NAME, 7, *NAME], COMMA, find=_find(1))
    assert chunks == [[PLACEHOLDER_ID, 7, PLACEHOLDER_ID]] and fixes == [[Fix(0, "emb"), Fix(2, "emb")]]


def test_a_name_that_does_not_fit_starts_the_next_chunk():
    tokens = [100] * 73 + list(NAME) + [101]
    chunks, fixes, _ = chunk_prompt(tokens, COMMA, find=_find(4))  # 73 + 4 > 75
    assert [len(c) for c in chunks] == [73, 5]
    assert fixes == [[], [Fix(0, "emb")]]
    chunks, fixes, _ = chunk_prompt([100] * 71 + list(NAME), COMMA, find=_find(4))  # 71 + 4 = 75 fits
    assert [len(c) for c in chunks] == [75] and fixes == [[Fix(71, "emb")]]


def test_comma_backtrack_moves_the_slots_and_leaves_the_fix_like_webui_1_10_1():
    # the chunk is full (69 + comma + 2 slots + 3) when 104 arrives and its last comma is 6 back: the words after
    # the comma (with the slots) move to the next chunk; WebUI 1.10.1 keeps the fix with the first chunk (its
    # tokenize_line relocates tokens and multipliers, not fixes)
    tokens = [100] * 69 + [COMMA] + list(NAME) + [101, 102, 103, 104]
    chunks, fixes, _ = chunk_prompt(tokens, COMMA, find=_find(2))
    assert [len(c) for c in chunks] == [70, 6]
    assert chunks[1] == [PLACEHOLDER_ID, PLACEHOLDER_ID, 101, 102, 103, 104]
    assert fixes == [[Fix(70, "emb")], []]


def test_without_names_chunking_is_unchanged():
    tokens = [100] * 70 + [COMMA] + [101] * 10
    assert chunk_prompt(tokens, COMMA, find=_find(2))[:1] == (chunk_tokens(tokens, COMMA)[0],)
    assert chunk_prompt(tokens, COMMA)[1] == [[], []]


def test_longest_registered_name_wins():
    registry = EmbeddingSlots()
    registry.add("short", (500,), torch.zeros(1, 4))
    registry.add("long", (500, 501), torch.zeros(3, 4))
    assert registry.find([500, 501, 9], 0) == ("long", 2, 3)
    assert registry.find([500, 9], 0) == ("short", 1, 1)
    assert registry.find([9, 500], 0) is None


def _conditioner(family: str, clip_skip: int = 1) -> TextConditioner:
    return TextConditioner(make_tiny_model(family).cond_stage_model, family, clip_skip=clip_skip)


def _with_new_tokens(cond: TextConditioner, vectors: torch.Tensor) -> tuple[TextConditioner, list[int]]:
    """An independent reference (diffusers' way): a copy of the text encoder whose vocabulary has n extra tokens with
    the vectors as their rows."""
    ref = copy.deepcopy(cond)
    table = ref.token_embedding
    vocab = table.weight.shape[0]
    grown = torch.nn.Embedding(vocab + len(vectors), table.weight.shape[1])
    with torch.no_grad():
        grown.weight[:vocab] = table.weight
        grown.weight[vocab:] = vectors
    if cond.family == "sd1":
        ref.embedder.transformer.text_model.embeddings.token_embedding = grown
    else:
        ref.embedder.model.token_embedding = grown
    return ref, list(range(vocab, vocab + len(vectors)))


@pytest.mark.parametrize("family,clip_skip", [("sd1", 1), ("sd1", 2), ("sd2", 1)])
def test_conditioning_equals_a_vocabulary_with_the_vectors_as_new_tokens(family, clip_skip):
    cond = _conditioner(family, clip_skip)
    vectors = torch.randn(3, cond.token_embedding.weight.shape[1], generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of laohuang", "laohuang, a red thing, laohuang"]
    plain = cond.tokenize(prompts)
    injection = Injection(cond, "laohuang", vectors)
    try:
        ids, fixes = cond.tokenize_prompts(prompts)
        with torch.no_grad():
            ours = cond(prompts)
    finally:
        injection.remove()
    assert cond.placeholders is None
    # "a photo of" = 3 tokens: the 3 slots start right after them (after BOS); the name's 2 tokens are gone
    assert ids[0, 0, 4:7].tolist() == [PLACEHOLDER_ID] * 3 and fixes[0] == [Fix(3, "laohuang")]
    assert fixes[1] == [Fix(0, "laohuang"), Fix(8, "laohuang")]  # 3 slots, ",", "a red thing", ","
    assert ids[0, 0, 7].item() == cond.ids.eos and plain[0, 0, 4:6].tolist() == cond.text_ids("laohuang")

    ref, new_ids = _with_new_tokens(cond, vectors)
    ref_ids = ids.clone()
    for row, row_fixes in enumerate(fixes):
        for offset, _ in row_fixes:
            ref_ids[row, 0, offset + 1:offset + 4] = torch.tensor(new_ids)
    with torch.no_grad():
        expected = ref.encode_ids(ref_ids)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_prompts_without_the_name_are_bit_identical_and_the_model_is_untouched():
    cond = _conditioner("sd1")
    table = cond.token_embedding.weight.detach().clone()
    hooks = len(cond.token_embedding._forward_hooks)
    prompts = ["a red thing", "blue, " * 40]
    with torch.no_grad():
        before = cond(prompts)
        injection = Injection(cond, "laohuang", torch.randn(2, table.shape[1]))
        during = cond(prompts)
        injection.remove()
    assert torch.equal(before, during)
    assert torch.equal(cond.token_embedding.weight, table)
    assert len(cond.token_embedding._forward_hooks) == hooks  # the splice hook lives only during one encode


def test_gradient_reaches_the_vectors_and_nothing_else():
    cond = _conditioner("sd2")
    vectors = torch.nn.Parameter(torch.randn(2, cond.token_embedding.weight.shape[1]))
    injection = Injection(cond, "laohuang", vectors)
    try:
        cond(["a photo of laohuang"]).square().sum().backward()
    finally:
        injection.remove()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in cond.embedder.parameters())


def test_name_beyond_the_last_chunk_is_cut_with_the_caption():
    cond = _conditioner("sd1")
    cond.max_chunks = 1
    injection = Injection(cond, "laohuang", torch.zeros(4, cond.token_embedding.weight.shape[1]))
    try:
        ids, fixes = cond.tokenize_prompts(["thing " * CHUNK + "laohuang"])
    finally:
        injection.remove()
    assert ids.shape == (1, 1, 77) and fixes == [[]] and cond.truncated_captions == 1
