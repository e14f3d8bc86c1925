"""Epoch × weight grids, planned without the WebUI, one module per step:

- :mod:`.runs` — runs on disk (:func:`~.runs.discover_runs`, :class:`~.runs.Run`, :class:`~.runs.RunFile`);
- :mod:`.axes` — weight and seed specs and the optional third axis (prompts or seeds);
- :mod:`.prompts` — a cell's prompt: ``<lora:STEM:w>`` for a LoRA file, ``(STEM:w)`` for an embedding;
- :mod:`.plan` — the cells of a grid (files across, weights down, one fixed seed) and their infotext;
- :mod:`.keep` — keeping a choice: the preferred weight in the sidecar, promoting a file to the final one.

Every problem a user can fix raises :class:`~lib_train.errors.TrainerError` naming the field or file. Import from the
module that holds a name; this package itself holds nothing else.
"""
