"""The two kinds of text-encoder module SD checkpoints use, as strategy objects the family table points at.

A *kind* knows one ldm embedder's layout: how to tokenize for it, where its token-embedding table is, which layer it
encodes with, which of its modules carry a kohya LoRA and under which HF CLIP name (FORMATS.md §A.3.3), how its
weights look in a checkpoint, how the offline builder makes one, and how to recognise a live one.

- :data:`HF_CLIP` — ldm ``FrozenCLIPEmbedder``: ``.transformer`` is an HF ``CLIPTextModel`` (SD1; SDXL's clip_l).
- :data:`OPEN_CLIP` — ldm ``FrozenOpenCLIPEmbedder``: ``.model`` is open_clip's text tower (SD2; SDXL's clip_g).

Which hidden state conditions is the family's choice: SD1/SD2 keep the ldm embedders' own rule (:meth:`encode`); a
family that names a :class:`Layer` (SDXL) gets it from :meth:`TextEncoderKind.hidden`, computed from the raw modules
(``.transformer`` / ``.model``), which also gives the pooled output.

No torch import at module level: :mod:`lib_train.network.naming` reads the LoRA names without torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Shape = Callable[[str], tuple[int, ...]]  # checkpoint key → tensor shape (TrainerError when missing)
Count = Callable[[str], int]  # checkpoint key prefix → how many numbered blocks follow it (``prefix{i}.``)


@dataclass(frozen=True)
class Layer:
    """The hidden state an encoder conditions with, for families that name it (SDXL, FORMATS §E.4).

    ``index`` counts like HF ``hidden_states`` (-1: the last block's output, -2: the penultimate block's output,
    which is ``hidden_states[11]`` of a 12-layer tower); ``final_norm``: through the final layer norm;
    ``pooled``: also return the pooled output (HF: ``pooler_output``; open_clip: ``ln_final`` of the last block's
    output at the end-of-text token, times ``text_projection``)."""

    index: int
    final_norm: bool
    pooled: bool = False


@dataclass(frozen=True)
class TokenIds:
    bos: int
    eos: int
    pad: int
    comma: int


class TextEncoderKind:
    """What differs between text-encoder modules; subclasses fill each part in."""

    name = ""
    layers_path = ""  # module path (relative to the embedder) of the numbered transformer layers
    token_embedding_key = ""  # checkpoint key of the token-embedding table, after the family's text-encoder prefix
    offline_class = ""  # class name in lib_train.models.build that builds one offline
    offline_params: Mapping[str, Any] = {}  # extra constructor arguments of that class
    tiny_text: Mapping[str, int] = {}  # TextSpec fields of the tiny test models that this kind needs
    truncates_init_text = False  # the WebUI's create_embedding keeps only the first n tokens of the init text

    def tokenizer(self, embedder) -> tuple[Callable[[str], Sequence[int]], TokenIds]:
        """(text → token ids without BOS/EOS, the special ids) for ``embedder``."""
        raise NotImplementedError

    def token_embedding(self, embedder):
        """The token-embedding module ``[vocab, width]`` of ``embedder`` (possibly wrapped by the WebUI)."""
        raise NotImplementedError

    def encode(self, embedder, ids, clip_skip: int):
        """Token ids ``[rows, 77]`` → hidden states ``[rows, 77, width]`` at the layer this kind conditions with."""
        raise NotImplementedError

    def hidden(self, embedder, ids, layer: Layer):
        """Token ids ``[rows, 77]`` → (hidden states ``[rows, 77, width]`` at ``layer``, pooled ``[rows, dim]`` or
        None), from the raw text modules."""
        raise NotImplementedError

    def lora_names(self, path: str, max_layer: int | None = None) -> list[str]:
        """HF CLIP module names (``text_model.encoder.layers.{i}.…``) a kohya LoRA gives the module at ``path``
        (relative to the embedder), in kohya's order; ``[]`` when it is never targeted or its layer ``i`` is
        ``max_layer`` or above."""
        raise NotImplementedError

    def text_spec(self, shape: Shape, count: Count, prefix: str) -> dict[str, int]:
        """``TextSpec`` fields (all but ``heads``) read from the checkpoint tensors under ``prefix``."""
        raise NotImplementedError

    def matches_live(self, encoder) -> bool:
        """True when a live embedder (the WebUI's, unwrapped) is of this kind."""
        raise NotImplementedError

    def num_layers(self, embedder) -> int:
        """How many numbered transformer layers ``embedder`` has (counted from its module paths)."""
        depth = self.layers_path.count(".") + 1
        return sum(1 for p, _ in embedder.named_modules() if p.startswith(self.layers_path + ".")
                   and p.count(".") == depth)


class _HFClip(TextEncoderKind):
    """ldm ``FrozenCLIPEmbedder``; clip skip N>1 takes ``hidden_states[-N]`` through the final layer norm."""

    name = "hf_clip"
    layers_path = "transformer.text_model.encoder.layers"
    token_embedding_key = "text_model.embeddings.token_embedding.weight"
    offline_class = "OfflineFrozenCLIPEmbedder"
    tiny_text = {"layers": 2, "intermediate": 64}
    truncates_init_text = True  # the WebUI calls the HF tokenizer with max_length = n
    _PATH = re.compile(
        r"^transformer\.text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)$")

    def tokenizer(self, embedder):
        tok = embedder.tokenizer

        def encode(text: str) -> list[int]:
            return tok(text, add_special_tokens=False, truncation=False)["input_ids"]

        return encode, TokenIds(bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.eos_token_id,
                                comma=tok.get_vocab()[",</w>"])

    def token_embedding(self, embedder):
        return embedder.transformer.text_model.embeddings.token_embedding

    def encode(self, embedder, ids, clip_skip: int):
        tr = embedder.transformer
        if clip_skip > 1:
            out = tr(input_ids=ids, output_hidden_states=True)
            return tr.text_model.final_layer_norm(out.hidden_states[-clip_skip])
        return tr(input_ids=ids).last_hidden_state

    def hidden(self, embedder, ids, layer: Layer):
        tr = embedder.transformer
        out = tr(input_ids=ids, output_hidden_states=True)
        z = out.hidden_states[layer.index]
        if layer.final_norm:
            z = tr.text_model.final_layer_norm(z)
        return z, (out.pooler_output if layer.pooled else None)

    def lora_names(self, path: str, max_layer: int | None = None) -> list[str]:
        m = self._PATH.match(path)
        if m is None or (max_layer is not None and int(m.group(1)) >= max_layer):
            return []
        return [f"text_model.encoder.layers.{m.group(1)}.{m.group(2)}"]

    def text_spec(self, shape: Shape, count: Count, prefix: str) -> dict[str, int]:
        p = prefix + "text_model."
        vocab, width = shape(p + "embeddings.token_embedding.weight")
        return dict(width=width, layers=count(p + "encoder.layers."),
                    intermediate=shape(p + "encoder.layers.0.mlp.fc1.weight")[0], vocab_size=vocab,
                    context_length=shape(p + "embeddings.position_embedding.weight")[0], projection_dim=width)

    def matches_live(self, encoder) -> bool:
        return hasattr(encoder, "transformer") and hasattr(encoder.transformer, "text_model")


class _OpenClip(TextEncoderKind):
    """ldm ``FrozenOpenCLIPEmbedder``: always the penultimate block's output through ``ln_final`` (clip skip does not
    apply); SD2 therefore never targets the last resblock (kohya never writes it, §A.3.3; the family's
    :attr:`TextEncoder.lora_last_layer`). Its fused ``attn`` (``nn.MultiheadAttention``) gives four names q/k/v/out;
    ``mlp.c_fc``/``mlp.c_proj`` are ``mlp.fc1``/``mlp.fc2``."""

    name = "open_clip"
    layers_path = "model.transformer.resblocks"
    token_embedding_key = "token_embedding.weight"
    offline_class = "OfflineFrozenOpenCLIPEmbedder"
    offline_params = {"layer": "penultimate"}
    # open_clip builds MLPs of 4 × width only; one layer more than HF CLIP, as the last one is not used
    tiny_text = {"layers": 3, "intermediate": 128}
    _PATH = re.compile(r"^model\.transformer\.resblocks\.(\d+)\.(attn|mlp\.c_fc|mlp\.c_proj)$")
    _QKVO = ("q_proj", "k_proj", "v_proj", "out_proj")
    _MLP = {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}

    def tokenizer(self, embedder):
        from open_clip.tokenizer import _tokenizer as simple

        return simple.encode, TokenIds(bos=simple.encoder["<start_of_text>"], eos=simple.encoder["<end_of_text>"],
                                       pad=0, comma=simple.encoder[",</w>"])

    def token_embedding(self, embedder):
        return embedder.model.token_embedding

    def encode(self, embedder, ids, clip_skip: int):
        return embedder.encode_with_transformer(ids)

    def hidden(self, embedder, ids, layer: Layer):
        """open_clip's text forward (sequence-first resblocks with the causal mask), keeping the output of block
        ``n + index`` (before it runs block ``n + index + 1``); the blocks after it run only for the pooled output."""
        import torch

        model = embedder.model
        blocks = model.transformer.resblocks
        keep = len(blocks) + layer.index + 1  # hidden state after `keep` blocks
        x = (model.token_embedding(ids) + model.positional_embedding).permute(1, 0, 2)
        z = x if keep == 0 else None
        for i, block in enumerate(blocks):
            if z is not None and not layer.pooled:
                break
            x = block(x, attn_mask=model.attn_mask)
            if i + 1 == keep:
                z = x
        z = z.permute(1, 0, 2)
        if layer.final_norm:
            z = model.ln_final(z)
        pooled = None
        if layer.pooled:
            last = model.ln_final(x.permute(1, 0, 2))
            pooled = last[torch.arange(last.shape[0], device=last.device), ids.argmax(dim=-1)] @ model.text_projection
        return z, pooled

    def lora_names(self, path: str, max_layer: int | None = None) -> list[str]:
        m = self._PATH.match(path)
        if m is None or (max_layer is not None and int(m.group(1)) >= max_layer):
            return []
        base = f"text_model.encoder.layers.{m.group(1)}."
        if m.group(2) == "attn":
            return [f"{base}self_attn.{p}" for p in self._QKVO]
        return [base + self._MLP[m.group(2)]]

    def text_spec(self, shape: Shape, count: Count, prefix: str) -> dict[str, int]:
        vocab, width = shape(prefix + "token_embedding.weight")
        return dict(width=width, layers=count(prefix + "transformer.resblocks."),
                    intermediate=shape(prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0], vocab_size=vocab,
                    context_length=shape(prefix + "positional_embedding")[0],
                    projection_dim=shape(prefix + "text_projection")[1])

    def matches_live(self, encoder) -> bool:
        return hasattr(encoder, "model") and hasattr(encoder, "encode_with_transformer")


HF_CLIP: TextEncoderKind = _HFClip()
OPEN_CLIP: TextEncoderKind = _OpenClip()
