"""LoRANetwork on tiny real ldm UNets, HF CLIP and open_clip text towers (FORMATS.md §A.1-A.5, §E.7)."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
import safetensors.torch
import torch
from torch import nn

from full_size_models import (SD1Embedder, SD2Embedder, meta_sd1_text_encoder, meta_sd2_text_encoder,
                              meta_sd2_unet, meta_sd15_unet, unet)
from lib_train.errors import TrainerError
from lib_train.network.lora import LoRANetwork, LoRAPair

TINY_SD1_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                     num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=32, use_checkpoint=False, legacy=False)
TINY_SD2_UNET = dict(TINY_SD1_UNET, num_heads=-1, num_head_channels=8, use_linear_in_transformer=True)
TINY_SD1_TEXT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=16, hidden_act="quick_gelu")
TINY_SD2_TEXT = dict(context_length=16, vocab_size=100, width=32, heads=4, layers=3, output_dim=32)


def _frozen(model: nn.Module) -> nn.Module:
    """Random, frozen, eval-mode host. ldm zero-inits proj_out/out convs; re-draw them so every path carries signal."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.05)
    return model.requires_grad_(False).eval()


class Case:
    """One tiny model plus how to run it."""

    def __init__(self, family: str, kind: str):
        torch.manual_seed(0)
        self.family, self.kind = family, kind
        if kind == "unet":
            self.model = _frozen(unet(TINY_SD1_UNET if family == "sd1" else TINY_SD2_UNET))
        elif family == "sd1":
            self.model = _frozen(SD1Embedder(**TINY_SD1_TEXT))
        else:
            self.model = _frozen(SD2Embedder(**TINY_SD2_TEXT))
        g = torch.Generator().manual_seed(1)
        if kind == "unet":
            self.inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
                           torch.randn(2, 5, 32, generator=g))
        else:
            self.inputs = (torch.randint(0, 100, (2, 16), generator=g),)

    def run(self, latents: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "unet":
            x, t, context = self.inputs
            return self.model(x if latents is None else latents, t, context=context)
        if self.family == "sd1":
            return self.model.transformer(input_ids=self.inputs[0]).last_hidden_state
        m = self.model.model  # the ldm FrozenOpenCLIPEmbedder path: LND through resblocks, ln_final
        x = m.token_embedding(self.inputs[0]) + m.positional_embedding
        x = m.transformer(x.permute(1, 0, 2), attn_mask=m.attn_mask).permute(1, 0, 2)
        return m.ln_final(x)

    def network(self, **kw) -> LoRANetwork:
        kw = {"rank": 4, "alpha": 2.0, **kw}
        if self.kind == "unet":
            return LoRANetwork.for_model(self.model, None, family=self.family, **kw)
        return LoRANetwork.for_model(None, self.model, family=self.family, **kw)


CASES = [("sd1", "unet"), ("sd2", "unet"), ("sd1", "text"), ("sd2", "text")]
IDS = ["sd1-unet", "sd2-unet", "sd1-te", "sd2-te"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run many small ops; with 2+ intra-op threads on a busy 2-core machine they spin-wait and run up to
    10× slower. One thread for this module only; the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
    return Case(*request.param)


def _randomize(network: LoRANetwork, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _snapshot(model: nn.Module):
    return ({n: (p.requires_grad, p.dtype) for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()})


def _kw(case: Case) -> dict:
    return {"conv_rank": 2, "conv_alpha": 1.0} if case.kind == "unet" else {}


# --- injection on tiny real models ------------------------------------------------------------------------------

def test_zero_init_is_identity_and_restore_is_exact(case):
    before_hash, before_flags = _state_hash(case.model), _snapshot(case.model)
    keys = list(case.model.state_dict())
    with torch.no_grad():
        reference = case.run()
    network = case.network(**_kw(case))
    with network:
        assert list(case.model.state_dict()) == keys  # LoRA params are not in the host's tree
        assert not any(isinstance(m, LoRAPair) for m in case.model.modules())
        with torch.no_grad():
            assert torch.equal(case.run(), reference)
    assert not any("forward" in m.__dict__ for m in case.model.modules())
    assert _state_hash(case.model) == before_hash and _snapshot(case.model) == before_flags


def test_backward_reaches_only_lora_params(case):
    flags = _snapshot(case.model)
    network = case.network(**_kw(case))
    _randomize(network)  # nonzero up weights so that every down weight gets a gradient too
    # 16×16 latents: at 8×8 the middle block sees one token and its self-attention q/k get zero gradients.
    latents = torch.randn(2, 4, 16, 16) if case.kind == "unet" else None
    with network:
        case.run(latents).square().mean().backward()
    for name, p in network.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in case.model.parameters())
    assert _snapshot(case.model) == flags
    assert all(p.dtype == torch.float32 for p in network.parameters())


def test_applied_forward_equals_merged_weights(case):
    network = case.network(**_kw(case))
    _randomize(network)
    with torch.no_grad():
        original = case.run()
        with network:
            lora_out = case.run()
        assert not torch.allclose(lora_out, original, atol=1e-3)
        deltas = network.weight_deltas()
        saved = [weight.clone() for weight, _ in deltas]
        for weight, delta in deltas:
            weight.add_(delta)
        try:
            merged = case.run()
        finally:
            for (weight, _), old in zip(deltas, saved, strict=True):
                weight.copy_(old)
    torch.testing.assert_close(lora_out, merged, rtol=1e-4, atol=1e-5)


def test_multiplier_scales_the_delta(case):
    network = case.network()
    _randomize(network)
    stem = network.stems()[0]
    base = network.delta_weight(stem).clone()
    network.multiplier = 2.5
    torch.testing.assert_close(network.delta_weight(stem), 2.5 * base)
    network.multiplier = 0.0
    with torch.no_grad():
        reference = case.run()
        with network:
            assert torch.equal(case.run(), reference)


def test_apply_is_idempotent_and_restore_safe_twice():
    case = Case("sd1", "text")
    layer = case.model.transformer.text_model.encoder.layers[0].mlp.fc1
    own = layer.forward  # an instance override that must survive apply/restore
    layer.forward = own
    network = case.network()
    network.restore()
    network.apply()
    wrapped = layer.forward
    network.apply()
    assert layer.forward is wrapped
    network.restore()
    network.restore()
    assert layer.__dict__["forward"] is own


def test_class_level_patch_still_runs(monkeypatch):
    """A1111 patches nn.Linear.forward class-wide; the wrapper must call the bound forward seen at apply time."""
    case = Case("sd1", "text")
    calls = Counter()
    original = nn.Linear.forward

    def patched(self, input):
        calls["n"] += 1
        return original(self, input)

    monkeypatch.setattr(nn.Linear, "forward", patched)
    with case.network():
        with torch.no_grad():
            case.run()
    assert calls["n"] == 3 * 6  # each targeted Linear (q, k, v, out, fc1, fc2 per layer); LoRA layers bypass it


def test_fp16_host_keeps_fp32_lora_and_output_dtype():
    case = Case("sd1", "text")
    case.model.half()
    network = case.network()
    _randomize(network)
    with network:
        out = case.run()
        assert out.dtype == torch.float16
        out.float().square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in network.parameters())
    assert all(p.dtype == torch.float16 and p.grad is None for p in case.model.parameters())


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_autocast_keeps_fp32_lora_grads(family):
    case = Case(family, "text")
    network = case.network()
    _randomize(network)
    with network, torch.autocast("cpu", dtype=torch.bfloat16):
        out = case.run()
    out.float().square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in network.parameters())


