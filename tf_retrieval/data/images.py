"""Image collections: tfds datasets and image folders, defensive decoding, and the batched input pipeline.

Every collection is a list of *encoded* images (JPEG/PNG bytes held in memory, or file paths) with integer labels, string ids and
the split each image came from. Decoding happens in one place, `decode_image`, for indexing, uploads and evaluation alike, so a
query image and a database image go through exactly the same pixels -> resize path.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import io
import logging
import os
import threading
import warnings
from typing import Iterable, Sequence

import numpy as np

from tf_retrieval.errors import InvalidInputError, MissingError

logger = logging.getLogger(__name__)

#: Largest image accepted, in pixels (width x height). Bigger files are treated as decompression bombs.
MAX_PIXELS = 64_000_000
#: Largest encoded file accepted, in bytes.
MAX_BYTES = 50 * 1024 * 1024
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: The formats PIL may open (JPEG includes the multi-picture JPEGs of cameras). Others are refused before their
#: decoders run: some call external programs (EPS runs Ghostscript) and rarely used ones are less hardened.
DECODED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")


class ImageDecodeError(InvalidInputError):
    """Raised when bytes are not a usable image (empty, not an image, truncated, too large)."""


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES, name: str = "image") -> np.ndarray:
    """Decodes encoded image bytes into an RGB uint8 array, refusing anything that is not a whole, sane image.

    Args:
      data: the encoded file (JPEG, PNG, BMP, GIF, WebP, TIFF).
      max_pixels: refuse images with more pixels than this (decompression bombs), checked from the header before decoding.
      max_bytes: refuse encoded inputs larger than this.
      name: how to call the input in error messages (a file name, say).

    Returns:
      uint8 array [height, width, 3]; EXIF orientation applied, grey/alpha/palette converted to RGB.

    Raises:
      ImageDecodeError: with a message saying what is wrong.
    """
    from PIL import Image, ImageOps

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"{name}: expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty file")
    if len(data) > max_bytes:
        raise ImageDecodeError(f"{name}: file is {len(data):,} bytes, more than the limit of {max_bytes:,}")
    fast = _decode_plain_jpeg(data, max_pixels)
    if fast is not None:
        return fast
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
                    "(possible decompression bomb)")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            image = _to_rgb(image, name)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{name}: too many pixels (possible decompression bomb): {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image of a known format ({', '.join(DECODED_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, NotImplementedError) as exc:  # NotImplementedError: unusual pixel formats
        message = str(exc)
        if "truncated" in message or "broken data stream" in message or "premature end" in message.lower():
            raise ImageDecodeError(f"{name}: truncated or damaged image ({message})") from None
        raise ImageDecodeError(f"{name}: cannot decode image ({message})") from None
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageDecodeError(f"{name}: decoded to an empty image of shape {array.shape}")
    return array


def _to_rgb(image, name: str):
    """An 8-bit RGB copy of a decoded image: 16-bit grey (mode I;16, 16-bit PNG and TIFF) keeps its high byte, where
    PIL's own conversion would clip it to white; 32-bit integer and float pixels have no agreed range and are refused."""
    from PIL import Image

    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        raise ImageDecodeError(f"{name}: {'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels have no "
                               "agreed range of brightness; save the image with 8 or 16 bits per channel")
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode_plain_jpeg(data, max_pixels: int) -> np.ndarray | None:
    """A plain JPEG (`_is_plain_jpeg`) decoded by libjpeg-turbo straight into numpy (simplejpeg): the same pixels as PIL,
    which uses libjpeg-turbo with the same settings, at a tenth of the cost on small images (9 vs 80 us for a 32 x 32
    CIFAR-10 JPEG; PIL's cost there is Python). None for anything else (other formats, EXIF orientation to apply, CMYK,
    damaged or truncated files, bombs): `decode_image` then decodes with PIL, which gives those their precise errors."""
    if not _is_plain_jpeg(data, max_pixels):
        return None
    import simplejpeg

    try:
        image = simplejpeg.decode_jpeg(data, colorspace="RGB")  # strict: a warning (premature end...) raises
    except ValueError:
        return None
    return image if image.size else None


