"""Requirements as PEP 508 specifiers, never as pip options: one rule for the gateway and the job.

A requirement is a project name with optional extras, version specifiers and markers
(`numpy>=1.26`, `torch[cuda]==2.3; python_version >= "3.10"`). Refused: anything starting
with `-` (`-r/etc/shadow`, `--index-url …`, `-e .`), direct references (`name @ url`), paths
and URLs (which are not PEP 508 names), control characters, and lines or lists beyond the
bounds below. What passes is returned in its canonical form, `str(Requirement(line))`, which is
what pip receives, after `--`, in an empty working directory.

The gateway checks every submit (services/gateway/policy.py) and the in-job runner checks
again before it runs pip (defence in depth). The job image has no `packaging` of its own, so
there pip's vendored copy parses (pip is what installs, so it is always there).
"""

from __future__ import annotations

from typing import Any

MAX_REQUIREMENTS = 256
"""Requirements one job may list."""
MAX_LINE = 1000
"""Characters one requirement may take."""


class RequirementError(ValueError):
    """A requirement line that is not a plain PEP 508 specifier; the message names it."""


def _parser() -> Any:
    """`packaging.requirements` (the gateway's), else pip's vendored copy (the job image's)."""
    try:
        from packaging import requirements
    except ImportError:  # pragma: no cover - the job image, where only pip brings it
        from pip._vendor.packaging import requirements  # type: ignore[no-redef]
    return requirements


def canonical(line: object) -> str:
    """The canonical form of one requirement, or RequirementError saying what is wrong."""
    if not isinstance(line, str):
        raise RequirementError(f"requirement {line!r} is not a string")
    text = line.strip()
    shown = repr(text[:80] + ("…" if len(text) > 80 else ""))
    if not text:
        raise RequirementError("empty requirement: list project names such as 'numpy>=1.26'")
    if len(text) > MAX_LINE:
        raise RequirementError(f"requirement {shown} is longer than {MAX_LINE} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise RequirementError(f"requirement {shown} contains control characters")
    if text.startswith("-"):
        raise RequirementError(
            f"requirement {shown} is a pip option; only PEP 508 requirements are accepted "
            "(the workers choose the index or wheelhouse)"
        )
    parser = _parser()
    try:
        req = parser.Requirement(text)
    except parser.InvalidRequirement as exc:
        raise RequirementError(
            f"requirement {shown} is not a PEP 508 requirement (name[extras] specifiers; "
            f"markers); paths and URLs are not accepted: {exc}"
        ) from None
    if req.url:
        raise RequirementError(
            f"requirement {shown} is a direct reference (name @ url); only names and "
            "versions from the workers' index or wheelhouse are accepted"
        )
    return str(req)


def canonical_list(lines: object) -> list[str]:
    """Every requirement in canonical form; RequirementError naming the first bad one."""
    if isinstance(lines, str) or not isinstance(lines, list | tuple):
        raise RequirementError("requirements must be a list of strings")
    if len(lines) > MAX_REQUIREMENTS:
        raise RequirementError(
            f"{len(lines)} requirements listed; at most {MAX_REQUIREMENTS} are accepted"
        )
    return [canonical(line) for line in lines]
