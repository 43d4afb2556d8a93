"""`cumulus profile list|show|use NAME`: the profiles a client can use.

Named profiles are tables of `~/.config/cumulus/config.toml` (url, credentials, user, and
`cumulus run`'s default gpu and duration); credentials files under `$CUMULUS_HOME/profiles/`
(`cumulus up` writes `default`) are profiles too. `use` makes one the default.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from cumulus import _profiles
from cumulus.cli.exits import EXIT_OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "profile",
        help="your profiles: list, show one, pick the default",
        description="Profiles: [profiles.NAME] tables of ~/.config/cumulus/config.toml, "
        "and credentials files under $CUMULUS_HOME/profiles/.",
    )
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    q = verbs.add_parser("list", help="every profile; * marks the one in use")
    q.add_argument("--json", action="store_true", help="print them as JSON")
    q = verbs.add_parser("show", help="one profile's settings (never its secret key)")
    q.add_argument("name", nargs="?", help="default: the one in use")
    q.add_argument("--json", action="store_true", help="print it as JSON")
    q = verbs.add_parser("use", help="make NAME the default profile (config.toml `default`)")
    q.add_argument("name")


def in_use(args: argparse.Namespace) -> str:
    """The name of the profile this command runs with."""
    return args.profile or _profiles.default_name() or "default"


def _listing() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    named = _profiles.named_profiles()
    for name, found in sorted(named.items()):
        rows.append({"name": name, "kind": "config.toml", "url": found.url, "user": found.user})
    folder = _profiles.home() / "profiles"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.stem not in named:
            rows.append({"name": path.stem, "kind": "credentials", "url": "", "user": ""})
    return rows


def _details(name: str) -> dict[str, Any]:
    found = _profiles.named_profiles().get(name)
    if found is not None:
        return {
            "name": name,
            "kind": "config.toml",
            "file": str(_profiles.config_file()),
            "url": found.url,
            "credentials": found.credentials,
            "user": found.user,
            "gpu": found.gpu,
            "duration": found.duration,
        }
    path = _profiles.path_of(name)
    creds, _ = _profiles.resolve(name)
    assert creds is not None  # resolve raises for a missing file
    return {
        "name": name,
        "kind": "credentials",
        "file": str(path),
        "url": creds.url,
        "identity": creds.name,
        "role": creds.role,
    }


def profile(args: argparse.Namespace) -> int:
    if args.verb == "use":
        path = _profiles.use(args.name)
        print(f"profile {args.name} is the default now ({path})")
        return EXIT_OK
    if args.verb == "show":
        details = _details(args.name or in_use(args))
        if args.json:
            print(json.dumps(details))
        else:
            for key, value in details.items():
                if value not in (None, ""):
                    print(f"{key}: {value}")
        return EXIT_OK
    rows = _listing()
    current = in_use(args)
    if args.json:
        print(json.dumps({"profiles": rows, "in_use": current}))
        return EXIT_OK
    if not rows:
        file = _profiles.config_file()
        print(f"no profiles: `cumulus up` writes `default`; add [profiles.NAME] to {file}")
    for row in rows:
        mark = "*" if row["name"] == current else " "
        where = " ".join(str(row[k]) for k in ("url", "user") if row[k])
        print(f"{mark} {row['name']:<16} {row['kind']:<12} {where}".rstrip())
    return EXIT_OK
