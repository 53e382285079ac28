import json
import os
import sys
import threading

import numpy as np
import pytest

from tf_retrieval import storage
from tf_retrieval.search import index as index_module
from tf_retrieval.search.index import (FLOAT_METRICS, ExactIndex, Index, IndexModelMismatchError, ScannIndex, build_index,
                                scann_params)

# Query q = [1, 0, 0]; database (ids 10..13), worked out by hand:
#   a = [3, 0, 0]        dot 3    cosine 1        |q-a|^2 4     Pearson: a-mean = [2,-1,-1] ~ q-mean = [2,-1,-1]/3 -> 1
#   b = [1, 1, 0]        dot 1    cosine 1/sqrt2  |q-b|^2 1     Pearson: [1,1,-2]/3 . [2,-1,-1]/3 / (6/9) = 0.5
#   c = [0.6, 0, 0.2]    dot 0.6  cosine 0.6/sqrt(0.4) = 0.949   |q-c|^2 0.16+0.04 = 0.2
#                        Pearson: c-mean = [1/3,-4/15,-1/15]; dot with q-mean 1/3; norms 0.816 * 0.432 -> 0.945
#   e = [0, -1, -1.2]    dot 0    cosine 0        |q-e|^2 1+1+1.44 = 3.44
#                        Pearson: e-mean = [0.733,-0.267,-0.467]; dot with q-mean 0.733; norms 0.816 * 0.909 -> 0.988
# So every metric ranks differently; euclidean scores are minus the squared distances.
POINTS = np.array([[3, 0, 0], [1, 1, 0], [0.6, 0, 0.2], [0, -1, -1.2]], np.float32)
IDS = [10, 11, 12, 13]
QUERY = np.array([[1, 0, 0]], np.float32)
EXPECTED = {
    "dot": ([10, 11, 12, 13], [3.0, 1.0, 0.6, 0.0]),
    "cosine": ([10, 12, 11, 13], [1.0, 0.9487, 0.7071, 0.0]),
    "euclidean": ([12, 11, 13, 10], [-0.2, -1.0, -3.44, -4.0]),
    "pearson": ([10, 13, 12, 11], [1.0, 0.9878, 0.9449, 0.5]),
}


@pytest.mark.parametrize("backend", ["exact", "scann"])
@pytest.mark.parametrize("metric", FLOAT_METRICS)
def test_hand_checked_orders_and_scores(metric, backend):
    index = build_index(POINTS, IDS, metric=metric, backend=backend)
    scores, ids = index.search(QUERY, 4)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and scores.shape == ids.shape == (1, 4)
    assert ids[0].tolist() == EXPECTED[metric][0]
    np.testing.assert_allclose(scores[0], EXPECTED[metric][1], rtol=1e-3, atol=1e-4)


def numpy_reference(db, q, metric):
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    if metric == "cosine":
        return unit(q) @ unit(db).T
    if metric == "pearson":
        return unit(q - q.mean(1, keepdims=True)) @ unit(db - db.mean(1, keepdims=True)).T
    if metric == "dot":
        return q @ db.T
    return -((q[:, None, :] - db[None]) ** 2).sum(-1)


@pytest.mark.parametrize("metric", FLOAT_METRICS)
def test_exact_matches_numpy_argsort(metric, rng, monkeypatch):
    monkeypatch.setattr(index_module, "_CHUNK_BYTES", 16 * 300 * 7)  # 7 queries per chunk: exercises chunking
    db = rng.normal(size=(300, 8)).astype(np.float32)
    q = rng.normal(size=(20, 8)).astype(np.float32)
    sims = numpy_reference(db.astype(np.float64), q.astype(np.float64), metric)
    reference = np.argsort(-sims, axis=1, kind="stable")
    index = build_index(db, np.arange(1000, 1300), metric=metric, backend="exact")
    for k in (15, 300):  # partial (argpartition) and full ranking
        scores, ids = index.search(q, k)
        np.testing.assert_array_equal(ids, reference[:, :k] + 1000)
        np.testing.assert_allclose(scores, np.take_along_axis(sims, reference[:, :k], 1), rtol=1e-4, atol=1e-4)


