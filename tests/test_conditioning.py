"""Text conditioning from the raw ldm text modules: tokenizer, 75-token chunking, padding, clip skip, SD2 layer."""

from __future__ import annotations

import torch
from helpers import make_tiny_model

from lib_train.models.build import clip_tokenizer
from lib_train.models.conditioning import CHUNK, TextConditioner, TokenIds, chunk_ids, chunk_tokens

COMMA = 9


def test_chunks_of_75_without_commas():
    chunks, truncated = chunk_tokens(list(range(100, 260)), COMMA, max_chunks=3)
    assert [len(c) for c in chunks] == [75, 75, 10] and not truncated
    chunks, truncated = chunk_tokens(list(range(100, 400)), COMMA, max_chunks=3)
    assert [len(c) for c in chunks] == [75, 75, 75] and truncated


def test_full_chunk_breaks_after_a_recent_comma():
    tokens = [100] * 70 + [COMMA] + [101] * 10  # comma at index 70, chunk full at 75
    chunks, _ = chunk_tokens(tokens, COMMA)
    assert len(chunks[0]) == 71 and chunks[0][-1] == COMMA
    assert chunks[1] == [101] * 10
    far = [100] * 40 + [COMMA] + [101] * 50  # comma 35 tokens before the end: too far back, no backtrack
    chunks, _ = chunk_tokens(far, COMMA)
    assert [len(c) for c in chunks] == [75, 16]


def test_empty_caption_is_one_empty_chunk():
    assert chunk_tokens([], COMMA) == ([[]], False)


def test_chunk_ids_padding_rules():
    sd1 = TokenIds(bos=49406, eos=49407, pad=49407, comma=267)
    sd2 = TokenIds(bos=49406, eos=49407, pad=0, comma=267)
    ids = chunk_ids([5, 6], sd1)
    assert len(ids) == CHUNK + 2 and ids[:3] == [49406, 5, 6] and set(ids[3:]) == {49407}
    ids2 = chunk_ids([5, 6], sd2)
    assert ids2[:4] == [49406, 5, 6, 49407] and set(ids2[4:]) == {0} and len(ids2) == 77


def test_offline_clip_tokenizer_matches_open_clip_ids():
    from open_clip.tokenizer import _tokenizer

    text = "a photo of sks dog, wearing a red hat, highly detailed!"
    assert clip_tokenizer()(text, add_special_tokens=False)["input_ids"] == _tokenizer.encode(text)
    tok = clip_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    assert tok.get_vocab()[",</w>"] == _tokenizer.encoder[",</w>"]


def test_sd1_conditioning_equals_the_text_model_on_the_same_ids():
    model = make_tiny_model("sd1")
    emb = model.cond_stage_model
    cond = TextConditioner(emb, "sd1")
    with torch.no_grad():
        z = cond(["a red thing", "blue"])
        ids = cond.tokenize(["a red thing"])[0]
        ref = emb.transformer(input_ids=ids).last_hidden_state
    assert z.shape == (2, 77, 32)
    torch.testing.assert_close(z[0], ref[0])


def test_sd1_clip_skip_uses_the_earlier_layer_with_final_norm():
    model = make_tiny_model("sd1")
    emb = model.cond_stage_model
    with torch.no_grad():
        z2 = TextConditioner(emb, "sd1", clip_skip=2)(["a red thing"])
        ids = TextConditioner(emb, "sd1").tokenize(["a red thing"])[0]
        out = emb.transformer(input_ids=ids, output_hidden_states=True)
        ref = emb.transformer.text_model.final_layer_norm(out.hidden_states[-2])
        z1 = TextConditioner(emb, "sd1", clip_skip=1)(["a red thing"])
    torch.testing.assert_close(z2[0], ref[0])
    assert not torch.allclose(z1, z2)


def test_long_captions_make_more_chunks_and_the_batch_is_padded_with_empty_chunks():
    model = make_tiny_model("sd1")
    cond = TextConditioner(model.cond_stage_model, "sd1")
    long = ", ".join(f"tag{i}" for i in range(30))  # 90 tokens: two chunks
    with torch.no_grad():
        z = cond([long, "short"])
        empty = cond([""])
    assert z.shape[1] == 77 * 2
    torch.testing.assert_close(z[1, 77:], empty[0])


def test_sd2_uses_the_penultimate_block_and_zero_padding():
    model = make_tiny_model("sd2")
    emb = model.cond_stage_model
    cond = TextConditioner(emb, "sd2", clip_skip=2)  # clip skip does not apply to SD2
    ids = cond.tokenize(["a red thing"])
    row = ids[0, 0].tolist()
    end = row.index(49407)
    assert set(row[end + 1:]) == {0}
    with torch.no_grad():
        z = cond(["a red thing"])
        x = emb.model.token_embedding(ids[0]) + emb.model.positional_embedding
        x = x.permute(1, 0, 2)
        for block in list(emb.model.transformer.resblocks)[:-1]:
            x = block(x, attn_mask=emb.model.attn_mask)
        ref = emb.model.ln_final(x.permute(1, 0, 2))
    torch.testing.assert_close(z[0], ref[0])
