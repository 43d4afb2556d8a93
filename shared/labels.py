"""A job's name, tags and target: how a user finds it again (`cumulus jobs --name/--tag`).

The rules live here once, for the SDK (which checks before it uploads anything) and the
gateway (which checks every submit):

    name    at most MAX_NAME characters: letters, digits, '.', '_' and '-', starting with a
            letter or digit; "" for none. Names need not be unique.
    tags    at most MAX_TAGS pairs; a key is 1-MAX_TAG_KEY characters of letters, digits, '.',
            '_', '-' and '/', starting with a letter or digit; a value is at most
            MAX_TAG_VALUE characters, printable (no control characters).
    target  what the user ran, as the SDK names it (`train.py`, `pkg.mod:fit`): at most
            MAX_TARGET characters without control characters. Shown, never trusted.

Each check raises InvalidArgument naming the field and the rule.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

from shared.errors import InvalidArgument, shown

MAX_NAME = 64
MAX_TAGS = 16
MAX_TAG_KEY = 63
MAX_TAG_VALUE = 128
MAX_TARGET = 256

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


def _printable(text: str) -> bool:
    return text.isprintable()


def check_name(name: object) -> str:
    """The job's name, if it follows the rule ("" for none)."""
    if not isinstance(name, str):
        raise InvalidArgument("name must be a string", field="name")
    if not name:
        return ""
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"Invalid job name {shown(repr(name))}: at most {MAX_NAME} letters, digits, '.', "
            "'_' and '-', starting with a letter or digit",
            field="name",
        )
    return name


def check_tags(tags: object) -> dict[str, str]:
    """The job's tags, if there are at most MAX_TAGS and each key and value follows the rule."""
    if not isinstance(tags, Mapping):
        raise InvalidArgument("tags must map keys to string values", field="tags")
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(
            f"A job may have at most {MAX_TAGS} tags ({len(tags)} given)", field="tags"
        )
    out: dict[str, str] = {}
    for key, value in tags.items():
        if not isinstance(key, str) or len(key) > MAX_TAG_KEY or not _KEY.fullmatch(key):
            raise InvalidArgument(
                f"Invalid tag key {shown(repr(key))}: 1 to {MAX_TAG_KEY} letters, digits, '.', "
                "'_', '-' and '/', starting with a letter or digit",
                field="tags",
            )
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE or not _printable(value):
            raise InvalidArgument(
                f"Invalid value for tag {key}: {shown(repr(value))}; a string of at most "
                f"{MAX_TAG_VALUE} printable characters",
                field="tags",
            )
        out[key] = value
    return out


def check_target(target: object) -> str:
    """What the job runs, as the client named it, if it is short, printable text."""
    if not isinstance(target, str):
        raise InvalidArgument("target must be a string", field="target")
    if len(target) > MAX_TARGET or not _printable(target):
        raise InvalidArgument(
            f"Invalid target {shown(repr(target))}: at most {MAX_TARGET} printable characters",
            field="target",
        )
    return target


def parse_tag(text: str) -> tuple[str, str | None]:
    """`key=value` -> (key, value); `key` alone -> (key, None): any value (a filter)."""
    key, eq, value = text.partition("=")
    return key, (value if eq else None)


def tags_match(tags: Mapping[str, str], wanted: Mapping[str, str | None]) -> bool:
    """Every wanted tag is there (with its value, where one is given)."""
    return all(
        key in tags and (value is None or tags[key] == value) for key, value in wanted.items()
    )


def name_matches(name: str, pattern: str) -> bool:
    """`pattern` is the name itself or a shell-style pattern (`train-*`); "" matches any."""
    return not pattern or fnmatch.fnmatchcase(name, pattern)


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_age(text: str) -> float:
    """`90`, `90s`, `15m`, `1h`, `2d`, `1w` -> seconds (positive)."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:], 0.0) if value else 0.0
    number = value[:-1] if unit else value
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise InvalidArgument(
            f"Invalid age {shown(repr(text))}: a positive number of seconds, or with a unit: "
            "90s, 15m, 1h, 2d, 1w",
            field="since",
        )
    return seconds
