import json
import os

import numpy as np
import pytest

from tf_retrieval.config import ModelConfig
from tf_retrieval.data.images import ImageCollection
from tf_retrieval.evaluation.evaluate import (RECORD_KEY, evaluate_protocol, fit_pca, make_record, rank_and_score,
                                              records_markdown, write_records_markdown)
from tf_retrieval.storage import RecordStore
from tf_retrieval.data.protocols import Protocol


def test_perfectly_separated_classes_score_one():
    # Two tight clusters on orthogonal axes: every neighbour of a query ranks its own class first.
    database = np.array([[1, 0.01], [1, -0.01], [0.98, 0], [0.01, 1], [-0.01, 1]], np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    queries = np.array([[1, 0.02], [0.02, 1]], np.float32)
    metrics, curve = rank_and_score(database, labels, queries, np.array([0, 1]))
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["MAP@R"] == pytest.approx(1.0)
    assert metrics["R@1"] == 1.0 and metrics["queries"] == 2
    assert curve["precision"][0] == pytest.approx(1.0)


def test_hand_computed_ranking():
    # Query [1, 0] against 1-d angles: ranking is d0 (rel), d1 (not), d2 (rel), d3 (not).
    database = np.array([[1, 0], [0.9, 0.3], [0.5, 0.6], [-1, 0.1]], np.float32)
    labels = np.array([0, 1, 0, 1])
    metrics, _ = rank_and_score(database, labels, np.array([[1, 0]], np.float32), np.array([0]))
    # AP = (1/1 + 2/3) / 2 = 0.8333; MAP@R with R=2: (1/2) * (1/1) = 0.5; R@1 = 1
    assert metrics["mAP"] == pytest.approx(5 / 6, abs=1e-6)
    assert metrics["MAP@R"] == pytest.approx(0.5, abs=1e-6)
    assert metrics["R@1"] == 1.0


def test_leave_one_out_excludes_the_query_itself():
    database = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99], [0.7, 0.7]], np.float32)
    labels = np.array([0, 0, 1, 1, 2])  # class 2 has a single image: no relevant item, skipped and counted
    metrics, _ = rank_and_score(database, labels, chunk_size=2)
    assert metrics["queries"] == 4 and metrics["skipped_queries"] == 1
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["R@1"] == pytest.approx(1.0)


@pytest.mark.parametrize("metric", ["cosine", "hamming"])
def test_map_at_r_from_rankings_r_deep_equals_the_whole_ranking(metric, rng):
    """Validation scores MAP@R from rankings only R deep: the same value, ties (duplicates, Hamming) included."""
    from tf_retrieval.evaluation.evaluate import map_at_r_score
    from tf_retrieval.vectors import pack_codes

    labels = rng.integers(0, 6, 200)
    database = (rng.normal(size=(200, 16)) + labels[:, None] * 0.3).astype(np.float32)
    database[7] = database[3]  # a duplicate: a tie at the top
    queries, query_labels = rng.normal(size=(30, 16)).astype(np.float32), rng.integers(0, 7, 30)  # class 6: skipped
    if metric == "hamming":
        database, queries = pack_codes(database), pack_codes(queries)
    for args in ((), (queries, query_labels)):  # leave-one-out, then separate queries
        whole = rank_and_score(database, labels, *args, metric=metric, chunk_size=7)[0]["MAP@R"]
        assert map_at_r_score(database, labels, *args, metric=metric, chunk_size=7) == pytest.approx(whole, abs=1e-12)
        assert 0 < whole < 1
    tied = np.ones((200, 8), np.float32)  # every score ties: the cut at R falls inside the tie
    tied_labels = np.repeat(np.arange(4), 50)
    whole = rank_and_score(tied, tied_labels, metric="cosine")[0]["MAP@R"]
    assert map_at_r_score(tied, tied_labels, metric="cosine") == pytest.approx(whole, abs=1e-12)


