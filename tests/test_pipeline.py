"""The Beam pipeline (`tf_retrieval.pipeline`, the `beam` extra; runs where apache_beam is installed: CI's beam step)."""
import glob
import json
import os

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from tf_retrieval.cli import main  # noqa: E402
from tf_retrieval.config import ModelConfig  # noqa: E402
from tf_retrieval.data.images import image_folder  # noqa: E402

SMALL = ModelConfig(name="small", backbone="mobilenet_v2", image_size=32, weights=None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tf_retrieval.serving.export import export_config

    return export_config(SMALL, str(tmp_path_factory.mktemp("models")))


def test_direct_runner_embeds_like_the_process_keeps_dead_letters_and_indexes(image_dir, exported, tmp_path, capsys):
    import shutil

    from tf_retrieval.features.embedding import Embedder
    from tf_retrieval.search.engine import RetrievalEngine

    folder = str(tmp_path / "with-a-broken-file")
    shutil.copytree(image_dir, folder)
    with open(os.path.join(folder, "red", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    out = str(tmp_path / "vectors" / "colours")
    assert main(["--workdir", str(tmp_path / "work"), "pipeline", "--dataset", folder, "--model-dir", exported,
                 "--out", out, "--shards", "3", "--", "--runner=DirectRunner", "--direct_num_workers=2",
                 "--direct_running_mode=multi_processing"]) == 0
    assert "embedded 18 images (1 unreadable" in capsys.readouterr().out
    manifest = json.load(open(out + ".manifest.json"))
    assert manifest["count"] == 18 and manifest["dead_letters"] == 1 and len(manifest["shards"]) == 3
    assert manifest["model_id"] == SMALL.model_id()
    dead = [json.loads(line) for path in glob.glob(out + "-dead-letter*.jsonl") for line in open(path)]
    assert dead[0]["id"] == os.path.join("red", "broken.png") and "not an image" in dead[0]["reason"]

    from tf_retrieval.pipeline import read_manifest, read_records

    records = {image_id: (name, vector) for image_id, name, vector in read_records(read_manifest(out + ".manifest.json")[1])}
    collection = image_folder(image_dir, progress=False)
    assert sorted(records) == sorted(collection.ids)
    assert all(records[i][0] == i.split("/")[0] for i in records)  # the class is the sub-folder
    in_process = Embedder(SMALL, runtime="tf").embed_bytes([collection.read_bytes(i) for i in range(len(collection))])
    beam = np.stack([records[i][1] for i in collection.ids])
    np.testing.assert_allclose(beam, in_process, atol=1e-5)

    assert main(["--workdir", str(tmp_path / "work"), "index", "--from-pipeline", out + ".manifest.json", "--name",
                 "colours"]) == 0
    engine = RetrievalEngine.load(os.path.join(tmp_path, "work", "indexes", "colours"))
    assert len(engine) == 18 and engine.config.model_id() == SMALL.model_id()
    query = os.path.join(image_dir, "green", "green_002.png")
    with open(query, "rb") as f:
        first = engine.search_images([f.read()], k=1)[0][0]
    assert first.id == os.path.join("green", "green_002.png") and first.score == pytest.approx(1.0, abs=1e-4)
    # the index flags apply to a pipeline's vectors too; the bundle is named after the model by default
    assert main(["--workdir", str(tmp_path / "work"), "index", "--from-pipeline", out + ".manifest.json",
                 "--dba", "2"]) == 0
    augmented = RetrievalEngine.load(os.path.join(tmp_path, "work", "indexes", SMALL.name))
    assert augmented.database_augmentation == {"k": 2, "alpha": 3.0}


def test_nested_folders_patterns_and_an_earlier_runs_shards(image_dir, exported, tmp_path, monkeypatch):
    import shutil

    from tf_retrieval.errors import InvalidInputError
    from tf_retrieval.pipeline import read_manifest, read_records, run_embedding
    from tf_retrieval.search.engine import RetrievalEngine

    folder = tmp_path / "photos"
    shutil.copytree(image_dir, folder)
    (folder / "green" / "deeper").mkdir()
    shutil.copy(folder / "green" / "green_002.png", folder / "green" / "deeper" / "nested.png")
    out = tmp_path / "vectors" / "photos"
    out.parent.mkdir()
    (out.parent / "photos-00000-of-00007.tfrecord").write_bytes(b"an earlier run's shard")
    manifest = run_embedding(str(folder), exported, str(out), shards=2, beam_args=["--runner=DirectRunner"])
    assert manifest["shards"] == ["photos-00000-of-00002.tfrecord", "photos-00001-of-00002.tfrecord"]
    records = {image_id: name for image_id, name, _ in read_records(read_manifest(f"{out}.manifest.json")[1])}
    assert manifest["count"] == len(records) == 19 and records["green/deeper/nested.png"] == "green"  # as tfr index

    monkeypatch.chdir(tmp_path)  # a relative pattern: ids are relative to the folder before its first wildcard
    run_embedding("photos/*/*.png", exported, "by-pattern", shards=1, beam_args=["--runner=DirectRunner"])
    manifest, files = read_manifest("by-pattern.manifest.json")
    records = {image_id: name for image_id, name, _ in read_records(files)}
    assert manifest["count"] == len(records) == 18 and records["red/red_000.png"] == "red"  # */* does not go deeper
    assert manifest["source"] == str(tmp_path / "photos/*/*.png")  # absolute: the manifest is read from anywhere
    # a pattern's run indexes like a folder's: the bundle lists the pattern's files, named as the pipeline named them
    assert main(["--workdir", str(tmp_path / "work"), "index", "--from-pipeline", "by-pattern.manifest.json",
                 "--name", "by-pattern"]) == 0
    engine = RetrievalEngine.load(os.path.join(tmp_path, "work", "indexes", "by-pattern"))
    assert sorted(engine.collection.ids) == sorted(records) and len(engine.collection) == 18
    with open(folder / "green" / "green_002.png", "rb") as f:
        first = engine.search_images([f.read()], k=1)[0][0]
    assert first.id == "green/green_002.png" and first.score == pytest.approx(1.0, abs=1e-4)
    assert engine.collection.image(engine.collection.ids.index("red/red_000.png")).shape[2] == 3
    with pytest.raises(InvalidInputError, match="a file pattern has no splits"):
        run_embedding("photos/*/*.png", exported, "split", split="test", beam_args=["--runner=DirectRunner"])
