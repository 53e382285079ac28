"""In-process embedding: images -> L2-normalised vectors, with the same decode and resize as indexing and serving."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from tf_retrieval.config import ModelConfig
from tf_retrieval.data import decode_image, resize_and_crop

logger = logging.getLogger(__name__)


def build_model(config: ModelConfig):
    """The keras model of `config`: pixels [n, s, s, 3] in 0..255 -> L2-normalised embeddings [n, d]."""
    from tf_retrieval.backbones import build_backbone
    from tf_retrieval.export import build_embedding_model
    from tf_retrieval.heads import load_head

    backbone = build_backbone(config.backbone, config.image_size, config.pooling, config.weights)
    head = load_head(config.head) if config.head else None
    return build_embedding_model(backbone, head)


class Embedder:
    """Embeds images in this process.

    Remote embedding through TF Serving (`serving.client.EmbeddingClient`) has the same `embed_bytes` method, so the engine
    and the web app take either.
    """

    def __init__(self, config: ModelConfig, model=None, batch_size: int = 64):
        import tensorflow as tf

        self.config = config
        self.model = model if model is not None else build_model(config)
        self.batch_size = batch_size
        self._forward = tf.function(lambda images: self.model(images, training=False), reduce_retracing=True)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [n, s, s, 3] in 0..255 -> float32 [n, d]."""
        pixels = np.asarray(pixels, dtype=np.float32)
        size = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
            raise ValueError(f"expected pixels of shape [n, {size}, {size}, 3], got {list(pixels.shape)}")
        outputs = [self._forward(pixels[i:i + self.batch_size]).numpy() for i in range(0, len(pixels), self.batch_size)]
        return np.concatenate(outputs).astype(np.float32, copy=False)

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded RGB uint8 images of any size -> float32 [n, d]."""
        if len(images) == 0:
            raise ValueError("embed_images: no images given")
        pixels = np.stack([resize_and_crop(image, self.image_size).numpy() for image in images])
        return self.embed_pixels(pixels)

    def embed_bytes(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Encoded images (JPEG/PNG/...) -> float32 [n, d]; undecodable input raises `data.ImageDecodeError`."""
        return self.embed_images([decode_image(data, name=f"image {i}") for i, data in enumerate(encoded)])
