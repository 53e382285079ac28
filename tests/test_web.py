"""The web app through Flask's test client (and once through waitress): every route, bad inputs, feedback, filters.

The engines are real: a generated image folder (6 shape classes x 10 images), two random-weight MobileNetV2 embedders
(32 px avg pooling and 64 px max pooling, so the two "models" rank differently), exact cosine indexes. Expected rankings are recomputed with
numpy from the engines' stored vectors.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("flask")

#: class name -> (RGB colour, shape). Names are shapes, not colours, so tag colours never contradict them.
SHAPES = {"circle": ((220, 50, 47), "circle"), "square": ((38, 110, 210), "square"),
          "triangle": ((40, 160, 70), "triangle"), "stripes": ((235, 190, 30), "stripes"),
          "ring": ((140, 60, 180), "ring"), "cross": ((245, 130, 30), "cross")}


def make_image_folder(root, per_class: int = 10, size: int = 64, seed: int = 0) -> str:
    """Writes `per_class` PNG images per class into root/<class>/ (coloured shapes, jittered, on noisy pastel backgrounds)."""
    rng = np.random.default_rng(seed)
    for name, (colour, shape) in SHAPES.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(215, 250, 3)))
            draw = ImageDraw.Draw(image)
            fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in colour)
            r = int(rng.integers(size // 4, size // 2 - 4))
            cx, cy = (int(v) for v in rng.integers(size // 2 - 6, size // 2 + 7, 2))
            box = [cx - r, cy - r, cx + r, cy + r]
            if shape == "circle":
                draw.ellipse(box, fill=fill)
            elif shape == "square":
                draw.rectangle(box, fill=fill)
            elif shape == "triangle":
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            elif shape == "stripes":
                width = int(rng.integers(4, 8))
                for x in range(0, size, 2 * width):
                    draw.rectangle([x, 0, x + width - 1, size], fill=fill)
            elif shape == "ring":
                draw.ellipse(box, outline=fill, width=max(3, r // 3))
            else:
                t = max(3, r // 3)
                draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
                draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
            pixels = np.asarray(image, dtype=np.int16) + rng.integers(-8, 9, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(root, name, f"{name}_{i:02d}.png"))
    return str(root)


def build_test_engines(root) -> dict:
    """Two real engines over a generated folder, as the app gets them.

    "baseline" is MobileNetV2 at 32 px with average pooling, "finetuned" the same (seeded random) backbone at 64 px with max
    pooling (at 32 px its last feature map is 1x1, where both poolings agree), so the two rank differently.
    """
    from tf_retrieval.config import ModelConfig
    from tf_retrieval.data.images import image_folder
    from tf_retrieval.features.embedding import Embedder
    from tf_retrieval.search.engine import RetrievalEngine
    from tf_retrieval.search.index import build_index

    collection = image_folder(make_image_folder(root), progress=False)
    encoded = [collection.read_bytes(i) for i in range(len(collection))]
    engines = {}
    for name, image_size, pooling in (("baseline", 32, "avg"), ("finetuned", 64, "max")):
        config = ModelConfig(name=name, backbone="mobilenet_v2", image_size=image_size, pooling=pooling, weights=None)
        embedder = Embedder(config)
        index = build_index(embedder.embed_bytes(encoded), np.arange(len(collection)), metric="cosine", backend="exact")
        engines[name] = RetrievalEngine(config, collection, index, embedder)
    return engines


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return build_test_engines(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def app(engines):
    from tf_retrieval.web.app import create_app

    return create_app(engines, max_upload_mb=2, default_k=8, max_k=50)


@pytest.fixture()
def client(app):
    return app.test_client()


def png_bytes(engine, position: int) -> bytes:
    return engine.collection.read_bytes(position)


def all_vectors(engine) -> np.ndarray:
    return engine.vectors(np.arange(len(engine)))


def reference_ranking(engine, query: np.ndarray, exclude=(), classes=None) -> list[tuple[str, float]]:
    """(id, cosine score) of every database image, best first: the numpy ground truth for the API."""
    vectors = all_vectors(engine)
    scores = vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")
    keep = [i for i in order if i not in set(exclude)
            and (classes is None or engine.collection.class_names[engine.collection.labels[i]] in classes)]
    return [(engine.collection.ids[i], float(scores[i])) for i in keep]


def assert_same_ranking(results: list[dict], expected: list[tuple[str, float]]):
    assert [round(r["score"], 4) for r in results] == pytest.approx([round(s, 4) for _, s in expected[:len(results)]], abs=2e-4)
    # ids must agree except where two scores tie
    for result, (image_id, score) in zip(results, expected):
        if result["id"] != image_id:
            assert result["score"] == pytest.approx(score, abs=1e-5)


def error_of(response) -> str:
    assert response.is_json, response.data[:200]
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == response.status_code
    return body["error"]["message"]


# ------------------------------------------------------------------------------------------------- pure helpers

def test_class_colours_are_deterministic_distinct_hex():
    from tf_retrieval.web.app import class_colour

    colours = [class_colour(i) for i in range(40)]
    assert colours == [class_colour(i) for i in range(40)]
    assert len(set(colours)) == 40
    assert all(len(c) == 7 and c.startswith("#") and int(c[1:], 16) >= 0 for c in colours)
    with pytest.raises(ValueError):
        class_colour(-1)


def test_create_app_rejects_bad_setup(engines):
    from tf_retrieval.web.app import create_app

    with pytest.raises(ValueError, match="at least one engine"):
        create_app({})
    with pytest.raises(ValueError, match="default_model 'nope'"):
        create_app(engines, default_model="nope")
    with pytest.raises(ValueError, match="default_k"):
        create_app(engines, default_k=500, max_k=50)


# ------------------------------------------------------------------------------------------------- page, health, stats

def test_homepage_has_intro_controls_and_config(client, engines):
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    for text in ("content-based image retrieval", "Search!", 'id="file-input"', 'id="dropzone"', 'id="spinner"',
                 'id="favourites"', "More like these", "Favourites only", "Random image", "Clear", "Side by side"):
        assert text in html
    config = json.loads(html.split('<script id="config" type="application/json">')[1].split("</script>")[0])
    assert [m["name"] for m in config["models"]] == ["baseline", "finetuned"]
    assert response.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "https://" not in html and "http://" not in html  # no CDN: the page works offline
    for asset in ("/static/app.js", "/static/style.css"):
        static = client.get(asset)
        assert static.status_code == 200 and b"http" not in static.data.replace(b"http://www.w3.org", b"")


def test_health_and_stats(client, engines):
    health = client.get("/api/health").get_json()
    assert health["status"] == "ok" and health["models"] == ["baseline", "finetuned"]
    assert health["index_sizes"] == {"baseline": 60, "finetuned": 60}
    stats = client.get("/api/stats").get_json()
    assert [(m["name"], m["backbone"], m["image_size"], m["pooling"], m["index_size"]) for m in stats["models"]] == [
        ("baseline", "mobilenet_v2", 32, "avg", 60), ("finetuned", "mobilenet_v2", 64, "max", 60)]
    assert [m["runtime"] for m in stats["models"]] == ["litert", "litert"]  # where queries are embedded
    assert [m["database_augmentation"] for m in stats["models"]] == [None, None]  # plain embeddings indexed
    assert stats["class_names"] == sorted(SHAPES)
    assert len(set(stats["class_colours"].values())) == 6
    assert stats["default_model"] == "baseline" and stats["default_k"] == 8 and stats["max_k"] == 50


def test_openapi_documents_every_api_route(client, app):
    spec = client.get("/api/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    routes = {rule.rule.replace("<path:image_id>", "{id}") for rule in app.url_map.iter_rules()
              if rule.rule.startswith("/api/")}
    assert routes == set(spec["paths"])
    random = {parameter["name"] for parameter in spec["paths"]["/api/random"]["get"]["parameters"]}
    assert random == {"model", "k", "threshold", "classes", "compare", "positives", "alpha", "beta", "seed"}
    assert set(client.get("/api/health").get_json()) == set(
        spec["paths"]["/api/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["properties"])
    assert set(client.get("/api/stats").get_json()) == set(spec["components"]["schemas"]["Stats"]["properties"])


# ------------------------------------------------------------------------------------------------- search

def test_upload_search_finds_the_image_itself_first(client, engines):
    engine = engines["baseline"]
    position = engine.collection.ids.index("ring/ring_03.png")
    response = client.post("/api/search", data={"image": (io.BytesIO(png_bytes(engine, position)), "my ring.png"),
                                                "k": "5"})
    assert response.status_code == 200, response.data
    body = response.get_json()
    assert body["query"] == {"type": "upload", "filename": "my ring.png", "bytes": len(png_bytes(engine, position)),
                             "width": 64, "height": 64}
    assert body["settings"]["model"] == "baseline" and body["settings"]["k"] == 5
    assert body["total"] == len(body["results"]) == 5
    first = body["results"][0]
    assert first["id"] == "ring/ring_03.png" and first["score"] == pytest.approx(1.0, abs=1e-4)
    assert first["class_name"] == "ring" and first["label"] == sorted(SHAPES).index("ring")
    assert first["thumbnail_url"] == "/api/images/ring%2Fring_03.png?model=baseline&size=256&v=0"
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert_same_ranking(body["results"], reference_ranking(engine, engine.vectors([position])[0]))


def test_search_by_id_matches_numpy_and_excludes_itself(client, engines):
    engine = engines["finetuned"]
    position = engine.collection.ids.index("cross/cross_01.png")
    body = client.post("/api/search", json={"id": "cross/cross_01.png", "model": "finetuned", "k": 12}).get_json()
    assert body["query"]["type"] == "id" and body["query"]["class_name"] == "cross"
    assert "cross/cross_01.png" not in [r["id"] for r in body["results"]]
    assert body["total"] == 12
    assert_same_ranking(body["results"], reference_ranking(engine, engine.vectors([position])[0], exclude={position}))


def test_k_controls_the_number_of_results(client):
    for k in (1, 3, 50):
        body = client.post("/api/search", data={"id": "square/square_00.png", "k": str(k)}).get_json()
        assert body["total"] == len(body["results"]) == k
    assert client.post("/api/search", data={"id": "square/square_00.png"}).get_json()["total"] == 8  # default_k


def test_class_filter_keeps_only_those_classes(client, engines):
    engine = engines["baseline"]
    position = engine.collection.ids.index("circle/circle_02.png")
    body = client.post("/api/search", data={"id": "circle/circle_02.png", "k": "50", "classes": ["triangle", "cross"]})
    body = body.get_json()
    assert body["settings"]["classes"] == ["cross", "triangle"]
    assert body["total"] == 20  # every triangle and cross, nothing else
    assert {r["class_name"] for r in body["results"]} == {"triangle", "cross"}
    assert_same_ranking(body["results"], reference_ranking(engine, engine.vectors([position])[0], exclude={position},
                                                           classes={"triangle", "cross"}))
    # comma-separated and integer labels work too
    label = sorted(SHAPES).index("stripes")
    body = client.post("/api/search", data={"id": "circle/circle_02.png", "classes": f"{label},ring", "k": "50"}).get_json()
    assert {r["class_name"] for r in body["results"]} == {"stripes", "ring"} and body["total"] == 20


def test_threshold_keeps_only_scores_above_it(client, engines):
    engine = engines["baseline"]
    position = engine.collection.ids.index("stripes/stripes_04.png")
    expected = reference_ranking(engine, engine.vectors([position])[0], exclude={position})
    threshold = expected[6][1] - 1e-6  # exactly 7 images reach it
    body = client.post("/api/search", data={"id": "stripes/stripes_04.png", "k": "50",
                                            "threshold": repr(threshold)}).get_json()
    assert body["settings"]["threshold"] == pytest.approx(threshold)
    assert body["total"] == 7 and all(r["score"] >= threshold for r in body["results"])
    body = client.post("/api/search", data={"id": "stripes/stripes_04.png", "threshold": "1.5"}).get_json()
    assert body["total"] == 0 and body["results"] == []


def test_rocchio_feedback_moves_results_towards_favourites(client, engines):
    engine = engines["baseline"]
    query_id = "circle/circle_00.png"
    favourites = ["square/square_01.png", "square/square_02.png", "square/square_03.png"]
    q_pos = engine.collection.ids.index(query_id)
    fav_pos = [engine.collection.ids.index(f) for f in favourites]
    q, fav = engine.vectors([q_pos])[0], engine.vectors(fav_pos)

    before = client.post("/api/search", json={"id": query_id, "k": 10}).get_json()
    after = client.post("/api/search", json={"id": query_id, "k": 10, "positives": favourites, "alpha": 0.5,
                                             "beta": 1.0}).get_json()
    assert after["settings"]["positives"] == favourites and after["settings"]["alpha"] == 0.5
    moved = 0.5 * q + 1.0 * fav.mean(axis=0)
    moved /= np.linalg.norm(moved)
    assert_same_ranking(after["results"], reference_ranking(engine, moved, exclude={q_pos, *fav_pos}))
    assert not set(favourites) & {r["id"] for r in after["results"]}

    centroid = fav.mean(axis=0) / np.linalg.norm(fav.mean(axis=0))
    vectors = all_vectors(engine)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def closeness(body):  # mean cosine of the results to the favourites' centroid
        return float(np.mean([vectors[r["position"]] @ centroid for r in body["results"]]))

    assert closeness(after) > closeness(before)
    assert sum(r["class_name"] == "square" for r in after["results"]) >= sum(
        r["class_name"] == "square" for r in before["results"])

    # favourites alone: the query is their centroid
    alone = client.post("/api/search", data={"positives": favourites, "k": "5"}).get_json()
    assert alone["query"] == {"type": "favourites", "count": 3}
    assert_same_ranking(alone["results"], reference_ranking(engine, centroid, exclude=set(fav_pos)))


def test_side_by_side_runs_both_models_on_the_same_query(client, engines):
    data = png_bytes(engines["baseline"], 17)
    body = client.post("/api/search", data={"image": (io.BytesIO(data), "q.png"), "compare": "true", "k": "6",
                                            "model": "finetuned"}).get_json()
    runs = {run["model"]: run for run in body["side_by_side"]}
    assert list(runs) == ["baseline", "finetuned"]
    assert runs["finetuned"]["results"] == body["results"]
    for name, engine in engines.items():
        vector = engine.embed([data])[0]
        assert runs[name]["total"] == 6
        assert_same_ranking(runs[name]["results"], reference_ranking(engine, vector))
        assert all(r["thumbnail_url"].endswith(f"model={name}&size=256&v=0") for r in runs[name]["results"])
    assert [r["score"] for r in runs["baseline"]["results"]] != [r["score"] for r in runs["finetuned"]["results"]]


def test_random_returns_a_database_image_and_its_neighbours(client, engines):
    first = client.get("/api/random?seed=7&k=4&model=finetuned").get_json()
    again = client.get("/api/random?seed=7&k=4&model=finetuned").get_json()
    assert first["results"] == again["results"] and first["query"] == again["query"]
    query = first["query"]
    assert query["type"] == "id" and query["random"] is True and query["id"] in engines["finetuned"].collection.ids
    expected = engines["finetuned"].search(engines["finetuned"].vectors([query["position"]]), 4,
                                           exclude=[query["position"]])[0]
    assert [r["id"] for r in first["results"]] == [r.id for r in expected]
    ids = {client.get("/api/random").get_json()["query"]["id"] for _ in range(8)}
    assert len(ids) > 1
    filtered = client.get("/api/random?classes=ring&k=50&compare=1").get_json()
    assert {r["class_name"] for r in filtered["results"]} == {"ring"}
    assert [run["model"] for run in filtered["side_by_side"]] == ["baseline", "finetuned"]


# ------------------------------------------------------------------------------------------------- thumbnails

def test_thumbnails_are_jpeg_of_the_requested_size(client):
    response = client.get("/api/images/ring%2Fring_03.png?size=48")
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    assert Image.open(io.BytesIO(response.data)).size == (48, 48)
    assert "max-age" in response.headers["Cache-Control"]
    default = client.get("/api/images/ring/ring_03.png?model=finetuned")
    assert Image.open(io.BytesIO(default.data)).size == (256, 256)


@pytest.mark.parametrize("url, status, message", [
    ("/api/images/nope.png", 404, "unknown image id"),
    ("/api/images/..%2F..%2Fetc%2Fpasswd", 404, "unknown image id"),
    ("/api/images/ring/../../../../etc/passwd", 404, "unknown image id"),
    ("/api/images/ring%2Fring_03.png?size=0", 400, "size must be between 16 and 512"),
    ("/api/images/ring%2Fring_03.png?size=100000", 400, "size must be between 16 and 512"),
    ("/api/images/ring%2Fring_03.png?size=big", 400, "size must be an integer"),
    ("/api/images/ring%2Fring_03.png?model=resnet", 404, "unknown model 'resnet'"),
])
def test_thumbnail_ids_and_sizes_are_validated(client, url, status, message):
    response = client.get(url)
    assert response.status_code == status
    assert message in error_of(response)


# ------------------------------------------------------------------------------------------------- bad input

def truncated_png(engine) -> bytes:
    data = png_bytes(engine, 0)
    return data[: len(data) // 2]


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes claiming width x height pixels (a decompression bomb header)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("make, message", [
    (lambda engine: b"", "empty file"),
    (lambda engine: b"GIF89a but not really an image at all" * 4, "not an image"),
    (lambda engine: b"hello, this is plain text\n" * 20, "not an image"),
    (truncated_png, "truncated"),
    (lambda engine: bomb_png(), "decompression bomb"),
])
def test_bad_uploads_get_clear_400_json(client, engines, make, message):
    response = client.post("/api/search", data={"image": (io.BytesIO(make(engines["baseline"])), "evil.png")})
    assert response.status_code == 400
    text = error_of(response)
    assert message in text and "evil.png" in text


def test_oversized_upload_gets_413_json(engines):
    from tf_retrieval.web.app import create_app

    small = create_app(engines, max_upload_mb=0.05).test_client()
    response = small.post("/api/search", data={"image": (io.BytesIO(b"\0" * 80_000), "big.png")})
    assert response.status_code == 413
    assert "larger than the limit of 0.05 MB" in error_of(response)
    assert small.get("/api/health").status_code == 200


def test_uploads_stay_in_memory(client, engines, monkeypatch):
    import tempfile

    import werkzeug.formparser

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    monkeypatch.setattr(werkzeug.formparser, "SpooledTemporaryFile", no_disk)
    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8))
    out = io.BytesIO()
    image.save(out, format="PNG")
    assert len(out.getvalue()) > 600_000  # above werkzeug's 500 KB in-memory limit
    response = client.post("/api/search", data={"image": (io.BytesIO(out.getvalue()), "noise.png"), "k": "2"})
    assert response.status_code == 200 and response.get_json()["query"]["width"] == 600


@pytest.mark.parametrize("kwargs, status, message", [
    ({"data": {}}, 400, "no query"),
    ({"data": {"id": "square/square_00.png", "k": "0"}}, 400, "k must be between 1 and 50"),
    ({"data": {"id": "square/square_00.png", "k": "51"}}, 400, "k must be between 1 and 50"),
    ({"data": {"id": "square/square_00.png", "k": "ten"}}, 400, "k must be an integer"),
    ({"json": {"id": "square/square_00.png", "k": 2.5}}, 400, "k must be an integer"),
    ({"data": {"id": "square/square_00.png", "threshold": "high"}}, 400, "threshold must be a number"),
    ({"data": {"id": "square/square_00.png", "threshold": "nan"}}, 400, "threshold must be a finite number"),
    ({"data": {"id": "square/square_00.png", "alpha": "-1", "positives": "ring/ring_00.png"}}, 400, "alpha must be"),
    ({"data": {"id": "square/square_00.png", "compare": "maybe"}}, 400, "compare must be true or false"),
    ({"data": {"id": "square/square_00.png", "classes": "unicorn"}}, 400, "unknown class 'unicorn'"),
    ({"data": {"id": "square/square_00.png", "model": "resnet"}}, 404, "unknown model 'resnet'"),
    ({"json": {"id": "square/square_00.png", "model": 0}}, 404, "unknown model 0"),  # not the default model
    ({"json": {"id": "square/square_00.png", "model": False}}, 404, "unknown model False"),
    ({"data": {"id": "nope.png"}}, 404, "unknown image id 'nope.png'"),
    ({"data": {"id": "square/square_00.png", "positives": "ghost.png"}}, 404, "unknown image id 'ghost.png'"),
    ({"json": {"id": 42}}, 400, "id must be a database image id"),
    ({"json": ["not", "an", "object"]}, 400, "JSON body must be an object"),
    ({"data": {"positives": ["circle/circle_00.png"], "alpha": "0", "beta": "0"}}, 400, "zero"),
    ({"json": {"id": "square/square_00.png", "threshold": 10 ** 400}}, 400, "threshold must be a number"),  # no float
    ({"json": {"id": "square/square_00.png", "k": 1e308 * 10}}, 400, "k must be an integer"),  # infinite
    ({"data": {"id": "square/square_00.png", "positives": ["circle/circle_00.png"] * 1200}}, 400,
     "at most 200 positives are accepted, got 1200"),
    ({"data": {"image": (io.BytesIO(b"x"), "x.png"), "positives": ["circle/circle_00.png"] * 2100}}, 413,
     "the form is over its limits: at most 2000 fields"),  # a multipart form over Werkzeug's limit of parts: its own reason, not the upload size's
])
def test_bad_parameters_get_json_errors_with_the_reason(client, kwargs, status, message):
    response = client.post("/api/search", **kwargs)
    assert response.status_code == status
    assert message in error_of(response)


def test_wrong_methods_and_unknown_routes_are_json(client):
    assert client.get("/api/search").status_code == 405
    assert "not allowed" in error_of(client.get("/api/search"))
    assert client.get("/api/nothing").status_code == 404 and error_of(client.get("/api/nothing"))
    assert client.get("/not-a-page").status_code == 404  # outside /api: a plain 404 page


@contextlib.contextmanager
def running_server(app, sock=None):
    """`app` under waitress on a free localhost port (or on `sock`), in a thread; yields its base URL."""
    from tf_retrieval.web.app import create_server

    server, stop = create_server(app, port=0, threads=2, sock=sock), threading.Event()

    def run():  # waitress' loop a poll at a time, closed in its own thread: never a select on a closed socket
        while not stop.is_set():
            server.asyncore.loop(timeout=0.05, map=server._map, count=1)
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        stop.set()
        thread.join(timeout=10)
        server.task_dispatcher.shutdown()


def multipart_image(body: bytes, boundary: str = "xYz") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()


def post_image(base: str, body: bytes, boundary: str = "xYz") -> tuple[int, dict]:
    req = urllib.request.Request(f"{base}/api/search", data=multipart_image(body, boundary), method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_server_keeps_serving_after_bad_requests_under_waitress(engines):
    """The production server: bad uploads and an oversized body get JSON errors, then searches still work."""
    from tf_retrieval.web.app import create_app

    with running_server(create_app(engines, max_upload_mb=0.1, default_k=3)) as base:
        assert post_image(base, b"")[0] == 400
        status, body = post_image(base, b"\0" * 300_000)
        assert status == 413 and body["error"]["code"] == 413
        assert post_image(base, b"not an image")[0] == 400
        status, body = post_image(base, png_bytes(engines["baseline"], 5))
        assert status == 200 and body["total"] == 3
        with urllib.request.urlopen(f"{base}/api/health", timeout=10) as response:
            assert json.load(response)["status"] == "ok"


def test_every_oversized_body_gets_the_json_413_under_waitress(engines):
    """Bodies over the app's limit, also above the 21 MB waitress once refused in plain text, get the API's JSON 413;
    a body announced over waitress' own limit too, at once."""
    from tf_retrieval.web.app import SERVER_BODY_LIMIT, create_app

    app = create_app(engines)  # the default 10 MB limit
    too_large = {"error": {"code": 413, "name": "Request Entity Too Large",
                           "message": "the upload is larger than the limit of 10 MB"}}
    with running_server(app) as base:
        for size in (11 << 20, 22020096 + 1):
            assert post_image(base, b"\0" * size) == (413, too_large)
        host, port = urllib.parse.urlsplit(base).netloc.split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(f"POST /api/search HTTP/1.1\r\nHost: {host}\r\nContent-Length: {SERVER_BODY_LIMIT + 1}\r\n"
                         "Content-Type: multipart/form-data; boundary=xYz\r\n\r\n".encode())
            head, _, payload = conn.makefile("rb").read().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ") and b"Content-Type: application/json" in head
        assert json.loads(payload) == too_large
        with urllib.request.urlopen(f"{base}/api/health", timeout=10) as response:
            assert response.status == 200


