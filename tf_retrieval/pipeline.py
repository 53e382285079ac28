"""Batch embedding on Apache Beam: images in, sharded (id, class, vector) records out, then an index bundle of them.

    images (a folder or file pattern on any Beam filesystem, or a tfds split)
      -> strict decode + resize (`data.images`; an unreadable file goes to the dead-letter output with the reason)
      -> RunInference with Beam's TensorFlow model handler over the exported SavedModel (`tfr export`), keyed by id
      -> TFRecord shards of tf.train.Example {id, class_name, embedding} + <out>.manifest.json (model id, shards, counts)
    tfr index --from-pipeline <out>.manifest.json --name NAME   -> an index bundle, as `tfr index` writes

The DirectRunner (in several processes: `--direct_num_workers 2 --direct_running_mode multi_processing`) is the
default; the same pipeline runs on Dataflow, Flink or Spark through standard `PipelineOptions` (docs/pipeline.md).
Beam is the `beam` extra (its own constraints file: it needs an older protobuf and pyarrow than the rest of the stack).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Iterable, Sequence

import numpy as np

from tf_retrieval.errors import InvalidInputError, MissingDependencyError, MissingError

logger = logging.getLogger(__name__)

#: Tag of the dead-letter output: {"id", "reason"} of every image that could not be read.
DEAD_LETTER = "dead_letter"


def _beam():
    try:
        import apache_beam as beam
    except ImportError as exc:
        raise MissingDependencyError("the Beam pipeline needs the beam extra: pip install -c constraints-beam.txt "
                                     f"'tf_retrieval[beam]' ({exc})") from None
    return beam


def export_details(model_dir: str) -> dict:
    """What an exported version says of itself (`<model_dir>/assets.extra/config.json`): image size, model config."""
    import tensorflow as tf  # tf.io.gfile: a local folder or Cloud Storage alike

    path = f"{model_dir.rstrip('/')}/assets.extra/config.json"
    if not tf.io.gfile.exists(f"{model_dir.rstrip('/')}/saved_model.pb") or not tf.io.gfile.exists(path):
        raise MissingError(f"{model_dir} is not an exported model version (expected saved_model.pb and "
                           "assets.extra/config.json): export one with `tfr export`")
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def read_images(pipeline, source: str, *, data_dir: str | None = None, split: str | None = None):
    """(id, class name, encoded bytes) of every image of `source`: a folder (one sub-folder per class; ids are paths
    relative to it, as `tfr index` names them), a file pattern on any Beam filesystem (class = parent folder), or a
    tfds dataset name (read by the launcher with `data.images.load_tfds`)."""
    beam = _beam()
    from apache_beam.io import fileio
    from apache_beam.io.filesystems import FileSystems

    from tf_retrieval.data.images import is_file_pattern, is_image_file, load_collection, pattern_id

    if os.path.isdir(source):  # listed as `tfr index` lists it: class sub-folders at any depth, or index.csv (splits)
        collection = load_collection(source, splits=[split] if split else None, validate=False)
        listed = [(image_id, collection.class_names[int(label)], path)
                  for image_id, label, path in zip(collection.ids, collection.labels, collection.paths)]

        def read(element):
            image_id, class_name, path = element
            with FileSystems.open(path) as f:
                return image_id, class_name, f.read()

        return pipeline | "List" >> beam.Create(listed, reshuffle=True) | "Read" >> beam.Map(read)
    if is_file_pattern(source):
        if split:
            raise InvalidInputError(f"a file pattern has no splits (--split {split}): match the split's files instead")
        source = _absolute(source)  # Beam names local matches by absolute path

        def keyed(readable):
            return (*pattern_id(source, readable.metadata.path), readable.read())

        return (pipeline | "Match" >> fileio.MatchFiles(source)
                | "Images" >> beam.Filter(lambda match: is_image_file(match.path))  # as `tfr index` lists a pattern
                | "Spread" >> beam.Reshuffle()  # else reading and embedding fuse with the one match: one worker
                | "Open" >> fileio.ReadMatches() | "Read" >> beam.Map(keyed))
    from tf_retrieval.data.images import load_tfds

    collection = load_tfds(source, data_dir=data_dir, splits=[split] if split else None)
    return pipeline | "Create" >> beam.Create(
        [(collection.ids[i], collection.class_names[int(collection.labels[i])], collection.read_bytes(i))
         for i in range(len(collection))], reshuffle=False)


class DecodeImage:
    """A DoFn body: (id, class, bytes) -> ((id, class), pixels [s, s, 3] float32), or a dead letter with the reason."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, element) -> Iterable:
        beam = _beam()
        from tf_retrieval.data.images import ImageDecodeError, decode_image, resize_and_crop_array

        image_id, class_name, data = element
        try:
            image = decode_image(data, name=image_id)
        except ImageDecodeError as exc:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, {"id": image_id, "reason": str(exc)})
            return
        yield (image_id, class_name), resize_and_crop_array(image, self.image_size)


