"""One path from a model config to vectors.

Every consumer of vectors goes through this module: building and updating an index, a query (the page, `tfr search`,
the engine), `tfr embed`, evaluation, validation during training, the SavedModel export and the server's model. So
every vector gets the same finishing (`vectors.finish`): unit L2 norm for a float model, binary codes packed 8 to a
byte for a hashing model (`ModelConfig.hash_bits`).

    model = build_model(config)                         # keras: pixels [n, s, s, 3] in 0..255 -> model outputs
    Embedder(config).embed_bytes([jpeg, png])           # in process: encoded images -> finished vectors
    embed_collection(collection, config, workdir=...)   # a whole collection, backbone outputs cached on disk

Model outputs are unit-length float embeddings, or +-1 float codes for a hashing model (what the SavedModel serves);
`finish` turns either into the vectors an index holds.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import numpy as np

from tf_retrieval.errors import InvalidInputError
from tf_retrieval.config import ModelConfig
from tf_retrieval.data.images import decode_image, resize_and_crop_images
from tf_retrieval.vectors import finish

logger = logging.getLogger(__name__)


def build_embedding_model(backbone, head=None, *, hash_bits: int | None = None):
    """pixels [n, s, s, 3] in 0..255 -> backbone -> head (identity when None) -> unit-length embedding [n, d], or
    +-1 codes [n, hash_bits] for a hashing head."""
    import keras

    from tf_retrieval.models.heads import BinaryCodes, L2Normalize

    images = keras.Input(backbone.input_shape[1:], dtype="float32", name="images")
    outputs = backbone(images, training=False)
    if head is not None:
        outputs = head(outputs, training=False)
    finishing = BinaryCodes(name="embedding") if hash_bits else L2Normalize(name="embedding")
    return keras.Model(images, finishing(outputs), name="embedder")


def build_model(config: ModelConfig):
    """The keras model of `config`: pixels [n, s, s, 3] in 0..255 -> model outputs (see the module docstring)."""
    from tf_retrieval.models.backbones import backbone_of
    from tf_retrieval.models.heads import load_head

    backbone = backbone_of(config)
    head = load_head(config.head) if config.head else None
    return build_embedding_model(backbone, head, hash_bits=config.hash_bits)


class Embedder:
    """Embeds images in this process into finished vectors (float32 unit rows, or packed uint8 codes).

    A remote embedder (`serving.client.EmbeddingClient`) has the same `embed_bytes` method; the engine finishes its
    outputs with `vectors.finish`, so the engine and the page take either.

    Args:
      config: the model.
      model: its keras model (default: `build_model(config)`).
      batch_size: images per model call.
      runtime: "litert" (default: the model converted to LiteRT, `features.litert`, several times faster on a CPU),
        "litert-fp16" (the same in float16 arithmetic) or "tf" (the keras model in a `tf.function`). A model LiteRT
        cannot convert runs on TensorFlow, with a warning.
      workdir: where converted LiteRT models are cached (`<workdir>/litert`; default `features.cache.default_workdir`).
    """

    def __init__(self, config: ModelConfig, model=None, batch_size: int = 64, runtime: str = "litert",
                 workdir: str | None = None):
        from tf_retrieval.features.cache import default_workdir
        from tf_retrieval.features.litert import compile_model

        self.config = config
        self._model = model
        self.batch_size = batch_size
        # a given keras model may differ from the config's: it is converted, not cached
        self._forward, self.runtime = compile_model(
            lambda: self.model, runtime=runtime, cache_key=None if model is not None else self._cache_key(),
            cache_dir=os.path.join(workdir or default_workdir(), "litert"))

    @property
    def model(self):
        """The keras model (built on first use: a cached LiteRT model runs without it, and without TensorFlow)."""
        if self._model is None:
            self._model = build_model(self.config)
        return self._model

    def _cache_key(self) -> str:
        """The model id and a digest of the files it loads (a head or weights file rewritten in place is a new model)
        and of the Keras version (which draws a model's seeded random weights)."""
        return f"{self.config.model_id()}-{_files_digest(self.config.head, self.config.weights)}"

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """float32 pixels [n, s, s, 3] in 0..255 -> finished vectors [n, ...]."""
        pixels = np.asarray(pixels, dtype=np.float32)
        size = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
            raise InvalidInputError(f"expected pixels of shape [n, {size}, {size}, 3], got {list(pixels.shape)}")
        outputs = [self._forward(pixels[i:i + self.batch_size]) for i in range(0, len(pixels), self.batch_size)]
        return finish(np.concatenate(outputs), self.config.hash_bits)

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded RGB uint8 images of any size -> finished vectors [n, ...]."""
        if len(images) == 0:
            raise InvalidInputError("embed_images: no images given")
        return self.embed_pixels(resize_and_crop_images(images, self.image_size))

    def embed_bytes(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Encoded images (JPEG/PNG/...) -> finished vectors [n, ...]; undecodable input raises `ImageDecodeError`."""
        return self.embed_images([decode_image(data, name=f"image {i}") for i, data in enumerate(encoded)])


def backbone_features(collection, config: ModelConfig, *, workdir: str | None = None, batch_size: int = 64,
                      progress: bool = True, runtime: str = "litert") -> np.ndarray:
    """The pooled backbone outputs of `config` for every image of `collection`, computed in `runtime` and cached under
    `<workdir>/features` (a second call reads the cache; an interrupted one resumes)."""
    from tf_retrieval.models.backbones import backbone_of

    return cached_outputs(collection, lambda: backbone_of(config), config.backbone_key(),
                          image_size=config.image_size, workdir=workdir, batch_size=batch_size, progress=progress,
                          runtime=runtime, weights_file=config.weights)


def cached_outputs(collection, build_model: Callable, model_key: str, *, image_size: int, workdir: str | None = None,
                   batch_size: int = 64, progress: bool = True, runtime: str = "litert", dtype: str = "float32",
                   weights_file: str | None = None) -> np.ndarray:
    """The outputs of a keras model (`build_model()`, named `model_key`) for every image of `collection`, computed in
    `runtime` (`features.litert.compile_model`) and cached under `<workdir>/features` by model key and runtime."""
    from tf_retrieval.features.cache import default_workdir, extract_features
    from tf_retrieval.features.litert import compile_model

    workdir = workdir or default_workdir()
    forward, used = compile_model(build_model, runtime=runtime, cache_key=f"{model_key}-{_files_digest(weights_file)}",
                                  cache_dir=os.path.join(workdir, "litert"))
    if weights_file and os.path.isfile(weights_file):  # a file's name is not its content: another file of that name,
        model_key += "-" + _files_digest(weights_file)  # or the same one rewritten, gets features of its own
    return extract_features(collection, forward, image_size=image_size,
                            model_key=model_key if used == "tf" else f"{model_key}-{used}",
                            cache_dir=os.path.join(workdir, "features"), batch_size=batch_size, dtype=dtype,
                            progress=progress)


def _files_digest(*paths: str | None) -> str:
    """A short digest of the Keras version (which draws seeded random weights) and of the files a model loads."""
    from importlib.metadata import version

    from tf_retrieval.storage import file_digest, value_digest

    files = [path for path in paths if path and os.path.isfile(path)]
    return value_digest([version("keras"), *(file_digest(path) for path in files)])[:12]


def head_function(config: ModelConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Backbone features -> finished vectors: the model's head (if any), then `vectors.finish`."""
    head = None
    if config.head:
        from tf_retrieval.models.heads import load_head

        head = load_head(config.head)

    def embed(features: np.ndarray) -> np.ndarray:
        outputs = features if head is None else head.predict(np.asarray(features, np.float32), batch_size=1024,
                                                              verbose=0)
        return finish(outputs, config.hash_bits)

    return embed


def embed_collection(collection, config: ModelConfig, *, workdir: str | None = None, batch_size: int = 64,
                     progress: bool = True, runtime: str = "litert") -> np.ndarray:
    """The finished vectors of `config` for every image of `collection` (backbone outputs computed in `runtime` and
    cached, then the head)."""
    features = backbone_features(collection, config, workdir=workdir, batch_size=batch_size, progress=progress,
                                 runtime=runtime)
    return head_function(config)(features)


def save_vectors(path: str, vectors: np.ndarray, ids: Sequence[str]) -> str:
    """Saves vectors as `.npy` and their image ids, one per line, beside it (`<stem>.ids.txt`; UTF-8, and ids from
    file names that are not UTF-8 as the bytes they were); returns the ids path."""
    from tf_retrieval.storage import atomic_write

    if len(vectors) != len(ids):
        raise InvalidInputError(f"{len(vectors)} vectors for {len(ids)} ids")
    with atomic_write(path, "wb") as f:
        np.save(f, vectors, allow_pickle=False)
    ids_path = os.path.splitext(path)[0] + ".ids.txt"
    with atomic_write(ids_path, "wb") as f:
        f.write(b"".join(os.fsencode(image_id) + b"\n" for image_id in ids))
    return ids_path