def test_exact_breaks_ties_by_id_whatever_the_insertion_order():
    index = ExactIndex(2, metric="dot")
    index.add(np.array([[1, 0], [0, 1], [1, 0], [1, 0]]), [7, 3, 9, 1])
    assert index.search(np.array([[1.0, 0.0]]), 3)[1][0].tolist() == [1, 7, 9]
    assert index.search(np.array([[1.0, 0.0]]), 4)[1][0].tolist() == [1, 7, 9, 3]
    assert index.search(np.array([[1.0, 0.0]]), 2)[1][0].tolist() == [1, 7]  # cut inside a tie: the smallest ids
    np.testing.assert_array_equal(index.search(np.array([[1.0, 0.0]]), 4)[0][0], [1, 1, 1, 0])
    many = ExactIndex(4, metric="cosine")
    many.add(np.ones((300, 4), np.float32), np.arange(300))
    assert many.search(np.ones((2, 4), np.float32), 51)[1].tolist() == [list(range(51))] * 2


def clustered(rng, n, dim=16, clusters=30):
    centres = rng.normal(size=(clusters, dim)) * 3
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def recall_at_10(approximate, exact, queries):
    _, found = approximate.search(queries, 10)
    _, truth = exact.search(queries, 10)
    return np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])


@pytest.mark.parametrize("mode,metric", [("ah", "cosine"), ("tree_ah", "cosine"), ("tree_ah", "euclidean")])
def test_scann_recall_against_exact(mode, metric, rng):
    both = clustered(rng, 3100)  # queries from the data's clusters (ScaNN's threaded training varies run to run:
    db, queries = both[:3000], both[3000:]  # queries far from every cluster sat right at the bound)
    scann = build_index(db, metric=metric, backend="scann", params={"mode": mode})
    exact = build_index(db, metric=metric, backend="exact")
    assert recall_at_10(scann, exact, queries) >= 0.95
    assert scann.built_params["mode"] == mode
    if mode == "tree_ah":  # num_leaves ~ sqrt(3000) = 55, at least 20 of them searched
        assert scann.built_params["num_leaves"] == 55 and scann.built_params["leaves_to_search"] == 20


def test_scann_brute_force_equals_exact(rng):
    db, queries = clustered(rng, 1000), clustered(rng, 20)
    for metric in FLOAT_METRICS:
        scann, exact = build_index(db, metric=metric, backend="scann"), build_index(db, metric=metric, backend="exact")
        (s_scores, s_ids), (e_scores, e_ids) = scann.search(queries, 10), exact.search(queries, 10)
        assert scann.built_params == {"mode": "brute_force"}  # 1,000 points: the automatic choice
        np.testing.assert_array_equal(s_ids, e_ids)
        np.testing.assert_allclose(s_scores, e_scores, rtol=1e-4, atol=1e-3)


def test_scann_pads_what_a_narrow_tree_search_misses(rng):
    db = clustered(rng, 1000)
    index = build_index(db, backend="scann", params={"mode": "tree_ah", "num_leaves": 20, "leaves_to_search": 1})
    scores, ids = index.search(db[:5], 500)  # one leaf holds far fewer than 500 points
    missing = ids == -1
    assert missing.any() and np.isneginf(scores[missing]).all() and np.isfinite(scores[~missing]).all()
    assert all(len(set(row[row >= 0])) == (row >= 0).sum() for row in ids)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_add_and_delete(backend, rng):
    db = clustered(rng, 2000)
    options = {"params": {"mode": "tree_ah", "num_leaves": 20}} if backend == "scann" else {}
    index = build_index(db, metric="cosine", backend=backend, **options)
    index.search(db[:1], 5)  # trains ScaNN: the small mutations below go through its mutation API
    assert index.delete([0, 1, 2, 2]) == 3
    assert len(index) == 1997 and not {0, 1, 2} & set(index.ids.tolist())
    _, ids = index.search(db[:3], 10)
    assert not {0, 1, 2} & set(ids.ravel().tolist())
    index.add(db[:2], [5000, 5001])  # the deleted vectors come back under new ids
    _, ids = index.search(db[:2], 1)
    assert ids[:, 0].tolist() == [5000, 5001]
    index.add(db[2:3], [2])  # and a deleted id can be reused
    assert index.search(db[2:3], 1)[1][0, 0] == 2
    if backend == "scann":
        assert index.built_params["mode"] == "tree_ah"  # 6 mutations: no retraining
    with pytest.raises(ValueError, match=r"already in the index, e.g. \[5000\]"):
        index.add(db[:1], [5000])
    with pytest.raises(KeyError, match=r"not in the index: \[0\]; nothing was deleted"):
        index.delete([5001, 0])
    assert 5001 in index.ids  # all or nothing
    np.testing.assert_allclose(index.get_vectors([5001]), db[1:2] / np.linalg.norm(db[1]), rtol=1e-5)
    assert index.delete(index.ids) == 2000 and len(index) == 0
    with pytest.raises(ValueError, match="the index is empty"):
        index.search(db[:1], 1)
    index.add(db[:3], [7, 8, 9])
    ids = index.search(db[:1], 5)[1][0].tolist()
    assert ids[0] == 7 and sorted(ids[1:3]) == [8, 9] and ids[3:] == [-1, -1]  # only 3 vectors: the rest is padding