def test_dropout_only_in_training_mode():
    case = Case("sd1", "text")
    network = case.network(dropout=0.5)
    _randomize(network)
    with network, torch.no_grad():
        network.eval()
        a, b = case.run(), case.run()
        network.train()
        c = case.run()
    assert torch.equal(a, b) and not torch.allclose(a, c)


# --- MultiheadAttention -----------------------------------------------------------------------------------------

class _AttnHolder(nn.Module):
    """Put a bare MHA at an SD2 path so the network targets it (resblock 0 of 2: the last one is never targeted)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.model = nn.Module()
        self.model.transformer = nn.Module()
        self.model.transformer.resblocks = nn.ModuleList([nn.Module(), nn.Module()])
        self.model.transformer.resblocks[0].attn = mha


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_forwards_every_argument(batch_first):
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).requires_grad_(False)
    holder = _AttnHolder(mha)
    network = LoRANetwork.for_model(None, holder, family="sd2", rank=2, alpha=1.0)
    assert len(network.stems()) == 4
    q = torch.randn(5, 3, 16) if not batch_first else torch.randn(3, 5, 16)
    kv = torch.randn(7, 3, 16) if not batch_first else torch.randn(3, 7, 16)
    calls = [
        dict(query=q, key=q, value=q, need_weights=False, attn_mask=torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)),
        dict(query=q, key=kv, value=kv, key_padding_mask=torch.rand(3, 7) > 0.7, need_weights=True,
             average_attn_weights=False),
        dict(query=q, key=q, value=q, attn_mask=torch.triu(torch.full((5, 5), float("-inf")), 1), is_causal=True,
             need_weights=False),
    ]
    exact = not batch_first  # batch-first eval may take torch's fused fast path, which rounds differently
    with torch.no_grad():
        for kw in calls:
            ref_out, ref_w = mha(**kw)
            with network:
                out, w = mha(**kw)
            if exact:
                assert torch.equal(out, ref_out)
            torch.testing.assert_close(out, ref_out)
            assert (w is None) == (ref_w is None)
            if w is not None:
                torch.testing.assert_close(w, ref_w)
        _randomize(network)
        merged = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        merged.load_state_dict(mha.state_dict())
        (w_in, d_in), (w_out, d_out) = network.weight_deltas()
        assert w_in is mha.in_proj_weight and w_out is mha.out_proj.weight and d_in.shape == (48, 16)
        merged.in_proj_weight.add_(d_in)
        merged.out_proj.weight.add_(d_out)
        merged.eval()
        for kw in calls:
            with network:
                out, w = mha(**kw)
            ref_out, ref_w = merged(**kw)
            torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
            if w is not None:
                torch.testing.assert_close(w, ref_w, rtol=1e-4, atol=1e-5)


def _a1111_delta(sd: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    """A1111's merge math from the file alone (FORMATS §A.1): (up.reshape(out,-1) @ down.reshape(r,-1)) · alpha / r."""
    up, down = sd[f"{stem}.lora_up.weight"], sd[f"{stem}.lora_down.weight"]
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * (sd[f"{stem}.alpha"].item()
                                                                             / down.shape[0])


