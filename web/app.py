"""The search page and its JSON API: a Flask app over one or more `RetrievalEngine`s, served by waitress (`tfr web`).

`create_app({"baseline": engine_a, "finetuned": engine_b})` builds the app; `serve(app)` runs it under waitress, the
production WSGI server, debug off. The routes only translate HTTP to the library and back: searching is
`search.query.Searcher`, thumbnails `data.images.ThumbnailCache`, batched embedding
`features.batching.EmbeddingBatcher`.
A `SearchPage` (in `app.extensions["tf_retrieval"]`) holds the engines and settings; when an engine's index bundle is
replaced on disk (`tfr index --add/--delete`), the page loads the new one in the background and serves it (`reload`).

API (documented in `web/openapi.json`, served at `/api/openapi.json`):

    POST /api/search        multipart `image` file, or `id` of a database image, or only `positives`; params k, threshold,
                            model, classes, positives, alpha, beta, compare -> query, settings, total, results[, side_by_side]
    GET  /api/random        a random database image and its neighbours (same params and answer as /api/search)
    GET  /api/images/<id>   a JPEG thumbnail of a database image (`?size=` 16..512, `?model=`)
    GET  /api/health        liveness: models and index sizes
    GET  /api/stats         models, backbones, index sizes, class names and their tag colours, limits
    GET  /api/openapi.json  this API as OpenAPI 3

Safety: uploads are bounded by `MAX_CONTENT_LENGTH` (413 JSON, also from waitress for bodies over its own limit), kept
in memory by the app (waitress buffers bodies over 512 KB in anonymous temporary files; never under the client's file
name), and decoded through `data.images.decode_image`, which refuses empty, non-image, truncated and
decompression-bomb input (400 JSON with the reason). Image ids are looked up in
the collections, never turned into paths. Every error under `/api/` is JSON: `{"error": {"code", "name", "message"}}`.
Every request is logged at INFO on `tf_retrieval.web.requests`: method, path, status, milliseconds.
"""
from __future__ import annotations

import colorsys
import dataclasses
import errno
import functools
import io
import json
import logging
import math
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping
from urllib.parse import quote

import numpy as np
from flask import Blueprint, Flask, Request, Response, current_app, jsonify, render_template, request
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask
from werkzeug.exceptions import BadRequest, HTTPException, InternalServerError, NotFound

from tf_retrieval.data.images import MAX_BYTES, ImageDecodeError, ThumbnailCache
from tf_retrieval.errors import InvalidInputError, MissingError, RetrievalError
from tf_retrieval.features.batching import EmbeddingBatcher
from tf_retrieval.search.query import ROCCHIO_ALPHA, ROCCHIO_BETA, Answer, Query, Searcher
from tf_retrieval.web.reload import BundleReloader

if TYPE_CHECKING:
    from tf_retrieval.search.engine import RetrievalEngine, SearchResult

logger = logging.getLogger(__name__)
request_logger = logging.getLogger("tf_retrieval.web.requests")

HERE = os.path.dirname(os.path.abspath(__file__))
OPENAPI_PATH = os.path.join(HERE, "openapi.json")

#: Thumbnail sizes accepted by `/api/images/<id>?size=` (longest side, pixels).
MIN_THUMBNAIL, MAX_THUMBNAIL, DEFAULT_THUMBNAIL = 16, 512, 256
#: Most favourites accepted for relevance feedback in one request.
MAX_POSITIVES = 200
#: Form fields a request may send (Werkzeug's limits): every favourite and class name, with room to spare.
MAX_FORM_PARTS = 2000
MAX_FORM_FIELD_BYTES = 500_000
#: Largest body waitress reads to its end (spooled to a temp file) to answer the app's JSON 413 cleanly: above it (or
#: above twice the upload limit, if larger), waitress answers as soon as the headers arrive. 64 MiB, not waitress's
#: 1 GiB, so that a hundred connections cannot fill the disk with oversized uploads.
SERVER_BODY_LIMIT = 64 << 20

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

