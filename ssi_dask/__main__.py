"""``python -m ssi_dask`` runs the command line."""

import sys

from .cli import main

sys.exit(main())