@pytest.mark.parametrize("max_upload_mb", [0, float("inf"), float("nan"), 51])
def test_an_upload_limit_the_decoder_cannot_honour_is_refused(engines, max_upload_mb):
    from tf_retrieval.errors import InvalidInputError
    from tf_retrieval.web.app import create_app

    with pytest.raises(InvalidInputError, match="max_upload_mb must be above 0 and at most 50 .*got"):
        create_app(engines, max_upload_mb=max_upload_mb)


def test_a_port_in_use_is_reported_at_once(app):
    """`tfr web` reserves its port before it loads models: a taken port fails fast, with the way out."""
    from tf_retrieval.errors import InvalidInputError
    from tf_retrieval.web.app import create_server, reserve_port

    with socket.create_server(("127.0.0.1", 0)) as occupant:
        port = occupant.getsockname()[1]
        with pytest.raises(InvalidInputError, match=f"^port {port} is in use: choose another with --port$"):
            reserve_port("127.0.0.1", port)
        with pytest.raises(InvalidInputError, match=f"port {port} is in use"):
            create_server(app, port=port)
    reserved = reserve_port("127.0.0.1", 0)
    with pytest.raises(InvalidInputError, match="is in use"):
        reserve_port("127.0.0.1", reserved.getsockname()[1])
    with running_server(app, sock=reserved) as base:  # the server listens on the reserved socket
        assert base.endswith(f":{reserved.getsockname()[1]}")
        with urllib.request.urlopen(f"{base}/api/health", timeout=10) as response:
            assert json.load(response)["status"] == "ok"


