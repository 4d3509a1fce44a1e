"""``python -m lageo_utils.cli``: the ``lageo`` command (what ``torchrun -m lageo_utils.cli train ...`` starts)."""

import sys

from lageo_utils.cli import main

sys.exit(main())
