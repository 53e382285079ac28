import json
import re

import pytest

from tf_retrieval.config import ModelConfig


def test_model_config_round_trip_and_id(tmp_path):
    config = ModelConfig(name="finetuned", image_size=160, pooling="gem", head="/x/head.keras", version=3)
    config.save(tmp_path / "model.json")
    loaded = ModelConfig.load(tmp_path / "model.json")
    assert loaded == config
    assert loaded.model_id() == "finetuned:v3:efficientnet_lite0-160px-tfinputs-gem-imagenet:head.keras@missing"
    assert ModelConfig(weights=None).model_id() == "baseline:v1:efficientnet_lite0-96px-tfinputs-avg-random:identity"


def test_a_saved_model_config_names_its_files_absolutely_so_another_folder_reads_the_same_model(tmp_path,
                                                                                                  monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "head.keras").write_bytes(b"head")
    (tmp_path / "run" / "trunk.weights.h5").write_bytes(b"trunk")
    monkeypatch.chdir(tmp_path)
    config = ModelConfig(name="finetuned", weights="run/trunk.weights.h5", head="run/head.keras")
    config.save("run/model.json")
    expected = config.model_id()
    monkeypatch.chdir(tmp_path / "run")  # e.g. `tfr web` started elsewhere
    loaded = ModelConfig.load("model.json")
    assert loaded.head == str(tmp_path / "run" / "head.keras")
    assert loaded.weights == str(tmp_path / "run" / "trunk.weights.h5")
    assert loaded.model_id() == expected and "@missing" not in expected
    assert config.model_id() != expected  # the relative paths, read from here, name no file
    for kept in ({"weights": "imagenet"}, {"weights": None}, {"head": "gs://bucket/head.keras"}):  # not local files
        ModelConfig(**kept).save("other.json")
        assert ModelConfig.load("other.json") == ModelConfig(**kept)


def test_model_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        ModelConfig.from_dict({"colour": "red"})
    with pytest.raises(FileNotFoundError, match="config file not found"):
        ModelConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ModelConfig.load(tmp_path / "bad.json")


@pytest.mark.parametrize("fields, message", [
    ({"backbone": "vgg16"}, "unknown backbone 'vgg16'; choose one of efficientnet_lite0"),
    ({"pooling": "sum"}, "unknown pooling 'sum'; choose one of avg, gem, max"),
    ({"image_size": 16}, "image_size must be a whole number of pixels, at least 32, got 16"),
    ({"image_size": "160"}, "image_size must be a whole number of pixels, at least 32, got '160'"),
    ({"scales": [1, 2]}, r"scales must be distinct factors in \(0, 1\]"),
    ({"flip": "yes"}, "flip must be true or false, got 'yes'"),
    ({"hash_bits": 0}, "hash_bits must be a positive number of bits, got 0"),
])
def test_a_model_file_with_a_bad_field_is_refused_on_load_with_the_field_named(tmp_path, fields, message):
    """A hand-edited model.json fails when read, naming the field, before any model is built."""
    (tmp_path / "model.json").write_text(json.dumps({**ModelConfig(image_size=160).to_dict(), **fields}))
    with pytest.raises(ValueError, match=message):
        ModelConfig.load(tmp_path / "model.json")


def test_best_run_ranks_whole_training_sets_then_validation_map_at_r(tmp_path):
    import os

    from tf_retrieval.config import TrainConfig, best_run

    def run(name, protocol, score, hash_bits=None, finished=True):
        run_dir = tmp_path / name
        config = TrainConfig(protocol=protocol, model=ModelConfig(name="finetuned", hash_bits=hash_bits))
        config.save(str(run_dir / "train_config.json"))
        if finished:
            config.model.save(str(run_dir / "model.json"))
        if score is not None:
            (run_dir / "result.json").write_text(json.dumps({"best_map_at_r": score}))
        return str(run_dir)

    assert best_run(str(tmp_path)) is None
    run("c1-good", "cifar10-1", 0.9)  # not on the whole training set
    assert best_run(str(tmp_path), protocol_prefix="cifar10") == str(tmp_path / "c1-good")
    good = run("c2-good", "cifar10-2", 0.84)
    run("c2-newer-worse", "cifar10-2", 0.80)
    run("c2-no-result", "cifar10-2", None)
    run("c2-unfinished", "cifar10-2", 0.99, finished=False)
    run("c2-hash", "cifar10-2", 0.95, hash_bits=48)
    run("flowers", "flowers-official", 0.97)
    os.makedirs(tmp_path / "not-a-run")
    assert best_run(str(tmp_path), protocol_prefix="cifar10", hashing=False) == good
    assert best_run(str(tmp_path), protocol_prefix="cifar10", hashing=True) == str(tmp_path / "c2-hash")
    assert best_run(str(tmp_path), protocol_prefix="flowers") == str(tmp_path / "flowers")
    # a final fit (no validation split) on the trunk of the best run counts with that run's score, and is newer
    (tmp_path / "c2-good" / "finetuned-backbone-1.weights.h5").write_bytes(b"")
    final_fit = tmp_path / "c2-final-fit"
    TrainConfig(protocol="cifar10-2", validation_fraction=0.0, model=ModelConfig(
        name="finetuned", weights=os.path.join(good, "finetuned-backbone-1.weights.h5"))).save(
        str(final_fit / "train_config.json"))
    ModelConfig(name="finetuned").save(str(final_fit / "model.json"))
    (final_fit / "result.json").write_text(json.dumps({"best_map_at_r": None}))
    assert best_run(str(tmp_path), protocol_prefix="cifar10", hashing=False) == str(final_fit)


