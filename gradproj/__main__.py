"""``python -m gradproj``: the ``gradproj`` command (train, compare, memory, list)."""

import sys

from gradproj.train.cli import main

sys.exit(main())