def test_scann_retrains_after_many_mutations(rng):
    db = clustered(rng, 1200)
    index = build_index(db[:1000], backend="scann", params={"mode": "ah"}, rebuild_fraction=0.1)
    index.search(db[:1], 1)
    index.add(db[1000:1050], np.arange(1000, 1050))
    assert index.built_params is not None  # 50 mutations <= 10% of 1000: updated in place
    index.add(db[1050:1200], np.arange(1050, 1200))
    assert index.built_params is None  # 200 > 100: dropped, retrained at the next search
    assert index.search(db[1100:1101], 1)[1][0, 0] == 1100
    assert index.built_params["mode"] == "ah"


@pytest.mark.parametrize("backend,options", [("exact", {}), ("scann", {}),
                                             ("scann", {"params": {"mode": "tree_ah", "num_leaves": 10}})])
def test_save_load_round_trip(backend, options, rng, tmp_path):
    db = clustered(rng, 600)
    index = build_index(db[:500], np.arange(100, 600), metric="euclidean", backend=backend, **options)
    index.search(db[:1], 1)
    index.delete(np.arange(100, 150))  # mutations before saving: ScaNN's row order is no longer the id order
    index.add(db[500:], np.arange(1000, 1100))
    before = index.search(db[:40], 5)
    path = tmp_path / "idx"
    index.save(path, model_id="m:v1", extra={"note": "x"})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["count"] == 550 and manifest["dim"] == 16 and manifest["model_id"] == "m:v1"
    assert manifest["backend"] == backend and manifest["metric"] == "euclidean" and manifest["extra"] == {"note": "x"}
    assert manifest["config"] == index.get_config() and {"vectors.npy", "ids.npy"} <= set(manifest["files"])
    assert not [name for name in manifest["files"] if name.endswith(".pkl")]  # nothing unpickled on load
    loaded = Index.load(path, expected_model_id="m:v1")
    assert type(loaded) is type(index) and len(loaded) == 550
    np.testing.assert_array_equal(loaded.ids, index.ids)
    if backend == "scann":
        assert loaded.built_params == index.built_params  # the trained searcher was loaded, not retrained
    after = loaded.search(db[:40], 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], rtol=1e-6)
    np.testing.assert_allclose(loaded.get_vectors([150, 1099]), db[[50, 599]])
    loaded.add(db[:1], [1])  # the loaded index stays mutable
    assert loaded.search(db[:1], 1)[1][0, 0] == 1


def test_save_and_load_an_empty_scann_index(tmp_path):
    ScannIndex(4).save(tmp_path / "idx", model_id="m")
    loaded = Index.load(tmp_path / "idx")
    loaded.add(np.eye(4), [1, 2, 3, 4])
    assert loaded.search(np.eye(4)[:1], 1)[1][0, 0] == 1


def test_load_refuses_another_model(rng, tmp_path):
    build_index(clustered(rng, 50), backend="exact").save(tmp_path / "idx", model_id="baseline:1")
    with pytest.raises(IndexModelMismatchError, match="'baseline:1', but the querying model is 'baseline:2'") as info:
        Index.load(tmp_path / "idx", expected_model_id="baseline:2")
    assert "Rebuild the index with `tfr index`" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="describes a exact index, not a scann one"):
        ScannIndex.load(tmp_path / "idx")


