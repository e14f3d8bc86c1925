"""Loads our SDXL textual-inversion files into diffusers' two SDXL text encoders with ``load_textual_inversion`` (the
``clip_l`` tensor into ``text_encoder`` + ``tokenizer``, the ``clip_g`` tensor into ``text_encoder_2`` +
``tokenizer_2``, diffusers' documented pattern for SDXL embeddings) and writes what ``encode_prompt`` computes.

Runs ONLY in the interop environment (``.venv-interop``), as a subprocess of ``tests/test_sdxl_embedding_interop.py``::

    $TRAINER_INTEROP_PYTHON tests/interop/diffusers_sdxl_ti_worker.py <workdir>

Input, in ``<workdir>/``:
- ``checkpoint.safetensors``: the text encoders of an SDXL single file (sgm keys, as the WebUI saves one):
  ``conditioner.embedders.0.transformer.*`` (clip_l, HF CLIP text model) and ``conditioner.embedders.1.model.*``
  (clip_g, open_clip text tower); other keys are ignored. Converted by diffusers' single-file converters
  (``diffusers_sdxl_worker.build_text_encoders``).
- ``spec.json``: ``{"text_encoder": <CLIPTextConfig arguments of clip_l>, "text_encoder_2": <the same of clip_g, with
  projection_dim>}`` (the models are tiny: nothing can be fetched from the hub).
- ``tokenizer/vocab.json`` + ``tokenizer/merges.txt``: the CLIP BPE. ``tokenizer`` pads with its end-of-text token,
  ``tokenizer_2`` with ``!`` (id 0), as SDXL's two hub tokenizers do; both ``model_max_length`` 77.
- ``request.json``: ``{"cases": [{"file": "<name in workdir>", "token": str, "text_encoder": "clip_l",
  "text_encoder_2": "clip_g", "prompts": [str, ...]}, ...]}``. Each case gets a fresh pipeline; the file is read with
  safetensors and its tensor named by ``text_encoder`` goes to ``pipe.text_encoder`` and the one named by
  ``text_encoder_2`` to ``pipe.text_encoder_2`` (a test swaps them to see the comparison fail), both under
  ``token``.

Output, in ``<workdir>/`` (float32 / int64):
- ``outputs.safetensors``: for case ``i`` and prompt ``j`` (one prompt per ``encode_prompt`` call, no guidance):
  ``embeds_{i}_{j}`` = ``prompt_embeds[0]`` ``[77, width_l + width_g]`` (both encoders' ``hidden_states[-2]``),
  ``pooled_{i}_{j}`` = ``pooled_prompt_embeds[0]`` ``[projection_dim]`` (``text_encoder_2``'s ``text_embeds``), and
  ``ids_l_{i}_{j}`` / ``ids_g_{i}_{j}`` = the token ids each tokenizer gave the prompt after ``maybe_convert_prompt``
  ``[77]`` (what ``encode_prompt`` feeds each encoder).
- ``report.json``: package versions, the encoders' ``eos_token_id``, and per case the tokens added to each tokenizer
  with their ids.

Exit status 0 on success; otherwise 1, with the traceback and a last line
``diffusers_sdxl_ti_worker: <step> failed: ...``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONTEXT = 77


def load_tokenizers(workdir: Path):
    """(tokenizer, tokenizer_2): the CLIP BPE, padding with end-of-text and with ``!`` respectively."""
    from transformers import CLIPTokenizer

    vocab, merges = str(workdir / "tokenizer" / "vocab.json"), str(workdir / "tokenizer" / "merges.txt")
    tokenizer, tokenizer_2 = CLIPTokenizer(vocab, merges), CLIPTokenizer(vocab, merges, pad_token="!")
    for t in (tokenizer, tokenizer_2):
        t.model_max_length = CONTEXT  # what the hub's tokenizer_config.json says; the files alone leave it unset
    return tokenizer, tokenizer_2


def build_text_pipeline(spec: dict, checkpoint: dict, workdir: Path):
    """A StableDiffusionXLPipeline with the checkpoint's two text encoders and both tokenizers (no UNet, no VAE:
    ``encode_prompt`` needs neither)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from diffusers_sdxl_worker import build_text_encoders

    text_encoder, text_encoder_2 = build_text_encoders(spec, checkpoint)
    tokenizer, tokenizer_2 = load_tokenizers(workdir)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=None,
                                     scheduler=EulerDiscreteScheduler(), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def added_tokens(tokenizer, vocab: int) -> dict[str, int]:
    return {t: i for t, i in tokenizer.get_vocab().items() if i >= vocab}


def run(workdir: Path, step: list[str]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # before diffusers: its import warns about the absent torchvision
    transformers.logging.disable_progress_bar()
    import diffusers
    import torch
    from safetensors.torch import load_file, save_file

    step[0] = "reading the workdir"
    spec = json.loads((workdir / "spec.json").read_text(encoding="utf-8"))
    request = json.loads((workdir / "request.json").read_text(encoding="utf-8"))
    checkpoint = load_file(str(workdir / "checkpoint.safetensors"))
    outputs = {}
    report = {"versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__},
              "eos_token_id": {k: spec[k].get("eos_token_id") for k in ("text_encoder", "text_encoder_2")},
              "cases": []}
    for i, case in enumerate(request["cases"]):
        step[0] = f"case {i}: building the pipeline"
        pipe = build_text_pipeline(spec, checkpoint, workdir)
        vocab = len(pipe.tokenizer)
        step[0] = f"case {i}: loading {case['file']} with load_textual_inversion"
        tensors = load_file(str(workdir / case["file"]))
        pipe.load_textual_inversion(tensors[case["text_encoder"]], token=case["token"],
                                    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(tensors[case["text_encoder_2"]], token=case["token"],
                                    text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        report["cases"].append({"file": case["file"], "added_tokens": added_tokens(pipe.tokenizer, vocab),
                                "added_tokens_2": added_tokens(pipe.tokenizer_2, vocab)})
        for j, prompt in enumerate(case["prompts"]):
            step[0] = f"case {i}: encoding {prompt!r}"
            for key, tokenizer in (("ids_l", pipe.tokenizer), ("ids_g", pipe.tokenizer_2)):
                converted = pipe.maybe_convert_prompt(prompt, tokenizer)
                ids = tokenizer(converted, padding="max_length", max_length=CONTEXT, truncation=True,
                                return_tensors="pt").input_ids[0]
                outputs[f"{key}_{i}_{j}"] = ids.to(torch.int64).contiguous()
            with torch.no_grad():
                embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
            outputs[f"embeds_{i}_{j}"] = embeds[0].float().contiguous()
            outputs[f"pooled_{i}_{j}"] = pooled[0].float().contiguous()
    step[0] = "writing outputs.safetensors and report.json"
    save_file(outputs, str(workdir / "outputs.safetensors"))
    (workdir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")


def main(argv: list[str]) -> int:
    from worker_cli import worker_main

    return worker_main("diffusers_sdxl_ti_worker", "<workdir>", run, argv, convert=lambda a: [Path(a[0])])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
