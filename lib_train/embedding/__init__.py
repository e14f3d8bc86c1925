"""Textual-inversion embeddings for SD1.x / SD2.x: create, inject, prompt, save and load (FORMATS.md §C).

* ``vectors``: initial vectors from an init text (the WebUI's rules), token counts, name-collision check.
* ``inject``: the registry that puts the vectors into the text encoder's token-embedding output at the name's slots.
* ``prompts``: prompt templates (``[name]``, ``[filewords]``) and the prompt of a training sample.
* ``files``: ``.safetensors`` ``{"emb_params": [n, dim]}`` and the WebUI ``.pt`` dict, written atomically; loaders.

Training itself is :mod:`lib_train.train.ti_trainer`.
"""
