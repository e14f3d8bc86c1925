"""The Trainer tab: :mod:`.build` lays it out with plain gradio (WebUI facts and actions come in as
:class:`~.build.WebuiInfo` and :class:`~.build.Backend`), :mod:`.fields` generates its fields from the settings,
:mod:`.presets` holds the presets, :mod:`.preprocess_panel` the "Prepare dataset" panel, :mod:`.render` the HTML
of reports and job status, and :mod:`.backend` wires it into the WebUI (``on_ui_tabs``/``on_ui_settings``)."""