def test_file_reproduces_the_trained_deltas(case):
    network = case.network(alpha=3.0, **_kw(case))
    _randomize(network)
    sd = network.kohya_state_dict(dtype=torch.float32)
    for stem in network.stems():
        trained = network.delta_weight(stem)
        torch.testing.assert_close(_a1111_delta(sd, stem).reshape(trained.shape), trained, rtol=1e-6, atol=1e-7)


def test_sd2_qkv_keys_reproduce_the_fused_delta_under_a1111_rule():
    """FORMATS §A.3.3: A1111 computes ΔW for q/k/v separately (from the file) and vstacks them into
    in_proj_weight (rows q, k, v); out goes to out_proj.weight. Compare with what the forward adds."""
    case = Case("sd2", "text")
    network = case.network(alpha=3.0)
    _randomize(network)
    sd = network.kohya_state_dict(dtype=torch.float32)
    deltas = {id(w): d for w, d in network.weight_deltas()}
    assert not any("encoder_layers_2_" in s for s in network.stems())
    *used, last = case.model.model.transformer.resblocks
    assert id(last.attn.in_proj_weight) not in deltas  # the last resblock is unused by SD2 (§A.3.3)
    for i, block in enumerate(used):
        base = f"lora_te_text_model_encoder_layers_{i}_self_attn_"
        fused = torch.vstack([_a1111_delta(sd, base + p) for p in ("q_proj", "k_proj", "v_proj")])
        torch.testing.assert_close(fused, deltas[id(block.attn.in_proj_weight)], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(_a1111_delta(sd, base + "out_proj"), deltas[id(block.attn.out_proj.weight)],
                                   rtol=1e-6, atol=1e-7)


# --- parameters, groups, validation -----------------------------------------------------------------------------

def test_param_groups_skip_zero_lr():
    unet_case, te_case = Case("sd1", "unet"), Case("sd1", "text")
    network = LoRANetwork.for_model(unet_case.model, te_case.model, family="sd1", rank=2, alpha=0)
    assert all(pair.alpha == 2.0 and pair.scale == 1.0 for pair in network.pairs.values())  # alpha 0 ⇒ rank
    groups = network.param_groups(unet_lr=1e-4, te_lr=0.0)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4)]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in network.unet_parameters()}
    _randomize(network)
    with network:
        ids = te_case.inputs[0]
        context = te_case.model.transformer(input_ids=ids[:, :5]).last_hidden_state
        x, t, _ = unet_case.inputs
        unet_case.model(x, t, context=context).square().mean().backward()
    assert all(p.grad is not None for p in network.unet_parameters())
    assert all(p.grad is None and not p.requires_grad for p in network.text_encoder_parameters())
    groups = network.param_groups(unet_lr=1e-4, te_lr=5e-5)
    assert [g["name"] for g in groups] == ["unet", "text_encoder"]
    assert all(p.requires_grad for p in network.parameters())
    with pytest.raises(TrainerError, match="nothing to train"):
        network.param_groups(0.0, 0.0)


