"""argparse types shared by `tfr` (`cli`) and `python -m tf_retrieval.serving`: a bad value is a one-line usage error."""
from __future__ import annotations

import argparse
import math


def _whole_number(text: str, low: int, high: float, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """Counts such as --batch-size, --shards or --max-workers: a whole number, at least 1."""
    return _whole_number(text, 1, math.inf, "a whole number, at least 1")


def port(text: str) -> int:
    """--port flags: a TCP port number, 0 to 65535 (0: any free port)."""
    return _whole_number(text, 0, 65535, "a port number from 0 to 65535")


def seconds(text: str) -> float:
    """Durations such as --poll-seconds: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, got {text!r}")
    return value
