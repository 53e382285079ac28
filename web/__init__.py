"""The tf_retrieval search page (`tfr web`): a Flask app (`tf_retrieval.web.app.create_app`) over loaded retrieval engines, served by
waitress.

Flask and waitress are the `web` extra (`pip install tf_retrieval[web]`).
"""
from __future__ import annotations

try:
    import flask  # noqa: F401
    import waitress  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the web page needs Flask and waitress: pip install 'tf_retrieval[web]'") from exc

from tf_retrieval.web.app import class_colour, create_app, create_server, reserve_port, serve

__all__ = ["class_colour", "create_app", "create_server", "reserve_port", "serve"]
