"""`python -m medvit` (and `torchrun -m medvit`) entry point."""

import sys

from medvit.cli import main

if __name__ == "__main__":
    sys.exit(main())
