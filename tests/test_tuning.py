import json
import os

import numpy as np
import pytest

from test_train import nuisance_features
from tf_retrieval.cli import main
from tf_retrieval.config import TrainConfig
from tf_retrieval.evaluation.evaluate import leave_one_out_map_at_r as map_at_r

pytest.importorskip("keras_tuner")

from tf_retrieval.tuning import SiameseHyperModel, make_tuner, measure_index_cost, tune  # noqa: E402

TINY = dict(classes_per_batch=6, images_per_class=6, epochs=3, steps_per_epoch=5, validation_fraction=0.25)


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_tuner_scores_each_trial_with_the_callbacks_map_at_r_and_resumes(rng, tmp_path):
    features, labels = nuisance_features(rng)
    base = TrainConfig(**TINY)
    out, lines = str(tmp_path / "tune"), []
    result = tune(base, features, labels, out, trials=2, progress=lines.append, database_size=500)

    assert len(result.trials) == 2 and len(lines) == 3
    assert "validation MAP@R on 60 images of 6 classes (stratified)" in lines[0]  # 6 classes: no class-disjoint split
    assert lines[1].startswith("trial 1/2: d=") and "-> val MAP@R 0." in lines[1]
    for record in result.trials:  # the oracle's score is the best epoch of the callback's val_map_at_r
        trial_dir = os.path.join(out, "tuner", "search", f"trial_{record['trial_id']}")
        history = json.load(open(os.path.join(trial_dir, "tfr_history.json")))["history"][0]
        assert 1 <= len(history["val_map_at_r"]) <= 3 and record["epochs"] == len(history["loss"])
        score = json.load(open(os.path.join(trial_dir, "trial.json")))["score"]
        assert score == record["MAP@R"] == pytest.approx(max(history["val_map_at_r"]), abs=1e-6)
        assert record["embedding_dim"] in (16, 32, 64, 128, 256, 512) and record["mining"] in ("semihard", "hard",
                                                                                             "batch-all")
        assert record["index_mb"] > record["embedding_dim"] * 500 * 4 / 1e6 and record["index_ms_per_query"] > 0
    assert result.best_score == max(r["MAP@R"] for r in result.trials)

    # the best config is the base config with the best trial's values, and round-trips through its JSON file
    best = max(result.trials, key=lambda r: r["MAP@R"])
    loaded = TrainConfig.load(result.config_path)
    assert loaded == result.best_config
    assert {k: getattr(loaded, k) for k in ("embedding_dim", "hidden_dim", "mining", "margin", "learning_rate")} == {
        k: best[k] for k in ("embedding_dim", "hidden_dim", "mining", "margin", "learning_rate")}
    assert (loaded.epochs, loaded.classes_per_batch, loaded.seed) == (base.epochs, base.classes_per_batch, base.seed)
    assert os.path.getsize(result.plot_path) > 10_000 and "(best)" in open(result.table_path).read()
    assert len(json.load(open(os.path.join(out, "trials.json")))["trials"]) == 2

    # the best checkpoint the tuner kept scores the trial's MAP@R on the validation split
    hypermodel = SiameseHyperModel(base, features, labels)
    tuner = make_tuner(hypermodel, os.path.join(out, "tuner"), trials=2)
    trial = tuner.oracle.get_best_trials(1)[0]
    model = tuner.load_model(trial)
    embeddings = model.predict(hypermodel.val_inputs, batch_size=512, verbose=0)  # as the callback
    assert map_at_r(embeddings, hypermodel.val_labels) == pytest.approx(trial.score, abs=1e-4)

    # resuming with more trials runs only the missing one; another base config is refused
    lines.clear()
    again = tune(base, features, labels, out, trials=3, progress=lines.append, database_size=500)
    assert [r["trial_id"] for r in again.trials][:2] == [r["trial_id"] for r in result.trials] and len(again.trials) == 3
    assert len(lines) == 2 and lines[1].startswith("trial 3/3:")
    with pytest.raises(ValueError, match="holds a search with another base"):
        tune(TrainConfig(**{**TINY, "epochs": 4}), features, labels, out, trials=3, progress=None)