def test_every_request_is_logged_with_its_status_and_time(client, caplog):
    with caplog.at_level(logging.INFO, logger="tf_retrieval.web.requests"):
        client.get("/api/health")
        client.post("/api/search", data={"id": "square/square_00.png", "k": "0"})
        client.get("/api/images/evil%0Aline.png")
        client.get("/static/app.js")
    lines = [record.getMessage() for record in caplog.records if record.name == "tf_retrieval.web.requests"]
    assert len(lines) == 4
    assert re.fullmatch(r"GET /api/health 200 \d+\.\d ms", lines[0])
    assert re.fullmatch(r"POST /api/search 400 \d+\.\d ms", lines[1])
    assert re.fullmatch(r"GET /api/images/evil%0Aline\.png 404 \d+\.\d ms", lines[2])  # no line breaks in the log
    assert re.fullmatch(r"GET /static/app\.js 200 \d+\.\d ms", lines[3])


def test_the_page_serves_a_bundle_replaced_on_disk(tmp_path, engines, caplog):
    """`tfr index --add` swaps the bundle folder: the running page loads it aside and serves it, without a restart."""
    from tf_retrieval.search.engine import RetrievalEngine, add_images, build_bundle, update_bundle
    from tf_retrieval.search.query import Query
    from tf_retrieval.web.app import create_app

    from tf_retrieval.data.images import image_folder

    engine = engines["baseline"]
    folder = shutil.copytree(engine.collection.name, tmp_path / "images")  # its own copy: a file is replaced below
    collection = image_folder(folder, progress=False)
    assert collection.ids == engine.collection.ids
    bundle = str(tmp_path / "bundle")
    build_bundle(bundle, engine.config, collection.subset(range(40)), engine.vectors(range(40)), source=str(folder),
                 backend="exact")
    app = create_app({"baseline": RetrievalEngine.load(bundle, embedder=engine.embedder)}, reload_seconds=0.01)
    page, client = app.extensions["tf_retrieval"], app.test_client()

    def index_size() -> int:
        """The index size /api/health reports once the reloads that requests start have finished."""
        for _ in range(2):
            time.sleep(0.02)  # more than reload_seconds: the next request looks at the bundle
            client.get("/api/health")
            page.reloader.wait()
        return client.get("/api/health").get_json()["index_sizes"]["baseline"]

    assert index_size() == 40
    before = page.searcher
    added = collection.subset(range(40, 60))
    add_images(bundle, added, engine.vectors(range(40, 60)))
    assert index_size() == 60
    new_id = added.ids[0]
    body = client.post("/api/search", json={"id": new_id, "k": 3}).get_json()
    assert body["query"]["id"] == new_id and body["total"] == 3
    assert client.get("/api/stats").get_json()["models"][0]["index_size"] == 60
    assert len(before.engines["baseline"]) == 40  # a request that started before keeps its engine
    assert before.search(Query(id=engine.collection.ids[0]), k=2).total == 2

    # a file replaced, and its id deleted and added again: the thumbnail gets a new URL and the new picture behind it
    first_id = collection.ids[0]

    def thumbnail_url(image_id):
        return client.post("/api/search", json={"id": image_id, "k": 1}).get_json()["query"]["thumbnail_url"]

    old_url = thumbnail_url(first_id)
    old_thumbnail = client.get(old_url).data
    other_thumbnail = client.get(thumbnail_url(engine.collection.ids[50])).data
    assert old_thumbnail != other_thumbnail
    with open(collection.paths[0], "wb") as f:
        f.write(collection.read_bytes(50))
    update_bundle(bundle, delete=[first_id], add=collection.subset([0]), embeddings=engine.vectors([50]))
    assert index_size() == 60
    new_url = thumbnail_url(first_id)
    assert new_url != old_url and client.get(new_url).data == other_thumbnail

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tf_retrieval.web.reload"):
        os.rename(bundle, bundle + ".aside")  # mid-swap without RENAME_EXCHANGE: no bundle there, nothing is read
        assert index_size() == 60
        os.rename(bundle + ".aside", bundle)
        assert index_size() == 60
        assert not [record for record in caplog.records if record.name == "tf_retrieval.web.reload"]
        # a bundle that cannot be read is logged and skipped: the page keeps serving the last good one
        with open(os.path.join(bundle, "catalog.json"), "w") as f:
            f.write("{broken")
        assert index_size() == 60
    assert "could not reload the bundle of baseline" in caplog.text


