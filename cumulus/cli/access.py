"""`cumulus users`, `cumulus certs`, `cumulus secrets`: identities, certificates and secrets.

`cumulus up` records the running stack in `$CUMULUS_HOME/stack.json` (0600): its data
directory (where the identities are), its nats-server's pid and config file, its URL and CA.
`cumulus users add` needs that record and the operator's profile (`admin`, which `cumulus up`
writes): it makes the identity in the stack's auth directory, rewrites the server's
authorization and has nats-server reload it (SIGHUP to the recorded pid, after checking that
the pid is still that server; never by name).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import msgspec

from cumulus import AsyncClient, _profiles
from cumulus.cli.exits import EXIT_OK, UsageError
from shared import auth
from shared.errors import PermissionDenied, Unavailable

RECORD = "stack.json"


class StackRecord(msgspec.Struct, kw_only=True):
    """What `cumulus up` leaves for the operator's other commands."""

    data_dir: str
    nats_pid: int
    nats_config: str
    url: str
    tls: bool = False
    ca_dir: str = ""


def record_path() -> Path:
    return _profiles.home() / RECORD


def write_record(record: StackRecord) -> Path:
    path = record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(record)))
    os.replace(path.with_suffix(".tmp"), path)
    return path


def remove_record(nats_pid: int) -> None:
    """Forget the record if it is still this stack's (another `up` may have replaced it)."""
    with contextlib.suppress(OSError, msgspec.DecodeError):
        if msgspec.json.decode(record_path().read_bytes(), type=StackRecord).nats_pid == nats_pid:
            record_path().unlink()


