"""The command line of `cumulus`: one sub-command per operation (docs/cli.md)."""

from __future__ import annotations

import argparse
import os

SERVICES = ("gateway", "scheduler", "partitioner", "runner")


def _stack_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name in ("up", "demo"):
        p = sub.add_parser(
            name,
            help="start the embedded stack" + (", run an example, stop" if name == "demo" else ""),
        )
        p.add_argument("--config", metavar="FILE", help="config file (docs/config.md)")
        p.add_argument("--data-dir")
        p.add_argument(
            "--devices", help="virtual devices per worker (default: the config's, else 2x16GiB)"
        )
        p.add_argument(
            "--backend",
            choices=("auto", "process", "docker", "swarm"),
            help="where jobs run: auto = the Docker engine when it holds the job image, "
            "else a process per job (default: the config's, else auto)",
        )
        p.add_argument("--workers", type=int, default=1)
        p.add_argument(
            "--metrics-port",
            type=int,
            metavar="PORT",
            help="Prometheus /metrics: one port per process counting up from PORT, printed "
            "at start; 0 = off (default: the config's metrics_port)",
        )
        p.add_argument("--port", type=int, default=0 if name == "demo" else 4222)
        p.add_argument(
            "--listen",
            default="127.0.0.1",
            metavar="HOST",
            help="address nats-server listens on (default 127.0.0.1); beyond loopback only "
            "with --tls (and never --insecure)",
        )
        p.add_argument(
            "--tls",
            action="store_true",
            help="TLS with a client certificate from every client (mTLS), from the CA in --ca",
        )
        p.add_argument(
            "--ca",
            metavar="DIR",
            help="CA for --tls (`cumulus certs init DIR`; default: <data-dir>/auth/tls, made)",
        )
        p.add_argument(
            "--tls-host",
            action="append",
            default=[],
            metavar="HOST",
            help="a name or address clients use for this host (in the server certificate)",
        )
        p.add_argument(
            "--insecure",
            action="store_true",
            help="an open bus: no identities, no permissions (loopback only; for experiments)",
        )


def _job_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name in ("run", "submit"):
        p = sub.add_parser(
            name,
            help="run a script, directory or module:function"
            + (" and follow it" if name == "run" else ", detached: print its id"),
            description="Options come before the target; what follows the target is its "
            "arguments (for module:function, JSON values or name=value keywords).",
        )
        p.add_argument(
            "--gpu",
            help="0.1-0.9 or a whole 1-8 (default: the function's @remote(gpu=...), else 0.5)",
        )
        p.add_argument(
            "--duration",
            type=int,
            help="seconds, 60-86400 (default: the function's @remote(duration=...), else 3600)",
        )
        p.add_argument(
            "-r",
            "--requirements",
            action="append",
            metavar="FILE",
            help="requirements.txt to install in the job (default: the one beside the script)",
        )
        p.add_argument("--pip", action="append", metavar="SPEC", help="one more requirement")
        p.add_argument("--env", action="append", metavar="NAME=VALUE", help="job environment")
        p.add_argument("--priority", type=int, help="higher goes first when jobs wait (default 0)")
        p.add_argument(
            "--name",
            default="",
            help="a name for the job, to find it again (`cumulus jobs --name`): letters, "
            "digits, '.', '_', '-'",
        )
        p.add_argument(
            "--tag",
            action="append",
            metavar="KEY=VALUE",
            help="a tag on the job (repeatable; `cumulus jobs --tag KEY=VALUE` finds it)",
        )
        p.add_argument(
            "--volume",
            action="append",
            metavar="NAME:PATH",
            help="mount the folder the operator offers as NAME at PATH in the job's container "
            "(repeatable; docker and swarm backends)",
        )
        p.add_argument(
            "--image",
            metavar="REF",
            help="run the job in this Docker image, built FROM the job image; the operator "
            "must allow it (policy.images; docker and swarm backends)",
        )
        p.add_argument(
            "--retries",
            type=int,
            metavar="N",
            help="run the job again, up to N times (0-10), when its code fails; waits 1 s, "
            "2 s, 4 s, … between attempts (default 0)",
        )
        p.add_argument(
            "--secret",
            action="append",
            metavar="NAME",
            help="a secret of yours (`cumulus secrets set`) in the job's environment as NAME "
            "(repeatable)",
        )
        p.add_argument(
            "--network",
            action="store_true",
            help="give the job network access (the operator's policy must allow it)",
        )
        p.add_argument("--working-dir", help="directory shipped with a script (default: its own)")
        p.add_argument(
            "--packaging",
            choices=("auto", "pickle", "source"),
            help="how a function travels (default auto: cloudpickle if the workers' Python "
            "matches)",
        )
        p.add_argument("--json", action="store_true", help="print the outcome as JSON")
        if name == "run":
            p.add_argument("-q", "--quiet", action="store_true", help="no logs, no progress")
        p.add_argument("target", help="script.py, a directory with main.py, or module:function")
        p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the target")
        p.set_defaults(detach=name == "submit", quiet=name == "submit")


