"""Entry point shared by the services: `python -m services.<name> [--config FILE]`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from shared import config as config_mod
from shared.errors import ConfigError
from shared.service import EventService
from shared.telemetry import setup_logging, start_metrics

EXIT_USAGE = 2
"""What a bad command line or configuration exits with (argparse's own code)."""


def run_service(cls: type[EventService[Any]], argv: list[str] | None = None) -> int:
    """Load and validate the configuration, then run the service until it stops.

    A bad configuration is one line on stderr naming the key, and exit status 2: the service
    never starts half-configured (a typo in `scheduler.backfill` used to turn on greedy backfill).
    """
    parser = argparse.ArgumentParser(prog=f"cumulus {cls.name}", description=cls.__doc__)
    parser.add_argument("--config", help="YAML config file (default: $CUMULUS_CONFIG)")
    args = parser.parse_args(argv)
    try:
        config = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"cumulus {cls.name}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(cls.name, config.logging.level, config.logging.format)
    os.environ.setdefault("OTEL_SERVICE_NAME", f"cumulus-{cls.name}")
    start_metrics(config.metrics_port)
    try:
        service = cls(config)
    except ConfigError as exc:
        print(f"cumulus {cls.name}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    try:
        import uvloop
    except ImportError:
        asyncio.run(service.run_forever())
    else:
        uvloop.run(service.run_forever())
    return 0
