"""Loads textual-inversion embeddings with diffusers' ``load_textual_inversion`` and writes the prompt embeddings
diffusers computes with them.

Runs ONLY in the interop environment (``.venv-interop``), as a subprocess of ``tests/test_embedding_interop.py``::

    $TRAINER_INTEROP_PYTHON tests/interop/diffusers_ti_worker.py <workdir>

Input, in ``<workdir>/``:
- ``checkpoint.safetensors``, ``spec.json``, ``tokenizer/vocab.json`` + ``tokenizer/merges.txt``: a tiny SD1 model, as
  for ``diffusers_worker.py`` (whose ``build_pipeline`` / ``load_tokenizer`` build the pipeline; ``spec.json``'s
  ``multiplier`` is unused).
- ``request.json``: ``{"prompts": [str, ...], "files": [{"file": "<name in workdir>", "token": str | null}, ...]}``.
  Each file is loaded into a fresh pipeline with ``pipe.load_textual_inversion(path, token=token)`` (``null``: no
  ``token=``, as for a WebUI ``.pt`` whose ``name`` diffusers uses).

Output, in ``<workdir>/``:
- ``outputs.safetensors``: for file ``i`` and prompt ``j``: ``embeds_{i}_{j}`` = ``pipe.encode_prompt(prompt)``'s
  prompt embeddings ``[1, 77, hidden]`` float32 and ``ids_{i}_{j}`` = the token ids diffusers fed the text encoder
  ``[77]`` int64 (after ``maybe_convert_prompt`` expanded the token into its ``token, token_1, ...`` vectors).
- ``report.json``: package versions and, per file, the tokens diffusers added and their ids.

Exit status 0 on success; otherwise 1, with the traceback and a last line ``diffusers_ti_worker: <step> failed: ...``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run(workdir: Path, step: list[str]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import diffusers
    import torch
    from diffusers_worker import build_pipeline, load_tokenizer
    from safetensors.torch import load_file, save_file

    step[0] = "reading the workdir"
    spec = json.loads((workdir / "spec.json").read_text(encoding="utf-8"))
    request = json.loads((workdir / "request.json").read_text(encoding="utf-8"))
    checkpoint = load_file(str(workdir / "checkpoint.safetensors"))
    outputs, report = {}, {"versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                                        "torch": torch.__version__}, "files": []}
    for i, entry in enumerate(request["files"]):
        step[0] = f"building the pipeline for {entry['file']}"
        tokenizer = load_tokenizer(workdir)
        tokenizer.model_max_length = 77  # what SD1's hub tokenizer_config.json says; files alone leave it unset
        pipe = build_pipeline(spec, checkpoint, tokenizer)
        vocab = len(pipe.tokenizer)
        step[0] = f"loading {entry['file']} with load_textual_inversion"
        kwargs = {"token": entry["token"]} if entry["token"] is not None else {}
        pipe.load_textual_inversion(str(workdir / entry["file"]), **kwargs)
        added = {t: pipe.tokenizer.convert_tokens_to_ids(t) for t in list(pipe.tokenizer.get_vocab())
                 if pipe.tokenizer.convert_tokens_to_ids(t) >= vocab}
        report["files"].append({"file": entry["file"], "added_tokens": added})
        for j, prompt in enumerate(request["prompts"]):
            step[0] = f"encoding {prompt!r} with {entry['file']}"
            converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
            ids = pipe.tokenizer(converted, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids[0]
            with torch.no_grad():
                embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            outputs[f"embeds_{i}_{j}"] = embeds.float().contiguous()
            outputs[f"ids_{i}_{j}"] = ids.to(torch.int64).contiguous()
    step[0] = "writing outputs.safetensors and report.json"
    save_file(outputs, str(workdir / "outputs.safetensors"))
    (workdir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")


def main(argv: list[str]) -> int:
    from worker_cli import worker_main

    return worker_main("diffusers_ti_worker", "<workdir>", run, argv, convert=lambda a: [Path(a[0])])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
