"""A job's own image on the container backends, and the operator's allow-list of them.

A job may ask for an image other than the job image (`image="cumulus-job-torch:2.4"`,
`cumulus run --image …`). The image must hold the in-job runner, so it is built `FROM` the
job image (`cumulus-job`). The gateway accepts a well-formed reference only if the operator's
`policy.images` allows it (references or shell patterns, `team/*:*`; the default job image
is always allowed): an image is code that runs on the workers, with the job's GPU share, so
the operator chooses which. The worker's runner takes the image from its own engine only (no
registry pull) and fails the job, naming the image, when it is not there. The process backend
runs no image: it refuses such a job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fnmatch import fnmatchcase

from shared.errors import ConfigError, InvalidArgument, PermissionDenied

MAX_REFERENCE = 255
"""Characters of an image reference."""
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?$")
_TAG = re.compile(r"^\w[\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


def well_formed(image: str) -> bool:
    """Docker's reference grammar: `[registry[:port]/]name[/name…][:tag][@sha256:digest]`."""
    rest, at, digest = image.partition("@")
    if at and not _DIGEST.match(digest):
        return False
    path, sep, last = rest.rpartition("/")
    name, colon, tag = last.partition(":")
    if colon and not _TAG.match(tag):
        return False
    parts = [*path.split("/"), name] if sep else [name]
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        if not _DOMAIN.match(parts[0]):
            return False
        parts = parts[1:]
    return all(_COMPONENT.match(part) for part in parts)


def check_reference(image: object) -> str:
    """`image` if it is a well-formed image reference ("" for the default image);
    InvalidArgument saying what one looks like."""
    if not isinstance(image, str):
        raise InvalidArgument(f"image must be a string, not {image!r}", field="image")
    if not image:
        return ""
    if len(image) > MAX_REFERENCE or not well_formed(image):
        shown = image if len(image) <= 80 else image[:80] + "…"
        raise InvalidArgument(
            f"Invalid image {shown!r}: a Docker image reference such as "
            "cumulus-job-torch:2.4 or registry.example:5000/team/img@sha256:<digest> "
            "(lower-case name, optional tag and digest)",
            field="image",
        )
    return image


def patterns(setting: str | Sequence[str]) -> list[str]:
    """`policy.images` as a list (a string is comma-separated); ConfigError for an empty
    entry or one that is not a string."""
    items = setting.split(",") if isinstance(setting, str) else list(setting)
    if isinstance(setting, str):
        items = [item.strip() for item in items if item.strip()]
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(
                f"Invalid policy.images entry {item!r}: an image reference or a shell "
                "pattern such as team/*:*",
                key="policy.images",
            )
    return [item.strip() for item in items]


def _tagged(image: str) -> str:
    """`image` with `:latest` when it names neither a tag nor a digest (Docker's default)."""
    last = image.rsplit("/", 1)[-1]
    return image if ":" in last or "@" in last else image + ":latest"


def allowed(image: str, setting: str | Sequence[str], default: str) -> bool:
    """Whether `image` is the default job image or matches an entry of `policy.images`."""
    names = {image, _tagged(image)}
    if _tagged(default) in names:
        return True
    return any(fnmatchcase(name, pattern) for pattern in patterns(setting) for name in names)


def check_allowed(image: str, setting: str | Sequence[str], default: str, user: str) -> str:
    """`image` if well formed and allowed; PermissionDenied naming it and the setting."""
    image = check_reference(image)
    if image and not allowed(image, setting, default):
        raise PermissionDenied(
            f"Image {image} is not allowed for user {user}: the operator's policy.images "
            f'does not list it (an operator allows it with policy.images: ["{image}"] or '
            "a pattern such as team/*; the image must be built FROM the job image)"
        )
    return image


def refuse_without_containers(image: str, backend: str) -> None:
    """A job with its own image cannot run on the process backend: InvalidArgument."""
    if image and backend == "process":
        raise InvalidArgument(
            f"image= needs the docker or swarm backend; this worker runs jobs as processes "
            f"(worker.backend), so image {image} cannot be used",
            field="image",
        )