def model_handler(model_dir: str, batch_size: int = 64):
    """Beam's TensorFlow model handler (`TFModelHandlerNumpy`) over the exported SavedModel's `embed_pixels` signature,
    keyed by (id, class). The handler's own loader is Keras' (`load_model`), which in Keras 3 reads only `.keras`
    files: the SavedModel is loaded with `tf.saved_model.load` instead."""
    from apache_beam.ml.inference.base import KeyedModelHandler
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy

    class SavedModelHandler(TFModelHandlerNumpy):
        def load_model(self):
            import tensorflow as tf

            return tf.saved_model.load(self._model_uri)

    return KeyedModelHandler(SavedModelHandler(model_dir, inference_fn=embed_pixels, min_batch_size=1,
                                               max_batch_size=batch_size))


def embed_pixels(model, batch: Sequence[np.ndarray], inference_args=None, model_id=None) -> list:
    """The handler's inference: a batch of pixels [s, s, 3] through the `embed_pixels` signature."""
    import tensorflow as tf
    from apache_beam.ml.inference.base import PredictionResult

    vectors = model.signatures["embed_pixels"](images=tf.constant(np.stack(batch), tf.float32))["embedding"].numpy()
    return [PredictionResult(x, y, model_id) for x, y in zip(batch, vectors)]


def to_example(element) -> bytes:
    """((id, class), PredictionResult) -> a serialized tf.train.Example {id, class_name, embedding}."""
    import tensorflow as tf

    (image_id, class_name), result = element
    feature = {"id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id.encode()])),
               "class_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[class_name.encode()])),
               "embedding": tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(result.inference)))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def run_embedding(source: str, model_dir: str, out: str, *, shards: int = 4, batch_size: int = 64,
                  data_dir: str | None = None, split: str | None = None, beam_args: Sequence[str] = ()) -> dict:
    """Runs the embedding pipeline (see the module docstring) and writes `<out>.manifest.json`; returns the manifest.

    Args:
      source: folder, file pattern or tfds name.
      model_dir: an exported version (`<base>/<name>/<version>`, from `tfr export`).
      out: output prefix: `<out>-SSSSS-of-NNNNN.tfrecord`, `<out>-dead-letter-*.jsonl`, `<out>.manifest.json`.
      shards: output shards.
      beam_args: Beam pipeline options (`--runner`, `--direct_num_workers`, Dataflow's `--project`, ...).
    """
    beam = _beam()
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from tf_retrieval.config import ModelConfig
    from tf_retrieval.data.images import is_file_pattern

    details = export_details(model_dir)
    config = ModelConfig.from_dict({field.name: details[field.name] for field in dataclasses.fields(ModelConfig)
                                    if field.name in details})
    image_size = int(details["image_size"])
    options = PipelineOptions(list(beam_args) or ["--runner=DirectRunner"])
    start = time.perf_counter()
    with beam.Pipeline(options=options) as pipeline:
        images = read_images(pipeline, source, data_dir=data_dir, split=split)
        decoded = images | "Decode" >> beam.FlatMap(DecodeImage(image_size)).with_outputs(DEAD_LETTER, main="pixels")
        (decoded.pixels | "Embed" >> RunInference(model_handler(model_dir, batch_size))
         | "Example" >> beam.Map(to_example)
         | "Write" >> beam.io.WriteToTFRecord(out, file_name_suffix=".tfrecord", num_shards=shards))
        (decoded[DEAD_LETTER] | "DeadLetterJson" >> beam.Map(json.dumps)
         | "WriteDeadLetter" >> beam.io.WriteToText(f"{out}-dead-letter", file_name_suffix=".jsonl", num_shards=1))
    seconds = time.perf_counter() - start
    import tensorflow as tf  # tf.io.gfile: local files and Cloud Storage alike

    # this run's files by their exact names: an earlier run's shards beside them (another --shards) are not this run's
    files = [f"{out}-{shard:05d}-of-{shards:05d}.tfrecord" for shard in range(shards)]
    dead_letters, dead = f"{out}-dead-letter-00000-of-00001.jsonl", []
    if tf.io.gfile.exists(dead_letters):
        with tf.io.gfile.GFile(dead_letters) as f:
            dead = [json.loads(line) for line in f if line.strip()]
    count = sum(1 for _ in read_records(files))
    manifest = {"model_id": config.model_id(), "model_config": config.to_dict(), "model_dir": _absolute(model_dir),
                "source": _absolute(source) if os.path.exists(source) or is_file_pattern(source) else source, "split": split,
                "shards": [f.rsplit("/", 1)[-1] for f in files], "count": count, "dead_letters": len(dead),
                "seconds": round(seconds, 1), "options": list(beam_args)}
    if "://" in out:
        with tf.io.gfile.GFile(f"{out}.manifest.json", "w") as f:
            f.write(json.dumps(manifest, indent=1))
    else:
        from tf_retrieval.storage import write_json

        write_json(f"{out}.manifest.json", manifest, indent=1)
    logger.info("embedded %d images (%d dead letters) into %d shards in %.1f s", count, len(dead), len(files), seconds)
    return manifest


