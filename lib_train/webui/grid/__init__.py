"""The "Epoch × weight grid" script in the WebUI: :mod:`.script` (arguments, rendering, keeping a choice),
:mod:`.ui` (its controls) and :mod:`.xyz` (the Trainer axes of the built-in X/Y/Z plot). The planning itself,
without the WebUI, is :mod:`lib_train.grid`."""