def test_class_disjoint_validation_with_many_classes(tmp_path):
    features, labels = nuisance_features(np.random.default_rng(2), classes=24, per_class=8)
    hypermodel = SiameseHyperModel(TrainConfig(**TINY), features, labels)
    assert hypermodel.class_disjoint and hypermodel.validation_classes == 6
    with pytest.raises(ValueError, match="hash_bits"):
        SiameseHyperModel(TrainConfig.from_dict({"hash_bits": 16}), features, labels)
    with pytest.raises(ValueError, match=r"drop augment \['flip'\] from the base config"):
        SiameseHyperModel(TrainConfig.from_dict({**TINY, "augment": ["flip"]}), features, labels)
    with pytest.raises(ValueError, match="validate_against must be 'held-out' in the base config, not 'training'"):
        SiameseHyperModel(TrainConfig.from_dict({**TINY, "validate_against": "training"}), features, labels)
    with pytest.raises(ValueError, match="unknown tuning algorithm"):
        make_tuner(hypermodel, str(tmp_path), algorithm="grid")
    from tf_retrieval.tuning.tune import tune_protocol

    with pytest.raises(ValueError, match="train_from 'images' .* would hold every decoded training image in memory"):
        tune_protocol(TrainConfig.from_dict({**TINY, "train_from": "images"}), str(tmp_path), workdir=str(tmp_path))


def test_index_cost_grows_with_the_embedding_size():
    small, large = (measure_index_cost(d, 400, backend="exact", queries=20) for d in (16, 64))
    assert small["backend"] == "exact" and small["database_size"] == 400
    assert 3 < large["index_mb"] / small["index_mb"] < 4.5  # the vectors dominate
    assert small["index_ms_per_query"] > 0 and large["index_ms_per_query"] > 0


def test_tfr_tune_writes_a_config_that_tfr_train_takes(tmp_path, capsys):
    from test_cli import split_folder

    folder = split_folder(tmp_path / "colours")
    workdir, out = str(tmp_path / "work"), str(tmp_path / "tuned")
    flags = ["--protocol", "cifar10-2", "--source", folder, "--backbone", "mobilenet_v2", "--weights", "none",
             "--image-size", "32", "--classes-per-batch", "4", "--images-per-class", "3", "--epochs", "2",
             "--steps-per-epoch", "2", "--validation-fraction", "0.34"]
    assert main(["--workdir", workdir, "tune", *flags, "--trials", "2", "--out", out, "--index-backend", "exact"]) == 0
    printed = capsys.readouterr().out
    assert "trial 2/2:" in printed and "best of 2 trials: validation MAP@R" in printed
    config_path = os.path.join(out, "best_config.json")
    assert f"next: tfr train --config {config_path}" in printed
    best = TrainConfig.load(config_path)
    assert best.source == folder and best.model.weights is None and best.model.image_size == 32
    assert sorted(os.listdir(out)) == ["best_config.json", "trials.json", "tuner", "tuning.md", "tuning.png"]
    assert json.load(open(os.path.join(out, "trials.json")))["database_size"] == 24  # the protocol's database

    run_dir = str(tmp_path / "run")
    assert main(["--workdir", workdir, "train", "--config", config_path, "--run-dir", run_dir]) == 0
    assert TrainConfig.load(os.path.join(run_dir, "train_config.json")) == best  # consumed unchanged
    assert "best validation MAP@R" in capsys.readouterr().out

    assert main(["tune", "--protocol", "cifar10-2", "--trials", "0"]) == 2
    assert "--trials must be positive" in capsys.readouterr().err
    assert main(["tune", "--protocol", "cifar10-2", "--margin", "0.3", "--strategy", "mirrored"]) == 2
    assert ("tfr tune searches embedding_dim, hidden_dim, mining, margin, learning_rate itself, on one device: drop "
            "--margin, --strategy") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    assert capsys.readouterr().out.startswith("usage: tfr tune")
