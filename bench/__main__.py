"""`python -m bench [--mode burst|steady|growth|all] ...`; see bench/cli.py."""

import sys

from bench.cli import main

sys.exit(main())
