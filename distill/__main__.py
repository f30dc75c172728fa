"""``python -m distill COMMAND ...`` (also ``torchrun ... -m distill COMMAND ...``): see :mod:`distill.cli`."""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main())
