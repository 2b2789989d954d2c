"""`python -m tunefetch ...` (how Ray jobs run the CLI on a cluster without the console script)."""

import sys

from tunefetch.cli import main

sys.exit(main())
