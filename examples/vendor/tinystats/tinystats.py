"""A tiny pure-Python dependency for the script example (built into a wheel offline)."""

__version__ = "0.1.0"


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def stdev(xs: list[float]) -> float:
    m = mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