def _is_plain_jpeg(data, max_pixels: int) -> bool:
    """Whether `data` is a plain JPEG, judged from its header: YCbCr or grey, no EXIF or XMP block, within the limits."""
    from PIL import Image

    if bytes(data[:2]) != b"\xff\xd8" or _has_app1(data):
        return False
    import simplejpeg

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return False
    return colorspace in ("YCbCr", "Gray") and width * height <= min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)


def _has_app1(data) -> bool:
    """Whether a JPEG has an APP1 block (EXIF or XMP, either of which can give an orientation that PIL applies) before
    its image data; also True when its markers do not parse, so that anything unusual goes to PIL."""
    view, position = memoryview(data), 2
    while position + 4 <= len(view):
        if view[position] != 0xFF:
            return True
        marker = view[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xDA:  # start of scan: no more headers
            return False
        if marker == 0xE1:
            return True
        position += 2 + int.from_bytes(view[position + 2:position + 4], "big")
    return True


#: What the exported model's in-graph decoder (`serving.export.decode_for_model`) reads exactly as `decode_image` does:
#: formats and PIL modes (MPO: a camera's multi-picture JPEG, whose first picture both decode).
GRAPH_FORMATS = {"JPEG": ("RGB", "L"), "MPO": ("RGB", "L"), "PNG": ("RGB", "L", "RGBA", "LA")}
_ORIENTATION_TAG = 0x0112
#: PNG chunks (by their type or keyword) from which PIL reads an orientation.
_PNG_ORIENTATION_CHUNKS = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp")


def encoded_for_graph(data: bytes, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES,
                      name: str = "image") -> bytes:
    """`data`, or a lossless PNG of its `decode_image` pixels where the exported model would read other pixels.

    The SavedModel decodes in its graph (TensorFlow's JPEG / PNG / GIF / BMP decoders), which knows nothing of EXIF
    orientation, palettes, 16-bit or CMYK pixels, TIFF or WebP. Sending what this returns instead of `data` makes any
    server, the real TF Serving included, embed the upright picture indexing embedded; JPEGs without an orientation to
    apply and 8-bit PNGs (nearly every file) go through unchanged, checked from their headers. The limits are those of
    `decode_image`; the PNG must be within `max_bytes` too (an EXIF-turned photo of over about 20 M pixels is not:
    embed such a photo in process, or send its pixels through `embed_pixels`).

    Raises:
      ImageDecodeError: as `decode_image`, or a PNG over `max_bytes`.
    """
    from PIL import Image

    if isinstance(data, (bytes, bytearray, memoryview)) and 0 < len(data) <= max_bytes:
        if _is_plain_jpeg(data, max_pixels):
            return bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
                width, height = image.size
                if (width * height <= max_pixels and image.mode in GRAPH_FORMATS.get(image.format, ())
                        and (image.format != "PNG" or data[24] == 8)  # the bit depth: 16-bit is rounded otherwise
                        and _orientation(image, data) == 1):
                    return bytes(data)
        except Exception:  # noqa: BLE001 - anything unusual: `decode_image` says precisely what is wrong with it
            pass
    out = io.BytesIO()
    Image.fromarray(decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes, name=name)).save(
        out, "PNG", compress_level=1)
    if out.tell() > max_bytes:
        raise ImageDecodeError(f"{name}: upright, as a PNG, it takes {out.tell():,} bytes, more than the limit of "
                               f"{max_bytes:,}: embed it in process, or send its pixels (embed_pixels)")
    return out.getvalue()


def _orientation(image, data) -> int:
    """The EXIF orientation PIL applies (EXIF, or XMP's where EXIF has none); 1 for a PNG with no chunk that can hold
    one, whose `getexif` would decode the whole image to look for one after the pixels."""
    if image.format == "PNG" and not any(chunk in data for chunk in _PNG_ORIENTATION_CHUNKS):
        return 1
    return image.getexif().get(_ORIENTATION_TAG, 1)


