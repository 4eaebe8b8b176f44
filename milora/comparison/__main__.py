"""``python -m milora.comparison JOB.json``: one run of a sweep in its own process (the local backend)."""

import sys

from milora.comparison.worker import main

sys.exit(main())
