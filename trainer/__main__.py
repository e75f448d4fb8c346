"""`python -m trainer ...` is `hearth ...` (kept for `torchrun -m trainer pretrain`)."""

import sys

from cli.main import main

sys.exit(main())
