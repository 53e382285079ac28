"""argparse types shared by `tfr` (`cli`) and `python -m tf_retrieval.serving`: a bad value is a one-line usage error."""
from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """Counts such as --batch-size, --shards or --max-workers: a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, at least 1, got {text!r}")
    return value


def port(text: str) -> int:
    """--port flags: a TCP port number, 0 to 65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return value


def seconds(text: str) -> float:
    """Durations such as --poll-seconds: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, got {text!r}")
    return value