def _absolute(path: str) -> str:
    """A local path made absolute (a manifest is read from anywhere); a URL (gs://...) as it is."""
    return path if "://" in path else os.path.abspath(path)


def read_records(files: Sequence[str]) -> Iterable[tuple[str, str, np.ndarray]]:
    """(id, class name, embedding) of every record of the TFRecord shards `files`."""
    import tensorflow as tf

    for serialized in tf.data.TFRecordDataset(list(files)):
        example = tf.train.Example.FromString(serialized.numpy())
        feature = example.features.feature
        yield (feature["id"].bytes_list.value[0].decode(), feature["class_name"].bytes_list.value[0].decode(),
               np.asarray(feature["embedding"].float_list.value, np.float32))


def read_manifest(path: str) -> tuple[dict, list[str]]:
    """The manifest and the paths of its shards (beside it), local or on Cloud Storage."""
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise MissingError(f"no pipeline manifest at {path}: run `tfr pipeline` first")
    with tf.io.gfile.GFile(path) as f:
        manifest = json.load(f)
    folder = _absolute(path).rsplit("/", 1)[0]
    files = [f"{folder}/{name}" for name in manifest["shards"]]
    missing = [f for f in files if not tf.io.gfile.exists(f)]
    if missing:
        raise MissingError(f"{len(missing)} shard(s) of {path} are missing, e.g. {missing[0]}")
    return manifest, files


def index_from_shards(manifest_path: str, bundle_dir: str, *, data_dir: str | None = None, metric: str | None = None,
                      backend: str = "auto", index_options: dict | None = None, augment: int = 0, alpha: float = 3.0):
    """An index bundle (`search.engine.build_bundle`) of the records a pipeline run wrote: the images of its source
    that were embedded (dead letters are left out), with their vectors finished as in process (`vectors.finish`);
    `augment`, `alpha`: α database augmentation, as `build_bundle` takes them."""
    from tf_retrieval.config import ModelConfig
    from tf_retrieval.data.images import load_collection
    from tf_retrieval.search.engine import build_bundle
    from tf_retrieval.vectors import finish

    manifest, files = read_manifest(manifest_path)
    config = ModelConfig.from_dict(manifest["model_config"])
    vector_of = {image_id: vector for image_id, _, vector in read_records(files)}
    collection = load_collection(manifest["source"], data_dir=data_dir,  # listed: the run decoded them
                                 splits=[manifest["split"]] if manifest.get("split") else None, validate=False)
    keep = np.array([i for i, image_id in enumerate(collection.ids) if image_id in vector_of], dtype=np.int64)
    if len(keep) == 0:
        raise InvalidInputError(f"none of the {len(vector_of)} embedded ids is an image of {manifest['source']}")
    if len(keep) < len(collection):
        logger.warning("%d of the %d images of %s have no vector (the run wrote %d dead letters): they are left out",
                       len(collection) - len(keep), len(collection), manifest["source"], manifest.get("dead_letters", 0))
    collection = collection.subset(keep)
    vectors = finish(np.stack([vector_of[image_id] for image_id in collection.ids]), config.hash_bits)
    return build_bundle(bundle_dir, config, collection, vectors, source=manifest["source"], data_dir=data_dir,
                        metric=metric, backend=backend, index_options=index_options, augment=augment, alpha=alpha)