def test_evaluate_protocol_with_head_and_pca(rng):
    n = 40
    labels = np.repeat([0, 1], n // 2)
    collection = ImageCollection("c", ids=[str(i) for i in range(n)], labels=labels, class_names=["a", "b"],
                                 splits=["all"] * n, encoded=[b""] * n)
    features = rng.normal(size=(n, 8)).astype(np.float32)
    features[:, 0] += np.where(labels == 0, 5, -5)
    protocol = Protocol("flowers-disjoint", collection, train=np.arange(0), database=np.arange(n), queries=None)
    metrics, _, dim = evaluate_protocol(protocol, features, pca_dim=2)
    assert dim == 2 and metrics["mAP"] > 0.95
    _, _, dim = evaluate_protocol(protocol, features, embed=lambda f: f[:, :3])
    assert dim == 3
    with pytest.raises(ValueError, match="3 feature rows for a collection of 40"):
        evaluate_protocol(protocol, features[:3])


def test_evaluate_protocol_with_database_augmentation_and_query_expansion(rng):
    from tf_retrieval.evaluation.evaluate import search_details, search_variant
    from tf_retrieval.search.query import augment_database, expand_exact

    n = 60
    labels = np.repeat([0, 1, 2], n // 3)
    collection = ImageCollection("c", ids=[str(i) for i in range(n)], labels=labels, class_names=["a", "b", "c"],
                                 splits=["all"] * n, encoded=[b""] * n)
    features = rng.normal(size=(n, 6)).astype(np.float32)
    features[np.arange(n), labels] += 1.5
    database, queries = np.arange(0, n, 2), np.arange(1, n, 2)
    protocol = Protocol("cifar10-2", collection, train=database, database=database, queries=queries)
    metrics, _, _ = evaluate_protocol(protocol, features, expand=(3, 2.0), augment=(4, 2.0))
    augmented = augment_database(features[database], 4, 2.0)
    reference, _ = rank_and_score(augmented, labels[database], expand_exact(features[queries], augmented, 3, 2.0),
                                  labels[queries])
    assert metrics == reference
    assert metrics["mAP"] != evaluate_protocol(protocol, features)[0]["mAP"]
    leave_one_out = Protocol("flowers-disjoint", collection, train=np.arange(0), database=np.arange(n), queries=None)
    with pytest.raises(ValueError, match="leave-one-out: query expansion and database augmentation need separate"):
        evaluate_protocol(leave_one_out, features, augment=(4, 3.0))
    assert [search_variant(e, a) for e, a in ((0, 0), (5, 0), (0, 5), (5, 10))] == [
        None, "alpha-qe", "alpha-dba", "alpha-dba+qe"]
    assert search_details() == {} and search_details(5, 10, 3.0) == {"variant": "alpha-dba+qe", "expand": 5,
                                                                     "dba": 10, "alpha": 3.0}


def test_fit_pca_recovers_the_main_axis(rng):
    x = rng.normal(size=(200, 3)) * np.array([10.0, 1.0, 0.1])
    mean, components = fit_pca(x, 1)
    assert components.shape == (3, 1) and abs(abs(components[0, 0]) - 1) < 1e-2
    with pytest.raises(ValueError, match="PCA dimension must be in 1..3"):
        fit_pca(x, 4)


def test_records_merge_and_markdown(tmp_path):
    path = str(tmp_path / "r.json")
    config = ModelConfig(image_size=96)
    first = make_record("cifar10-2", config, {"mAP": 0.5, "MAP@R": 0.2}, embedding_dim=1280, seconds=1.0, command="x")
    store = RecordStore(path, RECORD_KEY)
    store.merge([first])
    second = make_record("cifar10-2", config, {"mAP": 0.6, "MAP@R": 0.3}, embedding_dim=1280, seconds=1.0, command="x")
    other = make_record("cifar10-1", config, {"mAP": 0.7}, embedding_dim=1280, seconds=1.0, command="x")
    merged = store.merge([second, other])
    assert [r["metrics"]["mAP"] for r in json.load(open(path))] == [0.6, 0.7] == [r["metrics"]["mAP"] for r in merged]
    table = records_markdown(merged)
    assert "| cifar10-2 | baseline | efficientnet_lite0 | 96, tf inputs | avg | 1280 | imagenet | tf | 0.600 | 0.300 |" \
        in table
    # EfficientNet-Lite's own inputs are named ("tf"), its earlier ones not, as in ids: the records made before match
    assert first["preprocessing"] == "tf"
    assert "preprocessing" not in make_record("cifar10-2", ModelConfig(image_size=96, preprocessing="torch"), {},
                                              embedding_dim=1, seconds=1.0, command="x")
    fused = {**second, "model": "finetuned", "variant": "whitened + head (w=0.5)", "run": "r1", "hash_bits": None}
    markdown = write_records_markdown(path, store.merge([fused]))
    assert markdown == str(tmp_path / "r.md")
    text = open(markdown).read()
    assert "| cifar10-2 | finetuned + whitened + head (w=0.5) | efficientnet_lite0 |" in text and "| r1 |" in text
    assert "Commands:" in text and "    x" in text
    multiscale = ModelConfig(image_size=96, scales=(1, 0.75))
    records = store.merge([make_record("cifar10-2", multiscale, {"mAP": 0.65}, embedding_dim=1280, seconds=1.0,
                                       command="x")])
    assert [r.get("scales") for r in records] == [None, None, None, [1.0, 0.75]]  # its own key: nothing replaced
    store.merge([make_record("cifar10-2", multiscale, {"mAP": 0.66}, embedding_dim=1280, seconds=1.0, command="x")])
    assert [r["metrics"]["mAP"] for r in store.load()][-1] == 0.66 and len(store.load()) == 4
    assert "| cifar10-2 | baseline | efficientnet_lite0 | 96 x1/0.75, tf inputs | avg |" in records_markdown(store.load())
    # the compare report shows a baseline scored beside several runs once, and each baseline of its own key
    from tf_retrieval.evaluation.compare import report_markdown

    runs = [{**record, "run": run} for record in store.load() if record["model"] == "baseline" for run in ("a", "b")]
    report = report_markdown(json.loads(json.dumps(runs)), str(tmp_path))  # scales as JSON lists
    assert report.count("| cifar10-2 | baseline | efficientnet_lite0 | 96 x1/0.75, tf inputs |") == 1
    assert report.count("| cifar10-2 | baseline | efficientnet_lite0 | 96, tf inputs | avg |") == 1


@pytest.mark.parametrize("content, message", [("[{", "is not valid JSON"), ('{"protocol": "p"}', "holds no JSON list"),
                                              ("[1, 2]", "holds no JSON list")])
def test_a_damaged_records_file_is_a_clear_error_and_is_kept(tmp_path, content, message):
    from tf_retrieval.errors import InvalidInputError

    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match=f"r.json {message}.*: fix it or move it away"):
        RecordStore(str(path), ("protocol",)).merge([{"protocol": "p"}])
    assert path.read_text() == content


def test_concurrent_merges_keep_every_record(tmp_path):
    import threading

    store = RecordStore(str(tmp_path / "results" / "r.json"), ("protocol", "run"))
    threads = [threading.Thread(target=lambda i=i: [store.merge([{"protocol": "p", "run": f"{i}-{j}"}])
                                                    for j in range(5)]) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r["run"] for r in store.load()) == sorted(f"{i}-{j}" for i in range(6) for j in range(5))
    assert os.listdir(tmp_path / "results") == ["r.json"]  # no lock or temporary file left beside it


def test_a_head_on_a_fine_tuned_trunk_is_compared_with_the_imagenet_baseline():
    from tf_retrieval.config import TrainConfig
    from tf_retrieval.evaluation.compare import baseline_of

    on_trunk = TrainConfig(model=ModelConfig(name="finetuned", weights="runs/top/finetuned-backbone-1.weights.h5",
                                             hash_bits=48, image_size=160))
    assert baseline_of(on_trunk) == ModelConfig(name="baseline", weights="imagenet", image_size=160)
    assert baseline_of(TrainConfig(model=ModelConfig(name="finetuned", weights=None))).weights is None  # tests


def test_a_run_on_another_runs_trunk_records_the_runs_before_it(tmp_path):
    from tf_retrieval.config import TrainConfig
    from tf_retrieval.evaluation.evaluate import run_details
    from tf_retrieval.storage import write_json

    def finished_run(name: str, weights: str, seconds: float) -> str:
        run_dir = tmp_path / name
        run_dir.mkdir()
        config = TrainConfig(model=ModelConfig(name="finetuned", weights=weights, train_from="images"))
        config.save(str(run_dir / "train_config.json"))
        trained = ModelConfig(name="finetuned", weights=str(run_dir / "finetuned-backbone-1.weights.h5"))
        trained.save(str(run_dir / "model.json"))
        (run_dir / "finetuned-backbone-1.weights.h5").write_bytes(b"")
        write_json(str(run_dir / "result.json"), {"seconds": seconds, "epochs": 1, "best_map_at_r": 0.5,
                                                  "command": f"tfr train {name}"})
        return trained.weights

    first = finished_run("first", "imagenet", 10.0)
    second = finished_run("second", first, 20.0)
    finished_run("third", second, 30.0)
    details = run_details(str(tmp_path / "third"))
    assert details["train_command"] == "tfr train third"
    # reproducing the third run takes the first two, in this order
    assert details["starts_from"] == [{"run": "first", "train_command": "tfr train first", "train_seconds": 10.0},
                                      {"run": "second", "train_command": "tfr train second", "train_seconds": 20.0}]
    assert "starts_from" not in run_details(str(tmp_path / "first"))
    # and the compare report lists the three training commands in that order
    from tf_retrieval.evaluation.compare import report_markdown

    record = make_record("cifar10-2", ModelConfig(name="finetuned"), {"mAP": 0.9}, embedding_dim=128, seconds=1.0,
                         command="tfr compare third", model="finetuned", **details)
    report = report_markdown([record], str(tmp_path))
    training = report.split("Training commands (a run that starts from another run's trunk comes after that run):")[1]
    assert training.index("tfr train first") < training.index("tfr train second") < training.index("tfr train third")
    assert "| 0.500 |" in report  # the run's validation MAP@R; a run that held out no validation split shows none
    assert "| – (none held out) |" in report_markdown([{**record, "validation_map_at_r": None}], str(tmp_path))
    # a recipe changes over time: where a training command names one, the report says what reproduces the run
    assert "`--recipe` command" not in report
    recipe_record = {**record, "train_command": "tfr train --recipe cifar10-1 --run-dir third"}
    assert "`tfr train --config FILE` trains again" in report_markdown([recipe_record], str(tmp_path))


def test_the_baselines_benchmark_runs_and_records_its_runtime(image_dir, tmp_path, monkeypatch):
    """benchmarks/evaluate_baselines.py end to end on a small flowers-like folder, into a results folder of its own."""
    import importlib.util

    files = sorted(os.path.relpath(os.path.join(folder, name), image_dir)
                   for folder, _, names in os.walk(image_dir) for name in names if name.endswith(".png"))
    with open(os.path.join(image_dir, "index.csv"), "w") as f:
        f.write("file,label,official_split\n" + "".join(
            f"{file},{['blue', 'green', 'red'].index(file.split('/')[0])},{('train', 'validation', 'test')[i % 3]}\n"
            for i, file in enumerate(files)))
    monkeypatch.setenv("FLOWERS_DIR", image_dir)
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "evaluate_baselines.py")
    spec = importlib.util.spec_from_file_location("evaluate_baselines", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--backbone", "mobilenet_v2", "--weights", "none", "--sizes", "32", "--poolings", "avg",
                        "--protocols", "flowers-official", "--workdir", str(tmp_path / "work"),
                        "--results", str(tmp_path)]) == 0
    (record,) = json.load(open(tmp_path / "retrieval.json"))
    assert (record["protocol"], record["backbone"], record["runtime"]) == ("flowers-official", "mobilenet_v2", "tf")
    assert 0 < record["metrics"]["mAP"] <= 1 and os.path.exists(tmp_path / "retrieval.md")
