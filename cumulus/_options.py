"""`JobOptions`: what a job asks of the cluster, validated once, wherever a job is made.

The client's `submit`/`run`/`map`, `submit_script` and `@remote` all take the same keyword
arguments (`gpu=0.5, duration=600, …`); each builds one `JobOptions`, so the defaults and the
checks live here only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypedDict

from shared import images, labels, volumes
from shared.errors import InvalidArgument
from shared.events import MAX_RETRIES
from shared.gpu import GpuRequest

Packaging = Literal["auto", "pickle", "source"]


def gpu_tenths(value: object) -> int:
    """The GPU amount in exact tenths, or InvalidGpuAmount with the seed's message.

    The gateway's own rule (`shared.gpu`, which is cumulus_core's), so the SDK, the gateway
    and chronos_cli can never disagree on what is valid.
    """
    return GpuRequest.parse(value).tenths


class MapOptionArgs(TypedDict, total=False):
    """The keyword form of `JobOptions` but `retries` (for `map`, whose own `retries` is its
    inputs')."""

    gpu: float | str
    duration: int
    requirements: Sequence[str]
    priority: int
    env: Mapping[str, str] | None
    packaging: Packaging | None
    network: bool | None
    secrets: Sequence[str] | None
    name: str | None
    tags: Mapping[str, str] | None
    volumes: Mapping[str, str] | None
    image: str | None


class JobOptionArgs(MapOptionArgs, total=False):
    """The keyword form of `JobOptions` (for `**options`)."""

    retries: int | None


@dataclass(frozen=True)
class JobOptions:
    """What one job asks for. Frozen; `replace()` makes a changed copy.

    The GPU amount is checked here, so a bad one fails before anything is uploaded; the
    gateway checks the duration against its configured bounds (60-86,400 s by default).
    """

    gpu: float | str = 0.5
    """0.1-0.9 of one device (steps of 0.1) or a whole 1-8 devices."""
    duration: int = 3600
    """Seconds the job may run; it is stopped (DEADLINE_EXCEEDED) after that."""
    requirements: Sequence[str] = ()
    """pip requirements installed in the job before it runs."""
    priority: int = 0
    """Higher goes first when jobs wait for capacity."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment variables for the job."""
    packaging: Packaging | None = None
    """How a function travels ("auto", "pickle", "source"); None: the client's choice."""
    network: bool = False
    """The job gets network access; the operator's policy must allow it for the user
    (`policy.network`), else the submit is PERMISSION_DENIED."""
    secrets: Sequence[str] = ()
    """Names of your secrets (`Client.set_secret`) the job gets as environment variables of
    the same names; their values never appear in its events, logs or status."""
    name: str = ""
    """The job's name, to find it again (`cumulus jobs --name`): at most 64 letters, digits,
    '.', '_' and '-'; need not be unique."""
    tags: Mapping[str, str] = field(default_factory=dict)
    """The job's key=value tags (`cumulus jobs --tag k=v`): at most 16."""
    volumes: Mapping[str, str] = field(default_factory=dict)
    """Folders the operator offers (`container.volumes`) to mount in the job's container,
    {name: where}, e.g. {"datasets": "/data"}; the docker and swarm backends only."""
    image: str = ""
    """The job's own Docker image, built FROM the job image (`cumulus-job`), e.g.
    "cumulus-job-torch:2.4"; the operator must allow it (`policy.images`), else the submit
    is PERMISSION_DENIED. "": the workers' job image. The docker and swarm backends only."""
    retries: int = 0
    """Times the job is run again, as a new attempt, when its code fails (raises or exits
    non-zero): 0-10, after 1 s, 2 s, 4 s, … (at most 60 s). Not after a timeout, a cancel
    or a refusal. Every attempt is in the job's history; its error is the last attempt's."""

    def __post_init__(self) -> None:
        if isinstance(self.requirements, str):  # one string is not a list of requirements
            raise InvalidArgument("requirements must be a list of strings", field="requirements")
        object.__setattr__(self, "requirements", tuple(self.requirements))
        object.__setattr__(self, "env", dict(self.env or {}))
        if isinstance(self.secrets, str):  # one string is one name, not its letters
            object.__setattr__(self, "secrets", (self.secrets,))
        object.__setattr__(self, "secrets", tuple(self.secrets))
        if isinstance(self.tags, Mapping):
            object.__setattr__(self, "tags", dict(self.tags))
        object.__setattr__(self, "volumes", volumes.check_request(self.volumes))
        object.__setattr__(self, "image", images.check_reference(self.image))
        self.validate()

    def validate(self) -> None:
        """Raise InvalidArgument (InvalidGpuAmount for the GPU) naming what is wrong."""
        gpu_tenths(self.gpu)
        if not all(isinstance(r, str) for r in self.requirements):
            raise InvalidArgument("requirements must be a list of strings", field="requirements")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise InvalidArgument("env must map names to string values", field="env")
        if not all(isinstance(name, str) and name for name in self.secrets):
            raise InvalidArgument("secrets must be a list of secret names", field="secrets")
        labels.check_name(self.name)
        labels.check_tags(self.tags)
        if (
            not isinstance(self.retries, int)
            or isinstance(self.retries, bool)
            or not 0 <= self.retries <= MAX_RETRIES
        ):
            raise InvalidArgument(
                f"retries must be a whole number from 0 to {MAX_RETRIES}, not {self.retries!r}",
                field="retries",
            )
        if not isinstance(self.network, bool):
            raise InvalidArgument("network must be True or False", field="network")
        if self.packaging not in (None, "auto", "pickle", "source"):
            raise InvalidArgument(
                f"packaging must be 'auto', 'pickle' or 'source', not {self.packaging!r}",
                field="packaging",
            )

    @property
    def tenths(self) -> int:
        return gpu_tenths(self.gpu)

    def replace(self, **changes: Any) -> JobOptions:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def build(cls, base: JobOptions | None = None, **changes: Any) -> JobOptions:
        """`base` (or the defaults) with the keyword form's changes; None values keep the base."""
        given = {k: v for k, v in changes.items() if v is not None}
        if base is None:
            return cls(**given)
        return base.replace(**given) if given else base
