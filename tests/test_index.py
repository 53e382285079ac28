import json
import os

import numpy as np
import pytest

from tf_retrieval.index import (METRICS, ExactIndex, Index, IndexModelMismatchError, ScannIndex, build_index,
                                scann_params)

# Three 2-d points and a query at [1, 0]:
#   a = [2, 0]    cosine 1.00, dot 2.0, euclidean d^2 = 1,  pearson: a-mean = [1, -1]
#   b = [0.5, 0.5] cosine 0.71, dot 0.5, euclidean d^2 = 0.5
#   c = [-1, 0.2] cosine -0.98, dot -1, euclidean d^2 = 4.04
POINTS = np.array([[2.0, 0.0], [0.5, 0.5], [-1.0, 0.2]], np.float32)
QUERY = np.array([[1.0, 0.0]], np.float32)
EXPECTED_ORDER = {"cosine": [10, 11, 12], "dot": [10, 11, 12], "euclidean": [11, 10, 12], "pearson": [10, 12, 11]}


@pytest.mark.parametrize("backend", ["exact", "scann"])
@pytest.mark.parametrize("metric", METRICS)
def test_hand_checked_orders(metric, backend):
    # Pearson: query [1,0] -> centred [0.5,-0.5]; a -> [1,-1] (corr 1); b -> [0,0] (corr 0); c -> [-0.6,0.6] (corr -1).
    # So c ranks below b: [10, 11, 12] would be wrong; b (score 0) comes before c (score -1).
    expected = {"pearson": [10, 11, 12]}.get(metric, EXPECTED_ORDER[metric])
    index = build_index(POINTS, [10, 11, 12], metric=metric, backend=backend)
    scores, ids = index.search(QUERY, 3)
    assert ids[0].tolist() == expected
    assert (np.diff(scores[0]) <= 1e-6).all()
    if metric == "euclidean":
        np.testing.assert_allclose(scores[0], [-0.5, -1.0, -4.04], rtol=1e-5)
    if metric == "dot":
        np.testing.assert_allclose(scores[0], [2.0, 0.5, -1.0], rtol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_exact_matches_numpy_reference(metric, rng):
    db = rng.normal(size=(300, 8)).astype(np.float32)
    q = rng.normal(size=(20, 8)).astype(np.float32)
    if metric == "pearson":
        db_c, q_c = db - db.mean(1, keepdims=True), q - q.mean(1, keepdims=True)
        sims = (q_c / np.linalg.norm(q_c, axis=1, keepdims=True)) @ (db_c / np.linalg.norm(db_c, axis=1, keepdims=True)).T
    elif metric == "cosine":
        sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (db / np.linalg.norm(db, axis=1, keepdims=True)).T
    elif metric == "dot":
        sims = q @ db.T
    else:
        sims = -((q[:, None, :] - db[None]) ** 2).sum(-1)
    reference = np.argsort(-sims, axis=1, kind="stable")[:, :15]
    scores, ids = build_index(db, metric=metric, backend="exact").search(q, 15)
    np.testing.assert_array_equal(ids, reference)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, reference, 1), rtol=1e-4, atol=1e-4)


def clustered(rng, n, dim=16, clusters=40):
    centres = rng.normal(size=(clusters, dim)) * 3
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def recall_at_10(index, exact, queries):
    _, found = index.search(queries, 10)
    _, truth = exact.search(queries, 10)
    return np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])


@pytest.mark.parametrize("params", [
    {"mode": "ah", "dims_per_block": 2, "reorder": 100, "anisotropic_quantization_threshold": 0.2,
     "training_sample_size": 3000},
    {"mode": "tree_ah", "num_leaves": 40, "leaves_to_search": 10, "dims_per_block": 2, "reorder": 100,
     "anisotropic_quantization_threshold": 0.2, "training_sample_size": 3000},
])
def test_scann_recall_against_exact(params, rng):
    db, queries = clustered(rng, 3000), clustered(rng, 100)
    scann = build_index(db, metric="cosine", backend="scann", params=params)
    exact = build_index(db, metric="cosine", backend="exact")
    assert recall_at_10(scann, exact, queries) >= 0.95


