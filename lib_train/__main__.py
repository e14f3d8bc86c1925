"""``python -m lib_train`` — see :mod:`lib_train.cli`."""

import sys

from .cli import main

sys.exit(main())
