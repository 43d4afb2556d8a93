"""Host folders a job may mount on the container backends: the operator's allow-list.

The operator offers folders by name in `container.volumes` (`{name: "/host/path"}`, with
`:ro` at the end for read-only; or, in one string, `name=/host/path[:ro],…`). A job asks for
some of them by name and says where to mount them (`volumes={"datasets": "/data"}`,
`cumulus run --volume datasets:/data`). A user never names a host path: the gateway checks the
request's form, and the worker's runner mounts only what its own operator offers (a name it
does not offer fails the job, naming those it does). The process backend mounts none.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass

from shared.errors import ConfigError, InvalidArgument

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_VOLUMES = 8
RESERVED = ("/job", "/env", "/wheelhouse", "/tmp", "/proc", "/sys", "/dev")
"""Where a volume may not go (nor beneath): the job's own folders and the system's."""


@dataclass(frozen=True)
class Offered:
    """One folder the operator offers."""

    host: str
    read_only: bool


def offered(setting: str | Mapping[str, str]) -> dict[str, Offered]:
    """`container.volumes` as names and folders; ConfigError naming a bad entry."""
    if isinstance(setting, str):
        pairs = [item.partition("=") for item in setting.split(",") if item.strip()]
        if any(not eq for _, eq, _ in pairs):
            raise ConfigError(
                f"Invalid container.volumes: {setting!r}. Use name=/host/path[:ro],…",
                key="container.volumes",
            )
        entries = {name.strip(): value.strip() for name, _, value in pairs}
    else:
        entries = dict(setting)
    out: dict[str, Offered] = {}
    for name, value in entries.items():
        host, read_only = (value[:-3], True) if value.endswith(":ro") else (value, False)
        if not NAME.match(name) or not host.startswith("/"):
            raise ConfigError(
                f"Invalid container.volumes entry {name!r}: {value!r}. A name of letters, "
                "digits, '.', '_', '-' and an absolute host path, `:ro` for read-only",
                key="container.volumes",
            )
        out[name] = Offered(posixpath.normpath(host), read_only)
    return out


def check_request(volumes: Mapping[str, str] | None) -> dict[str, str]:
    """A job's volumes ({name: where in the container}), checked for form; InvalidArgument
    saying what is wrong."""
    wanted = dict(volumes or {})
    if len(wanted) > MAX_VOLUMES:
        raise InvalidArgument(f"A job may mount at most {MAX_VOLUMES} volumes", field="volumes")
    targets: set[str] = set()
    out: dict[str, str] = {}
    for name, target in wanted.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidArgument(
                f"Invalid volume name {name!r}: letters, digits, '.', '_', '-'", field="volumes"
            )
        path = posixpath.normpath(target) if isinstance(target, str) else ""
        if not path.startswith("/") or path == "/" or ".." in target.split("/"):
            raise InvalidArgument(
                f"Invalid mount path {target!r} for volume {name}: an absolute path such as /data",
                field="volumes",
            )
        if any(path == r or path.startswith(r + "/") for r in RESERVED):
            raise InvalidArgument(
                f"Volume {name} cannot be mounted at {path}: {', '.join(RESERVED)} are the "
                "job's own",
                field="volumes",
            )
        if path in targets:
            raise InvalidArgument(f"Two volumes at {path}", field="volumes")
        targets.add(path)
        out[name] = path
    return out


def mounts(
    setting: str | Mapping[str, str], wanted: Mapping[str, str]
) -> list[tuple[str, str, bool]]:
    """(host folder, container path, read-only) for each volume a job asks for; InvalidArgument
    for a name this worker's operator does not offer."""
    if not wanted:
        return []
    offers = offered(setting)
    out: list[tuple[str, str, bool]] = []
    for name, target in check_request(wanted).items():
        found = offers.get(name)
        if found is None:
            names = ", ".join(sorted(offers)) or "none"
            raise InvalidArgument(
                f"Volume {name!r} is not offered on this worker (container.volumes offers: "
                f"{names})",
                field="volumes",
            )
        out.append((found.host, target, found.read_only))
    return out
