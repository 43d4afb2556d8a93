"""Profiles: where a client finds its cluster and its credentials.

A profile is a credentials file (shared/auth.py: identity, nkey seed, URL, TLS files, mode
0600). `Client(profile=...)`, `cumulus --profile` and `$CUMULUS_PROFILE` take a name (a file
`<home>/profiles/<name>.json`, home being `$CUMULUS_HOME` or `~/.cumulus`) or a path. With none
given, the profile `default` is used where it exists: `cumulus up` writes it, so a client on the
same machine needs no set-up.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared import auth
from shared.errors import ConfigError


def home() -> Path:
    return Path(os.path.expanduser(os.environ.get("CUMULUS_HOME") or "~/.cumulus"))


def path_of(profile: str) -> Path:
    if os.sep in profile or profile.endswith(".json"):
        return Path(os.path.expanduser(profile))
    return home() / "profiles" / f"{profile}.json"


def resolve(profile: str | None) -> tuple[auth.Credentials | None, bool]:
    """(credentials, explicit) for `profile`, `$CUMULUS_PROFILE`, else the `default` profile
    if there is one; (None, False) when there is none at all."""
    chosen = profile or os.environ.get("CUMULUS_PROFILE")
    if chosen:
        path = path_of(chosen)
        if not path.exists():
            raise ConfigError(
                f"No profile {chosen!r} ({path}): `cumulus up` writes `default`; an operator "
                "gives you yours with `cumulus users add NAME`",
                key="profile",
            )
        return auth.load_credentials(path), True
    default = path_of("default")
    if default.exists():
        return auth.load_credentials(default), False
    return None, False


def save(name: str, creds: auth.Credentials) -> Path:
    """Write a profile (0600) under `<home>/profiles/`."""
    path = path_of(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    auth.write_credentials(path, creds)
    return path
