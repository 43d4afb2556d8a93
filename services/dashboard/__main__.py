"""`python -m services.dashboard [--port N] [--bind HOST]`: the same as `cumulus dashboard`."""

import sys

from cumulus.cli import main

sys.exit(main(["dashboard", *sys.argv[1:]]))
