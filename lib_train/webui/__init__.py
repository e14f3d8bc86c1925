"""The WebUI layer: the only part of ``lib_train`` that imports the WebUI's ``modules`` (DESIGN.md §2).

- :mod:`.host` decides whether the loaded checkpoint can be trained here, and says why not;
- :mod:`.model` turns ``shared.sd_model`` into a :class:`~lib_train.models.bundle.ModelBundle` for the duration of a
  run and restores everything the run touched;
- :mod:`.jobs` runs one training job at a time under the WebUI's queue lock, reporting through ``shared.state``;
- :mod:`.api` serves the jobs under ``/trainer/v1/``; :mod:`.diagnostics` holds the read-only check routes' work;
- :mod:`.preprocess` prepares a dataset folder with the WebUI's upscalers and captioners;
- :mod:`.tab` is the Trainer tab (built with plain gradio; :mod:`.tab.backend` wires it into the WebUI);
- :mod:`.grid` is the "Epoch × weight grid" script and the Trainer axes of the X/Y/Z plot;
- :mod:`.gradio_compat` holds what differs between gradio versions.

Importing this package imports nothing from the WebUI; its modules do, so import them only inside the WebUI.
"""
