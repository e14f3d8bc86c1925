"""LoRA networks in kohya format.

- :mod:`.naming` — module path → kohya key stem (FORMATS.md §A.3); pure strings, no torch import.
- :mod:`.lora` — :class:`~.lora.LoRANetwork`: LoRA injection into live SD1/SD2 modules (§A.2, §E.7).
- :mod:`.kohya_file` — ``.safetensors`` LoRA files with kohya hashes (§B.3).

Import the submodules directly; this package imports nothing, so ``naming`` stays usable without torch.
"""
