"""Export an embedding model (`features.embedding.build_model`) as a SavedModel that TF Serving loads.

Layout, as TF Serving expects: `<base_dir>/<name>/<version>/saved_model.pb` (+ `variables/`), integer versions; the
model's config sits in `<version>/assets.extra/config.json` (TF Serving ignores `assets.extra`).

Signatures:
  serving_default:  images tf.string [n] (JPEG / PNG / GIF / BMP bytes)   -> embedding float32 [n, d]
  embed_pixels:     images float32 [n, s, s, 3], RGB in 0..255            -> embedding float32 [n, d]
  model_info:       no inputs -> embedding_space tf.string [1] (`ModelConfig.embedding_space`; `tfr export` adds it)
The embedding is unit length, or +-1 codes [n, bits] for a hashing model (`tf_retrieval.vectors.finish` packs them).
JPEGs are decoded with `dct_method="INTEGER_ACCURATE"`, which gives the same pixels as PIL (used at index time).
"""
from __future__ import annotations

import logging
import os
import re

import keras

from tf_retrieval.config import ModelConfig
from tf_retrieval.errors import InvalidInputError
from tf_retrieval.serving.client import MODEL_INFO_SIGNATURE
from tf_retrieval.storage import atomic_directory, write_json, write_text

logger = logging.getLogger(__name__)


def decode_in_graph(data):
    """One encoded image (scalar tf.string) -> uint8 [h, w, 3], as `decode_image` decodes plain JPEGs and PNGs (the
    graph applies no EXIF orientation: `data.images.encoded_for_graph` prepares other files)."""
    import tensorflow as tf

    image = tf.cond(tf.io.is_jpeg(data),
                    lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                    lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    return image


def decode_for_model(data, image_size: int):
    """One encoded image (scalar tf.string) -> float32 [image_size, image_size, 3] (`decode_in_graph`, the shared resize)."""
    from tf_retrieval.data.images import resize_and_crop

    return resize_and_crop(decode_in_graph(data), image_size)


def next_version(model_dir: str) -> int:
    """1 + the highest integer version under `model_dir` (1 when there is none)."""
    versions = [int(d) for d in os.listdir(model_dir) if d.isdigit()] if os.path.isdir(model_dir) else []
    return max(versions, default=0) + 1


#: The LiteRT flatbuffer of the same model, beside the SavedModel (TF Serving ignores `assets.extra`).
LITERT_FILE = os.path.join("assets.extra", "model.tflite")


def export_model(model: keras.Model, base_dir: str, name: str, *, image_size: int, version: int | None = None,
                 config: dict | None = None, embedding_space: str | None = None, litert: bool = True) -> str:
    """Writes `model` as a SavedModel to `<base_dir>/<name>/<version>/` and returns that path; with `litert`, also its
    LiteRT flatbuffer (`features.litert.convert`: pixels in, the same outputs) to `<version>/assets.extra/model.tflite`.

    Args:
      model: pixels [n, s, s, 3] -> embeddings [n, d] (`features.embedding.build_model`).
      base_dir: the model base path TF Serving watches.
      name: the model name (a TF Serving model name: letters, digits, '_', '-', '.').
      image_size: s.
      version: integer version; None exports as the next version.
      config: stored beside the model (with the embedding dimension and signatures added).
      embedding_space: what the vectors are (`ModelConfig.embedding_space`); given, the model also answers it through
        the `model_info` signature (no inputs), so that a client checks it against its index's (`client.connect`).

    Raises:
      InvalidInputError: a bad name, or a version that exists already.
    """
    import tensorflow as tf

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise InvalidInputError(f"model name {name!r} may only contain letters, digits, '_', '-' and '.'")
    model_dir = os.path.join(base_dir, name)
    version = next_version(model_dir) if version is None else int(version)
    target = os.path.join(model_dir, str(version))
    if version <= 0:
        raise InvalidInputError(f"versions are positive integers, got {version}")
    if os.path.exists(target):
        raise InvalidInputError(f"{target} exists already: versions are immutable, export a new version instead")
    dim = int(model.output_shape[-1])

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")])
    def embed_pixels(images):
        return {"embedding": model(images, training=False)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def embed_bytes(images):
        pixels = tf.map_fn(lambda data: decode_for_model(data, image_size), images,
                           fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
        return {"embedding": model(pixels, training=False)}

    signatures = {"serving_default": embed_bytes, "embed_pixels": embed_pixels}
    described = {"serving_default": "images: string [n] -> embedding: float32 [n, d]",
                 "embed_pixels": f"images: float32 [n, {image_size}, {image_size}, 3] -> embedding: float32 [n, d]"}
    if embedding_space is not None:
        @tf.function(input_signature=[])
        def model_info():
            return {"embedding_space": tf.constant([embedding_space])}

        signatures[MODEL_INFO_SIGNATURE] = model_info
        described[MODEL_INFO_SIGNATURE] = f"no inputs -> embedding_space: string [1] ({embedding_space})"
    module = tf.Module()
    module.model = model
    with atomic_directory(target) as tmp:  # TF Serving never sees a half-written version
        tf.saved_model.save(module, tmp, signatures=signatures)
        extra = {}
        if litert:
            from tf_retrieval.features.litert import convert

            os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
            with open(os.path.join(tmp, LITERT_FILE), "wb") as f:
                f.write(convert(model))
            extra = {"litert": LITERT_FILE.replace(os.sep, "/")}
        write_json(os.path.join(tmp, "assets.extra", "config.json"),
                   {**(config or {}), **extra, "name": name, "version": version, "embedding_dim": dim,
                    "image_size": image_size, "signatures": described}, indent=2)
    write_models_config(base_dir)
    logger.info("exported %s version %d (%d-d embeddings) to %s", name, version, dim, target)
    return target


def write_models_config(base_dir: str, serving_base_path: str = "/models") -> str:
    """Writes `<base_dir>/models.config`, TF Serving's `--model_config_file`, listing every model under `base_dir`.

    `serving_base_path` is where `base_dir` is mounted in the TF Serving container (docker-compose.yml mounts it at
    /models), so `tensorflow_model_server --model_config_file=/models/models.config` serves all exported models.
    """
    names = sorted(name for name in os.listdir(base_dir)
                   if os.path.isdir(os.path.join(base_dir, name)) and not name.startswith("."))
    entries = "".join(f'  config {{\n    name: "{name}"\n    base_path: "{serving_base_path}/{name}"\n'
                      f'    model_platform: "tensorflow"\n  }}\n' for name in names)
    path = os.path.join(base_dir, "models.config")
    write_text(path, f"model_config_list {{\n{entries}}}\n")
    return path


def export_config(config: ModelConfig, base_dir: str, *, name: str | None = None, version: int | None = None) -> str:
    """Builds the model of `config` (`features.embedding.build_model`) and exports it (see `export_model`)."""
    from tf_retrieval.features.embedding import build_model

    return export_model(build_model(config), base_dir, name or config.name, image_size=config.image_size,
                        version=version, config=config.to_dict(), embedding_space=config.embedding_space())
