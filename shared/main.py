"""Entry point shared by the services: `python -m services.<name> [--config FILE]`."""

from __future__ import annotations

import argparse
import asyncio
import os

from shared import config as config_mod
from shared.service import EventService
from shared.telemetry import setup_logging, start_metrics


def run_service(cls: type[EventService], argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"cumulus {cls.name}", description=cls.__doc__)
    parser.add_argument("--config", help="YAML config file (default: $CUMULUS_CONFIG)")
    args = parser.parse_args(argv)
    config = config_mod.load(args.config)
    setup_logging(cls.name, config.logging.level, config.logging.format)
    os.environ.setdefault("OTEL_SERVICE_NAME", f"cumulus-{cls.name}")
    start_metrics(config.metrics_port)
    service = cls(config)
    try:
        import uvloop
    except ImportError:
        asyncio.run(service.run_forever())
    else:
        uvloop.run(service.run_forever())
    return 0
