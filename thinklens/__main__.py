"""``python -m thinklens`` (and ``torchrun -m thinklens``): the command line."""

import sys

from thinklens.cli import main

sys.exit(main())
