"""Entry point shared by the services: `python -m services.<name> [--config FILE]`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from shared import config as config_mod
from shared.config import Config
from shared.errors import ConfigError
from shared.service import EventService
from shared.telemetry import setup_logging, start_metrics

T = TypeVar("T")
EXIT_USAGE = 2
"""What a bad command line or configuration exits with (argparse's own code)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C before the service took its signals (shared/lifecycle.py has the rest)."""


def configured(name: str, argv: list[str] | None, description: str | None) -> Config | None:
    """Parse `--config`, load and check the configuration, and set up logging and metrics as
    `cumulus <name>`. A bad configuration is one line on stderr naming the key, and None: the
    caller exits with EXIT_USAGE and never starts half-configured (a typo in
    `scheduler.backfill` used to turn on greedy backfill)."""
    parser = argparse.ArgumentParser(prog=f"cumulus {name}", description=description)
    parser.add_argument("--config", help="YAML config file (default: $CUMULUS_CONFIG)")
    args = parser.parse_args(argv)
    try:
        config = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"cumulus {name}: {exc.message}", file=sys.stderr)
        return None
    setup_logging(name, config.logging.level, config.logging.format)
    os.environ.setdefault("OTEL_SERVICE_NAME", f"cumulus-{name}")
    start_metrics(config.metrics_port, config.metrics_bind)
    return config


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop where it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_service(cls: type[EventService[Any]], argv: list[str] | None = None) -> int:
    """Load and validate the configuration, then run the service until it stops."""
    config = configured(cls.name, argv, cls.__doc__)
    if config is None:
        return EXIT_USAGE
    try:
        service = cls(config)
    except ConfigError as exc:
        print(f"cumulus {cls.name}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    try:
        run_loop(service.run_forever())
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        return EXIT_INTERRUPTED
    return 0
