"""`python -m pmetal` is the `pmetal` command."""

import sys

from pmetal.cli import main

sys.exit(main())
