"""The `cumulus` command: run code on GPU shares, look at jobs and workers, start the stack.

    cumulus up [--config F] [--devices 2x16GiB] [--workers N] [--port 4222]   until Ctrl-C
    cumulus demo                                                 up, run an example job, stop
    cumulus gateway|scheduler|partitioner|runner [--config F]    one service (deployments)
    cumulus worker [--config F]                  a worker host's agent: partitioner + runner
    cumulus run [OPTIONS] script.py|dir|module:function [ARGS…]  run, stream logs, exit as the job
    cumulus submit [OPTIONS] TARGET [ARGS…]                      the same, detached: prints the id
    cumulus status JOB | logs JOB [-f] | cancel JOB
    cumulus download JOB [PATH] [-o DIR]                         a job's kept outputs/ folder
    cumulus profile list | show [NAME] | use NAME                your profiles (config.toml)
    cumulus completion bash|zsh|fish                             a shell completion script
    cumulus jobs | workers | health                              tables (--json for scripts)
    cumulus health --service NAME [--ready] [--config F]         a process alive/ready: exit 0/1
    cumulus events [SUBJECT]                                     live tail, like `nats sub 'jobs.>'`
    cumulus dashboard [--port N] [--bind HOST]                   live web page; prints its URL
    cumulus doctor [--config F] [--json]                         check a deployment, with fixes
    cumulus users add NAME | users list                          identities (operator)
    cumulus certs init DIR | certs issue DIR NAME [--server --host H]   CA and certificates
    cumulus nats-config --name N --peer H:P ... --store-dir D --auth-dir A --cert/--key/--ca
                                                       one cluster nats-server's config (operator)
    cumulus secrets set NAME | secrets list | secrets rm NAME    your secrets (`run --secret`)

Every command takes `--profile NAME|PATH` (default `$CUMULUS_PROFILE`, else `default`, which
`cumulus up` writes): who you are and where Cumulus is.

A client of the public `cumulus` SDK, split by concern: `parser`, `run` (run, submit, follow,
Ctrl-C), `views` (status, logs, jobs, workers, health, cancel), `events` (the tail), `render`
(tables and event lines), `up` (the embedded stack), `access` (users, certs, secrets). The
service commands are thin delegates that import the services only when asked for.

Options of `run` and `submit` come before the target; everything after it goes to the target.
Exit codes (docs/cli.md): 0 done; 1 the job failed; 2 bad usage or INVALID_ARGUMENT; 3 NOT_FOUND;
4 DEADLINE_EXCEEDED; 5 CANCELLED; 6 UNAVAILABLE or RESOURCE_EXHAUSTED (try later);
7 PERMISSION_DENIED or UNAUTHENTICATED; 130 interrupted (Ctrl-C; `run` cancels its job).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys

from cumulus.cli.exits import (
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Interrupted,
    UsageError,
)
from cumulus.cli.parser import SERVICES, build_parser
from shared.errors import CumulusError, PackagingError

__all__ = ["main"]


def _service(args: argparse.Namespace) -> int:
    """`cumulus gateway|scheduler|partitioner|runner`: run that service in this process."""
    from shared.main import run_service

    module = importlib.import_module(f"services.{args.command}.app")
    cls = getattr(module, args.command.capitalize())
    return run_service(cls, ["--config", args.config] if args.config else [])


def _client_tools(args: argparse.Namespace) -> int:
    """`cumulus download`, `cumulus profile`, `cumulus completion`."""
    if args.command == "download":
        from cumulus.cli.download import download

        return asyncio.run(download(args))
    if args.command == "profile":
        from cumulus.cli.profiles import profile

        return profile(args)
    from cumulus.cli.completion import completion

    return completion(args)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("up", "demo"):
        from cumulus.cli.up import up

        return asyncio.run(up(args, demo=args.command == "demo"))
    if args.command in SERVICES:
        return _service(args)
    if args.command == "worker":
        from services.worker import main as worker

        return worker(["--config", args.config] if args.config else [])
    if args.command in ("run", "submit"):
        from cumulus.cli.run import run, target_of

        return asyncio.run(run(args, target_of(args)))
    if args.command in ("users", "certs"):
        from cumulus.cli import access

        return access.users(args) if args.command == "users" else access.certs(args)
    if args.command == "nats-config":
        from cumulus.cli.natsconfig import nats_config

        return nats_config(args)
    if args.command == "secrets":
        from cumulus.cli.access import secrets

        return asyncio.run(secrets(args))
    if args.command == "events":
        from cumulus.cli.events import tail

        return asyncio.run(tail(args))
    if args.command in ("download", "profile", "completion"):
        return _client_tools(args)
    if args.command == "doctor":
        from cumulus.cli.doctor import doctor

        return asyncio.run(doctor(args))
    if args.command == "dashboard":
        from cumulus.cli.dashboard import dashboard

        return asyncio.run(dashboard(args))
    return _views(args)


def _views(args: argparse.Namespace) -> int:
    """The read-only views; `health --service NAME` asks one service (cumulus/cli/health.py)."""
    if args.command == "health":
        from cumulus.cli.health import service_health, wants_service

        if wants_service(args):
            return asyncio.run(service_health(args))
    from cumulus.cli.views import look

    return asyncio.run(look(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (UsageError, PackagingError) as exc:
        print(f"cumulus: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CumulusError as exc:
        print(f"cumulus: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_CODES.get(exc.code, EXIT_FAILED)
    except (KeyboardInterrupt, Interrupted):
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
