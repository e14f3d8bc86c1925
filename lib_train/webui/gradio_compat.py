"""What differs between the gradio versions the tab and the grid script meet (the WebUI pins 3.41.2; gradio 4 renamed
some keywords)."""

from __future__ import annotations

import gradio as gr


def js_kwarg(function: str) -> dict[str, str]:
    """The event keyword that runs a JS function before the call: ``_js`` in gradio 3, ``js`` in gradio 4."""
    return {"_js" if int(gr.__version__.split(".")[0]) < 4 else "js": function}