@pytest.mark.parametrize("damaged", ["vectors.npy", "ids.npy", "scann/dataset.npy"])
def test_load_detects_damaged_files(damaged, rng, tmp_path):
    path = tmp_path / "idx"
    build_index(clustered(rng, 50), backend="scann").save(path, model_id="m")
    with open(path / damaged, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xfe\xfd\xfc")
    with pytest.raises(ValueError, match=f"file {damaged} is damaged"):
        Index.load(path)


def test_load_detects_missing_files_and_bad_manifests(rng, tmp_path):
    path = tmp_path / "idx"
    build_index(clustered(rng, 50), backend="exact").save(path, model_id="m")
    os.remove(path / "ids.npy")
    with pytest.raises(ValueError, match="file ids.npy is missing"):
        Index.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is damaged"):
        Index.load(path)
    with pytest.raises(FileNotFoundError, match="no index at .*build one with `tfr index`"):
        Index.load(tmp_path / "nothing")


def test_save_failure_keeps_the_old_index(rng, tmp_path, monkeypatch):
    path = tmp_path / "idx"
    build_index(clustered(rng, 50), backend="exact").save(path, model_id="old")
    bigger = build_index(clustered(rng, 80), backend="exact")

    def disk_full(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(ExactIndex, "_save_backend", disk_full)
    with pytest.raises(OSError, match="disk full"):
        bigger.save(path, model_id="new")
    assert len(Index.load(path, expected_model_id="old")) == 50
    assert os.listdir(tmp_path) == ["idx"]  # no temp dirs left behind


def test_save_replaces_atomically_or_restores(rng, tmp_path, monkeypatch):
    path = tmp_path / "idx"
    build_index(clustered(rng, 50), backend="exact").save(path, model_id="v1")
    build_index(clustered(rng, 60), backend="exact").save(path, model_id="v2")  # RENAME_EXCHANGE where available
    assert len(Index.load(path, expected_model_id="v2")) == 60 and os.listdir(tmp_path) == ["idx"]

    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)  # the two-rename fallback
    build_index(clustered(rng, 70), backend="exact").save(path, model_id="v3")
    assert len(Index.load(path, expected_model_id="v3")) == 70 and os.listdir(tmp_path) == ["idx"]

    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(str(src)).startswith(".idx.tmp-") and not str(src).endswith("-old"):
            raise OSError("rename failed")  # the new index cannot be moved in
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        build_index(clustered(rng, 90), backend="exact").save(path, model_id="v4")
    monkeypatch.setattr(os, "rename", real_rename)
    assert len(Index.load(path, expected_model_id="v3")) == 70 and os.listdir(tmp_path) == ["idx"]


def test_save_refuses_to_replace_a_folder_that_is_not_an_index(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match="is not an index"):
        build_index(np.eye(3), backend="exact").save(tmp_path / "photos", model_id="m")
    assert (tmp_path / "photos" / "cat.jpg").exists()
    with pytest.raises(ValueError, match="model_id must be a non-empty string"):
        build_index(np.eye(3), backend="exact").save(tmp_path / "idx", model_id="")


def test_bad_inputs():
    index = ExactIndex(4)
    with pytest.raises(ValueError, match="the index is empty"):
        index.search(np.zeros((1, 4)), 1)
    with pytest.raises(ValueError, match=r"shape \[n, 4\], got \[2, 3\]"):
        index.add(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match=r"got \[4\] \(wrap a single vector"):
        index.add(np.zeros(4), [0])
    with pytest.raises(ValueError, match=r"NaN or infinite values \(rows \[1\]\)"):
        index.add(np.array([[0, 0, 0, 1], [np.inf, 0, 0, 0]]), [0, 1])
    with pytest.raises(ValueError, match="must be real numbers"):
        index.add(np.array([["a", "b", "c", "d"]]), [0])
    with pytest.raises(ValueError, match="2 vectors but 1 ids"):
        index.add(np.zeros((2, 4)), [0])
    with pytest.raises(ValueError, match=r"ids must be unique; repeated: \[3\]"):
        index.add(np.zeros((2, 4)), [3, 3])
    with pytest.raises(ValueError, match="ids must be a 1-d array of integers"):
        index.add(np.zeros((2, 4)), [0.5, 1.5])
    with pytest.raises(ValueError, match="ids must be non-negative"):
        index.add(np.zeros((1, 4)), [-1])
    assert len(index) == 0  # nothing half-added
    index.add(np.eye(4)[:2], [0, 1])
    for k in (0, -3, 2.5):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.search(np.ones((1, 4)), k)
    with pytest.raises(ValueError, match=r"queries must have shape \[n, 4\], got \[1, 5\]"):
        index.search(np.ones((1, 5)), 1)
    scores, ids = index.search(np.ones((1, 4)), 4)  # fewer vectors than k: padded
    assert ids[0].tolist() == [0, 1, -1, -1] and np.isneginf(scores[0, 2:]).all()
    assert index.search(np.zeros((0, 4)), 3)[1].shape == (0, 3)
    with pytest.raises(KeyError, match="not in the index"):
        index.get_vectors([0, 5])
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        ExactIndex(4, metric="manhattan")
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        ExactIndex(0)
    with pytest.raises(ValueError, match="unknown option.* for the exact index: params"):
        build_index(np.eye(4), backend="exact", params={"mode": "ah"})
    with pytest.raises(ValueError, match="unknown index backend 'faiss'"):
        build_index(np.eye(4), backend="faiss")
    with pytest.raises(ValueError, match=r"unknown keys \['leaves'\]"):
        ScannIndex(4, params={"mode": "tree_ah", "leaves": 3})
    with pytest.raises(ValueError, match="unknown ScaNN mode 'lsh'"):
        ScannIndex(4, params={"mode": "lsh"})


@pytest.mark.parametrize("metric,expected", [("cosine", [1.0, 3 ** -0.5, 0.0]), ("pearson", [1.0, 0.0, 0.0])])
def test_zero_vectors_score_zero_for_cosine_and_pearson(metric, expected):
    # [0, 0, 0] has no direction (and [2, 2, 2] no variance, for Pearson): similarity 0, not NaN
    index = build_index(np.array([[0, 0, 0], [2, 2, 2], [1, 0, 0]]), metric=metric, backend="exact")
    scores, ids = index.search(np.array([[1.0, 0.0, 0.0]]), 3)
    assert ids[0, 0] == 2 and np.isfinite(scores).all()
    np.testing.assert_allclose(scores[0], expected, atol=1e-6)


def test_missing_scann_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scann", None)  # makes `import scann` fail
    with pytest.raises(ImportError, match=r'pip install "tf_retrieval\[scann\]"'):
        build_index(np.eye(4), backend="scann").search(np.eye(4), 1)
    assert type(build_index(np.eye(4))) is ExactIndex  # "auto" falls back to exact


def test_config_round_trip():
    index = ScannIndex(8, "dot", params={"mode": "ah", "reorder": 50}, rebuild_fraction=0.5)
    clone = Index.from_config(index.get_config())
    assert type(clone) is ScannIndex and clone.get_config() == index.get_config()
    assert type(Index.from_config(ExactIndex(3, "pearson").get_config())) is ExactIndex


def test_concurrent_searches_and_mutations(rng):
    db = clustered(rng, 1500)
    index = build_index(db[:1000], backend="scann", params={"mode": "ah"})
    errors = []

    def searcher():
        try:
            for _ in range(20):
                _, ids = index.search(db[:8], 5)
                assert (ids >= 0).all()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for thread in threads:
        thread.start()
    for start in range(1000, 1500, 50):
        index.add(db[start:start + 50], np.arange(start, start + 50))
        index.delete([start])
    for thread in threads:
        thread.join()
    assert not errors and len(index) == 1490


def test_scann_params_follow_size():
    assert scann_params(5_000, 128) == {"mode": "brute_force"}
    mid = scann_params(50_000, 128)
    assert mid["mode"] == "ah" and mid["dims_per_block"] == 2 and mid["anisotropic_quantization_threshold"] == 0.2
    assert mid["reorder"] == 500 and mid["training_sample_size"] == 25_000
    wide = scann_params(50_000, 1280)  # wide vectors: a tree (scoring every AH code costs n x dim), 4 dims per block
    assert wide["mode"] == "tree_ah" and wide["num_leaves"] == 224 and wide["dims_per_block"] == 4
    big = scann_params(1_000_000, 128)
    assert big["mode"] == "tree_ah" and big["num_leaves"] == 1000 and big["leaves_to_search"] == 100
    assert big["spherical"] and big["tree_training_sample_size"] == 250_000 and big["training_sample_size"] == 100_000
    assert scann_params(120_000, 128)["leaves_to_search"] == 35  # ceil(346 / 10)
    for metric in ("euclidean", "dot"):  # no fixed norm: no anisotropic threshold, generic tree
        params = scann_params(200_000, 128, metric)
        assert params["anisotropic_quantization_threshold"] is None and not params["spherical"]
    assert scann_params(100, 8, mode="tree_ah")["num_leaves"] == 10


def test_scann_params_target_recall_bands():
    default = scann_params(1_000_000, 128)
    bands = [scann_params(1_000_000, 128, target_recall=t) for t in (0.8, 0.95, 0.99, 0.999)]
    assert [p["leaves_to_search"] for p in bands] == [25, 50, 125, 250]  # of 1000 leaves: /40, /20, /8, /4
    assert [p["reorder"] for p in bands] == [40, 100, 200, 500]
    search_time = ("leaves_to_search", "reorder")
    for params in bands:  # a target changes only search-time settings: one trained tree serves every target
        assert {k: v for k, v in params.items() if k not in search_time} == \
               {k: v for k, v in default.items() if k not in search_time}
    assert scann_params(10_000, 128, mode="tree_ah", target_recall=0.9)["leaves_to_search"] == 10  # the minimum
    assert scann_params(100, 8, mode="tree_ah", target_recall=0.999)["leaves_to_search"] == 10  # all 10 leaves
    assert scann_params(50_000, 128, target_recall=0.9) == {**scann_params(50_000, 128), "reorder": 40}
    assert scann_params(5_000, 128, target_recall=0.9) == {"mode": "brute_force"}
    assert scann_params(500_000, 128, target_recall=1.0) == {"mode": "brute_force"}  # exact
    assert scann_params(500_000, 128, mode="tree_ah", target_recall=1.0)["reorder"] == 500
    for bad in (0, 1.5, -0.1, "high"):
        with pytest.raises(ValueError, match="target_recall must be in"):
            scann_params(1000, 8, target_recall=bad)
    with pytest.raises(ValueError, match="target_recall must be in"):
        ScannIndex(8, target_recall=2)


def test_scann_target_recall_trades_recall_for_work(rng, tmp_path):
    db, queries = clustered(rng, 4000), clustered(rng, 100)
    exact = build_index(db, backend="exact")
    low = build_index(db, backend="scann", params={"mode": "tree_ah"}, target_recall=0.9)
    high = build_index(db, backend="scann", params={"mode": "tree_ah"}, target_recall=0.99)
    low_recall, high_recall = recall_at_10(low, exact, queries), recall_at_10(high, exact, queries)
    assert low.built_params["leaves_to_search"] == 10 and high.built_params["leaves_to_search"] == 40  # of 63
    assert (low.built_params["reorder"], high.built_params["reorder"]) == (40, 200)
    assert high_recall >= 0.99 and high_recall >= low_recall
    clone = Index.from_config(high.get_config())
    assert clone.target_recall == 0.99 and "target_recall" not in ScannIndex(8).get_config()
    high.save(tmp_path / "high", model_id="m:1")
    loaded = Index.load(tmp_path / "high")
    assert loaded.target_recall == 0.99 and loaded.built_params == high.built_params


def test_scann_tune_changes_search_settings_without_retraining(rng, tmp_path):
    db, queries = clustered(rng, 3000), clustered(rng, 100)
    exact = build_index(db, backend="exact")
    index = build_index(db, backend="scann", params={"mode": "tree_ah"})
    narrow = index.tune(leaves_to_search=1, reorder=100)  # trains the searcher first
    searcher = index._searcher
    assert narrow["leaves_to_search"] == 1 and narrow["reorder"] == 100 and narrow["num_leaves"] == 55
    narrow_recall = recall_at_10(index, exact, queries)
    wide = index.tune(leaves_to_search=55, reorder=1000)
    assert index._searcher is searcher and wide == index.built_params and wide["leaves_to_search"] == 55
    wide_recall = recall_at_10(index, exact, queries)
    assert wide_recall >= 0.99 and wide_recall > narrow_recall
    index.save(tmp_path / "tuned", model_id="m:1")  # the tuned settings are saved with the searcher
    assert Index.load(tmp_path / "tuned").built_params["leaves_to_search"] == 55
    index.rebuild()  # retraining goes back to the params / scann_params settings
    assert index.built_params["leaves_to_search"] == 20 and index.built_params["reorder"] == 500
    with pytest.raises(ValueError, match="positive integer"):
        index.tune(leaves_to_search=0)
    with pytest.raises(ValueError, match=r"\(ah\) has no leaves_to_search"):
        build_index(db, backend="scann", params={"mode": "ah"}).tune(leaves_to_search=3)
    with pytest.raises(ValueError, match=r"\(brute_force\) has no reorder"):
        build_index(db[:100], backend="scann").tune(reorder=50)
    with pytest.raises(ValueError, match="index is empty"):
        ScannIndex(4).tune(reorder=50)


def test_hamming_ranks_packed_codes_by_distance_then_id():
    # 8-bit codes, query 0b11110000; distances worked out by hand
    codes = np.array([[0b11110001], [0b11110000], [0b00001111], [0b11100000], [0b11110000]], np.uint8)
    ids = [40, 30, 20, 10, 5]
    index = build_index(codes, ids, metric="hamming", backend="auto")  # auto: Hamming is exact only
    assert isinstance(index, ExactIndex) and index.dim == 8 and len(index) == 5
    scores, found = index.search(np.array([[0b11110000]], np.uint8), 5)
    assert found[0].tolist() == [5, 30, 10, 40, 20]  # distance 0 (ids 5 < 30), 1 (10 < 40), 8
    assert scores[0].tolist() == [0.0, 0.0, -1.0, -1.0, -8.0]  # minus the Hamming distance
    assert not np.signbit(scores[0][:2]).any()  # a distance of 0 scores 0.0, not -0.0 (printed "-0.0000" before)
    top2 = index.search(np.array([[0b11110000]], np.uint8), 2)
    assert top2[1][0].tolist() == [5, 30]  # partial selection keeps the tie order


def test_hamming_matches_a_numpy_reference_and_packs_real_codes(rng, tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "_CHUNK_BYTES", 4000)  # a few queries per chunk
    db = rng.normal(size=(200, 48)).astype(np.float32)
    queries = rng.normal(size=(9, 48)).astype(np.float32)
    index = build_index(db, metric="hamming")  # real-valued codes are packed on the way in: bit = value >= 0
    assert index.get_vectors([0]).dtype == np.uint8 and index.get_vectors([0]).shape == (1, 6)
    scores, ids = index.search(queries, 200)
    reference = ((queries[:, None, :] >= 0) != (db[None] >= 0)).sum(-1)
    expected = np.lexsort((np.broadcast_to(np.arange(200), reference.shape), reference), axis=1)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(-scores, np.take_along_axis(reference, expected, axis=1))
    index.save(tmp_path / "codes", model_id="hash48")
    loaded = Index.load(tmp_path / "codes", expected_model_id="hash48")
    assert loaded.metric == "hamming" and loaded.dim == 48
    np.testing.assert_array_equal(loaded.search(queries, 7)[1], ids[:, :7])


def test_hamming_needs_the_exact_backend_and_the_right_width():
    with pytest.raises(ValueError, match="ScaNN does not search binary codes"):
        build_index(np.zeros((3, 1), np.uint8), metric="hamming", backend="scann")
    index = build_index(np.zeros((3, 2), np.uint8), metric="hamming")
    with pytest.raises(ValueError, match=r"shape \[n, 16\]"):
        index.search(np.zeros((1, 3), np.uint8), 1)


@pytest.mark.parametrize("mode, size", [("ah", 3000), ("tree_ah", 4000)])
def test_scann_calibrates_its_search_on_high_dimensional_data(mode, size, rng, caplog):
    """At high dimensions re-scoring is the costly part: ScaNN's `reorder` (with a tree: together with the leaves
    scanned) is the cheapest setting that reaches the target recall on probes of the data, and the searches keep that
    recall. A setting given in `params` is kept (a tree still calibrates the other one)."""
    import logging

    both = clustered(rng, size + 100, dim=256)  # queries from the data's own clusters, as a user's images would be
    db, queries = both[:size], both[size:]
    exact = build_index(db, backend="exact")
    with caplog.at_level(logging.INFO, logger="tf_retrieval.search.index"):
        scann = build_index(db, backend="scann", params={"mode": mode})
        recall = recall_at_10(scann, exact, queries)
    params = scann.built_params
    assert params["reorder"] in (20, 40, 100, 200, 500) and params["calibrated_recall"] >= 0.99
    assert f"ScaNN re-scores {params['reorder']} candidates per query" in caplog.text
    assert recall >= 0.95
    if mode == "tree_ah":
        assert params["num_leaves"] == 63 and 2 <= params["leaves_to_search"] <= 63
        assert f"scanning {params['leaves_to_search']} of 63 leaves" in caplog.text
    given = {"reorder": 300} if mode == "ah" else {"leaves_to_search": 63}
    fixed = build_index(db, backend="scann", params={"mode": mode, **given})
    fixed.search(queries[:1], 10)  # trains the searcher
    assert {key: fixed.built_params[key] for key in given} == given
    assert ("calibrated_recall" in fixed.built_params) == (mode == "tree_ah")


def test_scann_calibration_scans_more_leaves_before_it_settles_and_says_so(rng, caplog):
    """Unclustered data is the worst case of a tree: what the usual shares of its leaves reach is not the target, so
    half the leaves and then all of them are tried, and a target still missed is a warning."""
    import logging

    db = rng.standard_normal((3000, 257)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="tf_retrieval.search.index"):
        scann = build_index(db, backend="scann", params={"mode": "tree_ah", "num_leaves": 2000})
        scann.search(db[:1], 10)
    params = scann.built_params
    assert params["num_leaves"] == 60  # as many as 3,000 vectors make (50 each), not the 2,000 asked for
    assert params["leaves_to_search"] > 20 and "of 60 leaves" in caplog.text  # beyond the default share
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "not reached" in r.getMessage()]
    assert bool(warned) == (params["calibrated_recall"] < 0.99)


