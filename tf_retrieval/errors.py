"""The library's user errors: one base type, `RetrievalError`, for everything a user can cause and fix.

Bad input, missing files and mismatched artefacts raise a subclass; the CLI prints these as one line
(`tfr: error: ...`) and the web API as a 4xx JSON answer. Any other exception is a bug and keeps its traceback.
The subclasses also derive from the matching built-in type, so `except ValueError` / `except FileNotFoundError`
keep working.
"""
from __future__ import annotations


class RetrievalError(Exception):
    """Something the user can fix: bad input, a missing file, artefacts that do not belong together."""


class InvalidInputError(RetrievalError, ValueError):
    """A value, file content or argument that is not acceptable (the message says what is expected)."""


class MissingError(RetrievalError, FileNotFoundError):
    """A file, folder, index bundle, model or run that does not exist (the message says where it looked)."""


class PortUnavailableError(RetrievalError, OSError):
    """A server cannot listen where it was asked to: the port is in use or the address is not this machine's."""


class ModelMismatchError(InvalidInputError):
    """Artefacts of different models used together (e.g. an index queried with another model's embeddings)."""


class UnknownIdError(RetrievalError, KeyError):
    """Ids (index ids, image ids) that are not there; the message lists some of them."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(RetrievalError, ImportError):
    """An optional dependency (an extra such as scann, the web page or keras-tuner) is not installed."""
