"""``python -m esr_core.cli``: the same as the ``esr-lab`` script."""

import sys

from esr_core.cli import main

sys.exit(main())
