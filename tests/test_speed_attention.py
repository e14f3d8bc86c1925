"""Attention (issue 13): the fused SDPA lib_train installs comes out again exactly (restore_attention), and inside the
WebUI the choice between the WebUI's own optimisation and ours (choose_attention) keeps the WebUI's where it is as
fast as ours and names the one that runs."""

from __future__ import annotations

import torch
from helpers import make_tiny_model

from lib_train.models.attention import choose_attention, restore_attention, use_sdpa


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 32, generator=g)


def test_restore_attention_takes_out_exactly_what_use_sdpa_put_in():
    unet = make_tiny_model("sd1").model.diffusion_model
    x, t, ctx = _inputs()
    attn = [m for m in unet.modules() if type(m).__name__ == "CrossAttention"]
    own = attn[0]

    def host_forward(x, context=None, mask=None):  # an instance forward someone else installed: left alone
        return type(own).forward(own, x, context, mask)

    own.forward = host_forward
    with torch.no_grad():
        ref = unet(x, t, context=ctx)
    assert use_sdpa(unet) == len(attn)  # over every CrossAttention (another instance forward too)
    assert use_sdpa(unet) == 0  # ...and never twice
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context=ctx), ref, rtol=1e-4, atol=1e-5)
    assert restore_attention(unet) == len(attn)
    assert restore_attention(unet) == 0
    assert vars(own)["forward"] is host_forward
    assert not any("forward" in vars(m) for m in attn[1:])
    with torch.no_grad():
        assert torch.equal(unet(x, t, context=ctx), ref)


def test_inside_the_webui_ours_replaces_only_slower_attention():
    for fast in ("sdp", "sdp-no-mem", "xformers"):
        which, what = choose_attention(fast)
        assert which == "webui" and what == f"the WebUI's {fast} attention"
    for slow in ("Doggettx", "sub-quadratic", "InvokeAI", "V1"):
        which, what = choose_attention(slow)
        assert which == "ours" and f"faster than WebUI's {slow} attention" in what
    for none in (None, ""):
        which, what = choose_attention(none)
        assert which == "ours" and "unoptimised" in what
    # SDXL (sgm's attention) and a torch without SDPA keep the WebUI's, saying why
    assert choose_attention("Doggettx", ldm=False) == ("webui", "the WebUI's Doggettx attention (SDXL: lib_train "
                                                                "installs none on sgm's attention)")
    which, what = choose_attention("sub-quadratic", sdpa_available=False)
    assert which == "webui" and "no fused scaled_dot_product_attention" in what


def test_a_webui_run_installs_ours_only_over_slower_attention_and_takes_it_out(monkeypatch):
    """lib_train.webui.model.webui_attention on a real (tiny) ldm model, with the WebUI's choice as its
    ``sd_hijack.model_hijack.optimization_method`` reports it (the WebUI itself: tests/webui)."""
    import sys
    import types

    from lib_train.webui.model import webui_attention

    model = make_tiny_model("sd1")
    unet = model.model.diffusion_model
    attn = [m for m in unet.modules() if type(m).__name__ == "CrossAttention"]
    hijack = types.SimpleNamespace(optimization_method="Doggettx")
    package = types.ModuleType("modules")
    package.sd_hijack = types.SimpleNamespace(model_hijack=hijack)
    monkeypatch.setitem(sys.modules, "modules", package)
    monkeypatch.setitem(sys.modules, "modules.sd_hijack", package.sd_hijack)
    notes = []
    with webui_attention(model, notes.append) as what:
        assert all(getattr(vars(m).get("forward"), "_lib_train_sdpa", False) for m in attn)
    assert notes == [f"Attention: {what}."] and "faster than WebUI's Doggettx attention" in what
    assert not any("forward" in vars(m) for m in attn)
    hijack.optimization_method = "sdp"
    with webui_attention(model, notes.append) as what:
        assert not any("forward" in vars(m) for m in attn)
    assert notes[-1] == "Attention: the WebUI's sdp attention."
