"""``python -m cumulus_core``: the same command as ``chronos_cli``."""

from cumulus_core.cli import main

raise SystemExit(main())