def _is_server(record: StackRecord) -> bool:
    """The recorded pid is still the stack's nats-server (not a process that reused it)."""
    try:
        argv = Path(f"/proc/{record.nats_pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return record.nats_config.encode() in argv


def running() -> StackRecord:
    """The stack `cumulus up` runs on this machine, or a UsageError that says what to do."""
    path = record_path()
    try:
        record = msgspec.json.decode(path.read_bytes(), type=StackRecord)
    except FileNotFoundError:
        raise UsageError(
            f"no running stack recorded in {path}: start one with `cumulus up` (with the same "
            "$CUMULUS_HOME)"
        ) from None
    except (OSError, msgspec.DecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if not _is_server(record):
        raise Unavailable(
            f"the stack recorded in {path} (nats-server pid {record.nats_pid}) is not running: "
            "start it with `cumulus up`"
        )
    return record


def _auth_dir(record: StackRecord) -> auth.AuthDir:
    root = Path(record.data_dir) / "auth"
    if not record.tls:
        return auth.AuthDir(root, url=record.url)
    ca_dir = Path(record.ca_dir) if record.ca_dir else root / "tls"
    return auth.AuthDir(
        root, url=record.url, tls=auth.TlsFiles(ca=str(ca_dir / "ca.crt")), ca_dir=ca_dir
    )


def _operator(args: argparse.Namespace, identities: auth.AuthDir) -> None:
    """Only the holder of the stack's admin identity manages its users."""
    creds, _ = _profiles.resolve(args.profile or "admin")
    admins = [c for c in identities.identities() if c.role == "admin"]
    if creds is None or creds.role != "admin" or creds.seed not in {c.seed for c in admins}:
        who = f"{creds.name!r} (role {creds.role})" if creds else "no identity"
        raise PermissionDenied(
            f"`cumulus users` needs the operator's profile of this stack (`admin`, which "
            f"`cumulus up` writes); this profile is {who}"
        )


def reload_server(record: StackRecord, identities: auth.AuthDir) -> None:
    """Put the identities into the server's config and have it reload (SIGHUP)."""
    config_path = Path(record.nats_config)
    config = json.loads(config_path.read_text())
    config["authorization"] = identities.authorization()
    tmp = config_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, config_path)
    if not _is_server(record):
        raise Unavailable(f"nats-server (pid {record.nats_pid}) is no longer running")
    os.kill(record.nats_pid, signal.SIGHUP)
    time.sleep(0.3)  # the server applies a reload in well under this


def _bundle(source: Path, out: Path) -> Path:
    """Copy credentials to `out` (0600) with their TLS files beside it, named relatively."""
    creds = auth.load_credentials(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    if creds.tls is not None:
        files = {"ca": creds.tls.ca, "cert": creds.tls.cert, "key": creds.tls.key}
        suffix = {"ca": "-ca.crt", "cert": ".crt", "key": ".key"}
        named: dict[str, str] = {}
        for kind, file in files.items():
            if file:
                target = out.with_name(out.stem + suffix[kind])
                shutil.copyfile(file, target)
                os.chmod(target, 0o600 if kind == "key" else 0o644)
                named[kind] = target.name
        creds.tls = auth.TlsFiles(**named)
    auth.write_credentials(out, creds)
    return out


def _fleet_auth_dir(args: argparse.Namespace) -> auth.AuthDir:
    """A fleet's identities (`--auth-dir`), kept apart from any running stack: whoever can
    write that directory is its operator."""
    root = Path(args.auth_dir).absolute()
    url = getattr(args, "url", None) or ""
    ca = getattr(args, "ca_dir", None)
    if args.verb == "add" and not url:
        raise UsageError("--url is needed with --auth-dir (the bus's servers, comma-separated)")
    if ca is None:
        return auth.AuthDir(root, url=url)
    ca_dir = Path(ca).absolute()
    if not (ca_dir / "ca.key").exists():
        raise UsageError(f"no CA in {ca_dir} (ca.crt, ca.key): `cumulus certs init {ca_dir}`")
    return auth.AuthDir(root, url=url, tls=auth.TlsFiles(ca=str(ca_dir / "ca.crt")), ca_dir=ca_dir)


def users(args: argparse.Namespace) -> int:
    record: StackRecord | None = None
    if args.auth_dir:
        identities = _fleet_auth_dir(args)
    else:
        if args.verb == "add" and args.role not in ("user", "observer"):
            raise UsageError(
                f"--role {args.role} is for a fleet's identities: give --auth-dir (docs/deploy.md)"
            )
        record = running()
        identities = _auth_dir(record)
        _operator(args, identities)
    if args.verb == "list":
        rows = [
            {"name": c.name, "role": c.role, "file": str(identities.path(c.role, c.name))}
            for c in sorted(identities.identities(), key=lambda c: (c.role, c.name))
        ]
        if args.json:
            print(json.dumps(rows, indent=2))
        for row in [] if args.json else rows:
            print(f"{row['role']:<10} {row['name']:<24} {row['file']}")
        return EXIT_OK
    path = identities.ensure(args.role, args.name, [args.name] if args.role == "worker" else [])
    if record is not None:
        reload_server(record, identities)
    else:
        print(
            "  the bus accepts it once every server's config is written again "
            "(`cumulus nats-config … --auth-dir`) and reloaded (SIGHUP)",
            file=sys.stderr,
        )
    if args.out:
        path = _bundle(path, Path(args.out).absolute())
    print(f"{args.role} {args.name}: credentials in {path} (0600)")
    print(f"  cumulus --profile {path} run …   # or copy it to ~/.cumulus/profiles/default.json")
    return EXIT_OK


def certs(args: argparse.Namespace) -> int:
    from shared import certs as certs_mod

    if args.verb == "init":
        made = certs_mod.make_ca(Path(args.dir))
        print(f"CA: {made.cert} (share it); key {made.key} (0600: keep it on the operator's host)")
        return EXIT_OK
    made = certs_mod.issue(
        Path(args.dir),
        args.name,
        server=args.server,
        hosts=args.host,
        out=Path(args.out) if args.out else None,
    )
    kind = "server" if args.server else "client"
    print(f"{kind} certificate {made.cert}, key {made.key} (0600)")
    return EXIT_OK


def _secret_value(args: argparse.Namespace) -> str:
    """From --from-file as it is, else stdin without its last newline (`echo x |`)."""
    if args.from_file:
        return Path(args.from_file).read_text()
    if sys.stdin.isatty():
        print(f"value of {args.name} (then Ctrl-D):", file=sys.stderr)
    return sys.stdin.read().removesuffix("\n")


async def secrets(args: argparse.Namespace) -> int:
    async with AsyncClient(args.url, args.user, profile=args.profile) as client:
        if args.verb == "set":
            await client.set_secret(args.name, _secret_value(args))
            print(f"secret {args.name} stored", file=sys.stderr)
        elif args.verb == "list":
            for name in await client.secrets():
                print(name)
        else:
            await client.delete_secret(args.name)
            print(f"secret {args.name} deleted", file=sys.stderr)
    return EXIT_OK