#: Tag colours of the first classes: distinct hues, all dark enough for white text (WCAG contrast >= 4.5).
PALETTE = ("#2563eb", "#dc2626", "#047857", "#b45309", "#7c3aed", "#be185d", "#0e7490", "#4d7c0f", "#475569", "#c2410c",
           "#4338ca", "#0f766e")


def class_colour(label: int) -> str:
    """A deterministic tag colour for class `label`: a fixed palette, then golden-angle hues for more classes."""
    if label < 0:
        raise ValueError(f"class labels are non-negative, got {label}")
    if label < len(PALETTE):
        return PALETTE[label]
    hue = ((label - len(PALETTE)) * 137.508 + 15.0) % 360.0
    red, green, blue = colorsys.hls_to_rgb(hue / 360.0, 0.36, 0.65)
    return "#{:02x}{:02x}{:02x}".format(round(red * 255), round(green * 255), round(blue * 255))


def error_body(code: int, name: str, message: str) -> dict[str, Any]:
    """The JSON body of every API error."""
    return {"error": {"code": code, "name": name, "message": message}}


# ------------------------------------------------------------------------------------------------ the page's state

@dataclasses.dataclass(frozen=True)
class PageSettings:
    """The page's limits and defaults (see `create_app` for each)."""

    max_upload_mb: float = 10.0
    default_k: int = 20
    max_k: int = 200
    batching: bool = True
    max_batch: int = 32
    batch_wait_ms: float = 0.0
    batch_workers: int = 2
    reload_seconds: float = 2.0

    def __post_init__(self):
        if not 1 <= self.default_k <= self.max_k:
            raise InvalidInputError(f"default_k must be between 1 and max_k={self.max_k}, got {self.default_k}")
        if not 0 < self.max_upload_mb <= MAX_BYTES / (1 << 20):
            raise InvalidInputError(f"max_upload_mb must be above 0 and at most {MAX_BYTES >> 20} (the largest image "
                                    f"the decoder reads), got {self.max_upload_mb}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def upload_too_large(self) -> str:
        """The message of a 413."""
        return f"the upload is larger than the limit of {self.max_upload_mb:g} MB"


class SearchPage:
    """What the routes serve: a `Searcher` over the engines, the settings, the embedding batchers and thumbnails.

    `searcher` is replaced as a whole when a bundle is reloaded, so a request that took it keeps consistent engines;
    `revision` counts the reloads: thumbnails are cached (here and in browsers) per revision, since a reloaded bundle
    may hold another image under an old id.
    """

    def __init__(self, engines: Mapping[str, RetrievalEngine], settings: PageSettings,
                 default_model: str | None = None):
        self.settings = settings
        self.searcher = Searcher(engines, default_model, embed=self.embed)
        self.thumbnails = ThumbnailCache()
        self.revision = 0
        self.started = time.time()
        self._batchers: dict[str, EmbeddingBatcher | None] = {}
        self._lock = threading.Lock()
        self.reloader = BundleReloader(engines, self._use_engines, settings.reload_seconds)

    def embed(self, model: str, engine: RetrievalEngine, query: Query) -> np.ndarray:
        """A query image's embedding: batched with concurrent uploads when the embedder runs in this process."""
        batcher = self._batcher(model, engine)
        return batcher.embed(query.image) if batcher is not None else engine.embed([query.encoded])[0]

    def _batcher(self, model: str, engine: RetrievalEngine) -> EmbeddingBatcher | None:
        with self._lock:
            if model not in self._batchers:
                settings = self.settings
                usable = settings.batching and EmbeddingBatcher.supports(engine.embedder)
                self._batchers[model] = EmbeddingBatcher(engine.embedder, settings.max_batch, settings.batch_wait_ms,
                                                         settings.batch_workers) if usable else None
            return self._batchers[model]

    def _use_engines(self, engines: dict[str, RetrievalEngine]) -> None:
        """Serves reloaded engines from now on (requests in flight finish on the engines they started with)."""
        with self._lock:
            old = self.searcher
            self.searcher = Searcher({**old.engines, **engines}, old.default_model, embed=self.embed)
            self.revision += 1

    def warm_up(self) -> None:
        """Builds each model and traces it for a batch of one and of several, so that no request pays for that."""
        from PIL import Image

        out = io.BytesIO()
        Image.new("RGB", (48, 48), (120, 60, 30)).save(out, format="PNG")
        query = Query.from_bytes(out.getvalue())
        for name, engine in self.searcher.engines.items():
            started = time.perf_counter()
            self.searcher.search(query, name, k=1)
            if self._batcher(name, engine) is not None:
                size = engine.embedder.image_size
                engine.embedder.embed_pixels(np.zeros((3, size, size, 3), np.float32))
            logger.info("warmed up %s in %.1f s", name, time.perf_counter() - started)

    def health(self) -> dict[str, Any]:
        """Liveness: models, index sizes, uptime, batching counts."""
        engines = self.searcher.engines
        with self._lock:
            batchers = {name: batcher for name, batcher in self._batchers.items() if batcher is not None}
        batching = {name: {"batches": b.batches, "images": b.images} for name, b in batchers.items()}
        return {"status": "ok", "models": list(engines), "index_sizes": {n: len(e) for n, e in engines.items()},
                "uptime_s": round(time.time() - self.started, 1), "embedding_batches": batching}

    def stats(self) -> dict[str, Any]:
        """Models, index sizes, class names and their tag colours, limits: what the page shows and offers."""
        searcher, settings = self.searcher, self.settings
        class_names = list(dict.fromkeys(name for engine in searcher.engines.values()
                                         for name in engine.collection.class_names))
        return {"models": [_model_info(name, engine) for name, engine in searcher.engines.items()],
                "default_model": searcher.default_model, "default_k": settings.default_k, "max_k": settings.max_k,
                "max_upload_mb": settings.max_upload_mb, "max_positives": MAX_POSITIVES, "class_names": class_names,
                "class_colours": {name: class_colour(i) for i, name in enumerate(class_names)},
                "rocchio": {"alpha": ROCCHIO_ALPHA, "beta": ROCCHIO_BETA}}


def _model_info(name: str, engine: RetrievalEngine) -> dict[str, Any]:
    config = engine.config
    return {"name": name, "model_id": config.model_id(), "backbone": config.backbone, "image_size": config.image_size,
            "pooling": config.pooling, "weights": config.weights, "head": os.path.basename(config.head or "") or None,
            "version": config.version, "index_size": len(engine), "collection": engine.collection.name,
            "index": type(engine.index).__name__, "runtime": getattr(engine.embedder, "runtime", "model-server"),
            "database_augmentation": engine.database_augmentation, "class_names": list(engine.collection.class_names)}


# ------------------------------------------------------------------------------------------------ HTTP in

class InMemoryRequest(Request):
    """A request whose uploaded files stay in memory (the body is already bounded by MAX_CONTENT_LENGTH).

    Werkzeug would spool files over 500 KB to a temporary file; keeping them in a BytesIO means no upload ever touches disk.
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


class _Params:
    """Typed access to request parameters from the query string, form fields and a JSON body (JSON wins, then form)."""

    def __init__(self, req: Request):
        self._json: dict[str, Any] = {}
        if req.is_json:
            body = req.get_json(silent=True)
            if not isinstance(body, dict):
                raise BadRequest("the JSON body must be an object, e.g. {\"id\": \"...\", \"k\": 10}")
            self._json = body
        self._form = req.form
        self._args = req.args

    def raw(self, name: str) -> Any:
        if name in self._json:
            return self._json[name]
        if name in self._form:
            return self._form.get(name)
        return self._args.get(name)

    def raw_list(self, name: str) -> list[Any]:
        """A list parameter: a JSON array, or repeated form / query fields."""
        if name in self._json:
            value = self._json[name]
            if value is None:
                return []
            return list(value) if isinstance(value, list) else [value]
        values = self._form.getlist(name) or self._args.getlist(name)
        return [v for v in values if v != ""]

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.raw(name)
        if value is None or value == "":
            return default
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
            raise BadRequest(f"{name} must be an integer between {low} and {high}, got {str(value)[:100]!r}") from None
        if not low <= number <= high:
            raise BadRequest(f"{name} must be between {low} and {high}, got {number}")
        return number

    def number(self, name: str, default: float | None, low: float, high: float) -> float | None:
        value = self.raw(name)
        if value is None or value == "" or (isinstance(value, str) and value.lower() in ("none", "null", "off")):
            return default
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond any float
            raise BadRequest(f"{name} must be a number between {low} and {high}, got {str(value)[:100]!r}") from None
        if not math.isfinite(number) or not low <= number <= high:
            raise BadRequest(f"{name} must be a finite number between {low} and {high}, got {str(value)[:100]!r}")
        return number

    def flag(self, name: str) -> bool:
        value = self.raw(name)
        if value is None or value == "":
            return False
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise BadRequest(f"{name} must be true or false, got {value!r}")

    def search_settings(self, searcher: Searcher, settings: PageSettings) -> dict[str, Any]:
        """The search settings of a request, echoed in its answer (with the class filter as the answer applied it)."""
        positives = self.raw_list("positives")
        if len(positives) > MAX_POSITIVES:
            raise BadRequest(f"at most {MAX_POSITIVES} positives are accepted, got {len(positives)}")
        return {"model": searcher.engine(self.raw("model"))[0],
                "k": self.integer("k", settings.default_k, 1, settings.max_k),
                "threshold": self.number("threshold", None, -1e6, 1e6),
                "alpha": self.number("alpha", ROCCHIO_ALPHA, 0.0, 10.0),
                "beta": self.number("beta", ROCCHIO_BETA, 0.0, 10.0),
                "positives": positives,
                "compare": self.flag("compare"),
                "classes": self.raw_list("classes")}


# ------------------------------------------------------------------------------------------------ HTTP out

def _thumbnail_url(model: str, image_id: str) -> str:
    """The URL of a thumbnail, with the page's revision: a reloaded bundle's images get new URLs."""
    return (f"/api/images/{quote(image_id, safe='')}?model={quote(model, safe='')}&size={DEFAULT_THUMBNAIL}"
            f"&v={_page().revision}")


def _result_json(model: str, result: SearchResult, rank: int) -> dict[str, Any]:
    return {"rank": rank, "id": result.id, "position": result.position, "label": result.label,
            "class_name": result.class_name, "score": round(float(result.score), 6),
            "thumbnail_url": _thumbnail_url(model, result.id)}


def _answer_json(answer: Answer) -> dict[str, Any]:
    return {"model": answer.model, "total": answer.total,
            "results": [_result_json(answer.model, r, rank) for rank, r in enumerate(answer.results, start=1)],
            "timing_ms": {key: round(value, 2) for key, value in answer.timing_ms.items()}}


def _id_description(searcher: Searcher, model: str, image_id: Any) -> dict[str, Any]:
    """How a query by database image is shown: its id, position, class and thumbnail (from `model`'s collection, or
    the first other one that holds it)."""
    model, position = searcher.locate(image_id, model)
    collection = searcher.engines[model].collection
    label = int(collection.labels[position])
    return {"type": "id", "id": image_id, "position": position, "label": label,
            "class_name": collection.class_names[label], "thumbnail_url": _thumbnail_url(model, image_id)}


def _feedback(settings: dict[str, Any]) -> dict[str, Any]:
    """The `Query` fields of the request's favourites."""
    return {"positives": tuple(settings["positives"]), "alpha": settings["alpha"], "beta": settings["beta"]}


def _search_response(searcher: Searcher, query: Query, description: dict[str, Any],
                     settings: dict[str, Any]) -> Response:
    """Runs the query on the chosen model, or on every model side by side, and answers it as JSON."""
    started = time.perf_counter()
    filters = {"k": settings["k"], "threshold": settings["threshold"], "classes": settings["classes"]}
    model = settings["model"]
    answers = (searcher.compare(query, **filters) if settings["compare"]
               else {model: searcher.search(query, model, **filters)})
    main = _answer_json(answers[model])
    body = {"query": description, "settings": {**settings, "classes": answers[model].classes}, "total": main["total"],
            "results": main["results"]}
    if settings["compare"]:
        body["side_by_side"] = [_answer_json(answer) for answer in answers.values()]
    body["timing_ms"] = {**main["timing_ms"], "total_ms": round((time.perf_counter() - started) * 1000, 2)}
    return jsonify(body)


@functools.lru_cache(maxsize=1)
def _openapi() -> dict[str, Any]:
    with open(OPENAPI_PATH) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ routes

routes = Blueprint("search_page", __name__)


def _page() -> SearchPage:
    return current_app.extensions["tf_retrieval"]


def _request_settings():
    """The searcher, this request's parameters and its search settings (the page defaults where a parameter is absent)."""
    page = _page()
    params = _Params(request)
    return page.searcher, params, params.search_settings(page.searcher, page.settings)


@routes.get("/")
def index() -> str:
    return render_template("index.html", config=_page().stats())


@routes.post("/api/search")
def api_search() -> Response:
    searcher, params, settings = _request_settings()
    upload = request.files.get("image")
    if upload is not None:
        data = upload.read()
        name = (upload.filename or "upload")[:120]
        query = Query.from_bytes(data, name=f"uploaded file {name!r}", **_feedback(settings))
        height, width = query.image.shape[:2]
        description = {"type": "upload", "filename": name, "bytes": len(data), "width": width, "height": height}
        return _search_response(searcher, query, description, settings)
    image_id = params.raw("id")
    if image_id is not None and image_id != "":
        description = _id_description(searcher, settings["model"], image_id)
        return _search_response(searcher, Query(id=image_id, **_feedback(settings)), description, settings)
    if settings["positives"]:
        description = {"type": "favourites", "count": len(settings["positives"])}
        return _search_response(searcher, Query(**_feedback(settings)), description, settings)
    raise BadRequest("no query: send an image file in the multipart field 'image', a database image 'id', "
                     "or favourites in 'positives'")


@routes.get("/api/random")
def api_random() -> Response:
    searcher, params, settings = _request_settings()
    seed = params.integer("seed", -1, 0, 2**63 - 1)
    image_id = searcher.random_id(settings["model"], None if seed < 0 else seed)
    description = {**_id_description(searcher, settings["model"], image_id), "random": True}
    return _search_response(searcher, Query(id=image_id, **_feedback(settings)), description, settings)


@routes.get("/api/images/<path:image_id>")
def api_image(image_id: str) -> Response:
    page = _page()
    searcher = page.searcher
    params = _Params(request)
    size = params.integer("size", DEFAULT_THUMBNAIL, MIN_THUMBNAIL, MAX_THUMBNAIL)
    model, position = searcher.locate(image_id, params.raw("model"))
    try:
        data = page.thumbnails.get(searcher.engines[model].collection, position, size, version=page.revision)
    except (ImageDecodeError, OSError):
        logger.exception("cannot read database image %r of model %s", image_id, model)
        raise InternalServerError(f"database image {image_id[:200]!r} could not be read") from None
    return Response(data, mimetype="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})


@routes.get("/api/health")
def api_health() -> Response:
    return jsonify(_page().health())


@routes.get("/api/stats")
def api_stats() -> Response:
    return jsonify(_page().stats())


@routes.get("/api/openapi.json")
def api_openapi() -> Response:
    return jsonify(_openapi())


@routes.before_app_request
def reload_changed_bundles() -> None:
    _page().reloader.check()


@routes.after_app_request
def add_headers(response: Response) -> Response:
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    if request.path.startswith("/api/") and response.mimetype == "application/json":
        response.headers.setdefault("Cache-Control", "no-store")
    return response


@routes.app_errorhandler(HTTPException)
def http_error(exc: HTTPException):
    """Errors under /api/ as JSON; the page's own errors stay HTML."""
    if not request.path.startswith("/api/"):
        return exc
    message = exc.description
    if exc.code == 413:
        settings = _page().settings
        message = (settings.upload_too_large if (request.content_length or 0) > settings.max_upload_bytes else
                   f"the form is over its limits: at most {MAX_FORM_PARTS} fields, and {MAX_FORM_FIELD_BYTES:,} "
                   "bytes in a field other than a file")
    response = jsonify(error_body(exc.code, exc.name, message))
    response.status_code = exc.code or 500
    return response


@routes.app_errorhandler(RetrievalError)
@routes.app_errorhandler(ImageDecodeError)
def user_error(exc: Exception):
    """What the user can fix: 404 for something that does not exist, else 400."""
    return http_error(NotFound(str(exc)) if isinstance(exc, MissingError) else BadRequest(str(exc)))


@routes.app_errorhandler(Exception)
def unexpected_error(exc: Exception):
    logger.exception("unhandled error on %s %s", request.method, request.path)
    response = jsonify(error_body(500, "Internal Server Error",
                                  f"internal error ({type(exc).__name__}); see the server log"))
    response.status_code = 500
    return response


class RequestLog:
    """WSGI middleware logging one line per request at INFO: method, path, status, milliseconds."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        status = "-"

        def logging_start_response(status_line, headers, exc_info=None):
            nonlocal status
            status = status_line.split(" ", 1)[0]
            return start_response(status_line, headers, exc_info)

        try:
            return self.wsgi_app(environ, logging_start_response)
        finally:
            request_logger.info("%s %s %s %.1f ms", environ.get("REQUEST_METHOD", "-"), _logged_path(environ), status,
                                (time.perf_counter() - started) * 1000)


def _logged_path(environ) -> str:
    """The request path as the client sent it (percent-encoded: no control characters reach the log)."""
    return quote(environ.get("PATH_INFO", "").encode("latin-1", "replace"), safe="/:@!$&'()*+,;=~")


def create_app(engines: Mapping[str, RetrievalEngine], *, max_upload_mb: float = 10.0, default_k: int = 20,
               max_k: int = 200, default_model: str | None = None, warmup: bool = False, batching: bool = True,
               max_batch: int = 32, batch_wait_ms: float = 0.0, batch_workers: int = 2,
               reload_seconds: float = 2.0) -> Flask:
    """Builds the Flask app serving the search page and the JSON API over `engines`.

    Args:
      engines: model name -> engine (e.g. {"baseline": ..., "finetuned": ...}); the page offers them in this order.
      max_upload_mb: largest request body accepted (uploads above it get 413).
      default_k: results per search when the request gives no `k`.
      max_k: the largest `k` accepted.
      default_model: the model used when a request names none (default: the first of `engines`).
      warmup: embed one small generated image with every engine now, so the first real request is not slow.
      batching: embed concurrent uploads together (`EmbeddingBatcher`) when the engine's embedder runs in this process;
        a remote embedder (TF Serving client) gets one call per upload.
      max_batch: most uploads embedded in one model call.
      batch_wait_ms: how long a batch waits for more uploads once it has one (0: only those already queued).
      batch_workers: model calls that may run at once (on a machine with few cores, one model call on a small batch
        leaves cores idle).
      reload_seconds: how often (at most) to look whether an engine's index bundle was replaced on disk, e.g. by
        `tfr index --add`, and then serve the new one; <= 0: never. Engines built in memory are never reloaded.

    Returns:
      the app; `app.extensions["tf_retrieval"]` is its `SearchPage` (engines, settings, batchers).

    Raises:
      ValueError: no engines, an unknown default model, or limits out of range.
    """
    settings = PageSettings(max_upload_mb=max_upload_mb, default_k=default_k, max_k=max_k, batching=batching,
                            max_batch=max_batch, batch_wait_ms=batch_wait_ms, batch_workers=batch_workers,
                            reload_seconds=reload_seconds)
    page = SearchPage(engines, settings, default_model)
    app = Flask(__name__, template_folder=os.path.join(HERE, "templates"), static_folder=os.path.join(HERE, "static"))
    app.request_class = InMemoryRequest
    app.config.update(MAX_CONTENT_LENGTH=settings.max_upload_bytes, DEBUG=False, PROPAGATE_EXCEPTIONS=False,
                      SEND_FILE_MAX_AGE_DEFAULT=300, MAX_FORM_PARTS=MAX_FORM_PARTS,
                      MAX_FORM_MEMORY_SIZE=MAX_FORM_FIELD_BYTES)
    app.json.sort_keys = False
    app.extensions["tf_retrieval"] = page
    app.register_blueprint(routes)
    app.wsgi_app = RequestLog(app.wsgi_app)
    if warmup:
        page.warm_up()
    logger.info("web app over %d model(s): %s", len(page.searcher.engines),
                ", ".join(f"{n} ({len(e)} images)" for n, e in page.searcher.engines.items()))
    return app


# ------------------------------------------------------------------------------------------------ serving

def reserve_port(host: str = "127.0.0.1", port: int = 8080) -> socket.socket:
    """Binds and listens on host:port now, so that a taken port is reported before slow work (loading models).

    Connections that arrive before the server runs wait in the socket's backlog. Give the socket to `serve` or
    `create_server`.

    Raises:
      InvalidInputError: "port N is in use: choose another with --port", or another reason the address cannot be bound.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise InvalidInputError(f"cannot serve on host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as waitress: restarts need not wait for TIME_WAIT
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InvalidInputError(f"port {port} is in use: choose another with --port") from None
        raise InvalidInputError(f"cannot serve on {host}:{port}: {exc.strerror}") from None
    return sock


class _JsonErrorTask(ErrorTask):
    """Waitress' own error answers (a body over its limit, a malformed request) in the API's JSON error shape."""

    def execute(self):
        error = self.request.error
        message = self.channel.upload_too_large if error.code == 413 else error.body
        body = json.dumps(error_body(error.code, error.reason, message)).encode()
        request_logger.info("%s %s %s refused by the server: %s", self.request.command or "-",
                            quote(self.request.path or "", safe="/"), error.code, error.body)
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _JsonErrorChannel(HTTPChannel):
    """A waitress connection whose own error answers are JSON (`upload_too_large`: the message of a 413)."""

    error_task_class = _JsonErrorTask

    def __init__(self, *args, upload_too_large: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.upload_too_large = upload_too_large


def create_server(app: Flask, host: str = "127.0.0.1", port: int = 8080, threads: int = 8,
                  sock: socket.socket | None = None):
    """A waitress server for `app` (from `create_app`), not yet running: call `.run()` (blocks) and `.close()`.

    Args:
      app: from `create_app`.
      host, port: where to listen when no `sock` is given (port 0 picks a free port: see `.effective_port`).
      threads: worker threads (concurrent requests).
      sock: a listening socket from `reserve_port`.

    Waitress reads a whole body before the app sees it, up to its own limit (`SERVER_BODY_LIMIT`, far above the app's
    upload limit): an oversized upload is read to its end and gets the app's JSON 413, which the client then reads
    (a server that answered while the client still sends would reset the connection: the client would see no answer).
    Bodies over the server's limit get the same JSON from waitress as soon as their headers arrive.

    Raises:
      InvalidInputError: the port is in use (see `reserve_port`).
    """
    from waitress import create_server as waitress_server

    sock = sock if sock is not None else reserve_port(host, port)
    server = waitress_server(app, sockets=[sock], threads=threads, ident="tf_retrieval",
                             max_request_body_size=max(SERVER_BODY_LIMIT, 2 * app.config["MAX_CONTENT_LENGTH"]))
    page: SearchPage = app.extensions["tf_retrieval"]
    server.channel_class = functools.partial(_JsonErrorChannel, upload_too_large=page.settings.upload_too_large)
    return server


def serve(app: Flask, host: str = "127.0.0.1", port: int = 8080, threads: int = 8,
          sock: socket.socket | None = None) -> None:
    """Serves `app` with waitress (production server, debug off) until interrupted.

    Args:
      app: from `create_app`.
      host: interface to bind; the default serves this machine only (use "0.0.0.0" deliberately, behind a proxy).
      port: TCP port.
      threads: worker threads (concurrent requests).
      sock: a listening socket from `reserve_port` (then `host` and `port` are not used).
    """
    from tf_retrieval.runtime import single_threaded_blas

    single_threaded_blas()
    server = create_server(app, host, port, threads, sock)
    logger.info("serving on http://%s:%s/ with %d threads", server.effective_host, server.effective_port, threads)
    try:
        server.run()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        server.close()


def serve_workers(build_app: Callable[[], Flask], sock: socket.socket, *, workers: int, threads: int = 8) -> None:
    """Serves the apps of `workers` processes on one listening socket (from `reserve_port`), until interrupted.

    Python runs one thread at a time per process, and the page's request handling (HTTP, multipart, JSON) is Python:
    one process cannot keep several cores busy. Each worker is forked before anything heavy is loaded, builds its own
    app (`build_app()`: engines, models, index) and serves with `threads` threads (its LiteRT interpreters get
    cores / `workers` kernel threads each, unless `$TFR_LITERT_THREADS` says otherwise); the kernel spreads connections over
    the processes, as with gunicorn's pre-fork workers. A worker that dies is started again (one that dies before its
    app is built stops them all: it would fail again); SIGINT / SIGTERM stop all. With `workers` == 1 the app is
    served in this process.
    """
    import multiprocessing
    import signal

    if workers < 1:
        raise InvalidInputError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        return serve(build_app(), threads=threads, sock=sock)
    # Forked: the socket is inherited. The caller must not have run a model yet (`tfr web` loads nothing before):
    # a forked child that releases an inherited LiteRT interpreter crashes.
    context = multiprocessing.get_context("fork")

    def start(number: int):
        ready = context.Event()
        process = context.Process(target=_worker, name=f"web-worker-{number}", daemon=True,
                                  args=(build_app, sock, threads, ready, max(1, (os.cpu_count() or 1) // workers)))
        process.start()
        return process, ready

    processes, ready = map(list, zip(*(start(number) for number in range(workers))))
    stopping = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        while not stopping.wait(1.0):
            for number, process in enumerate(processes):
                if process.is_alive():
                    continue
                if not ready[number].is_set():  # it cannot start: do not loop on it
                    raise RetrievalError(f"web worker {number} exited with code {process.exitcode} while starting "
                                         "(its error is above)")
                logger.warning("web worker %d (pid %s) exited with %s: starting it again", number, process.pid,
                               process.exitcode)
                processes[number], ready[number] = start(number)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=10)
        logger.info("stopped %d web workers", workers)


def _worker(build_app: Callable[[], Flask], sock: socket.socket, threads: int, ready, threads_per_worker: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.setdefault("TFR_LITERT_THREADS", str(threads_per_worker))
    app = build_app()
    ready.set()  # from now on an exit is a crash, and the worker is started again
    serve(app, threads=threads, sock=sock)