def _states() -> list[str]:
    from shared.views import JobStatus

    return [status.lower() for status in JobStatus]


def job_state(text: str) -> str:
    """A job state named on the command line (any case), as the API names it; a usage error
    (exit 2) naming the valid ones for any other word."""
    if text.lower() not in _states():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a job state; use one of: {', '.join(_states())}"
        )
    return text.upper()


def _view_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="a job's status")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("logs", help="a job's output; -f follows it until the job ends")
    p.add_argument("job_id")
    p.add_argument("-f", "--follow", action="store_true")
    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("jobs", help="your jobs, newest first")
    p.add_argument(
        "--status",
        action="append",
        type=job_state,
        help="only jobs in this state (repeatable): " + ", ".join(_states()),
    )
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--name", default="", help="only jobs with this name, or matching train-*")
    p.add_argument(
        "--tag",
        action="append",
        metavar="KEY[=VALUE]",
        help="only jobs with this tag (KEY alone: any value; repeatable: all of them)",
    )
    p.add_argument(
        "--since", metavar="AGE", help="only jobs submitted within AGE: 90s, 15m, 1h, 2d"
    )
    p.add_argument(
        "--user",
        dest="owner",
        metavar="USER",
        help="another user's jobs (an observer's or operator's profile only)",
    )
    p.add_argument(
        "--all-users",
        action="store_true",
        help="every user's jobs (an observer's or operator's profile only)",
    )
    p.add_argument("--json", action="store_true")
    for name, text in (
        ("workers", "workers and their GPU shares"),
        ("health", "API health; --service NAME: one service alive (exit 0) or not (1)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true")
    from cumulus.cli import health

    health.add_options(p)  # the last parser made: `health`
    p = sub.add_parser("events", help="live tail of events, like `nats sub 'jobs.>'`")
    p.add_argument(
        "subject", nargs="?", default="jobs.>", help="jobs.> (history), logs.> (output), results.>"
    )
    p.add_argument("--replay", action="store_true", help="from the stream's first event")
    p.add_argument("--count", type=int, default=0, help="stop after this many")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p = sub.add_parser("dashboard", help="the live web dashboard of your jobs and the workers")
    p.add_argument(
        "--port", type=int, help="default: the config's dashboard.port (8765); 0 = a free port"
    )
    p.add_argument("--bind", default="127.0.0.1", metavar="HOST", help="default 127.0.0.1")


def access_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`cumulus users`, `cumulus certs`, `cumulus secrets` (docs/cli.md, docs/security.md)."""
    users = sub.add_parser("users", help="identities of the running stack (operator)")
    verbs = users.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("add", help="make an identity and have the bus accept it")
    p.add_argument("name")
    p.add_argument(
        "--role",
        choices=("user", "observer", "worker", "gateway", "scheduler", "admin"),
        default="user",
        help="user (default), observer; with --auth-dir also the fleet's own: worker (its "
        "worker id is NAME), gateway, scheduler, admin",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="also write the credentials here (0600), TLS files beside it: a bundle to hand over",
    )
    _fleet_identity_options(p)
    p = verbs.add_parser("list", help="the identities and their credentials files")
    p.add_argument("--json", action="store_true")
    p.add_argument("--auth-dir", metavar="DIR", help="a fleet's identities (as for `add`)")
    certs = sub.add_parser("certs", help="a CA and certificates for TLS (operator)")
    verbs = certs.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("init", help="make a CA in DIR (ca.crt, ca.key 0600)")
    p.add_argument("dir")
    p = verbs.add_parser("issue", help="a server or client certificate signed by DIR's CA")
    p.add_argument("dir")
    p.add_argument("name")
    p.add_argument("--server", action="store_true", help="a server certificate (needs --host)")
    p.add_argument(
        "--host", action="append", default=[], help="a DNS name or IP of the server (repeatable)"
    )
    p.add_argument("--out", metavar="DIR", help="where NAME.crt and NAME.key go (default DIR)")
    secrets = sub.add_parser("secrets", help="your secrets (stored encrypted; `run --secret`)")
    verbs = secrets.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("set", help="store a secret: its value from --from-file or stdin")
    p.add_argument("name")
    p.add_argument("--from-file", metavar="FILE")
    verbs.add_parser("list", help="the names of your secrets (never their values)")
    p = verbs.add_parser("rm", help="delete a secret")
    p.add_argument("name")


def _fleet_identity_options(p: argparse.ArgumentParser) -> None:
    """`users add` for a fleet (docs/deploy.md): its identities in a directory of their own,
    not `cumulus up`'s running stack; the bus's servers take them from `cumulus nats-config`."""
    p.add_argument(
        "--auth-dir",
        metavar="DIR",
        help="a fleet's identities (creds/*.json; made if missing) instead of the running "
        "stack's; then write the servers' configs again (`cumulus nats-config`) and reload them",
    )
    p.add_argument(
        "--url",
        metavar="URLS",
        help="with --auth-dir: the bus the credentials name (every server, comma-separated)",
    )
    p.add_argument(
        "--ca-dir",
        metavar="DIR",
        help="with --auth-dir: the CA (`cumulus certs init`) that issues the identity's client "
        "certificate (mTLS); without it, no TLS",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cumulus")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cumulus",
        description="Share GPUs: run Python on a GPU share.",
        epilog="Exit codes: 0 done; 1 job failed; 2 usage/INVALID_ARGUMENT; 3 NOT_FOUND; "
        "4 DEADLINE_EXCEEDED; 5 CANCELLED; 6 UNAVAILABLE/RESOURCE_EXHAUSTED; "
        "7 PERMISSION_DENIED; 130 interrupted. See docs/cli.md.",
    )
    parser.add_argument(
        "--profile",
        default=os.environ.get("CUMULUS_PROFILE"),
        metavar="NAME|PATH",
        help="who you are and where Cumulus is: a profile name ($CUMULUS_HOME/profiles/NAME"
        ".json) or a credentials file (default $CUMULUS_PROFILE, else `default`, which "
        "`cumulus up` writes)",
    )
    parser.add_argument(
        "--url",
        default=None,
        help="NATS URL (default: the profile's, else $CUMULUS_NATS_URL, else "
        "nats://127.0.0.1:4222)",
    )
    parser.add_argument(
        "--user", default=os.environ.get("CUMULUS_USER"), help="user (default $CUMULUS_USER)"
    )
    parser.add_argument(
        "--version", action="version", version=f"cumulus {_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _stack_commands(sub)
    _job_commands(sub)
    _view_commands(sub)
    access_commands(sub)
    from cumulus.cli import natsconfig

    natsconfig.add_parser(sub)
    from cumulus.cli import completion, doctor, download, profiles

    doctor.add_parser(sub)
    download.add_parser(sub)
    profiles.add_parser(sub)
    completion.add_parser(sub)
    for name in SERVICES:
        p = sub.add_parser(name, help=f"run the {name} service")
        p.add_argument("--config")
    p = sub.add_parser(
        "worker", help="run a worker host's agent: its partitioner and runner in one process"
    )
    p.add_argument("--config", help="YAML config file (default: $CUMULUS_CONFIG)")
    return parser