WORKERS = r"""
import sys

import numpy as np

from tf_retrieval.data.images import decode_image
from tf_retrieval.search.engine import RetrievalEngine
from tf_retrieval.web.app import create_app, reserve_port, serve_workers


class MeanColour:  # a numpy embedder: the image's mean colour
    def embed_bytes(self, encoded):
        vectors = np.stack([decode_image(b).reshape(-1, 3).mean(axis=0) for b in encoded]).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


bundle, port = sys.argv[1], int(sys.argv[2])
build = (lambda: create_app({"colour": RetrievalEngine.load(bundle, embedder=MeanColour())}, batching=False))
if bundle == "broken":
    def build():
        raise OSError("bundle unreadable")
serve_workers(build, reserve_port("127.0.0.1", port), workers=2, threads=2)
"""


def start_workers(bundle: str, port: int):
    """`serve_workers` with 2 workers in a fresh process (this one has run models: forking it is not safe)."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", WORKERS, bundle, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_worker_processes_share_the_port_and_a_dead_worker_is_replaced(tmp_path):
    """`tfr web --workers 2`: two processes answer on one port; one killed is started again, the port keeps answering."""
    import signal

    psutil = pytest.importorskip("psutil")
    from tf_retrieval.config import ModelConfig
    from tf_retrieval.data.images import decode_image, image_folder
    from tf_retrieval.search.engine import build_bundle

    folder = make_image_folder(str(tmp_path / "images"), per_class=3)
    collection = image_folder(folder, progress=False)
    vectors = np.stack([decode_image(collection.read_bytes(i)).reshape(-1, 3).mean(axis=0)
                        for i in range(len(collection))]).astype(np.float32)
    bundle = str(tmp_path / "bundle")
    build_bundle(bundle, ModelConfig(name="colour", backbone="mobilenet_v2", image_size=32, weights=None), collection,
                 vectors / np.linalg.norm(vectors, axis=1, keepdims=True), source=folder, backend="exact")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    parent = start_workers(bundle, port)

    def search_ok() -> bool:
        body = json.dumps({"id": collection.ids[0], "k": 3}).encode()
        request = urllib.request.Request(f"{base}/api/search", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            results = json.load(response)["results"]
        return len(results) == 3 and collection.ids[0] not in [r["id"] for r in results]  # the query is left out

    def workers(count: int) -> list[int]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pids = [child.pid for child in psutil.Process(parent.pid).children()]
            if len(pids) == count:
                try:
                    if search_ok():
                        return pids
                except OSError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"expected {count} workers, found {pids}")

    try:
        first = workers(2)
        assert all(search_ok() for _ in range(10))
        os.kill(first[0], signal.SIGKILL)
        second = workers(2)
        while first[0] in second:
            second = workers(2)
        assert first[1] in second and all(search_ok() for _ in range(10))
    finally:
        parent.terminate()
        parent.wait(timeout=20)
    assert parent.returncode == 0 and not psutil.pid_exists(first[1])


def test_a_worker_that_cannot_start_stops_the_server():
    parent = start_workers("broken", free_port())
    output, _ = parent.communicate(timeout=120)
    assert parent.returncode != 0
    assert "web worker 0 exited with code 1 while starting" in output or \
        "web worker 1 exited with code 1 while starting" in output
