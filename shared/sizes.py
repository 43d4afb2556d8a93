"""Byte sizes as settings write them, Docker's way: "512m", "8g", "1g", "16GiB", "1073741824".

One parser for every size setting (`container.memory`, `container.tmp_size`). The suffixes
k, m, g, t are powers of 1024, with or without a trailing "i"/"b" ("8g" == "8gb" == "8GiB"),
as `docker run --memory` reads them.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?)i?b?\s*")


def parse_size(text: str) -> int:
    """'512m', '8g', '16GiB', '1073741824' -> bytes; ValueError naming the text otherwise."""
    match = _SIZE.fullmatch(text.lower())
    if not match:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 512m or 8g)")
    power = " kmgt".index(match[2] or " ")
    return int(match[1]) * int(1024**power)