def read_image(path: str | os.PathLike, **kwargs) -> np.ndarray:
    """Reads and decodes an image file (see `decode_image`); a missing file raises FileNotFoundError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingError(f"no such image file: {path}")
    with open(path, "rb") as f:
        return decode_image(f.read(), name=path, **kwargs)


def resize_and_crop(image, size: int):
    """Resizes the shorter side to `size` (bilinear, antialiased) and takes the central `size` x `size` crop.

    Works on one image tensor [h, w, 3] of any dtype holding 0..255 values; returns float32 [size, size, 3] in 0..255. This
    is the one resize used for indexing, queries and the exported SavedModel.
    """
    import tensorflow as tf

    image = tf.cast(image, tf.float32)
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.minimum(height, width)
    new_height = tf.maximum(size, tf.cast(tf.round(height * scale), tf.int32))
    new_width = tf.maximum(size, tf.cast(tf.round(width * scale), tf.int32))
    top = (new_height - size) // 2
    left = (new_width - size) // 2
    # `tf.image.resize(..., antialias=True)` to the new size and the crop, in one op that computes only the crop:
    # resizing a 1 x 5,000 line to 224 x 1,120,000 first would take gigabytes
    image = tf.raw_ops.ScaleAndTranslate(
        images=image[None], size=tf.constant([size, size]),
        scale=tf.stack([tf.cast(new_height, tf.float32) / height, tf.cast(new_width, tf.float32) / width]),
        translation=-tf.cast(tf.stack([top, left]), tf.float32), kernel_type="triangle", antialias=True)[0]
    image = tf.clip_by_value(image, 0.0, 255.0)
    return tf.ensure_shape(image, [size, size, 3])


@functools.lru_cache(maxsize=128)
def _resize_weights(in_size: int, out_size: int, first: int, count: int) -> tuple[int, np.ndarray]:
    """Outputs `first` .. `first + count - 1` of TensorFlow's antialiased bilinear resize along one axis from `in_size`
    to `out_size` (a triangle kernel widened by the downscaling factor, half-pixel centres: `tf.image.resize(...,
    antialias=True)`'s scale_and_translate), as (offset, weights [count, support]): they read only the inputs `offset`
    .. `offset + support - 1`, so a crop of a very long resize costs what the crop does."""
    inv_scale = in_size / out_size
    kernel_scale = max(inv_scale, 1.0)
    samples = (np.arange(first, first + count, dtype=np.float32) + 0.5) * np.float32(inv_scale)
    starts = np.clip(np.ceil(samples - kernel_scale - 0.5), 0, in_size - 1).astype(np.int64)
    ends = np.clip(np.floor(samples + kernel_scale - 0.5), 0, in_size - 1).astype(np.int64) + 1
    offset = int(starts.min())
    columns = np.arange(offset, int(ends.max()))
    sources = columns.astype(np.float32) + 0.5
    weights = np.maximum(0.0, 1.0 - np.abs((sources[None, :] - samples[:, None]) / np.float32(kernel_scale)))
    inside = (columns[None, :] >= starts[:, None]) & (columns[None, :] < ends[:, None])
    weights = np.where(inside, weights, 0.0).astype(np.float32)
    totals = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=np.abs(totals) >= 1000 * np.finfo(np.float32).tiny)
    weights.flags.writeable = False  # cached and shared between calls
    return offset, weights


def resize_and_crop_array(image: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """`resize_and_crop` in numpy, for one decoded image in process (no TensorFlow op per image): the same pixels, up
    to float rounding. Returns float32 [size, size, 3] in 0..255, written into `out` (C-contiguous) when it is given."""
    image = np.asarray(image)
    height, width = image.shape[:2]
    scale = np.float32(size) / np.float32(min(height, width))
    new_height = max(size, int(np.round(np.float32(height) * scale)))
    new_width = max(size, int(np.round(np.float32(width) * scale)))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    # only the rows and columns the crop keeps, from only the pixels they read
    first_row, rows = _resize_weights(height, new_height, top, size)
    first_column, columns = _resize_weights(width, new_width, left, size)
    image = image[first_row:first_row + rows.shape[1], first_column:first_column + columns.shape[1]]
    height, width = image.shape[:2]
    if out is None:
        out = np.empty((size, size, 3), np.float32)
    elif out.shape != (size, size, 3) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise InvalidInputError(f"out must be a C-contiguous float32 array [{size}, {size}, 3]")
    # Two matrix products, channels last. A small or short image: its columns first (transposing it is cheap, and the
    # second product runs over its few rows) straight into `out`. A large one: its rows first, without transposing it.
    if height * width <= size * size or height <= size:
        transposed = np.ascontiguousarray(image.transpose(1, 0, 2), dtype=np.float32).reshape(width, height * 3)
        half_way = (columns @ transposed).reshape(size, height, 3).transpose(1, 0, 2)  # [h, size, 3]
        np.matmul(rows, np.ascontiguousarray(half_way).reshape(height, size * 3), out=out.reshape(size, size * 3))
    else:  # the result comes out transposed
        pixels = np.ascontiguousarray(image, dtype=np.float32).reshape(height, width * 3)
        half_way = (rows @ pixels).reshape(size, width, 3).transpose(1, 0, 2)  # [w, size, 3]
        resized = columns @ np.ascontiguousarray(half_way).reshape(width, size * 3)  # [x, y * 3]
        out[...] = resized.reshape(size, size, 3).transpose(1, 0, 2)
    return np.clip(out, 0.0, 255.0, out=out)


def resize_and_crop_images(images: Iterable[np.ndarray], size: int, count: int | None = None) -> np.ndarray:
    """`resize_and_crop_array` of each decoded image, as one float32 batch [n, size, size, 3] (each image written in
    place: no per-image array and no copy to stack them). `images` may be a generator of `count` images, decoded one
    at a time: a batch of large photos then holds one of them in memory, not all."""
    from tf_retrieval.runtime import one_blas_thread

    pixels = np.empty((len(images) if count is None else count, size, size, 3), np.float32)
    with one_blas_thread():  # small matrix products: BLAS threads would only contend with the caller's
        for image, target in zip(images, pixels):
            resize_and_crop_array(image, size, out=target)
    return pixels


def make_thumbnail(image: np.ndarray, size: int, quality: int = 88) -> bytes:
    """JPEG bytes of a decoded RGB image scaled (aspect ratio kept) so that its longer side is `size` pixels."""
    from PIL import Image

    if size < 1:
        raise InvalidInputError(f"thumbnail size must be positive, got {size}")
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    scale = size / max(picture.size)
    new_size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    picture = picture.resize(new_size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=quality)
    return out.getvalue()


class ThumbnailCache:
    """Thumbnails of collection images (`make_thumbnail`); the `maxsize` most recently used stay in memory.

    Entries are keyed by collection name, image id, size and a `version` the caller gives: a reloaded collection
    (other positions) still hits them, unless the caller moves to a new version (an id may now name another image).
    Safe to share between threads.
    """

    def __init__(self, maxsize: int = 2048):
        self.maxsize = maxsize
        self._entries: collections.OrderedDict[tuple[str, str, int, int], bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, collection: ImageCollection, position: int, size: int, version: int = 0) -> bytes:
        """The JPEG thumbnail of `collection`'s image at `position` (decode errors: `ImageDecodeError`, `OSError`)."""
        key = (collection.name, collection.ids[position], size, version)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        data = make_thumbnail(collection.image(position), size)
        with self._lock:
            self._entries[key] = data
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return data


@dataclasses.dataclass
class ImageCollection:
    """A labelled set of encoded images.

    Attributes:
      name: where it came from ("cifar10", a folder path, ...); part of every cache key.
      ids: one unique string id per image (tfds example id or path relative to the folder).
      labels: int64 [n] class labels; `class_names[label]` is the class name.
      class_names: names of all classes (also classes without images).
      splits: the split each image belongs to ("train", "test", ...), as given by the source.
      encoded: the encoded images in memory (tfds; a list, or `PackedImages` from a bundle's image store), or None.
      paths: the image files (folders), or None. Exactly one of `encoded` and `paths` is set.
      skipped: (path, reason) of files left out because they could not be decoded.
    """

    name: str
    ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    splits: np.ndarray
    encoded: Sequence[bytes] | None = None
    paths: list[str] | None = None
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.splits = np.asarray(self.splits, dtype=str)
        n = len(self.ids)
        if (self.encoded is None) == (self.paths is None):
            raise InvalidInputError("ImageCollection needs exactly one of `encoded` and `paths`")
        sizes = {"labels": len(self.labels), "splits": len(self.splits),
                 "images": len(self.encoded if self.encoded is not None else self.paths)}
        if any(size != n for size in sizes.values()):
            raise InvalidInputError(f"ImageCollection {self.name!r}: {n} ids but {sizes}")

    def __len__(self) -> int:
        return len(self.ids)

    def read_bytes(self, index: int) -> bytes:
        """The encoded image at position `index`."""
        if self.encoded is not None:
            return self.encoded[index]
        if "://" in self.paths[index]:  # a file on Cloud Storage or another filesystem of TensorFlow's
            import tensorflow as tf

            with tf.io.gfile.GFile(self.paths[index], "rb") as f:
                return f.read()
        with open(self.paths[index], "rb") as f:
            return f.read()

    def image(self, index: int) -> np.ndarray:
        """The decoded RGB uint8 image at position `index`."""
        return decode_image(self.read_bytes(index), name=self.ids[index])

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> ImageCollection:
        """The images at `indices` (in that order) as a new collection sharing this one's class names."""
        indices = np.asarray(indices, dtype=np.int64)
        pick = (lambda values: [values[i] for i in indices]) if len(indices) else (lambda values: [])
        return ImageCollection(
            name=name or self.name, ids=pick(self.ids), labels=self.labels[indices], class_names=self.class_names,
            splits=self.splits[indices], encoded=pick(self.encoded) if self.encoded is not None else None,
            paths=pick(self.paths) if self.paths is not None else None)

    def pixel_batches(self, image_size: int, batch_size: int = 64, threads: int | None = None):
        """Float32 pixel batches [b, image_size, image_size, 3] in 0..255, in collection order.

        A pool of `threads` threads (default: the cores) decodes (`decode_image`) and resizes (`resize_and_crop_images`)
        whole batches, a few ahead of the consumer; PIL and numpy release the GIL, so this overlaps with a model that
        runs outside Python (LiteRT, TensorFlow). An image that does not decode raises `ImageDecodeError`.
        """
        import concurrent.futures
        import itertools

        def load(start: int) -> np.ndarray:
            positions = range(start, min(start + batch_size, len(self)))
            return resize_and_crop_images((self.image(i) for i in positions), image_size, count=len(positions))

        threads = threads or os.cpu_count() or 1
        starts = iter(range(0, len(self), batch_size))
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
            pending = collections.deque(pool.submit(load, start) for start in itertools.islice(starts, threads + 1))
            try:
                while pending:
                    batch = pending.popleft().result()
                    start = next(starts, None)
                    if start is not None:
                        pending.append(pool.submit(load, start))
                    yield batch
            finally:  # the consumer stopped early, or a batch failed: do not decode the rest
                for future in pending:
                    future.cancel()


class PackedImages(Sequence):
    """Encoded images concatenated in one buffer, read by position: a sequence of bytes that memory-maps from disk.

    The image store of an index bundle (`search.engine`): loading it costs two `np.load` calls with `mmap_mode="r"`,
    however many images it holds, where re-reading a tfds source takes seconds.
    """

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or len(offsets) < 1 or int(offsets[-1]) != len(data):
            raise InvalidInputError(f"packed images: {len(offsets)} offsets do not fit {len(data)} bytes of data")
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> bytes:
        if not -len(self) <= index < len(self):
            raise IndexError(f"image {index} of {len(self)}")
        index %= len(self)
        return bytes(self.data[int(self.offsets[index]):int(self.offsets[index + 1])])

    def save(self, folder: str) -> None:
        """Writes `data.npy` and `offsets.npy` into `folder` (an existing, empty folder)."""
        np.save(os.path.join(folder, "data.npy"), self.data)
        np.save(os.path.join(folder, "offsets.npy"), self.offsets)

    @classmethod
    def pack(cls, images: Sequence[bytes]) -> PackedImages:
        """The images of `images`, in order, in one buffer."""
        offsets = np.zeros(len(images) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(image) for image in images])
        return cls(np.frombuffer(b"".join(images), dtype=np.uint8), offsets)

    @classmethod
    def load(cls, folder: str) -> PackedImages:
        """Memory-maps a folder written by `save`."""
        return cls(np.load(os.path.join(folder, "data.npy"), mmap_mode="r"),
                   np.load(os.path.join(folder, "offsets.npy"), mmap_mode="r"))