@pytest.mark.parametrize("kw, match", [
    (dict(rank=0), "rank"), (dict(rank=-4), "rank"), (dict(rank=2.5), "rank"),
    (dict(conv_rank=0), "conv rank"), (dict(alpha=-1.0), "alpha"), (dict(family="sd3"), "not 'sd3'"),
    (dict(family="sdxl"), "no LoRA target modules in the text encoder; is this an SDXL model"),  # SD1's encoder
    (dict(dropout=1.0), "dropout"), (dict(train_unet=False, train_text_encoder=False), "nothing to train"),
])
def test_bad_settings_raise_trainer_error(kw, match):
    case = Case("sd1", "text")
    args = {"family": "sd1", "rank": 4, "alpha": 1.0, **kw}
    with pytest.raises(TrainerError, match=match):
        LoRANetwork.for_model(None, case.model, **args)


def test_wrong_model_raises_trainer_error():
    with pytest.raises(TrainerError, match="UNet"):
        LoRANetwork.for_model(nn.Sequential(nn.Linear(2, 2)), None, family="sd1", rank=4, alpha=1.0)
    with pytest.raises(TrainerError, match="SD2"):
        LoRANetwork.for_model(None, Case("sd1", "text").model, family="sd2", rank=4, alpha=1.0)


# --- kohya state dict ---------------------------------------------------------------------------------------------

def test_kohya_state_dict_layout(case):
    network = case.network(**_kw(case))
    _randomize(network)
    sd = network.kohya_state_dict()
    stems = network.stems()
    assert list(sd) == [f"{s}.{p}" for s in stems for p in ("lora_down.weight", "lora_up.weight", "alpha")]
    assert all(t.device.type == "cpu" and t.dtype == torch.float16 and t.is_contiguous() for t in sd.values())
    assert len({t.untyped_storage().data_ptr() for t in sd.values()}) == len(sd)
    safetensors.torch.save(sd)  # rejects shared storage / non-contiguous tensors
    for stem in stems:
        down, up, alpha = (sd[f"{stem}.{p}"] for p in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert alpha.dim() == 0
        assert up.shape[1] == down.shape[0] and up.shape[2:] in ((), (1, 1))
        assert down.dim() == up.dim()
        assert alpha.item() == (1.0 if down.dim() == 4 and down.shape[2:] == (3, 3) else 2.0)
    prefix = "lora_unet_" if case.kind == "unet" else "lora_te_"
    assert all(s.startswith(prefix) for s in stems)
    if case.kind == "unet":
        proj = sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
        assert proj.shape == ((4, 32, 1, 1) if case.family == "sd1" else (4, 32))
        assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
        assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 2, 1, 1)
        assert sd["lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"].shape == (4, 32, 1, 1)
    # The export is a copy: changing it leaves the network alone, even at the network's own dtype.
    sd32 = network.kohya_state_dict(dtype=torch.float32)
    first = next(iter(sd32.values()))
    first.add_(1.0)
    assert not torch.equal(network.kohya_state_dict(dtype=torch.float32)[next(iter(sd32))], first)


def test_load_round_trip(case):
    source = case.network(**_kw(case))
    _randomize(source, seed=5)
    for pair in source.pairs.values():
        pair.alpha = 3.0
    sd = source.kohya_state_dict(dtype=torch.float32)
    target = case.network(**_kw(case))  # alpha 2 configured; the file's alpha wins
    target.load_kohya_state_dict(sd)
    assert all(pair.alpha == 3.0 for pair in target.pairs.values())
    loaded = target.kohya_state_dict(dtype=torch.float32)
    assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    for stem in (source.stems()[0], source.stems()[-1]):
        assert torch.equal(target.delta_weight(stem), source.delta_weight(stem))


