"""``python -m moe_passes.cli``."""

import sys

from moe_passes.cli import main

sys.exit(main())
