"""``python -m milora.cli`` (as torchrun / accelerate launch run it)."""

import sys

from milora.cli import main

sys.exit(main())