def test_load_errors_name_the_problem_and_change_nothing():
    case = Case("sd2", "unet")
    network = case.network()
    before = network.kohya_state_dict(dtype=torch.float32)
    good = case.network()
    _randomize(good)
    sd = good.kohya_state_dict(dtype=torch.float32)
    stem = network.stems()[5]

    missing = {k: v for k, v in sd.items() if not k.startswith(stem + ".")}
    extra = dict(sd, **{"lora_unet_foo_bar.lora_down.weight": torch.zeros(4, 3)})
    wrong_rank = dict(sd, **{f"{stem}.lora_down.weight": torch.zeros(8, *sd[f"{stem}.lora_down.weight"].shape[1:])})
    odd_part = dict(sd, **{f"{stem}.dora_scale": torch.zeros(1)})
    for bad, words in [(missing, ["missing", stem]), (extra, ["does not have", "lora_unet_foo_bar"]),
                       (wrong_rank, ["shape", stem, "[8,"]), (odd_part, ["not kohya LoRA weights", "dora_scale"])]:
        with pytest.raises(TrainerError) as err:
            network.load_kohya_state_dict(bad, source="x.safetensors")
        assert all(w in str(err.value) for w in words + ["x.safetensors"]), str(err.value)
        after = network.kohya_state_dict(dtype=torch.float32)
        assert all(torch.equal(after[k], before[k]) for k in before)


def test_load_accepts_4d_proj_for_linear_and_missing_alpha():
    """kohya trains SD2 with conv projections, so its files carry [r, in, 1, 1] for a Linear proj_in (§A.3.1)."""
    case = Case("sd2", "unet")
    network = case.network()
    sd = network.kohya_state_dict(dtype=torch.float32)
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    down = torch.randn(4, 32)
    sd[f"{stem}.lora_down.weight"] = down[:, :, None, None]
    del sd[f"{stem}.alpha"]
    network.load_kohya_state_dict(sd)
    assert torch.equal(network.pairs[stem].lora_down.weight, down)
    assert network.pairs[stem].alpha == 4.0


# --- full-size layouts (meta device) ----------------------------------------------------------------------------

