import glob
import json
import os

import numpy as np
import pytest

from tf_retrieval.cli import build_parser, main

SMALL_MODEL = ["--backbone", "mobilenet_v2", "--image-size", "32", "--weights", "none"]


def commands() -> list[str]:
    import argparse

    (subcommands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return sorted(subcommands.choices)


@pytest.mark.parametrize("command", commands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tfr {command}") and len(out.splitlines()) > 5


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for command in ("embed", "index", "search", "evaluate", "demo"):
        assert command in out


def run_error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.split("\r")[-1]  # after any progress bar
    assert last.startswith("tfr: error: ") and len(last.splitlines()) == 1, err
    return last


def test_bad_arguments_give_one_line(tmp_path, capsys):
    assert "unknown backbone 'vgg'" in run_error(["index", "--dataset", str(tmp_path), "--backbone", "vgg"], capsys)
    assert "image_size must be a whole number of pixels, at least 32, got 8" in run_error(
        ["index", "--dataset", str(tmp_path), "--image-size", "8"], capsys)
    assert "image folder not found" in run_error(["index", "--dataset", "./no/such/dir", *SMALL_MODEL], capsys)
    assert "no such image or folder" in run_error(["search", str(tmp_path / "nope.jpg"), "--index", "x"], capsys)
    assert "training drew cifar10-1's split with seed 0" in run_error(
        ["evaluate", "--protocol", "cifar10-1", "--seed", "1", "--head", str(tmp_path / "head.keras")], capsys)
    assert "--metric dot would replace it; drop --records or --metric" in run_error(
        ["evaluate", "--protocol", "cifar10-2", "--metric", "dot", "--records", str(tmp_path / "r.json")], capsys)
    assert "drop --dataset, --backbone" in run_error(
        ["index", "--from-pipeline", "run.manifest.json", "--dataset", str(tmp_path), "--backbone", "vgg"], capsys)
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors: exit 2 with usage
        main(["evaluate", "--protocol", "imagenet"])
    assert exit_info.value.code == 2
    for command in (["embed", "--dataset", str(tmp_path), "--out", "v.npy"], ["index", "--dataset", str(tmp_path)]):
        with pytest.raises(SystemExit):
            main([*command, "--batch-size", "0"])
        assert "--batch-size: must be a whole number, at least 1, got '0'" in capsys.readouterr().err
    for command, flag, message in ((["web", "--index", "x", "--port", "70000"], "--port", "must be a port number "
                                    "from 0 to 65535, got '70000'"),
                                   (["serve", "--rest-port", "-1"], "--rest-port", "must be a port number"),
                                   (["demo", "--port", "http"], "--port", "must be a port number"),
                                   (["web", "--index", "x", "--threads", "0"], "--threads", "must be a whole number"),
                                   (["web", "--index", "x", "--workers", "0"], "--workers", "must be a whole number"),
                                   (["serve", "--max-workers", "0"], "--max-workers", "must be a whole number"),
                                   (["serve", "--max-batch-size", "0"], "--max-batch-size", "must be a whole number"),
                                   (["serve", "--poll-seconds", "-1"], "--poll-seconds", "must be a number of seconds")):
        with pytest.raises(SystemExit):
            main(command)
        assert f"{flag}: {message}" in capsys.readouterr().err


def test_training_flags_can_unset_a_configs_optional_fields(tmp_path):
    from tf_retrieval.cli import _train_config, build_parser
    from tf_retrieval.config import ModelConfig, TrainConfig

    path = str(tmp_path / "hashing.json")
    TrainConfig(model=ModelConfig(name="finetuned", hash_bits=48), proxy_loss="cosface").save(path)
    args = build_parser().parse_args(["train", "--config", path, "--hash-bits", "None", "--proxy-loss", "none"])
    config = _train_config(args)
    assert config.model.hash_bits is None and config.proxy_loss is None
    assert _train_config(build_parser().parse_args(["train", "--config", path, "--hash-bits", "16"])).model.hash_bits == 16


def test_index_then_search_a_folder(image_dir, tmp_path, capsys, monkeypatch):
    workdir = str(tmp_path / "work")
    assert main(["--workdir", workdir, "index", "--dataset", image_dir, "--name", "colours", *SMALL_MODEL]) == 0
    assert "indexed 18 images" in capsys.readouterr().out
    bundle = os.path.join(workdir, "indexes", "colours")
    assert sorted(os.listdir(bundle)) == ["catalog.json", "index", "model.json"]

    query = os.path.join(image_dir, "green", "green_002.png")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    assert main(["--workdir", workdir, "search", query, str(broken), "--index", "colours", "-k", "3"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith(f"{query}: top 3 of 18")
    assert "green/green_002.png" in lines[1] and "1.0000" in lines[1]  # the image itself ranks first
    assert "broken.jpg: skipped:" in captured.err

    out = str(tmp_path / "emb.npy")
    assert main(["--workdir", workdir, "embed", "--dataset", image_dir, "--out", out, *SMALL_MODEL]) == 0
    embeddings = np.load(out)
    assert embeddings.shape == (18, 1280)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert open(out.replace(".npy", ".ids.txt")).read().split()[0] == os.path.join("blue", "blue_000.png")

    # tfr web serves the bundle: the app it would run answers a search
    from tf_retrieval.web import app as web_app

    served = {}
    monkeypatch.setattr(web_app, "serve", lambda app, **kwargs: served.update(app=app, **kwargs))
    assert main(["--workdir", workdir, "web", "--index", "colours", "--port", "8123"]) == 0
    assert served["sock"].getsockname()[:2] == ("127.0.0.1", 8123)  # bound before the models loaded
    served["sock"].close()
    with open(query, "rb") as f:
        response = served["app"].test_client().post("/api/search", data={"image": (f, "q.png"), "k": "3"})
    assert response.status_code == 200, response.get_json()
    assert [r["class_name"] for r in response.get_json()["results"]] == ["green"] * 3
    capsys.readouterr()
    assert "two bundles hold the model" in run_error(["--workdir", workdir, "web", "--index", "colours", "--index",
                                                      bundle], capsys)


def test_export_then_embed_through_the_server(image_dir, tmp_path, capsys):
    from tf_retrieval.serving.server import serve

    workdir = str(tmp_path / "work")
    assert main(["--workdir", workdir, "export", "--name", "tiny", *SMALL_MODEL]) == 0
    assert os.path.isfile(os.path.join(workdir, "models", "tiny", "1", "saved_model.pb"))
    server = serve(os.path.join(workdir, "models"), port=0, poll_seconds=0)
    try:
        served, local = str(tmp_path / "served.npy"), str(tmp_path / "local.npy")
        assert main(["--workdir", workdir, "embed", "--dataset", image_dir, "--out", served,
                     "--server", f"127.0.0.1:{server.port}", "--server-model", "tiny", *SMALL_MODEL]) == 0
        assert main(["--workdir", workdir, "embed", "--dataset", image_dir, "--out", local, *SMALL_MODEL]) == 0
        np.testing.assert_allclose(np.load(served), np.load(local), atol=1e-4)
        capsys.readouterr()
        # the served model says what its vectors are: another model's (here with flip) are refused
        error = run_error(["--workdir", workdir, "embed", "--dataset", image_dir, "--out", served, "--server",
                           f"127.0.0.1:{server.port}", "--server-model", "tiny", "--flip", *SMALL_MODEL], capsys)
        assert "the served model 'tiny' gives v1:mobilenet_v2-32px-avg-random:identity vectors, but this " \
               "command's model needs v1:mobilenet_v2-32px-flip-avg-random:identity vectors" in error
        # and an index built with flip refuses it as the query embedder (RetrievalEngine.load checks)
        assert main(["--workdir", workdir, "index", "--dataset", image_dir, "--name", "flipped", "--flip",
                     *SMALL_MODEL]) == 0
        capsys.readouterr()
        query = os.path.join(image_dir, sorted(os.listdir(image_dir))[0])
        error = run_error(["--workdir", workdir, "search", query, "--index", "flipped", "--server",
                           f"127.0.0.1:{server.port}", "--server-model", "tiny"], capsys)
        assert "gives v1:mobilenet_v2-32px-avg-random:identity vectors, but the index at " in error
        assert "flipped needs v1:mobilenet_v2-32px-flip-avg-random:identity vectors" in error
    finally:
        server.stop(grace=1)
    capsys.readouterr()  # the embed commands' progress bars
    assert "bad/name" in run_error(["--workdir", workdir, "export", "--name", "bad/name", *SMALL_MODEL], capsys)


def split_folder(root, classes=("red", "green", "blue", "yellow"), per_class=8):
    """An image folder with an index.csv giving CIFAR-like train/test splits (6 train + 2 test per class)."""
    from conftest import make_image_folder

    make_image_folder(root, classes=classes, per_class=per_class)
    rows = ["file,label,official_split"]
    for label, name in enumerate(classes):
        rows += [f"{name}/{name}_{i:03d}.png,{label},{'test' if i >= per_class - 2 else 'train'}" for i in range(per_class)]
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    return str(root)


def test_train_takes_a_recipe_and_flags_override_it(tmp_path):
    from tf_retrieval.cli import _train_config, _train_recipe
    from tf_retrieval.config import RECIPES_DIR, load_recipe

    def parse(*argv):
        return build_parser().parse_args(["train", *argv])

    def config(*argv):
        return _train_config(parse(*argv))

    recipe = load_recipe("cifar10-2")
    assert _train_recipe(parse("--recipe", "cifar10-2")) == recipe and recipe.stages[0].model.train_from  # not a head
    changed = _train_recipe(parse("--recipe", "cifar10-2", "--epochs", "3", "--train-from", "block4_add", "--augment",
                                  "flip", "zoom", "--weights", "trunk.weights.h5"))
    for stage in changed.stages:  # flags apply to every stage ...
        assert (stage.epochs, stage.model.train_from, stage.augment) == (3, "block4_add", ("flip", "zoom"))
    assert [stage.model.weights for stage in changed.stages] == ["trunk.weights.h5"] + ["imagenet"] * 4  # ... --weights to the first
    # what no flag names stays the recipe's, in each stage
    assert [s.trunk_lr_scale for s in changed.stages] == [s.trunk_lr_scale for s in recipe.stages] == [1, 0.5, 0.5, 0.5, 0.5]
    assert [s.validation_fraction for s in recipe.stages] == [0.1, 0.1, 0.1, 0, 0]  # the last two fit every training image
    assert _train_recipe(parse("--recipe", "cifar10-2", "--stages", "1")).stages == recipe.stages[:1]
    with pytest.raises(ValueError, match=r"the recipe has 5 stage\(s\): stages must be in 1..5, got 6"):
        _train_recipe(parse("--recipe", "cifar10-2", "--stages", "6"))
    changed.stages[0].save(tmp_path / "views.json")
    end_to_end = config("--config", str(tmp_path / "views.json"), "--train-from", "images", "--augment")  # no views
    assert (end_to_end.model.train_from, end_to_end.augment, end_to_end.epochs) == ("images", (), 3)
    assert load_recipe("cifar10-1").stages[0].model.train_from == "images" and not load_recipe("cifar10-1").stages[0].augment
    flowers = load_recipe("flowers-official").stages[0]
    assert flowers.proxy_loss == "cosface" and config("--recipe", "flowers-official", "--proxy-loss", "none").proxy_loss is None
    assert config("--flip").model.flip and not config("--flip", "--no-flip").model.flip and not config().model.flip
    with pytest.raises(ValueError, match="give --config or --recipe, not both"):
        config("--recipe", "cifar10-2", "--config", str(tmp_path / "views.json"))
    with pytest.raises(FileNotFoundError, match="no training recipe 'mnist'; recipes: cifar10-1, cifar10-2"):
        config("--recipe", "mnist")
    with pytest.raises(ValueError, match="has 5 stages: give one stage"):  # tfr tune and the like train one run
        _train_config(build_parser().parse_args(["tune", "--config", os.path.join(RECIPES_DIR, "cifar10-2.json")]))


def test_train_a_recipe_in_stages_each_from_the_trunk_before_and_resume_it(tmp_path, capsys):
    from tf_retrieval.evaluation.evaluate import earlier_runs

    folder = split_folder(tmp_path / "colours")
    workdir, run_dir, recipe = str(tmp_path / "work"), str(tmp_path / "run"), tmp_path / "recipe.json"
    first_stage = {
        "protocol": "cifar10-2", "source": folder, "model": {"image_size": 32, "train_from": "images"},
        "embedding_dim": 8, "hidden_dim": 16, "classes_per_batch": 4, "images_per_class": 3, "epochs": 1,
        "steps_per_epoch": 2, "validation_fraction": 0.34}
    recipe.write_text(json.dumps({**first_stage, "then": [{"trunk_lr_scale": 0.5, "epochs": 2}]}))
    command = ["--workdir", workdir, "train", "--recipe", str(recipe), "--run-dir", run_dir]
    assert main(command) == 0
    assert "(the last of 2 stages)" in capsys.readouterr().out
    first = json.load(open(tmp_path / "run-stage1" / "model.json"))["weights"]
    assert os.path.basename(first).startswith("finetuned-backbone-")
    second = json.load(open(tmp_path / "run" / "train_config.json"))
    assert (second["model"]["weights"], second["trunk_lr_scale"], second["epochs"]) == (first, 0.5, 2)
    assert json.load(open(tmp_path / "run" / "result.json"))["epochs"] == 2
    assert [run["run"] for run in earlier_runs(second["model"]["weights"])] == ["run-stage1"]  # its records' starts_from
    # --head none: the fine-tuned trunk's own pooled features, scored as a fine-tuned model of the run
    records = str(tmp_path / "records.json")
    assert main(["--workdir", workdir, "evaluate", "--protocol", "cifar10-2", "--dataset", folder, "--model-config",
                 os.path.join(run_dir, "model.json"), "--head", "none", "--records", records]) == 0
    [record] = json.load(open(records))
    trunk = json.load(open(tmp_path / "run" / "model.json"))["weights"]
    assert (record["model"], record["variant"], record["run"], record["weights"]) == (
        "finetuned", "trunk features", "run", trunk)
    assert record["embedding_dim"] == 1280 and "| finetuned + trunk features (end to end) |" in capsys.readouterr().out
    # run again: the finished first stage is kept, the last one trains again
    stamp = os.path.getmtime(first)
    assert main(command) == 0 and os.path.getmtime(first) == stamp
    assert json.load(open(tmp_path / "run" / "train_config.json"))["model"]["weights"] == first
    # a first stage with other settings trains again
    assert main(command + ["--hidden-dim", "12"]) == 0
    assert json.load(open(tmp_path / "run-stage1" / "train_config.json"))["hidden_dim"] == 12
    # the cifar10-2 recipe's shape: trunk stages, then a head alone fitted on every training image on the last trunk
    recipe.write_text(json.dumps({**first_stage, "then": [{"trunk_lr_scale": 0.5, "epochs": 2}, {
        "train_from": None, "trunk_lr_scale": 1.0, "augment": ["flip"], "validation_fraction": 0, "epochs": 2}]}))
    assert main(command) == 0 and "(the last of 3 stages)" in capsys.readouterr().out
    final = json.load(open(tmp_path / "run" / "model.json"))
    assert final["weights"] == json.load(open(tmp_path / "run-stage2" / "model.json"))["weights"]
    assert final["train_from"] is None and json.load(open(tmp_path / "run" / "result.json"))["best_map_at_r"] is None
    # a later stage needs a trunk to go on from, and the first stage's data and validation split
    recipe.write_text(json.dumps({"then": [{"epochs": 2}]}))
    assert "stage 2 of the recipe goes on from the fine-tuned trunk of stage 1, which trains no trunk" in run_error(
        command, capsys)
    recipe.write_text(json.dumps({"model": {"train_from": "images"}, "then": [{"seed": 1}]}))
    assert "stage 2 of the recipe changes seed: every stage keeps" in run_error(command, capsys)


def test_train_then_compare(tmp_path, capsys):
    folder = split_folder(tmp_path / "colours")
    workdir, run_dir, report = str(tmp_path / "work"), str(tmp_path / "run"), str(tmp_path / "report")
    training = ["--protocol", "cifar10-2", "--source", folder, "--image-size", "32", "--embedding-dim", "8",
                "--hidden-dim", "16", "--classes-per-batch", "4", "--images-per-class", "3", "--epochs", "2",
                "--steps-per-epoch", "2", "--validation-fraction", "0.34"]
    assert main(["--workdir", workdir, "train", *training, "--run-dir", run_dir]) == 0
    assert "best validation MAP@R" in capsys.readouterr().out
    records_path = str(tmp_path / "records.json")
    assert main(["--workdir", workdir, "compare", run_dir, "--out", report, "--records", records_path,
                 "--expand", "2"]) == 0
    records = json.load(open(records_path))
    assert [(r["model"], r.get("variant")) for r in records] == [
        ("baseline", None), ("baseline", "alpha-qe"), ("finetuned", None), ("finetuned", "alpha-qe")]
    assert all(r["protocol"] == "cifar10-2" and r["metrics"]["queries"] == 8 for r in records)
    assert records[2]["embedding_dim"] == 8 and records[0]["embedding_dim"] == 1280
    assert records[2]["config"]["embedding_dim"] == 8 and records[2]["train_epochs"] == 2
    assert records[2]["train_command"].startswith("tfr ") and 0 <= records[2]["cache_seconds"] <= records[2]["train_seconds"]
    assert sorted(os.listdir(report)) == ["report.json", "report.md", "run-grid.png", "run-map.png", "run-pr.png"]
    assert "| cifar10-2 | finetuned + alpha-qe |" in open(os.path.join(report, "report.md")).read()
    # a config file round-trips: flags override it
    config_path = os.path.join(run_dir, "train_config.json")
    assert main(["--workdir", workdir, "train", "--config", config_path, "--epochs", "1", "--run-dir",
                 str(tmp_path / "run2")]) == 0
    assert json.load(open(tmp_path / "run2" / "train_config.json"))["epochs"] == 1
    # comparing another run into the same report adds it; the first run's records stay
    assert main(["--workdir", workdir, "compare", str(tmp_path / "run2"), "--out", report, "--expand", "0"]) == 0
    merged = json.load(open(os.path.join(report, "report.json")))
    assert [(r["run"], r["model"]) for r in merged][-2:] == [("run2", "baseline"), ("run2", "finetuned")]
    assert len(merged) == 6 and "## run2 (cifar10-2)" in open(os.path.join(report, "report.md")).read()
    # with test-time flip: records of their own (nothing replaced), figures of their own, the same as evaluate --flip
    assert main(["--workdir", workdir, "compare", str(tmp_path / "run2"), "--out", report, "--expand", "0",
                 "--flip"]) == 0
    merged = json.load(open(os.path.join(report, "report.json")))
    assert [(r["run"], r["model"], r.get("flip")) for r in merged][-2:] == [("run2", "baseline", True),
                                                                            ("run2", "finetuned", True)]
    assert len(merged) == 8 and os.path.isfile(os.path.join(report, "run2-flip-grid.png"))
    assert "## run2 + flip (cifar10-2)" in open(os.path.join(report, "report.md")).read()
    flipped = str(tmp_path / "flipped.json")
    assert main(["--workdir", workdir, "evaluate", "--protocol", "cifar10-2", "--dataset", folder, "--model-config",
                 str(tmp_path / "run2" / "model.json"), "--flip", "--records", flipped]) == 0
    (evaluated,) = json.load(open(flipped))
    assert evaluated["flip"] is True and evaluated["metrics"]["mAP"] == merged[-1]["metrics"]["mAP"]
    for command in (["evaluate"], ["adapt", "--out", str(tmp_path / "never")]):  # another protocol of the same data:
        assert main(["--workdir", workdir, *command, "--protocol", "cifar10-1", "--dataset", folder,  # its queries
                     "--model-config", str(tmp_path / "run2" / "model.json")]) == 2  # hold its training images
        assert ("run2 trained on cifar10-2's training images: cifar10-1 on the same data would search with images or "
                "classes it trained on; use --protocol cifar10-2") in capsys.readouterr().err
    damaged = tmp_path / "damaged.json"
    damaged.write_text('[{"protocol": "cifar10-2"},')  # a hand edit gone wrong: refused before evaluating, kept
    for command in (["evaluate", "--protocol", "cifar10-2", "--dataset", folder], ["compare", str(tmp_path / "run2"),
                                                                                   "--out", report]):
        assert main(["--workdir", workdir, *command, "--records", str(damaged)]) == 2
        assert f"tfr: error: {damaged} is not valid JSON" in capsys.readouterr().err
    assert damaged.read_text() == '[{"protocol": "cifar10-2"},'
    # a model that embeds with flip (its model.json says so) is compared with a baseline that does too; --no-flip
    # turns it off for both
    model_json = tmp_path / "run2" / "model.json"
    model_json.write_text(json.dumps({**json.load(open(model_json)), "flip": True}))
    for option, flip in (([], True), (["--no-flip"], None)):
        written = str(tmp_path / f"compare{len(option)}.json")
        assert main(["--workdir", workdir, "compare", str(tmp_path / "run2"), "--out", report, "--expand", "0",
                     "--records", written, *option]) == 0
        assert [(r["model"], r.get("flip")) for r in json.load(open(written))] == [("baseline", flip),
                                                                                  ("finetuned", flip)]
    # a model adapted from the run (tfr adapt) is compared and evaluated as that run's model, its adaptation the variant
    adapted = str(tmp_path / "adapted")
    assert main(["--workdir", workdir, "adapt", "--protocol", "cifar10-2", "--dataset", folder, "--model-config",
                 os.path.join(run_dir, "model.json"), "--whiten", "no", "--head-weight", "0.5", "--out", adapted]) == 0
    assert main(["--workdir", workdir, "compare", adapted, "--out", report, "--expand", "2"]) == 0
    fused = [r for r in json.load(open(os.path.join(report, "report.json"))) if r["run"] == "adapted"]
    assert [(r["model"], r.get("variant")) for r in fused] == [("baseline", None), ("baseline", "alpha-qe"),
                                                               ("finetuned", "frozen + head (w=0.5)")]
    assert fused[2]["source_run"] == "run" and fused[2]["embedding_dim"] == 1280 + 8 and fused[2]["runtime"] == "litert"
    # its fusion was fitted on the features without flip: with flip it refuses, and says how to adapt it again
    adapted_model = os.path.join(adapted, "model.json")
    for command in (["compare", adapted, "--out", report, "--flip"],
                    ["evaluate", "--protocol", "cifar10-2", "--dataset", folder, "--model-config", adapted_model,
                     "--flip"]):
        error = run_error(["--workdir", workdir, *command], capsys)
        assert "was adapted (whitened, fused) on efficientnet_lite0-32px-tfinputs-avg-imagenet features" in error
        assert "tfr adapt` again" in error
    assert main(["--workdir", workdir, "evaluate", "--protocol", "cifar10-2", "--dataset", folder, "--model-config",
                 os.path.join(adapted, "model.json"), "--records", records_path]) == 0
    evaluated = json.load(open(records_path))[-1]
    assert (evaluated["model"], evaluated["variant"], evaluated["run"]) == ("finetuned", "frozen + head (w=0.5)", "run")
    assert evaluated["metrics"]["mAP"] == fused[2]["metrics"]["mAP"]  # the same vectors either way
    # the run's own model, evaluated after compare, replaces compare's record of it (one key for both)
    assert main(["--workdir", workdir, "evaluate", "--protocol", "cifar10-2", "--dataset", folder, "--model-config",
                 os.path.join(run_dir, "model.json"), "--records", records_path]) == 0
    own = [r for r in json.load(open(records_path)) if r["run"] == "run" and r["model"] == "finetuned"]
    assert [r.get("variant") for r in own] == [None, "alpha-qe", "frozen + head (w=0.5)"]
    assert "pca_dim" in own[0] and "pca_dim" not in own[1] and own[0]["weights"] == own[1]["weights"]
    # the search-side options of evaluate: α-QE gives compare's figure (and replaces its record); α-DBA is its variant
    for options in (["--expand", "2"], ["--expand", "2", "--dba", "2"]):
        assert main(["--workdir", workdir, "evaluate", "--protocol", "cifar10-2", "--dataset", folder,
                     "--model-config", os.path.join(run_dir, "model.json"), "--records", records_path, *options]) == 0
    own = [r for r in json.load(open(records_path)) if r["run"] == "run" and r["model"] == "finetuned"]
    assert [r.get("variant") for r in own] == [None, "alpha-qe", "frozen + head (w=0.5)", "alpha-dba+qe"]
    assert own[1]["metrics"]["mAP"] == records[3]["metrics"]["mAP"] and own[1]["expand"] == 2
    assert (own[3]["expand"], own[3]["dba"], own[3]["alpha"]) == (2, 2, 3.0)
    capsys.readouterr()
    assert "unknown protocol 'cifar100'" in run_error(["train", "--protocol", "cifar100"], capsys)
    assert "no finished training run" in run_error(["compare", str(tmp_path)], capsys)


def test_demo_indexes_cifar10_answers_a_query_and_adds_a_finetuned_model(tmp_path, capsys, monkeypatch):
    import tensorflow_datasets as tfds
    from tf_retrieval.web import app as web_app

    workdir = str(tmp_path / "work")
    with tfds.testing.mock_data(num_examples=40):
        assert main(["--workdir", workdir, "demo", "--no-web", "--limit", "30", "--baseline-only", *SMALL_MODEL]) == 0
        out = capsys.readouterr().out
        assert "indexing 30 CIFAR-10 train images" in out and "query: CIFAR-10 test image" in out
        assert "baseline: " in out and "neighbours share the query's class" in out and "finetuned" not in out
        assert [int(line.split(".")[0]) for line in out.splitlines() if line.startswith("  ")] == list(range(1, 11))
        os.remove(os.path.join(workdir, "indexes", "demo-baseline", "model.json"))  # a damaged bundle is rebuilt
        assert main(["--workdir", workdir, "demo", "--no-web", "--limit", "30", "--baseline-only", *SMALL_MODEL]) == 0
        assert "demo-baseline: config file not found" in capsys.readouterr().out
        assert "drop --finetuned or --baseline-only" in run_error(
            ["--workdir", workdir, "demo", "--no-web", "--baseline-only", "--finetuned", "some-run"], capsys)
        assert main(["--workdir", workdir, "train", "--protocol", "cifar10-2", "--image-size", "32", "--embedding-dim", "8", "--hidden-dim", "8", "--epochs", "1", "--steps-per-epoch", "2",
                     "--validation-fraction", "0.5"]) == 0
        served = {}
        monkeypatch.setattr(web_app, "serve", lambda app, **kwargs: served.update(app=app, **kwargs))
        assert main(["--workdir", workdir, "demo", "--limit", "30", *SMALL_MODEL]) == 0
        out = capsys.readouterr().out
        assert f"using the index at {os.path.join(workdir, 'indexes', 'demo-baseline')}" in out
        assert "indexing 30 CIFAR-10 train images with finetuned:" in out and "finetuned: " in out
        stats = served["app"].test_client().get("/api/stats").get_json()
        assert main(["--workdir", workdir, "demo", "--no-web", "--limit", "30", "--flip", *SMALL_MODEL]) == 0
        flipped = capsys.readouterr().out  # both models with test-time flip: new ids, new indexes
        assert flipped.count("holds other images or another model") == 2 and "-32px-flip-avg-random:" in flipped
        assert "with finetuned:v1:efficientnet_lite0-32px-flip-tfinputs-avg-imagenet:" in flipped
        # without the flag, both models embed as the fine-tuned model.json says: here with flip, so both reuse those
        (model_json,) = glob.glob(os.path.join(workdir, "runs", "*", "model.json"))
        with open(model_json) as f:
            config = json.load(f)
        with open(model_json, "w") as f:
            json.dump({**config, "flip": True}, f)
        assert main(["--workdir", workdir, "demo", "--no-web", "--limit", "30", *SMALL_MODEL]) == 0
        assert capsys.readouterr().out.count("using the index at") == 2
    assert [m["name"] for m in stats["models"]] == ["baseline", "finetuned"]
    assert [m["index_size"] for m in stats["models"]] == [30, 30]


def test_demo_trains_a_head_when_no_run_exists(tmp_path, capsys, monkeypatch):
    import tensorflow_datasets as tfds

    from tf_retrieval import demo

    monkeypatch.setitem(demo.DEMO_TRAINING, "epochs", 2)  # the real demo trains longer; the path is the same
    monkeypatch.setitem(demo.DEMO_TRAINING, "steps_per_epoch", 3)
    workdir = str(tmp_path / "work")
    with tfds.testing.mock_data(num_examples=100):
        assert main(["--workdir", workdir, "demo", "--no-web", "--limit", "100", *SMALL_MODEL]) == 0
        out = capsys.readouterr().out
        assert "no fine-tuned CIFAR-10 model yet: training a triplet-loss head on the 100 demo images" in out
        assert "baseline: " in out and "finetuned: " in out
        assert os.path.isfile(os.path.join(workdir, "runs", "demo-finetuned", "model.json"))
        assert main(["--workdir", workdir, "demo", "--no-web", "--limit", "100", *SMALL_MODEL]) == 0  # reused
        out = capsys.readouterr().out
        assert "training" not in out and out.count("using the index at") == 2


def test_index_add_and_delete_without_a_rebuild(image_dir, tmp_path, capsys):
    from conftest import make_image_folder

    workdir = str(tmp_path / "work")
    assert main(["--workdir", workdir, "index", "--dataset", image_dir, "--name", "colours", "--backend", "scann",
                 "--target-recall", "0.95", *SMALL_MODEL]) == 0
    from tf_retrieval.search.index import Index

    assert Index.load(os.path.join(workdir, "indexes", "colours", "index")).target_recall == 0.95
    more = make_image_folder(tmp_path / "more", classes=("yellow",), per_class=3, seed=3)
    capsys.readouterr()
    assert main(["--workdir", workdir, "index", "--name", "colours", "--add", more]) == 0
    assert "added 3 image(s), deleted 0; 21 images indexed, no rebuild" in capsys.readouterr().out
    assert main(["--workdir", workdir, "index", "--name", "colours", "--add", more]) == 0  # nothing new
    assert "added 0 image(s) (3 already indexed)" in capsys.readouterr().out

    query = os.path.join(more, "yellow", "yellow_001.png")
    assert main(["--workdir", workdir, "search", query, "--index", "colours", "-k", "1"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert os.path.realpath(query) in line and "1.0000" in line and "yellow" in line  # embedded by the bundle's model

    gone = os.path.join("green", "green_002.png")
    assert main(["--workdir", workdir, "index", "--name", "colours", "--delete", gone, os.path.realpath(query)]) == 0
    assert "added 0 image(s), deleted 2; 19 images indexed" in capsys.readouterr().out
    assert main(["--workdir", workdir, "search", os.path.join(image_dir, gone), "--index", "colours", "-k", "19"]) == 0
    out = capsys.readouterr().out
    assert "top 19 of 19" in out and f" {gone}\n" not in out and os.path.realpath(query) not in out
    assert "not in the bundle: ['nope.png']" in run_error(
        ["--workdir", workdir, "index", "--name", "colours", "--delete", "nope.png"], capsys)
    assert "no index bundle 'other'" in run_error(["--workdir", workdir, "index", "--name", "other", "--delete", "x"],
                                                  capsys)
    assert "--dataset is required" in run_error(["--workdir", workdir, "index", *SMALL_MODEL], capsys)
    assert "give one or the other" in run_error(
        ["--workdir", workdir, "index", "--name", "colours", "--dataset", image_dir, "--add", more], capsys)
    assert "drop --metric, --shards, --dba (or rebuild" in run_error(  # they used to be ignored silently
        ["--workdir", workdir, "index", "--name", "colours", "--add", more, "--metric", "dot", "--shards", "3",
         "--dba", "2"], capsys)


def test_a_sharded_bundle_is_searched_and_changed_like_any_other(image_dir, tmp_path, capsys):
    from conftest import make_image_folder

    from tf_retrieval.search.index import Index

    workdir = str(tmp_path / "work")
    for name, extra in (("one", []), ("three", ["--shards", "3"])):
        assert main(["--workdir", workdir, "index", "--dataset", image_dir, "--name", name, "--backend", "exact",
                     *extra, *SMALL_MODEL]) == 0
    sharded = Index.load(os.path.join(workdir, "indexes", "three", "index"))
    assert type(sharded).__name__ == "ShardedIndex" and len(sharded.shards) == 3 and len(sharded) == 18
    more = make_image_folder(tmp_path / "more", classes=("yellow",), per_class=2, seed=3)
    assert main(["--workdir", workdir, "index", "--name", "three", "--add", more]) == 0
    assert main(["--workdir", workdir, "index", "--name", "one", "--add", more]) == 0
    capsys.readouterr()
    query = os.path.join(image_dir, "green", "green_002.png")
    answers = []
    for name in ("one", "three"):
        assert main(["--workdir", workdir, "search", query, "--index", name, "-k", "20"]) == 0
        answers.append(capsys.readouterr().out.splitlines()[1:])
    assert answers[0] == answers[1] and len(answers[0]) == 20  # the same ranking, scores and ids


def test_the_preprocessing_flag_reaches_the_model_and_training_configs():
    from tf_retrieval.cli import _model_config, _train_recipe

    args = build_parser().parse_args(["evaluate", "--protocol", "cifar10-2", "--preprocessing", "tf"])
    assert _model_config(args).preprocessing == "tf"
    assert _model_config(build_parser().parse_args(["evaluate", "--protocol", "cifar10-2"])).preprocessing is None
    recipe = _train_recipe(build_parser().parse_args(["train", "--recipe", "cifar10-2", "--preprocessing", "tf"]))
    assert {stage.model.preprocessing for stage in recipe.stages} == {"tf"}
    recorded = _train_recipe(build_parser().parse_args(["train", "--recipe", "cifar10-2"]))
    assert {stage.model.preprocessing for stage in recorded.stages} == {"torch"}  # as its records were made
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--protocol", "cifar10-2", "--preprocessing", "inception"])


def test_head_none_drops_the_head_and_its_codes(tmp_path):
    from tf_retrieval.cli import _model_config
    from tf_retrieval.config import ModelConfig

    path = str(tmp_path / "model.json")
    ModelConfig(name="finetuned", weights=str(tmp_path / "trunk.weights.h5"), head=str(tmp_path / "head.keras"),
                hash_bits=48).save(path)

    def config(*flags):
        return _model_config(build_parser().parse_args(["evaluate", "--protocol", "cifar10-2", "--model-config", path,
                                                        *flags]))

    assert (config().head, config().hash_bits) == (str(tmp_path / "head.keras"), 48)
    trunk = config("--head", "none")
    assert (trunk.head, trunk.hash_bits, trunk.weights) == (None, None, str(tmp_path / "trunk.weights.h5"))
    assert trunk.fine_tuned and trunk.metric == "cosine"
    assert config("--head", "other.keras").head == "other.keras"
    assert not ModelConfig().fine_tuned and not ModelConfig(weights=None).fine_tuned
