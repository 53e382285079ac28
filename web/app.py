"""The search page and its JSON API: a Flask app factory over one or more loaded `RetrievalEngine`s.

`create_app({"baseline": engine_a, "finetuned": engine_b})` builds the app (no globals: everything the routes need lives in the
closure and in `app.extensions["tf_retrieval"]`); `serve(app)` runs it under waitress, the production WSGI server, debug off.

API (documented in `web/openapi.json`, served at `/api/openapi.json`):

    POST /api/search        multipart `image` file, or `id` of a database image, or only `positives`; params k, threshold,
                            model, classes, positives, alpha, beta, compare -> query, settings, total, results[, side_by_side]
    GET  /api/random        a random database image and its neighbours (same params and answer as /api/search)
    GET  /api/images/<id>   a JPEG thumbnail of a database image (`?size=` 16..512, `?model=`)
    GET  /api/health        liveness: models and index sizes
    GET  /api/stats         models, backbones, index sizes, class names and their tag colours, limits
    GET  /api/openapi.json  this API as OpenAPI 3

Safety: uploads are bounded by `MAX_CONTENT_LENGTH` (413 JSON), kept in memory (never written to disk, never under the
client's file name), and decoded through `tf_retrieval.data.decode_image`, which refuses empty, non-image, truncated and
decompression-bomb input (400 JSON with the reason). Image ids are looked up in the collections, never turned into paths.
Every error under `/api/` is JSON: `{"error": {"code", "name", "message"}}`.
"""
from __future__ import annotations

import argparse
import colorsys
import functools
import io
import json
import logging
import math
import os
import queue
import random
import threading
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence
from urllib.parse import quote

import numpy as np
from flask import Flask, Request, Response, jsonify, render_template, request
from werkzeug.exceptions import BadRequest, HTTPException, InternalServerError, NotFound

from tf_retrieval.data import ImageDecodeError, decode_image, resize_and_crop

if TYPE_CHECKING:
    from tf_retrieval.engine import RetrievalEngine, SearchResult

logger = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
OPENAPI_PATH = os.path.join(HERE, "openapi.json")

