"""Tiny exported models for the serving tests: a random-weight conv backbone, 16x16 inputs, 8-d embeddings."""
import io
import time

import numpy as np
from PIL import Image

IMAGE_SIZE = 16


def tiny_model(seed: int = 0):
    """pixels [n, 16, 16, 3] -> unit-length embeddings [n, 8], random weights from `seed`."""
    import keras

    from tf_retrieval.features.embedding import build_embedding_model

    keras.utils.set_random_seed(seed)
    backbone = keras.Sequential([keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)), keras.layers.Rescaling(1 / 255),
                                 keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.GlobalAveragePooling2D()])
    return build_embedding_model(backbone)


def export_tiny(base_dir: str, name: str = "tiny", seed: int = 0, litert: bool = False,
                embedding_space: str | None = None):
    """Exports a `tiny_model(seed)` as the next version of `name` (with its LiteRT flatbuffer when `litert`: without
    it, servers run the SavedModel whatever their runtime; with a `model_info` signature when `embedding_space` is
    given); returns the keras model."""
    from tf_retrieval.serving.export import export_model

    model = tiny_model(seed)
    export_model(model, str(base_dir), name, image_size=IMAGE_SIZE, litert=litert, embedding_space=embedding_space)
    return model


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def photo(pixels: np.ndarray, orientation: int = 6, format: str = "JPEG") -> bytes:
    """`pixels` saved as a camera would, with an EXIF orientation tag (6: to be turned 90 degrees to be upright)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format, exif=exif.tobytes(), **({"quality": 95} if format == "JPEG" else {}))
    return buffer.getvalue()


def random_pngs(rng, count: int) -> list[bytes]:
    return [png(rng.integers(0, 255, (18, 20, 3), dtype=np.uint8)) for _ in range(count)]


def embed_in_process(model, encoded: list[bytes]) -> np.ndarray:
    """What the served `serving_default` signature should answer: PIL decode, the shared resize, the keras model."""
    from tf_retrieval.data.images import decode_image, resize_and_crop

    pixels = np.stack([resize_and_crop(decode_image(data), IMAGE_SIZE).numpy() for data in encoded])
    return model.predict(pixels, verbose=0)


def wait_for(condition, seconds=60):
    """Whether `condition()` came true within `seconds` (polled every 0.1 s)."""
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.1)
    return condition()
