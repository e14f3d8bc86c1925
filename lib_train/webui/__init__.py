"""The WebUI layer: the only part of ``lib_train`` that imports the WebUI's ``modules`` (DESIGN.md §2).

- :mod:`.host` decides whether the loaded checkpoint can be trained here, and says why not;
- :mod:`.model` turns ``shared.sd_model`` into a :class:`~lib_train.models.bundle.ModelBundle` for the duration of a
  run and restores everything the run touched;
- :mod:`.jobs` runs one training job at a time under the WebUI's queue lock, reporting through ``shared.state``;
- :mod:`.api` serves the jobs under ``/trainer/v1/``; :mod:`.diagnostics` holds the read-only check routes' work.

Importing this package imports nothing from the WebUI; its modules do, so import them only inside the WebUI.
"""
