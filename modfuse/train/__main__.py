"""python -m modfuse.train: the same as the modfuse-train command."""

import sys

from modfuse.train.cli import main

sys.exit(main())
