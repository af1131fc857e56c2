"""`python -m einstruct`: see einstruct.cli."""

import sys

from .cli import main

sys.exit(main())