#: Thumbnail sizes accepted by `/api/images/<id>?size=` (longest side, pixels).
MIN_THUMBNAIL, MAX_THUMBNAIL, DEFAULT_THUMBNAIL = 16, 512, 256
#: Most favourites accepted for relevance feedback in one request.
MAX_POSITIVES = 200
#: Longest image id looked up (ids are paths relative to a folder, or tfds ids).
MAX_ID_LENGTH = 1024
#: Rocchio defaults (the classic SMART values): q' = alpha * q + beta * mean(positives), re-normalised.
ROCCHIO_ALPHA, ROCCHIO_BETA = 1.0, 0.75

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class InMemoryRequest(Request):
    """A request whose uploaded files stay in memory (the body is already bounded by MAX_CONTENT_LENGTH).

    Werkzeug would spool files over 500 KB to a temporary file; keeping them in a BytesIO means no upload ever touches disk.
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


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


def rocchio(query: np.ndarray | None, positives: np.ndarray, alpha: float = ROCCHIO_ALPHA,
            beta: float = ROCCHIO_BETA) -> np.ndarray:
    """Rocchio relevance feedback: q' = alpha * q + beta * mean(positives), L2-normalised.

    Args:
      query: the query embedding [d] (or None: the feedback vector alone, i.e. the favourites' centroid).
      positives: embeddings of the images marked relevant, [m, d] with m >= 1.
      alpha: weight of the original query.
      beta: weight of the positives' mean.

    Returns:
      float32 [d], unit length.

    Raises:
      ValueError: on empty positives, mismatched dimensions or a zero result vector.
    """
    positives = np.asarray(positives, dtype=np.float32)
    if positives.ndim != 2 or len(positives) == 0:
        raise ValueError(f"rocchio needs positives of shape [m >= 1, d], got {list(positives.shape)}")
    moved = beta * positives.mean(axis=0)
    if query is not None:
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if query.shape[0] != positives.shape[1]:
            raise ValueError(f"query has dimension {query.shape[0]} but positives have {positives.shape[1]}")
        moved = alpha * query + moved
    norm = float(np.linalg.norm(moved))
    if not math.isfinite(norm) or norm < 1e-12:
        raise ValueError("the feedback query vector is zero: choose other favourites or a larger alpha/beta")
    return (moved / norm).astype(np.float32)


class EmbeddingBatcher:
    """Dynamic batching of one-image embedding requests coming from many server threads (like TF Serving's batcher).

    Request threads resize their decoded image (the same `data.resize_and_crop` as indexing, compiled once with
    tf.function) and queue it; one worker thread takes everything queued (up to `max_batch`, waiting at most
    `max_wait_ms` for more) and embeds it in one model call. Under load, the model then runs on batches instead of one
    image at a time, which costs far less per image; a lone request waits for nothing.

    Args:
      embedder: an in-process embedder with `image_size` and `embed_pixels` (`tf_retrieval.embedder.Embedder`).
      max_batch: most images per model call.
      max_wait_ms: how long the worker waits for more images once it has one (0: take only what is already queued).
      workers: model calls that may run at the same time (each on its own batch).
    """

    def __init__(self, embedder, max_batch: int = 32, max_wait_ms: float = 0.0, workers: int = 1):
        import tensorflow as tf

        if max_batch < 1 or max_wait_ms < 0 or workers < 1:
            raise ValueError(f"max_batch and workers must be >= 1 and max_wait_ms >= 0, got {max_batch}, {workers} and "
                             f"{max_wait_ms}")
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        size = int(embedder.image_size)
        self._resize = tf.function(lambda image: resize_and_crop(image, size),
                                   input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        self._queue: queue.Queue = queue.Queue()
        self.batches = 0  # model calls made, and images embedded (for stats)
        self.images = 0
        self._workers = [threading.Thread(target=self._run, name=f"embedding-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def embed(self, image: np.ndarray) -> np.ndarray:
        """One decoded RGB uint8 image [h, w, 3] -> its embedding [d] (blocks until its batch is done)."""
        job = {"pixels": self._resize(image).numpy(), "done": threading.Event()}
        self._queue.put(job)
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["vector"]

    def close(self) -> None:
        """Stops the worker threads (queued jobs are finished first)."""
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            deadline = time.perf_counter() + self.max_wait
            stop = False
            while len(batch) < self.max_batch:
                try:
                    remaining = deadline - time.perf_counter()
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            try:
                vectors = self.embedder.embed_pixels(np.stack([j["pixels"] for j in batch]))
                for j, vector in zip(batch, vectors):
                    j["vector"] = vector
            except Exception as exc:  # handed to every waiting request, which turns it into a 500
                for j in batch:
                    j["error"] = exc
            finally:
                self.batches += 1
                self.images += len(batch)
                for j in batch:
                    j["done"].set()
            if stop:
                return


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
        except (TypeError, ValueError):
            raise BadRequest(f"{name} must be an integer between {low} and {high}, got {value!r}") from None
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
        except (TypeError, ValueError):
            raise BadRequest(f"{name} must be a number between {low} and {high}, got {value!r}") from None
        if not math.isfinite(number) or not low <= number <= high:
            raise BadRequest(f"{name} must be a finite number between {low} and {high}, got {value!r}")
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


def create_app(engines: Mapping[str, RetrievalEngine], *, max_upload_mb: float = 10.0, default_k: int = 20,
               max_k: int = 200, default_model: str | None = None, warmup: bool = False, batching: bool = True,
               max_batch: int = 32, batch_wait_ms: float = 0.0, batch_workers: int = 2) -> Flask:
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

    Returns:
      the app; `app.extensions["tf_retrieval"]` holds the engines and settings.

    Raises:
      ValueError: no engines, an unknown default model, or limits out of range.
    """
    if not engines:
        raise ValueError("create_app needs at least one engine, e.g. {'baseline': RetrievalEngine.load(bundle_dir)}")
    engines = dict(engines)
    default_model = default_model or next(iter(engines))
    if default_model not in engines:
        raise ValueError(f"default_model {default_model!r} is not one of the engines {sorted(engines)}")
    if not 1 <= default_k <= max_k:
        raise ValueError(f"default_k must be between 1 and max_k={max_k}, got {default_k}")
    if not max_upload_mb > 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")

    app = Flask(__name__, template_folder=os.path.join(HERE, "templates"), static_folder=os.path.join(HERE, "static"))
    app.request_class = InMemoryRequest
    app.config.update(MAX_CONTENT_LENGTH=int(max_upload_mb * 1024 * 1024), JSON_SORT_KEYS=False, DEBUG=False,
                      PROPAGATE_EXCEPTIONS=False, SEND_FILE_MAX_AGE_DEFAULT=300)
    app.json.sort_keys = False
    started = time.time()
    system_random = random.SystemRandom()
    positions = {name: {image_id: i for i, image_id in enumerate(engine.collection.ids)} for name, engine in engines.items()}
    all_classes = _union_class_names(engines.values())
    colours = {name: class_colour(i) for i, name in enumerate(all_classes)}
    with open(OPENAPI_PATH) as f:
        openapi = json.load(f)
    batchers: dict[str, EmbeddingBatcher | None] = {}
    batchers_lock = threading.Lock()

    def batcher_for(model: str) -> EmbeddingBatcher | None:
        with batchers_lock:
            if model not in batchers:
                embedder = engines[model].embedder
                usable = batching and hasattr(embedder, "embed_pixels") and hasattr(embedder, "image_size")
                batchers[model] = EmbeddingBatcher(embedder, max_batch, batch_wait_ms, batch_workers) if usable else None
            return batchers[model]

    def embed_upload(model: str, data: bytes, image: np.ndarray) -> np.ndarray:
        batcher = batcher_for(model)
        return batcher.embed(image) if batcher is not None else engines[model].embed([data])[0]

    if warmup:  # build each model and trace it for a batch of one and of several, so no request pays for that
        from PIL import Image

        out = io.BytesIO()
        Image.new("RGB", (48, 48), (120, 60, 30)).save(out, format="PNG")
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.search(embed_upload(name, out.getvalue(), decode_image(out.getvalue()))[None, :], 1)
            if batcher_for(name) is not None:
                size = engine.embedder.image_size
                engine.embedder.embed_pixels(np.zeros((3, size, size, 3), np.float32))
            logger.info("warmed up %s in %.1f s", name, time.perf_counter() - t0)

    def model_info(name: str, engine: RetrievalEngine) -> dict[str, Any]:
        config = engine.config
        return {"name": name, "model_id": config.model_id(), "backbone": config.backbone, "image_size": config.image_size,
                "pooling": config.pooling, "weights": config.weights, "head": os.path.basename(config.head or "") or None,
                "version": config.version, "index_size": len(engine), "collection": engine.collection.name,
                "index": type(engine.index).__name__, "class_names": list(engine.collection.class_names)}

    stats = {"models": [model_info(name, engine) for name, engine in engines.items()], "default_model": default_model,
             "default_k": default_k, "max_k": max_k, "max_upload_mb": max_upload_mb,
             "class_names": all_classes, "class_colours": colours,
             "rocchio": {"alpha": ROCCHIO_ALPHA, "beta": ROCCHIO_BETA}}

    # ---------------------------------------------------------------- helpers

    def get_engine(name: str | None) -> tuple[str, RetrievalEngine]:
        name = name or default_model
        if not isinstance(name, str) or name not in engines:
            raise NotFound(f"unknown model {name!r}; available models: {', '.join(engines)}")
        return name, engines[name]

    def position_of(model: str, image_id: Any, what: str = "id") -> int:
        if not isinstance(image_id, str) or not image_id or len(image_id) > MAX_ID_LENGTH:
            raise BadRequest(f"{what} must be a database image id (a non-empty string), got {str(image_id)[:80]!r}")
        position = positions[model].get(image_id)
        if position is None:
            raise NotFound(f"unknown image id {image_id[:200]!r} in the collection of model {model!r}")
        return position

    def thumbnail_url(model: str, image_id: str) -> str:
        return f"/api/images/{quote(image_id, safe='')}?model={quote(model, safe='')}&size={DEFAULT_THUMBNAIL}"

    def result_dict(model: str, result: SearchResult, rank: int) -> dict[str, Any]:
        return {"rank": rank, "id": result.id, "position": result.position, "label": result.label,
                "class_name": result.class_name, "score": round(float(result.score), 6),
                "thumbnail_url": thumbnail_url(model, result.id)}

    def parse_classes(params: _Params, engine: RetrievalEngine) -> list[int] | None:
        values = params.raw_list("classes")
        if len(values) == 1 and isinstance(values[0], str) and "," in values[0]:
            values = [v.strip() for v in values[0].split(",") if v.strip()]
        if not values:
            return None
        names = list(engine.collection.class_names)
        labels = []
        for value in values:
            if isinstance(value, str) and value in names:
                labels.append(names.index(value))
            elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
                labels.append(value)
            elif isinstance(value, str) and value.isdigit() and int(value) < len(names):
                labels.append(int(value))
            else:
                raise BadRequest(f"unknown class {str(value)[:100]!r} in classes; known classes: {', '.join(names)}")
        return sorted(set(labels))

    def parse_settings(params: _Params) -> dict[str, Any]:
        model, _ = get_engine(params.raw("model"))
        positives = params.raw_list("positives")
        if len(positives) > MAX_POSITIVES:
            raise BadRequest(f"at most {MAX_POSITIVES} positives are accepted, got {len(positives)}")
        return {
            "model": model,
            "k": params.integer("k", default_k, 1, max_k),
            "threshold": params.number("threshold", None, -1e6, 1e6),
            "alpha": params.number("alpha", ROCCHIO_ALPHA, 0.0, 10.0),
            "beta": params.number("beta", ROCCHIO_BETA, 0.0, 10.0),
            "positives": positives,
            "compare": params.flag("compare"),
        }

    def run_model(model: str, query: dict[str, Any], settings: dict[str, Any], classes_params: _Params,
                  upload: tuple[bytes, np.ndarray] | None) -> dict[str, Any]:
        """Searches one model: embeds (or looks up) the query, applies feedback and filters, returns total + results."""
        engine = engines[model]
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        classes = parse_classes(classes_params, engine)
        exclude = set()
        vector = None
        if upload is not None:
            vector = embed_upload(model, *upload)
            timings["embed_ms"] = (time.perf_counter() - t0) * 1000
        elif query.get("id") is not None:
            position = position_of(model, query["id"])
            vector = engine.vectors([position])[0]
            exclude.add(position)
        if settings["positives"]:
            positive_positions = [position_of(model, p, "positives") for p in settings["positives"]]
            try:
                vector = rocchio(vector, engine.vectors(positive_positions), settings["alpha"], settings["beta"])
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            exclude.update(positive_positions)
        t1 = time.perf_counter()
        results = engine.search(vector[None, :], settings["k"], threshold=settings["threshold"], classes=classes,
                                exclude=sorted(exclude))[0]
        timings["search_ms"] = (time.perf_counter() - t1) * 1000
        return {"model": model, "total": len(results),
                "results": [result_dict(model, r, rank) for rank, r in enumerate(results, start=1)],
                "classes": None if classes is None else [engine.collection.class_names[c] for c in classes],
                "timing_ms": {key: round(value, 2) for key, value in timings.items()}}

    def answer(query: dict[str, Any], settings: dict[str, Any], params: _Params,
               upload: tuple[bytes, np.ndarray] | None) -> Response:
        t0 = time.perf_counter()
        main = run_model(settings["model"], query, settings, params, upload)
        body: dict[str, Any] = {"query": query, "settings": {**settings, "classes": main["classes"]},
                                "total": main["total"], "results": main["results"]}
        if settings["compare"]:
            runs = []
            for name in engines:
                run = main if name == settings["model"] else run_model(name, query, settings, params, upload)
                runs.append({key: run[key] for key in ("model", "total", "results", "timing_ms")})
            body["side_by_side"] = runs
        body["timing_ms"] = {**main["timing_ms"], "total_ms": round((time.perf_counter() - t0) * 1000, 2)}
        return jsonify(body)

    def id_query(model: str, image_id: str) -> dict[str, Any]:
        engine = engines[model]
        position = position_of(model, image_id)
        label = int(engine.collection.labels[position])
        return {"type": "id", "id": image_id, "position": position, "label": label,
                "class_name": engine.collection.class_names[label], "thumbnail_url": thumbnail_url(model, image_id)}

    @functools.lru_cache(maxsize=2048)
    def thumbnail(model: str, position: int, size: int) -> bytes:
        from PIL import Image

        image = Image.fromarray(engines[model].collection.image(position))
        scale = size / max(image.size)
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=88)
        return out.getvalue()

    # ---------------------------------------------------------------- routes

    @app.get("/")
    def index() -> str:
        return render_template("index.html", config=stats)

    @app.post("/api/search")
    def api_search() -> Response:
        params = _Params(request)
        settings = parse_settings(params)
        upload = request.files.get("image")
        if upload is not None:
            data = upload.read()
            name = (upload.filename or "upload")[:120]
            try:
                array = decode_image(data, name=f"uploaded file {name!r}")
            except ImageDecodeError as exc:
                raise BadRequest(str(exc)) from None
            query = {"type": "upload", "filename": name, "bytes": len(data), "width": int(array.shape[1]),
                     "height": int(array.shape[0])}
            return answer(query, settings, params, (data, array))
        image_id = params.raw("id")
        if image_id is not None and image_id != "":
            return answer(id_query(settings["model"], image_id), settings, params, None)
        if settings["positives"]:
            return answer({"type": "favourites", "count": len(settings["positives"])}, settings, params, None)
        raise BadRequest("no query: send an image file in the multipart field 'image', a database image 'id', "
                         "or favourites in 'positives'")

    @app.get("/api/random")
    def api_random() -> Response:
        params = _Params(request)
        settings = parse_settings(params)
        engine = engines[settings["model"]]
        seed = params.integer("seed", -1, 0, 2**63 - 1)
        rng = system_random if seed < 0 else random.Random(seed)
        image_id = engine.collection.ids[rng.randrange(len(engine.collection))]
        query = {**id_query(settings["model"], image_id), "random": True}
        return answer(query, settings, params, None)

    @app.get("/api/images/<path:image_id>")
    def api_image(image_id: str) -> Response:
        params = _Params(request)
        size = params.integer("size", DEFAULT_THUMBNAIL, MIN_THUMBNAIL, MAX_THUMBNAIL)
        requested = params.raw("model")
        candidates = [get_engine(requested)[0]] if requested else list(engines)
        for model in candidates:
            position = positions[model].get(image_id) if len(image_id) <= MAX_ID_LENGTH else None
            if position is not None:
                try:
                    data = thumbnail(model, position, size)
                except (ImageDecodeError, OSError):
                    logger.exception("cannot read database image %r of model %s", image_id, model)
                    raise InternalServerError(f"database image {image_id[:200]!r} could not be read") from None
                return Response(data, mimetype="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})
        raise NotFound(f"unknown image id {image_id[:200]!r}")

    @app.get("/api/health")
    def api_health() -> Response:
        batching_stats = {name: {"batches": b.batches, "images": b.images} for name, b in batchers.items() if b is not None}
        return jsonify({"status": "ok", "models": list(engines), "index_sizes": {n: len(e) for n, e in engines.items()},
                        "uptime_s": round(time.time() - started, 1), "embedding_batches": batching_stats})

    @app.get("/api/stats")
    def api_stats() -> Response:
        return jsonify(stats)

    @app.get("/api/openapi.json")
    def api_openapi() -> Response:
        return jsonify(openapi)

    # ---------------------------------------------------------------- errors and headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if not request.path.startswith("/api/"):
            return exc
        message = exc.description
        if exc.code == 413:
            message = f"the upload is larger than the limit of {max_upload_mb:g} MB"
        response = jsonify({"error": {"code": exc.code, "name": exc.name, "message": message}})
        response.status_code = exc.code or 500
        return response

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        if isinstance(exc, ImageDecodeError):  # raised by an engine's own decode check
            return http_error(BadRequest(str(exc)))
        logger.exception("unhandled error on %s %s", request.method, request.path)
        response = jsonify({"error": {"code": 500, "name": "Internal Server Error",
                                      "message": f"internal error ({type(exc).__name__}); see the server log"}})
        response.status_code = 500
        return response

    @app.after_request
    def add_headers(response: Response) -> Response:
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if request.path.startswith("/api/") and response.mimetype == "application/json":
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    app.extensions["tf_retrieval"] = {"engines": engines, "stats": stats, "batchers": batchers}
    logger.info("web app over %d model(s): %s", len(engines),
                ", ".join(f"{n} ({len(e)} images)" for n, e in engines.items()))
    return app


def _union_class_names(engines: Sequence[RetrievalEngine] | Any) -> list[str]:
    names: list[str] = []
    for engine in engines:
        for name in engine.collection.class_names:
            if name not in names:
                names.append(name)
    return names


def create_server(app: Flask, host: str = "127.0.0.1", port: int = 8000, threads: int = 8):
    """A waitress server for `app` (not yet running): call `.run()` (blocks) and `.close()`; port 0 picks a free port.

    The server's body limit is set a little above the app's MAX_CONTENT_LENGTH, so oversized uploads get the app's JSON 413.
    """
    from waitress import create_server as waitress_server

    limit = int(app.config.get("MAX_CONTENT_LENGTH") or 10 * 1024 * 1024)
    return waitress_server(app, host=host, port=port, threads=threads, max_request_body_size=2 * limit + (1 << 20),
                           ident="tf_retrieval")


def serve(app: Flask, host: str = "127.0.0.1", port: int = 8000, threads: int = 8) -> None:
    """Serves `app` with waitress (production server, debug off) until interrupted.

    Args:
      app: from `create_app`.
      host: interface to bind; the default serves this machine only (use "0.0.0.0" deliberately, behind a proxy).
      port: TCP port.
      threads: worker threads (concurrent requests).
    """
    server = create_server(app, host, port, threads)
    logger.info("serving on http://%s:%s/ with %d threads", host, server.effective_port, threads)
    try:
        server.run()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        server.close()


def load_engines(bundles: Mapping[str, str] | Sequence[str], data_dir: str | None = None) -> dict[str, RetrievalEngine]:
    """Loads index bundles (`RetrievalEngine.load`) into {name: engine}.

    Args:
      bundles: {name: bundle_dir}, or a list of "NAME=DIR" / "DIR" strings (a bare DIR is named after its model config).
      data_dir: tfds data dir for bundles over tfds datasets.

    Raises:
      ValueError: two bundles with the same name.
    """
    from tf_retrieval.engine import RetrievalEngine

    if isinstance(bundles, Mapping):
        items = list(bundles.items())
    else:
        items = [(spec.split("=", 1)[0], spec.split("=", 1)[1]) if "=" in spec and not os.path.isdir(spec) else (None, spec)
                 for spec in bundles]
    engines: dict[str, RetrievalEngine] = {}
    for name, path in items:
        engine = RetrievalEngine.load(path, data_dir=data_dir)
        name = name or engine.name
        if name in engines:
            raise ValueError(f"two bundles are named {name!r}; name them explicitly with NAME=DIR")
        engines[name] = engine
    return engines


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m web.app --bundle baseline=DIR --bundle finetuned=DIR [--port 8000]`: load bundles and serve the page."""
    parser = argparse.ArgumentParser(description="Serve the tf_retrieval search page over index bundles.")
    parser.add_argument("--bundle", action="append", required=True, metavar="[NAME=]DIR",
                        help="an index bundle (repeat for several models; NAME defaults to the bundle's model name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--max-upload-mb", type=float, default=10.0)
    parser.add_argument("--default-k", type=int, default=20)
    parser.add_argument("--data-dir", default=os.environ.get("TFDS_DATA_DIR"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engines = load_engines(args.bundle, args.data_dir)
    app = create_app(engines, max_upload_mb=args.max_upload_mb, default_k=args.default_k, warmup=True)
    serve(app, args.host, args.port, args.threads)


if __name__ == "__main__":
    main()
