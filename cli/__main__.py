"""`python -m cli ...` is `hearth ...`."""

import sys

from cli.main import main

sys.exit(main())