def tfds_data_dir(data_dir: str | None = None) -> str:
    """`data_dir`, else `$TFDS_DATA_DIR`, else tfds' default `~/tensorflow_datasets` (an empty value counts as unset)."""
    return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def load_tfds(name: str, data_dir: str | None = None, splits: Iterable[str] | None = None) -> ImageCollection:
    """Loads a tfds image-classification dataset (all splits, or `splits`) as one collection of encoded images.

    Uses `tfds.load` on `tfds_data_dir(data_dir)`; a dataset not prepared there is downloaded and prepared as usual.

    Raises:
      MissingError: the dataset is not prepared there and cannot be downloaded (offline).
    """
    import tensorflow_datasets as tfds

    data_dir = tfds_data_dir(data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.info.splits:  # not prepared yet: download and prepare as tfds.load would
        try:
            builder.download_and_prepare()
        except (OSError, tfds.download.DownloadError) as exc:
            raise MissingError(f"tfds dataset {name!r} is not prepared in {data_dir} and could not be downloaded "
                               f"({type(exc).__name__}): set TFDS_DATA_DIR (or --data-dir) to a folder holding a "
                               "prepared copy, or connect to the internet to download it") from exc
    class_names = list(builder.info.features["label"].names)
    # canonical (sorted) order: the same collection, and so the same feature cache, however the splits are listed
    split_names = sorted(splits) if splits is not None else sorted(builder.info.splits.keys())
    if not split_names:
        raise InvalidInputError(f"tfds dataset {name!r} has no splits in {builder.data_dir}")
    ids, labels, split_of, encoded = [], [], [], []
    for split in split_names:
        ds = tfds.load(name, split=split, data_dir=data_dir, decoders={"image": tfds.decode.SkipDecoding()})
        for example in tfds.as_numpy(ds.batch(4096)):
            count = len(example["label"])
            keys = example.get("id", example.get("file_name"))
            if keys is None:
                keys = np.array([f"{split}_{len(ids) + i:06d}".encode() for i in range(count)])
            ids.extend(k.decode() if isinstance(k, bytes) else str(k) for k in keys)
            labels.extend(example["label"].tolist())
            encoded.extend(bytes(b) for b in example["image"])
            split_of.extend([split] * count)
    if len(set(ids)) != len(ids):  # file names repeat across splits in some datasets: make them unique
        ids = [f"{s}/{i}" for s, i in zip(split_of, ids)]
    logger.info("loaded tfds %s: %d images, %d classes, splits %s", name, len(ids), len(class_names), split_names)
    return ImageCollection(name=name, ids=ids, labels=np.array(labels), class_names=class_names,
                           splits=np.array(split_of), encoded=encoded)


def image_folder(path: str | os.PathLike, *, validate: bool = True, progress: bool = True) -> ImageCollection:
    """Loads a folder of images, one sub-folder per class (the sub-folder name is the class name).

    If the folder holds an `index.csv` with columns `file,label[,official_split]` (file relative to the folder, integer label),
    it is used instead of the sub-folder names. Files that cannot be decoded are skipped, counted and logged with the reason
    (see `ImageCollection.skipped`); the rest load.
    """
    root = os.path.abspath(os.fspath(path))
    if not os.path.isdir(root):
        raise MissingError(f"image folder not found: {root}")
    index_csv = os.path.join(root, "index.csv")
    if os.path.isfile(index_csv):
        files, labels, splits = _read_index_csv(root, index_csv)
        class_names = [str(i) for i in range(max(labels) + 1)] if labels else []
    else:
        class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        files, labels = [], []
        for label, class_name in enumerate(class_names):
            for dirpath, _, names in sorted(os.walk(os.path.join(root, class_name))):
                for file in sorted(names):
                    if is_image_file(file) and not file.startswith("."):
                        files.append(os.path.relpath(os.path.join(dirpath, file), root))
                        labels.append(label)
        splits = ["all"] * len(files)
    if not files:
        raise InvalidInputError(f"no images found in {root} (expected class sub-folders of {', '.join(IMAGE_EXTENSIONS)} files)")
    keep, skipped = list(range(len(files))), []
    if validate:
        keep, skipped = _validate_files(root, files, progress=progress)
    if skipped:
        logger.warning("%s: skipped %d unreadable file(s): %s", root, len(skipped),
                       "; ".join(f"{p}: {why}" for p, why in skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    return ImageCollection(name=root, ids=[files[i] for i in keep], labels=np.array([labels[i] for i in keep]),
                           class_names=class_names, splits=np.array([splits[i] for i in keep]),
                           paths=[os.path.join(root, files[i]) for i in keep], skipped=skipped)


def _read_index_csv(root: str, index_csv: str) -> tuple[list[str], list[int], list[str]]:
    files, labels, splits = [], [], []
    with open(index_csv, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
            raise InvalidInputError(f"{index_csv}: expected a header with columns file,label[,official_split]; got {reader.fieldnames}")
        first_line = {}
        for line, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                label = -1
            if label < 0:
                raise InvalidInputError(f"{index_csv}:{line}: label {row['label']!r} is not an integer of 0 or more")
            file = os.path.normpath(row["file"] or "")
            if file in first_line:
                raise InvalidInputError(f"{index_csv}:{line}: {row['file']!r} is listed already (line {first_line[file]})")
            first_line[file] = line
            labels.append(label)
            files.append(row["file"])
            splits.append(row.get("official_split") or "all")
    return files, labels, splits


def _validate_files(root: str, files: list[str], progress: bool) -> tuple[list[int], list[tuple[str, str]]]:
    from tqdm.auto import tqdm

    keep, skipped = [], []
    for i, file in enumerate(tqdm(files, desc=f"checking images in {os.path.basename(root)}", unit="img",
                                  disable=not progress, leave=False)):
        try:
            read_image(os.path.join(root, file))
            keep.append(i)
        except (ImageDecodeError, OSError) as exc:
            skipped.append((file, str(exc)))
    return keep, skipped


def load_dataset(source: str, data_dir: str | None = None, *, validate: bool = True) -> ImageCollection:
    """Loads `source`: a folder path (or "folder:PATH") as an image folder (each file decoded to check it unless not
    `validate`), anything else as a tfds dataset name."""
    if source.startswith("folder:"):
        return image_folder(source[len("folder:"):], validate=validate)
    if os.path.isdir(source):
        return image_folder(source, validate=validate)
    if is_file_pattern(source):
        return pattern_images(source)
    if os.sep in source or source.startswith("."):
        raise MissingError(f"image folder not found: {source}")
    return load_tfds(source, data_dir=data_dir)


#: The characters that make a source a file pattern (glob's).
WILDCARDS = "*?["


def is_file_pattern(source: str) -> bool:
    """Whether `source` is a file pattern (`photos/*/*.jpg`, `gs://bucket/images/*/*.jpg`), not a folder or a tfds
    name (`cifar10:3.*.*` is a tfds name with a version pattern: no "/")."""
    return "://" in source or ("/" in source and any(ch in source for ch in WILDCARDS))


def is_image_file(path: str) -> bool:
    """Whether a file name has one of `IMAGE_EXTENSIONS` (any case): what folders and file patterns list."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def pattern_root(pattern: str) -> str:
    """The folder a file pattern's matches are named relative to (their ids; the class is the first folder below it):
    everything before the first wildcard, back to its last "/" (`gs://b/images/*/*.jpg` -> `gs://b/images/`)."""
    first = min((pattern.find(ch) for ch in WILDCARDS if ch in pattern), default=len(pattern))
    folder, _, _ = pattern[:first].rpartition("/")
    return folder + "/"


def pattern_id(pattern: str, path: str) -> tuple[str, str]:
    """(id, class name) of a file matched by `pattern`: its path below `pattern_root`, and the first folder there."""
    root = pattern_root(pattern)
    relative = path[len(root):] if path.startswith(root) else os.path.basename(path)
    return relative, relative.split("/")[0] if "/" in relative else ""


def pattern_images(pattern: str) -> ImageCollection:
    """The files matching `pattern` (local, or any filesystem `tf.io.gfile` reads: gs://...), named as `pattern_id`
    names them, in id order; listed, not decoded (a pipeline's dead letters say which did not decode)."""
    import tensorflow as tf

    pattern = pattern if "://" in pattern else os.path.abspath(pattern)
    paths = [path for path in tf.io.gfile.glob(pattern) if is_image_file(path)]
    if not paths:
        raise MissingError(f"no image files match {pattern}")
    named = sorted((*pattern_id(pattern, path), path) for path in paths)
    class_names = sorted({class_name for _, class_name, _ in named})
    label_of = {name: label for label, name in enumerate(class_names)}
    return ImageCollection(name=pattern, ids=[image_id for image_id, _, _ in named],
                           labels=[label_of[class_name] for _, class_name, _ in named], splits=["all"] * len(named),
                           class_names=class_names, paths=[path for _, _, path in named])


def load_collection(source: str, *, data_dir: str | None = None, splits: Sequence[str] | None = None,
                    limit: int | None = None, validate: bool = True) -> ImageCollection:
    """`load_dataset`, restricted to some `splits` (of a tfds dataset, or of a folder whose index.csv has an
    official_split column) and to the first `limit` images when given."""
    if splits and not (os.path.isdir(source) or source.startswith("folder:") or is_file_pattern(source)):
        collection = load_tfds(source, data_dir=data_dir, splits=splits)
    else:
        collection = load_dataset(source, data_dir=data_dir, validate=validate)
        if splits:
            unknown = sorted(set(splits) - set(collection.splits.tolist()))
            if unknown:
                raise InvalidInputError(f"{collection.name} has no split {', '.join(map(repr, unknown))} (its splits: "
                                        f"{', '.join(sorted(set(collection.splits.tolist())))}; a folder has splits "
                                        "where its index.csv has an official_split column)")
            collection = collection.subset(np.flatnonzero(np.isin(collection.splits, list(splits))))
    if limit is not None:
        if limit <= 0:
            raise InvalidInputError(f"the limit must be positive, got {limit}")
        collection = collection.subset(np.arange(min(limit, len(collection))))
    return collection


def image_files(paths: Sequence[str]) -> list[str]:
    """The image files among `paths`: files as given, folders searched recursively for image extensions (sorted).

    Raises:
      MissingError: a path that does not exist. InvalidInputError: a folder without images.
    """
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
                           if is_image_file(name))
            if not found:
                raise InvalidInputError(f"no images in folder {path}")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise MissingError(f"no such image or folder: {path}")
    return files
