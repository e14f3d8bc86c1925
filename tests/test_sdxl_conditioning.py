"""SDXL conditioning from the raw text modules (lib_train/models/sdxl.py) on tiny transformers CLIP + open_clip text
towers: shapes, per-encoder chunking, the pooled vector of the first chunk, the size embedding against a formula
written here; and (sgm tier) equality with sgm's own GeneralConditioner built from its classes at tiny width."""

from __future__ import annotations

import math

import pytest
import torch
from sdxl_models import sgm_root, tiny_sdxl_text_encoders, tiny_sgm_conditioner_config

from lib_train.models.families import SDXL
from lib_train.models.sdxl import SDXLConditioner, TextRoot, size_embedding, text_root

LONG = " ".join(f"word{i}" for i in range(40))  # 80+ tokens, no comma


@pytest.fixture(scope="module")
def root():
    return tiny_sdxl_text_encoders()


def _clip_l_ref(root, ids: list[int]) -> torch.Tensor:
    """hidden_states[-2] (no final norm) of HF CLIP for one row of 77 ids."""
    out = root.embedders[0].transformer(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-2][0]


def _clip_g_ref(root, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of the last resblock = penultimate output, open_clip's own encode_text) for one row of 77 ids."""
    model = root.embedders[1].model
    seen = {}
    hook = model.transformer.resblocks[-1].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        pooled = model.encode_text(torch.tensor([ids]))[0]
    finally:
        hook.remove()
    x = seen["x"]
    return (x[:, 0] if x.shape[0] == 77 else x[0]), pooled


def _rows(tok_ids: list[int], pad: int) -> list[int]:
    body = [49406] + tok_ids + [49407]
    return body + [pad] * (77 - len(body))


def test_shapes_and_the_vector_layout(root):
    cond = SDXLConditioner(root)
    out = cond(["a cat", LONG, ""], (768, 1024), (0, 0), [[1024, 1024], [512, 768], [1024, 640]])
    assert out["crossattn"].shape == (3, 154, 32 + 32)  # 2 chunks (the long caption), clip_l ‖ clip_g widths
    assert out["vector"].shape == (3, 24 + 3 * 2 * 256)
    _context, pooled = cond.text(["a cat", LONG, ""])
    assert torch.equal(out["vector"][:, :24], pooled)
    assert torch.equal(out["vector"][:, 24:536], size_embedding(torch.tensor([[768, 1024]] * 3)))
    assert torch.equal(out["vector"][:, 536:1048], size_embedding(torch.zeros(3, 2)))
    assert torch.equal(out["vector"][2, 1048:], size_embedding(torch.tensor([[1024, 640]]))[0])


def test_context_equals_each_encoder_per_chunk(root):
    cond = SDXLConditioner(root)
    tok_l = root.embedders[0].tokenizer("a cat", add_special_tokens=False)["input_ids"]
    from open_clip.tokenizer import _tokenizer

    tok_g = _tokenizer.encode("a cat")
    assert tok_l == tok_g  # same BPE for both encoders
    context, pooled = cond.text(["a cat"])
    assert context.shape == (1, 77, 64)
    assert torch.allclose(context[0, :, :32], _clip_l_ref(root, _rows(tok_l, 49407)), atol=1e-6)
    g_hidden, g_pooled = _clip_g_ref(root, _rows(tok_g, 0))
    assert torch.allclose(context[0, :, 32:], g_hidden, atol=1e-6)
    assert torch.allclose(pooled[0], g_pooled, atol=1e-6)


def test_long_captions_chunk_and_pool_from_the_first_chunk(root):
    cond = SDXLConditioner(root)
    from open_clip.tokenizer import _tokenizer

    tokens = _tokenizer.encode(LONG)
    assert 75 < len(tokens) <= 150
    context, pooled = cond.text([LONG])
    assert context.shape == (1, 154, 64)
    first, second = _rows(tokens[:75], 0), _rows(tokens[75:], 0)
    g1, p1 = _clip_g_ref(root, first)
    g2, p2 = _clip_g_ref(root, second)
    assert torch.allclose(context[0, :77, 32:], g1, atol=1e-6) and torch.allclose(context[0, 77:, 32:], g2, atol=1e-6)
    assert torch.allclose(context[0, 77:, :32], _clip_l_ref(root, _rows(tokens[75:], 49407)), atol=1e-6)
    assert torch.allclose(pooled[0], p1, atol=1e-6) and not torch.allclose(pooled[0], p2, atol=1e-3)
    # a short caption in the same batch is padded with an empty chunk (BOS, EOS, padding)
    context2, _ = cond.text(["a cat", LONG])
    assert context2.shape == (2, 154, 64)
    assert torch.allclose(context2[0, 77:, :32], _clip_l_ref(root, _rows([], 49407)), atol=1e-6)
    assert torch.allclose(context2[0, 77:, 32:], _clip_g_ref(root, _rows([], 0))[0], atol=1e-6)


def test_the_empty_caption_is_one_empty_chunk(root):
    context, pooled = SDXLConditioner(root).text([""])
    assert context.shape == (1, 77, 64)
    assert torch.allclose(context[0, :, :32], _clip_l_ref(root, _rows([], 49407)), atol=1e-6)
    hidden, ref_pooled = _clip_g_ref(root, _rows([], 0))
    assert torch.allclose(context[0, :, 32:], hidden, atol=1e-6) and torch.allclose(pooled[0], ref_pooled, atol=1e-6)


def test_gradients_reach_the_text_encoders(root):
    clip_g = root.embedders[1].model
    clip_g.ln_final.weight.requires_grad_(True)
    try:
        out = SDXLConditioner(root)(["a cat"], (64, 64), (0, 0), (64, 64))
        out["vector"].sum().backward()
        assert clip_g.ln_final.weight.grad is not None and clip_g.ln_final.weight.grad.abs().sum() > 0
    finally:
        clip_g.ln_final.weight.requires_grad_(False)
        clip_g.ln_final.weight.grad = None


def test_the_text_root_unwraps_the_webuis_prompt_wrappers(root):
    class Wrapper(torch.nn.Module):  # the WebUI's FrozenCLIPEmbedderForSDXLWithCustomWords & co keep `.wrapped`
        def __init__(self, wrapped):
            super().__init__()
            self.wrapped = wrapped

    class Engine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedders = torch.nn.ModuleList([Wrapper(root.embedders[0]), Wrapper(root.embedders[1]),
                                                  torch.nn.Identity()])  # + the size embedders

    unwrapped = text_root(Engine())
    assert isinstance(unwrapped, TextRoot) and list(unwrapped.embedders) == list(root.embedders)
    assert [te.module(unwrapped) for te in SDXL.text_encoders] == list(root.embedders)
    assert SDXL.matches_live(unwrapped)
    a, b = SDXLConditioner(unwrapped).text(["a cat"]), SDXLConditioner(root).text(["a cat"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_size_embedding_formula():
    values = torch.tensor([[1024.0, 768.0], [0.0, 37.0]])
    got = size_embedding(values)
    assert got.shape == (2, 512) and got.dtype == torch.float32
    for b in range(2):
        for d in range(2):
            v = float(values[b, d])
            for j in (0, 1, 5, 64, 127):
                angle = v * math.exp(-math.log(10000.0) * j / 128)
                assert got[b, 256 * d + j].item() == pytest.approx(math.cos(angle), abs=5e-4)
                assert got[b, 256 * d + 128 + j].item() == pytest.approx(math.sin(angle), abs=5e-4)
    assert torch.equal(size_embedding(torch.tensor([5.0, 6.0])), size_embedding(torch.tensor([[5.0], [6.0]])))


# ---- sgm tier: sgm's GeneralConditioner with its own embedder classes at tiny width

@pytest.fixture(scope="module")
def sgm_pair():
    """sgm's GeneralConditioner (its classes, sd_xl_base.yaml's embedders) and our stand-in with the same weights."""
    sgm_root()
    import sgm.modules.encoders.modules as sgm_modules

    emb, mp = tiny_sgm_conditioner_config()
    try:
        conditioner = sgm_modules.GeneralConditioner(emb)
    finally:
        mp.undo()
    ours = tiny_sdxl_text_encoders(seed=11, clip_l_layers=12)
    conditioner.embedders[0].transformer.load_state_dict(ours.embedders[0].transformer.state_dict())
    missing = conditioner.embedders[1].model.load_state_dict(ours.embedders[1].model.state_dict(), strict=False)
    assert not missing.unexpected_keys
    return ours, conditioner


@pytest.mark.parametrize("captions", [["a cat", "a red dog, sitting"], [""], ["a photo of a cat, " * 8]])
def test_equal_to_sgm_general_conditioner(sgm_pair, captions):
    ours, conditioner = sgm_pair
    b = len(captions)
    sizes = {"original_size_as_tuple": torch.tensor([[768, 1024]] * b), "crop_coords_top_left": torch.tensor(
        [[16, 0]] * b), "target_size_as_tuple": torch.tensor([[1024, 1024]] * b)}
    with torch.no_grad():
        theirs = conditioner({"txt": captions, **sizes})
        mine = SDXLConditioner(ours)(captions, sizes["original_size_as_tuple"], sizes["crop_coords_top_left"],
                                     sizes["target_size_as_tuple"])
    assert mine["crossattn"].shape == theirs["crossattn"].shape and mine["vector"].shape == theirs["vector"].shape
    assert torch.equal(mine["crossattn"], theirs["crossattn"]) and torch.equal(mine["vector"], theirs["vector"])


def test_size_embedding_equals_sgm():
    sgm_root()
    from sgm.modules.encoders.modules import ConcatTimestepEmbedderND

    x = torch.tensor([[1024, 1024], [832, 1216], [0, 64]])
    assert torch.equal(size_embedding(x), ConcatTimestepEmbedderND(256)(x))
    assert torch.equal(size_embedding(x.half()), ConcatTimestepEmbedderND(256)(x.half()))


def test_the_family_records_layers_are_what_sgm_is_configured_with():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(sgm_root() / "configs" / "inference" / "sd_xl_base.yaml")
    emb = cfg.model.params.conditioner_config.params.emb_models
    clip_l, clip_g = SDXL.text_encoders
    assert (emb[0].params.layer, emb[0].params.layer_idx) == ("hidden", 11) and clip_l.layer.index == 11 - 13
    assert (emb[1].params.layer, emb[1].params.legacy, emb[1].params.always_return_pooled) == (
        "penultimate", False, True) and clip_g.layer.pooled and not clip_g.layer.final_norm
    assert cfg.model.params.scale_factor == SDXL.latent_scale
    assert [e.input_key for e in emb] == ["txt", "txt", "original_size_as_tuple", "crop_coords_top_left",
                                          "target_size_as_tuple"]