@pytest.mark.parametrize("metric", ["dot", "euclidean"])
def test_sharded_exact_search_equals_one_exact_index_through_ties_in_any_id_order(metric, rng):
    """Small integer vectors score exactly (no rounding), each stored 20 times under ids in random order: ties
    everywhere, and the same answer from 4 shards as from one index, at every depth."""
    vectors = np.repeat(rng.integers(-3, 4, (30, 8)).astype(np.float32), 20, axis=0)
    ids = rng.permutation(10_000)[:600]
    whole = build_index(vectors, ids, metric=metric, backend="exact")
    sharded = build_index(vectors, ids, metric=metric, backend="exact", shards=4)
    for k in (7, 30, 600):
        scores, found = whole.search(vectors[::50], k)
        np.testing.assert_array_equal(sharded.search(vectors[::50], k)[1], found)
        assert all((np.diff(row_ids)[np.diff(row_scores) == 0] > 0).all() for row_ids, row_scores in zip(found, scores))


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "hamming"])
def test_sharded_exact_search_equals_one_exact_index(metric, rng, tmp_path):
    """Shards by id, searched in parallel and merged by score then id: the same answer as one index over everything,
    before and after a save, an addition and a deletion."""
    from tf_retrieval.search.sharded import ShardedIndex, shard_of

    vectors = clustered(rng, 900, dim=32) if metric != "hamming" else rng.integers(0, 256, (900, 4), dtype=np.uint8)
    queries = clustered(rng, 40, dim=32) if metric != "hamming" else rng.integers(0, 256, (40, 4), dtype=np.uint8)
    ids = rng.permutation(5000)[:900]
    dim = 32
    whole = build_index(vectors, ids, metric=metric, backend="exact", dim=dim)
    sharded = build_index(vectors, ids, metric=metric, backend="exact", dim=dim, shards=3)
    assert isinstance(sharded, ShardedIndex) and len(sharded) == 900
    assert sorted(len(shard) for shard in sharded.shards)[0] > 250  # the hash spreads ids evenly
    assert set(shard_of(sharded.shards[1].ids, 3)) == {1}

    def same(a, b, k=25):
        (sa, ia), (sb, ib) = a.search(queries, k), b.search(queries, k)
        np.testing.assert_array_equal(ia[:, :10], ib[:, :10])
        np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-4)
        assert all(set(x) == set(y) for x, y in zip(ia[:, :-1], ib[:, :-1])) or metric == "euclidean"
        # (deep euclidean ranks can swap near-ties: -|q - x|^2 is rounded differently in a shard's product)

    same(sharded, whole)
    sharded.save(tmp_path / "sharded", model_id="m:1")
    loaded = Index.load(tmp_path / "sharded", expected_model_id="m:1")
    assert isinstance(loaded, ShardedIndex) and len(loaded.shards) == 3
    same(loaded, whole)
    np.testing.assert_array_equal(loaded.get_vectors(ids[:5]), whole.get_vectors(ids[:5]))
    loaded.delete(ids[:100])
    whole.delete(ids[:100])
    loaded.add(vectors[:50], ids[:50] + 10_000)
    whole.add(vectors[:50], ids[:50] + 10_000)
    same(loaded, whole, k=1000)  # more than the index holds: both pad with -1 / -inf
    with pytest.raises(KeyError, match="not in the index"):  # errors.UnknownIdError
        loaded.delete([999_999])
    with pytest.raises(IndexModelMismatchError):
        Index.load(tmp_path / "sharded", expected_model_id="other:1")


def test_sharded_scann_recall_matches_one_scann_index(rng):
    both = clustered(rng, 6100, dim=32)
    db, queries = both[:6000], both[6000:]
    exact = build_index(db, backend="exact")
    one = build_index(db, backend="scann", params={"mode": "ah"})
    sharded = build_index(db, backend="scann", params={"mode": "ah"}, shards=4)
    assert abs(recall_at_10(sharded, exact, queries) - recall_at_10(one, exact, queries)) <= 0.01