def test_add_and_delete(rng):
    db = clustered(rng, 2000)
    for backend in ("exact", "scann"):
        index = build_index(db, metric="cosine", backend=backend)
        index.search(db[:1], 5)  # builds the ScaNN searcher: later mutations go through its API
        assert index.delete([0, 1, 2]) == 3
        assert len(index) == 1997
        _, ids = index.search(db[:3], 10)
        assert not set(ids.ravel()) & {0, 1, 2}
        index.add(db[:2] * 1.0, [5000, 5001])
        _, ids = index.search(db[:2], 1)
        assert ids[:, 0].tolist() == [5000, 5001]
        with pytest.raises(ValueError, match="ids already in the index"):
            index.add(db[:1], [5000])
        with pytest.raises(KeyError, match="ids not in the index"):
            index.delete([0])


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_save_load_round_trip(backend, rng, tmp_path):
    db = clustered(rng, 500)
    index = build_index(db, np.arange(100, 600), metric="euclidean", backend=backend)
    before = index.search(db[:7], 5)
    index.save(str(tmp_path / "idx"), model_id="m:v1", extra={"note": "x"})
    manifest = json.load(open(tmp_path / "idx" / "manifest.json"))
    assert manifest["count"] == 500 and manifest["dim"] == 16 and manifest["model_id"] == "m:v1"
    assert manifest["backend"] == backend and "vectors.npy" in manifest["files"]
    loaded = Index.load(str(tmp_path / "idx"), expected_model_id="m:v1")
    assert type(loaded) is type(index) and len(loaded) == 500
    after = loaded.search(db[:7], 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], rtol=1e-5)
    np.testing.assert_allclose(loaded.get_vectors([100, 599]), db[[0, 499]])


def test_load_refuses_other_model_and_damage(rng, tmp_path):
    index = build_index(clustered(rng, 50), backend="exact")
    path = str(tmp_path / "idx")
    index.save(path, model_id="baseline:v1")
    with pytest.raises(IndexModelMismatchError, match="'baseline:v1', but the querying model is 'baseline:v2'"):
        Index.load(path, expected_model_id="baseline:v2")
    with open(os.path.join(path, "vectors.npy"), "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(ValueError, match="vectors.npy is missing or damaged"):
        Index.load(path)
    with pytest.raises(FileNotFoundError, match="no index at"):
        Index.load(str(tmp_path / "nothing"))


def test_atomic_save_keeps_the_old_index_when_writing_fails(rng, tmp_path, monkeypatch):
    path = str(tmp_path / "idx")
    build_index(clustered(rng, 50), backend="exact").save(path, model_id="old")
    bigger = build_index(clustered(rng, 80), backend="exact")
    monkeypatch.setattr(ExactIndex, "_save_backend", lambda self, d: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        bigger.save(path, model_id="new")
    assert len(Index.load(path, expected_model_id="old")) == 50
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp dirs left behind


def test_bad_inputs(rng):
    index = ExactIndex(4)
    with pytest.raises(ValueError, match="the index is empty"):
        index.search(np.zeros((1, 4)), 1)
    with pytest.raises(ValueError, match=r"shape \[n, 4\], got \[2, 3\]"):
        index.add(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.add(np.array([[np.nan, 0, 0, 0]]), [0])
    with pytest.raises(ValueError, match="2 vectors but 1 ids"):
        index.add(np.zeros((2, 4)), [0])
    index.add(np.eye(4)[:2], [0, 1])
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(np.ones((1, 4)), 0)
    scores, ids = index.search(np.ones((1, 4)), 4)  # fewer vectors than k: padded
    assert ids[0, 2:].tolist() == [-1, -1] and np.isneginf(scores[0, 2:]).all()
    with pytest.raises(ValueError, match="unknown metric"):
        ExactIndex(4, metric="manhattan")
    with pytest.raises(ValueError, match="unknown index backend"):
        build_index(np.eye(4), backend="faiss")


def test_scann_params_follow_size():
    assert scann_params(5_000, 128)["mode"] == "brute_force"
    assert scann_params(50_000, 128)["mode"] == "ah"
    big = scann_params(1_000_000, 128)
    assert big["mode"] == "tree_ah" and big["num_leaves"] == 1000 and big["leaves_to_search"] == 50
    assert scann_params(50_000, 128, "euclidean")["anisotropic_quantization_threshold"] is None
    assert ScannIndex(8).get_config()["params"] is None
