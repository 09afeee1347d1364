"""``python -m experiments.cli``: the ``alignsam`` command."""

import sys

from experiments.cli import main

sys.exit(main())
