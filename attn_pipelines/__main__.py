"""`python -m attn_pipelines ...` = the `attnplug` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