def test_stage_changes_name_model_fields_flat_or_in_a_nested_model_object():
    from tf_retrieval.config import TrainConfig, with_changes
    from tf_retrieval.errors import InvalidInputError

    config = TrainConfig(model=ModelConfig(name="finetuned", image_size=160, train_from="images"), epochs=10)
    flat = with_changes(config, {"image_size": 224, "epochs": 4})
    nested = with_changes(config, {"model": {"image_size": 224, "flip": True}, "epochs": 4})
    assert (flat.model.image_size, flat.epochs) == (224, 4)
    assert (nested.model.image_size, nested.model.flip, nested.epochs, nested.model.train_from) == (224, True, 4, "images")
    with pytest.raises(InvalidInputError, match="model changes must be an object of model fields, got 'big'"):
        with_changes(config, {"model": "big"})


@pytest.mark.parametrize("changes, message", [
    ({"mining": "semi"}, "unknown mining 'semi'; choose one of semi-hard, semihard, hard"),
    ({"strategy": "tpu"}, "unknown strategy 'tpu'; choose one of default, mirrored, multiworker"),
    ({"proxy_loss": "arcface"}, "unknown proxy_loss 'arcface'; choose one of None, cosface, proxy-anchor"),
    ({"hashing": "sign"}, "unknown hashing 'sign'; choose one of tanh, greedy"),
    ({"epochs": 0}, "epochs must be a whole number, at least 1; got 0"),
    ({"steps_per_epoch": 0}, "steps_per_epoch must be a whole number, at least 1; got 0"),
    ({"images_per_class": 1}, "images_per_class must be a whole number, at least 2: a batch needs positives; got 1"),
    ({"classes_per_batch": 1}, "classes_per_batch must be a whole number, at least 2: a batch needs negatives"),
    ({"embedding_dim": 2.5}, "embedding_dim must be a whole number, at least 1; got 2.5"),
])
def test_a_train_config_that_cannot_train_is_refused_when_made(changes, message):
    """Before any caching or training: such values used to fail hours later, or train nothing."""
    from tf_retrieval.config import TrainConfig
    from tf_retrieval.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=re.escape(message)):
        TrainConfig(**changes)
    assert TrainConfig(mining="Batch_Hard").mining == "Batch_Hard"  # as `training.losses.get` reads names


def test_the_minings_a_config_accepts_are_the_losses_names():
    from tf_retrieval.config import MININGS
    from tf_retrieval.training import losses

    assert set(MININGS) == set(losses._NAMES)


def test_a_recipe_may_end_in_stages_that_hold_out_no_validation_split():
    from tf_retrieval.config import Recipe, TrainConfig

    end_to_end = TrainConfig(model=ModelConfig(name="finetuned", train_from="images"))
    final_fit = TrainConfig(validation_fraction=0.0, epochs=100)  # the head alone, on every training image
    assert Recipe((end_to_end, final_fit)).stages[-1].validation_fraction == 0
    with pytest.raises(ValueError, match="stage 2 of the recipe changes validation_fraction: every stage keeps"):
        Recipe((end_to_end, TrainConfig(validation_fraction=0.2)))
    with pytest.raises(ValueError, match=r"stage 3 of the recipe changes validation_fraction \(after a stage that "
                                         r"held out nothing\)"):
        Recipe((end_to_end, TrainConfig(model=end_to_end.model, validation_fraction=0.0), TrainConfig()))


def test_each_recipe_is_the_config_of_the_best_recorded_run_on_its_protocol():
    """`tfr train --recipe P` must reproduce the best float record on protocol P in benchmarks/results/retrieval.json
    (search-side variants and hashing codes aside): the recipe holds that run's recorded training config, and the
    test-time flip the record was evaluated with (training ignores it; the trained model embeds with it). A record of
    a run that went on from other runs' trunks (`starts_from`) is a recipe in stages: one per run, in that order, each
    stage the config its run's record holds (starting from the trunk of the stage before it)."""
    import os

    from tf_retrieval.config import TrainConfig, load_recipe, recipe_names

    records = json.load(open(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "retrieval.json")))
    trained = [r for r in records if r["model"] != "baseline" and not r.get("variant") and r.get("config")]

    def recorded_config(record, flip):
        config = TrainConfig.from_dict({**record["config"], "source": None})  # the recipe loads the protocol's dataset
        config.model.flip = flip
        return config

    assert {"cifar10-1", "cifar10-2", "flowers-official"} <= set(recipe_names())
    for name in recipe_names():
        best = max((r for r in trained if r["protocol"] == name and not r.get("hash_bits")),
                   key=lambda r: r["metrics"]["mAP"])
        runs = [earlier["run"] for earlier in best.get("starts_from", [])] + [best["run"]]
        stages = load_recipe(name).stages
        assert len(stages) == len(runs), (name, runs)
        for number, (stage, run) in enumerate(zip(stages, runs)):
            record = best if run == best["run"] else next(r for r in trained if r["run"] == run)
            config = recorded_config(record, bool(best.get("flip")))
            if number:  # it starts from the trunk of the stage before it
                assert os.path.basename(os.path.dirname(config.model.weights)) == runs[number - 1]
                config.model.weights = stage.model.weights
            assert stage == config, (name, run)
    with pytest.raises(FileNotFoundError, match="no training recipe 'mnist'; recipes: cifar10-1, cifar10-2"):
        load_recipe("mnist")
