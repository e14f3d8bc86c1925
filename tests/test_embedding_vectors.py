"""Creating an embedding's vectors with the WebUI's semantics (FORMATS.md §C.5), and prompt templates."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import make_tiny_model

from lib_train.embedding.prompts import fill, load_template
from lib_train.embedding.vectors import count_tokens, init_token_ids, init_vectors, name_collision
from lib_train.errors import TrainerError
from lib_train.models.build import clip_tokenizer
from lib_train.models.conditioning import TextConditioner

INIT = "man in a leather jacket"  # 5 tokens


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def cond(request) -> TextConditioner:
    return TextConditioner(make_tiny_model(request.param).cond_stage_model, request.param)


def _rows(cond: TextConditioner, ids: list[int]) -> torch.Tensor:
    return cond.token_embedding.weight.detach()[ids]


def test_more_vectors_than_tokens_repeat_rows(cond):
    ids = cond.text_ids(INIT)
    assert len(ids) == 5 and init_token_ids(cond, INIT, 8) == ids
    vec = init_vectors(cond, INIT, 8)
    assert vec.shape == (8, cond.token_embedding.weight.shape[1]) and vec.dtype == torch.float32
    # vector i = row i·len//n: rows 0,0,1,1,2,3,3,4
    assert torch.equal(vec, _rows(cond, [ids[i * 5 // 8] for i in range(8)]))
    assert torch.equal(init_vectors(cond, "cat", 3), _rows(cond, cond.text_ids("cat") * 3))


def test_fewer_vectors_than_tokens_sd1_truncates_sd2_spreads(cond):
    ids = cond.text_ids(INIT)
    vec = init_vectors(cond, INIT, 2)
    if cond.family == "sd1":  # HF tokenizer with max_length = n: the first n tokens
        assert init_token_ids(cond, INIT, 2) == ids[:2]
        assert torch.equal(vec, _rows(cond, ids[:2]))
    else:  # open_clip does not truncate: rows 0 and 5·1//2 = 2
        assert init_token_ids(cond, INIT, 2) == ids
        assert torch.equal(vec, _rows(cond, [ids[0], ids[2]]))


def test_empty_init_text_gives_zeros(cond):
    for text in ("", "   "):
        vec = init_vectors(cond, text, 3)
        assert vec.shape == (3, cond.token_embedding.weight.shape[1]) and not vec.any()


def test_init_vectors_are_a_copy(cond):
    vec = init_vectors(cond, INIT, 1)
    vec += 1
    assert not torch.equal(vec, init_vectors(cond, INIT, 1))


def test_name_collision_warns_for_single_known_tokens(cond):
    assert "cat" in name_collision(cond, "cat") and "replaced by the embedding" in name_collision(cond, "cat")
    assert name_collision(cond, "laohuang") is None  # two tokens: only this exact sequence is replaced


def test_token_count_for_validation():
    assert count_tokens(INIT) == 5
    assert count_tokens("") == 0
    assert count_tokens("word " * 80) == 80


def test_full_size_widths_are_the_webui_expected_shapes():
    """The WebUI checks a loaded embedding against encode_embedding_init_text(",", 1).shape[1]: 768 SD1, 1024 SD2."""
    from full_size_models import meta_sd1_text_encoder, meta_sd2_text_encoder

    sd1 = TextConditioner(types.SimpleNamespace(tokenizer=clip_tokenizer(),
                                                transformer=meta_sd1_text_encoder().transformer), "sd1")
    sd2 = TextConditioner(meta_sd2_text_encoder(), "sd2")
    for cond, width in ((sd1, 768), (sd2, 1024)):
        rows = cond.token_embedding(torch.tensor(init_token_ids(cond, ",", 1), device="meta"))
        assert tuple(rows.shape) == (1, width)


# ------------------------------------------------------------------------------------------- templates

def test_builtin_templates_are_ours_and_use_name():
    for spec in ("subject", "style"):
        lines = load_template(spec)
        assert len(lines) >= 5 and all("[name]" in line for line in lines)
        assert not any(line.startswith("#") for line in lines)
    assert load_template("none") is None


def test_custom_template_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# comment\n\na [name] on a table, [filewords]\n[name]\n", encoding="utf-8")
    assert load_template(str(f)) == ["a [name] on a table, [filewords]", "[name]"]
    f.write_text("a [name]\nno name here\n", encoding="utf-8")
    with pytest.raises(TrainerError, match=r"line 2 has no \[name\]"):
        load_template(str(f))
    f.write_text("# only comments\n", encoding="utf-8")
    with pytest.raises(TrainerError, match="no template lines"):
        load_template(str(f))
    with pytest.raises(TrainerError, match="neither subject, style, none nor"):
        load_template(str(tmp_path / "missing.txt"))


def test_fill_replaces_name_and_filewords():
    assert fill("a photo of [name], [filewords]", "lh", "red hat, smiling") == "a photo of lh, red hat, smiling"
    assert fill("[filewords], in the style of [name]", "st", "") == "in the style of st"
    assert fill("a photo of [name], [filewords]", "lh", "") == "a photo of lh"
    assert fill("[filewords]", "lh", "[name] at the beach,  sunset") == "lh at the beach,  sunset"  # kept verbatim


def test_a_caption_names_the_embedding_by_tokens():
    from lib_train.embedding.prompts import caption_names

    assert caption_names("laohuang, red jacket", "laohuang")
    assert caption_names("LaoHuang at the beach", "laohuang")  # the tokenizer lowercases
    assert caption_names("[name] at the beach", "laohuang")
    assert not caption_names("laohuangs at the beach", "laohuang")  # other tokens: the WebUI would not match
    assert not caption_names("thing, tag0, red", "n")
