"""Profiles: where a client finds its cluster and its credentials.

A profile is a credentials file (shared/auth.py: identity, nkey seed, URL, TLS files, mode
0600). `Client(profile=...)`, `cumulus --profile` and `$CUMULUS_PROFILE` take a name (a file
`<home>/profiles/<name>.json`, home being `$CUMULUS_HOME` or `~/.cumulus`) or a path. With none
given, the profile `default` is used where it exists: `cumulus up` writes it, so a client on the
same machine needs no set-up.

Named profiles live in `~/.config/cumulus/config.toml` (`$XDG_CONFIG_HOME/cumulus/`): each a
table `[profiles.NAME]` with `url`, `credentials` (a credentials file), `user`, and the
defaults `gpu` and `duration` of `cumulus run`; a top-level `default = "NAME"` (written by
`cumulus profile use NAME`) picks the one used when none is named. A name found there wins
over a credentials file of the same name; any other name or path is a credentials file.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from shared import auth
from shared.errors import ConfigError

KEYS = ("url", "credentials", "user", "gpu", "duration")
"""What a profile of config.toml may say."""


@dataclass(frozen=True)
class Named:
    """One `[profiles.NAME]` table of config.toml."""

    name: str
    url: str = ""
    credentials: str = ""
    """A credentials file (`cumulus users add NAME --out FILE`); empty: no identity."""
    user: str = ""
    gpu: float | str | None = None
    """`cumulus run`'s GPU amount when neither `--gpu` nor `@remote(gpu=...)` gives one."""
    duration: int | None = None
    """`cumulus run`'s duration (seconds) when neither `--duration` nor `@remote` gives one."""


def config_file() -> Path:
    """`$XDG_CONFIG_HOME/cumulus/config.toml`, else `~/.config/cumulus/config.toml`."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "cumulus" / "config.toml"


def load_config() -> dict[str, Any]:
    """config.toml as a table ({} when there is none); ConfigError when it is not TOML."""
    path = config_file()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Cannot read {path}: {exc}", key="profile") from None


def named_profiles() -> dict[str, Named]:
    """Every profile of config.toml, by name; ConfigError naming a bad one."""
    tables = load_config().get("profiles", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{config_file()}: `profiles` must be tables", key="profile")
    out: dict[str, Named] = {}
    for name, table in tables.items():
        where = f"{config_file()} [profiles.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table", key="profile")
        unknown = sorted(set(table) - set(KEYS))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r}; a profile has {', '.join(KEYS)}",
                key="profile",
            )
        try:
            out[name] = msgspec.convert({"name": name, **table}, Named)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{where}: {exc}", key="profile") from None
    return out


def default_name() -> str:
    """config.toml's `default` ("" when it names none)."""
    value = load_config().get("default", "")
    return value if isinstance(value, str) else ""


def named(profile: str | None) -> Named | None:
    """The config.toml profile `profile` (else `$CUMULUS_PROFILE`, else the file's
    `default`) stands for; None when it names a credentials file instead, or none at all."""
    chosen = profile or os.environ.get("CUMULUS_PROFILE") or default_name()
    if not chosen or os.sep in chosen:
        return None
    return named_profiles().get(chosen)


def job_defaults(profile: str | None) -> dict[str, Any]:
    """`gpu` and `duration` the config.toml profile in use gives `cumulus run` (only those
    it sets)."""
    found = named(profile)
    if found is None:
        return {}
    pairs = {"gpu": found.gpu, "duration": found.duration}
    return {key: value for key, value in pairs.items() if value is not None}


def use(name: str) -> Path:
    """Make `name` the default profile: config.toml's top-level `default`, the rest of the
    file left as it is."""
    if name not in named_profiles() and not path_of(name).exists():
        raise ConfigError(
            f"No profile {name!r}: neither [profiles.{name}] in {config_file()} nor "
            f"{path_of(name)}",
            key="profile",
        )
    path = config_file()
    text = path.read_text() if path.exists() else ""
    line = f"default = {_quoted(name)}\n"
    top_end = re.search(r"^\s*\[", text, re.MULTILINE)
    head, rest = (text[: top_end.start()], text[top_end.start() :]) if top_end else (text, "")
    found = re.search(r"^\s*default\s*=.*\n?", head, re.MULTILINE)
    head = head[: found.start()] + line + head[found.end() :] if found else line + head
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + rest)
    return path


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def home() -> Path:
    return Path(os.path.expanduser(os.environ.get("CUMULUS_HOME") or "~/.cumulus"))


def path_of(profile: str) -> Path:
    if os.sep in profile or profile.endswith(".json"):
        return Path(os.path.expanduser(profile))
    return home() / "profiles" / f"{profile}.json"


def resolve(profile: str | None) -> tuple[auth.Credentials | None, bool]:
    """(credentials, explicit) for `profile`, `$CUMULUS_PROFILE`, else config.toml's
    `default`, else the `default` profile if there is one; (None, False) when there is none
    at all. A config.toml profile's `url` replaces its credentials' own."""
    chosen = profile or os.environ.get("CUMULUS_PROFILE")
    explicit = bool(chosen)
    found = named(profile)
    if found is not None:
        if not found.credentials:
            return None, explicit
        creds = auth.load_credentials(path_of(found.credentials))
        if found.url:
            creds = msgspec.structs.replace(creds, url=found.url)
        return creds, explicit
    chosen = chosen or default_name()  # config.toml's `default` may name a credentials file
    if chosen:
        path = path_of(chosen)
        if not path.exists():
            raise ConfigError(
                f"No profile {chosen!r} ({path}): `cumulus up` writes `default`; an operator "
                "gives you yours with `cumulus users add NAME`",
                key="profile",
            )
        return auth.load_credentials(path), explicit
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