def _shapes(network: LoRANetwork, stem: str):
    pair = network.pairs[stem]
    return tuple(pair.lora_down.weight.shape), tuple(pair.lora_up.weight.shape)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_counts_and_worked_example_shapes(family):
    unet_model = meta_sd15_unet() if family == "sd1" else meta_sd2_unet()
    te = meta_sd1_text_encoder() if family == "sd1" else meta_sd2_text_encoder()
    plain = LoRANetwork.for_model(unet_model, te, family=family, rank=4, alpha=1.0)
    locon = LoRANetwork.for_model(unet_model, te, family=family, rank=4, alpha=1.0, conv_rank=8, conv_alpha=1.0)
    te_count = 72 if family == "sd1" else 138
    assert len(plain.stems()) == 192 + te_count
    assert len(locon.stems()) == 278 + te_count == len(set(locon.stems()))
    assert len(LoRANetwork.for_model(unet_model, te, family=family, rank=4, alpha=1.0,
                                     train_text_encoder=False).stems()) == 192
    r, rc = 4, 8
    ctx = 768 if family == "sd1" else 1024
    proj = ((r, 320, 1, 1), (320, r, 1, 1)) if family == "sd1" else ((r, 320), (320, r))
    expected = {  # FORMATS §A.5, SD1.5 table; SD2: Linear proj, context 1024
        "lora_unet_down_blocks_0_attentions_0_proj_in": proj,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((r, 320), (320, r)),
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k": ((r, ctx), (320, r)),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj": ((r, 640), (5120, r)),
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_2": ((r, 5120), (1280, r)),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v": ((r, ctx), (1280, r)),
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0": ((r, 1280), (1280, r)),
        "lora_unet_up_blocks_3_attentions_2_proj_out": proj,
        "lora_unet_down_blocks_0_resnets_0_conv1": ((rc, 320, 3, 3), (320, rc, 1, 1)),
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": ((r, 320, 1, 1), (640, r, 1, 1)),
        "lora_unet_down_blocks_1_resnets_0_time_emb_proj": ((r, 1280), (640, r)),
        "lora_unet_down_blocks_0_downsamplers_0_conv": ((rc, 320, 3, 3), (320, rc, 1, 1)),
        "lora_unet_up_blocks_0_upsamplers_0_conv": ((rc, 1280, 3, 3), (1280, rc, 1, 1)),
        "lora_unet_up_blocks_1_upsamplers_0_conv": ((rc, 1280, 3, 3), (1280, rc, 1, 1)),
        "lora_unet_up_blocks_0_resnets_0_conv2": ((rc, 1280, 3, 3), (1280, rc, 1, 1)),
        "lora_unet_mid_block_resnets_1_conv1": ((rc, 1280, 3, 3), (1280, rc, 1, 1)),
    }
    if family == "sd1":
        expected["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] = ((r, 768), (768, r))
        expected["lora_te_text_model_encoder_layers_11_mlp_fc1"] = ((r, 768), (3072, r))
    else:
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            expected[f"lora_te_text_model_encoder_layers_7_self_attn_{p}"] = ((r, 1024), (1024, r))
        expected["lora_te_text_model_encoder_layers_22_mlp_fc1"] = ((r, 1024), (4096, r))
        expected["lora_te_text_model_encoder_layers_22_mlp_fc2"] = ((r, 4096), (1024, r))
        assert not any("layers_23_" in s for s in locon.stems())
    assert {stem: _shapes(locon, stem) for stem in expected} == expected
    assert all(_shapes(locon, s) == _shapes(plain, s) for s in plain.stems())


@pytest.mark.parametrize("kind", ["linear2d", "linear3d", "conv1x1", "conv3x3", "host16"])
def test_add_to_is_the_host_output_plus_the_branch_with_the_same_gradients(kind):
    # add_to folds the scale and the sum into the up projection's kernel (addmm / add with alpha); it must give what
    # org(x) + pair(x) gives, values and gradients, for every host shape and a 16-bit host under a fp32 branch.
    torch.manual_seed(0)
    if kind.startswith("conv"):
        k = 3 if kind == "conv3x3" else 1
        host = nn.Conv2d(6, 10, k, padding=k // 2)
        pair = LoRAPair.for_conv(host, rank=4, alpha=2.0, dropout=0.0)
        x = torch.randn(2, 6, 5, 5)
    else:
        host = nn.Linear(6, 10)
        pair = LoRAPair.for_linear(6, 10, rank=4, alpha=2.0, dropout=0.0, device=torch.device("cpu"))
        x = torch.randn(3, 6) if kind == "linear2d" else torch.randn(2, 3, 6)
    nn.init.normal_(pair.lora_up.weight)
    pair.multiplier = 0.7
    host.requires_grad_(False)
    if kind == "host16":
        host = host.to(torch.bfloat16)

    def run(fold: bool):
        xi = x.clone().requires_grad_(True)
        out = host(xi.to(host.weight.dtype))
        y = pair.add_to(out, xi) if fold else out + pair(xi).to(out.dtype)
        grads = torch.autograd.grad(y.float().square().sum(), [xi, pair.lora_down.weight, pair.lora_up.weight])
        return y, grads

    (y, grads), (ref, ref_grads) = run(True), run(False)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the branch really is in the result: without it the output differs
        assert not torch.allclose(y.float(), host(x.to(host.weight.dtype)).float(), atol=1e-3)


def test_add_to_drops_the_rank_activations_like_forward():
    pair = LoRAPair.for_linear(8, 8, rank=4, alpha=None, dropout=0.5, device=torch.device("cpu"))
    nn.init.normal_(pair.lora_up.weight)
    x, out = torch.randn(64, 8), torch.zeros(64, 8)
    torch.manual_seed(3)
    y = pair.add_to(out, x)
    torch.manual_seed(3)
    torch.testing.assert_close(y, pair(x))
    pair.eval()
    torch.testing.assert_close(pair.add_to(out, x), pair(x))
    assert not torch.allclose(y, pair(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_to_under_autocast_stays_in_the_autocast_dtype(dtype):
    # Under autocast (CUDA training, CPU here) the host's output and the branch are both 16-bit: add_to takes the
    # folded path, whose addmm autocast casts like the host's own linear; result and gradients match the plain sum.
    torch.manual_seed(0)
    host = nn.Linear(8, 6).requires_grad_(False)
    pair = LoRAPair.for_linear(8, 6, rank=4, alpha=None, dropout=0.0, device=torch.device("cpu"))
    nn.init.normal_(pair.lora_up.weight)
    x = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=dtype):
        out = host(x)
        y, ref = pair.add_to(out, x), out + pair(x).to(out.dtype)
    assert y.dtype == ref.dtype == dtype and pair.lora_up.weight.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    g = torch.autograd.grad(y.float().sum(), pair.lora_up.weight)[0]
    g_ref = torch.autograd.grad(ref.float().sum(), pair.lora_up.weight)[0]
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=2e-2)
