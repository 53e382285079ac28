import io
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from tf_retrieval.data.images import (ImageCollection, ImageDecodeError, decode_image, encoded_for_graph, image_folder,
                                      load_dataset, load_tfds, read_image, resize_and_crop)
from tf_retrieval.errors import InvalidInputError


def encode(array, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width, height):
    """A PNG whose header claims width x height pixels, with (almost) no pixel data: a decompression-bomb shape."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def test_decode_image_rgb_and_conversions():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    np.testing.assert_array_equal(decode_image(encode(rgb)), rgb)
    grey = np.full((3, 2), 77, np.uint8)
    out = decode_image(encode(grey))
    assert out.shape == (3, 2, 3) and (out == 77).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    assert decode_image(encode(rgba)).shape == (2, 2, 3)
    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024 + 1000)  # 16-bit grey (mode I;16): its high byte
    for fmt in ("PNG", "TIFF"):
        np.testing.assert_array_equal(decode_image(encode(deep, fmt))[..., 1], (deep >> 8).astype(np.uint8))
    with pytest.raises(ImageDecodeError, match="floating-point pixels have no agreed range"):
        decode_image(encode(np.ones((4, 4), np.float32), "TIFF"))


def test_decode_image_applies_the_exif_orientation():
    pixels = np.zeros((4, 6, 3), np.uint8)  # 4 rows x 6 columns, stored sideways: orientation 6 = rotate 90 degrees CW
    pixels[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", exif=exif)
    decoded = decode_image(out.getvalue())
    assert decoded.shape == (6, 4, 3)  # shown upright: 6 rows x 4 columns
    np.testing.assert_array_equal(decoded, np.rot90(pixels, k=-1))


def pil_pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    ImageOps.exif_transpose(image, in_place=True)
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("mode, subsampling, progressive", [
    ("RGB", 2, False), ("RGB", 0, False), ("RGB", 1, True), ("L", 2, False), ("CMYK", 0, False)])
def test_decode_image_jpeg_pixels_equal_pil(mode, subsampling, progressive):
    """Plain JPEGs take the libjpeg-turbo fast path, CMYK goes to PIL: both give PIL's pixels exactly."""
    from tf_retrieval.data.images import _decode_plain_jpeg

    smooth = np.asarray(Image.fromarray(np.random.default_rng(1).integers(0, 255, (9, 12, 3), dtype=np.uint8))
                        .resize((120, 90), Image.Resampling.BILINEAR))
    buffer = io.BytesIO()
    Image.fromarray(smooth).convert(mode).save(buffer, format="JPEG", quality=85, subsampling=subsampling,
                                               progressive=progressive)
    data = buffer.getvalue()
    fast = _decode_plain_jpeg(data, max_pixels=10**6)
    assert (fast is None) == (mode == "CMYK")
    decoded = decode_image(data)
    assert decoded.shape == (90, 120, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, pil_pixels(data))


def test_decode_image_jpeg_with_exif_orientation_goes_to_pil():
    from tf_retrieval.data.images import _decode_plain_jpeg

    pixels = np.zeros((16, 24, 3), np.uint8)
    pixels[:8, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(pixels, "JPEG", exif=exif)
    assert _decode_plain_jpeg(data, max_pixels=10**6) is None
    assert _decode_plain_jpeg(encode(pixels, "JPEG"), max_pixels=10**6) is not None
    decoded = decode_image(data)
    assert decoded.shape == (24, 16, 3)  # rotated upright
    np.testing.assert_array_equal(decoded, pil_pixels(data))


def test_decode_image_jpeg_with_xmp_orientation_goes_to_pil():
    pixels = np.zeros((10, 20, 3), np.uint8)
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    data = encode(pixels, "JPEG", xmp=xmp)
    assert decode_image(data).shape == pil_pixels(data).shape == (20, 10, 3)  # rotated, as PIL does


@pytest.mark.parametrize("data, message", [
    (b"", "empty file"),
    (b"this is not an image at all", "not an image"),
    ("a string", "expected encoded image bytes"),
])
def test_decode_image_rejects_garbage(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["PPM", "DDS", "EPS"])
def test_decode_image_opens_only_the_documented_formats(fmt):
    from PIL import Image

    if fmt == "EPS":  # a header is enough to be recognised (PIL would hand the file to Ghostscript)
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
    else:
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format=fmt)
        data = buffer.getvalue()
    with pytest.raises(ImageDecodeError, match=r"upload: not an image of a known format \(JPEG, PNG, BMP, GIF"):
        decode_image(data, name="upload")
    assert decode_image(encode(np.zeros((8, 8, 3), np.uint8), "PNG")).shape == (8, 8, 3)


def test_decode_image_rejects_truncated_jpeg_and_png():
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for fmt in ("JPEG", "PNG"):
        data = encode(pixels, fmt)
        with pytest.raises(ImageDecodeError, match="truncated|damaged|cannot decode"):
            decode_image(data[: len(data) // 2], name=f"half.{fmt}")
    with pytest.raises(ImageDecodeError, match="half.jpg: truncated or damaged image"):
        decode_image(encode(pixels, "JPEG")[:-10], name="half.jpg")  # only the end missing: libjpeg warns


def test_decode_image_rejects_decompression_bombs_before_decoding():
    with pytest.raises(ImageDecodeError, match="possible decompression bomb"):
        decode_image(png_header_only(100_000, 100_000))
    with pytest.raises(ImageDecodeError, match="20x20 = 400 pixels is over the limit of 100 .possible decompression bomb"):
        decode_image(encode(np.zeros((20, 20, 3), np.uint8)), max_pixels=100)
    with pytest.raises(ImageDecodeError, match="20x20 = 400 pixels is over the limit of 100 .possible decompression bomb"):
        decode_image(encode(np.zeros((20, 20, 3), np.uint8), "JPEG"), max_pixels=100)
    with pytest.raises(ImageDecodeError, match="more than the limit of 10"):
        decode_image(encode(np.zeros((20, 20, 3), np.uint8)), max_bytes=10)


def test_encoded_for_graph_gives_the_exported_models_decoder_the_pixels_of_decode_image():
    from tf_retrieval.serving.export import decode_in_graph

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (12, 18, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = Image.Exif()
    upright[0x0112] = 1
    mpo = io.BytesIO()
    Image.fromarray(pixels).save(mpo, "MPO", save_all=True, append_images=[Image.fromarray(pixels[::-1])])
    plain = [encode(pixels, "JPEG"), encode(pixels, "PNG"), encode(pixels[..., 0], "PNG"),
             encode(np.dstack([pixels, pixels[..., :1]]), "PNG"), encode(pixels, "JPEG", exif=upright.tobytes()),
             mpo.getvalue()]
    for data in plain:  # nearly every file: sent as it is
        assert encoded_for_graph(data) == data
    converted = [encode(pixels, "JPEG", exif=exif.tobytes()), encode(pixels, "PNG", exif=exif.tobytes()),
                 encode(pixels, "TIFF"), encode(pixels, "WEBP", lossless=True),
                 encode(pixels, "GIF"), encode(pixels[..., 0].astype(np.uint16) * 257, "PNG")]
    for data in plain + converted:
        ready = encoded_for_graph(data)
        np.testing.assert_array_equal(decode_in_graph(ready).numpy(), decode_image(data))
    for data in converted[:2]:  # upright
        assert decode_image(encoded_for_graph(data)).shape == (18, 12, 3)
    noise = encode(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "JPEG", exif=exif.tobytes())  # PNG: 12 kB
    assert len(noise) < 8000
    with pytest.raises(ImageDecodeError, match="as a PNG, it takes .* bytes, more than the limit of 8,000"):
        encoded_for_graph(noise, max_bytes=8000)
    with pytest.raises(ImageDecodeError, match="possible decompression bomb"):
        encoded_for_graph(png_header_only(100_000, 100_000))
    with pytest.raises(ImageDecodeError, match="upload: not an image"):
        encoded_for_graph(b"not an image", name="upload")


def test_read_image_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image file"):
        read_image(tmp_path / "nope.jpg")


def test_resize_and_crop_keeps_the_centre():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # a white centre band exactly as wide as the central crop after resizing to 20x40
    out = resize_and_crop(image, 20).numpy()
    assert out.shape == (20, 20, 3) and out.dtype == np.float32
    assert out[:, 1:-1].min() > 250 and out.min() > 200  # the crop is the white centre band (antialiased edges)
    tall = resize_and_crop(np.zeros((10, 3, 3), np.uint8), 32)
    assert tall.shape == (32, 32, 3)


def test_image_folder_labels_and_skips_corrupt_files(image_dir):
    import os

    open(os.path.join(image_dir, "red", "empty.png"), "wb").close()
    with open(os.path.join(image_dir, "blue", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    with open(os.path.join(image_dir, "blue", "notes.txt"), "w") as f:
        f.write("ignored: not an image extension")
    collection = image_folder(image_dir, progress=False)
    assert collection.class_names == ["blue", "green", "red"]
    assert len(collection) == 18
    assert np.bincount(collection.labels).tolist() == [6, 6, 6]
    assert sorted(os.path.basename(p) for p, _ in collection.skipped) == ["broken.jpg", "empty.png"]
    assert any("empty file" in why for _, why in collection.skipped)
    assert collection.ids[0] == os.path.join("blue", "blue_000.png")
    assert collection.image(0).shape == (40, 48, 3)


def test_image_folder_index_csv(image_dir):
    import os

    with open(os.path.join(image_dir, "index.csv"), "w") as f:
        f.write("file,label,official_split\nred/red_000.png,5,train\nblue/blue_001.png,2,test\n")
    collection = image_folder(image_dir, progress=False)
    assert collection.ids == ["red/red_000.png", "blue/blue_001.png"]
    assert collection.labels.tolist() == [5, 2]
    assert collection.splits.tolist() == ["train", "test"]
    assert len(collection.class_names) == 6
    from tf_retrieval.data.images import load_collection

    assert load_collection(image_dir, splits=["test"]).ids == ["blue/blue_001.png"]
    with pytest.raises(InvalidInputError, match=r"has no split 'validation' \(its splits: test, train"):
        load_collection(image_dir, splits=["validation"])


@pytest.mark.parametrize("rows, message", [
    ("red/red_000.png,-1\n", r"index.csv:2: label '-1' is not an integer of 0 or more"),  # was the last class
    ("red/red_000.png,x\n", r"index.csv:2: label 'x' is not an integer"),
    ("red/red_000.png,1\nblue/blue_001.png,2\n./red/red_000.png,1\n",
     r"index.csv:4: './red/red_000.png' is listed already \(line 2\)"),  # two ids for one image
])
def test_image_folder_index_csv_errors(image_dir, rows, message):
    import os

    with open(os.path.join(image_dir, "index.csv"), "w") as f:
        f.write("file,label\n" + rows)
    with pytest.raises(InvalidInputError, match=message):
        image_folder(image_dir, progress=False)


def test_a_file_pattern_is_a_collection_named_below_its_first_wildcard(image_dir):
    import os

    open(os.path.join(image_dir, "red", "notes.txt"), "w").close()
    collection = load_dataset(os.path.join(image_dir, "*", "*_00[0-2].png"))
    assert collection.ids == [f"{colour}/{colour}_00{i}.png" for colour in ("blue", "green", "red") for i in range(3)]
    assert collection.class_names == ["blue", "green", "red"] and collection.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert collection.image(0).shape == (40, 48, 3)
    with pytest.raises(FileNotFoundError, match="no image files match"):
        load_dataset(os.path.join(image_dir, "*", "*.txt"))
    from tf_retrieval.data.images import is_file_pattern

    assert is_file_pattern("gs://bucket/images/*/*.jpg") and not is_file_pattern("cifar10:3.*.*")  # a tfds version


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        image_folder(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_dataset("./no/such/folder")


def test_collection_pipeline_and_subset(image_dir):
    collection = image_folder(image_dir, progress=False)
    batches = list(collection.pixel_batches(image_size=32, batch_size=8, threads=2))
    assert [b.shape[0] for b in batches] == [8, 8, 2]
    assert batches[0].shape[1:] == (32, 32, 3) and batches[0].dtype == np.float32
    # Pipeline order equals collection order (the first image is blue, the 13th red), and its pixels are the
    # TensorFlow resize's, to float rounding.
    first = batches[0][0].mean(axis=(0, 1))
    assert first[2] > first[0] + 100
    expected = resize_and_crop(collection.image(12), 32).numpy()
    np.testing.assert_allclose(batches[1][4], expected, atol=0.01)
    sub = collection.subset([12, 0])
    assert sub.ids == [collection.ids[12], collection.ids[0]] and sub.labels.tolist() == [2, 0]
    with pytest.raises(ValueError, match="2 ids but"):
        ImageCollection("x", ids=["a", "b"], labels=[0], class_names=["c"], splits=["all", "all"], paths=["p", "q"])


def test_load_tfds_offline_fails_with_one_clear_line(tmp_path, monkeypatch):
    """An unprepared dataset with no network: tfds' download-and-prepare path (checksum lookup included, which imports
    importlib_resources) runs up to the HTTP request, then one line says what was searched and how to fix it."""
    import requests

    from tf_retrieval.errors import MissingError

    def offline(*args, **kwargs):
        raise requests.ConnectionError("network disabled for the test")

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", offline)
    with pytest.raises(MissingError) as caught:
        load_tfds("cifar10", data_dir=str(tmp_path))
    message = str(caught.value)
    assert "\n" not in message and "'cifar10'" in message and str(tmp_path) in message
    assert "(ConnectionError)" in message  # it got as far as the download
    assert "set TFDS_DATA_DIR" in message and "connect to the internet" in message


def test_tfds_data_dir_treats_an_empty_variable_as_unset(monkeypatch):
    from tf_retrieval.data.images import tfds_data_dir

    monkeypatch.setenv("TFDS_DATA_DIR", "")
    assert tfds_data_dir() == os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    monkeypatch.setenv("TFDS_DATA_DIR", "/data/tfds")
    assert tfds_data_dir() == "/data/tfds" and tfds_data_dir("/elsewhere") == "/elsewhere"


def test_load_tfds_with_mock_data():
    with tfds.testing.mock_data(num_examples=5):
        collection = load_tfds("cifar10", splits=["train", "test"])
    assert len(collection) == 10  # 5 per split, train + test
    assert sorted(set(collection.splits.tolist())) == ["test", "train"]
    assert len(set(collection.ids)) == 10
    assert collection.image(0).shape == (32, 32, 3)
    assert len(collection.class_names) == 10
    images = next(iter(collection.pixel_batches(image_size=48, batch_size=10)))
    assert images.shape == (10, 48, 48, 3)


def test_packed_images_round_trip_and_bounds(tmp_path):
    from tf_retrieval.data.images import PackedImages
    from tf_retrieval.errors import InvalidInputError

    images = [b"first", b"", b"third image"]
    PackedImages.pack(images).save(str(tmp_path))
    packed = PackedImages.load(str(tmp_path))
    assert len(packed) == 3 and list(packed) == images and packed[-1] == b"third image"
    with pytest.raises(IndexError, match="image 3 of 3"):
        packed[3]
    with pytest.raises(InvalidInputError, match="offsets do not fit"):
        PackedImages(packed.data[:-1], packed.offsets)


def _resize_then_crop(image, size):
    """The definition both resizes implement: TensorFlow's antialiased bilinear resize of the shorter side to `size`,
    then the central crop."""
    import tensorflow as tf

    height, width = image.shape[:2]
    scale = np.float32(size) / np.float32(min(height, width))
    new_height = max(size, int(np.round(np.float32(height) * scale)))
    new_width = max(size, int(np.round(np.float32(width) * scale)))
    resized = tf.image.resize(image.astype(np.float32), [new_height, new_width], method="bilinear", antialias=True)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return np.clip(resized.numpy()[top:top + size, left:left + size], 0, 255)


@pytest.mark.parametrize("height, width, size", [(32, 32, 96), (32, 32, 160), (480, 640, 96), (333, 500, 160),
                                                 (100, 37, 64), (96, 96, 96), (40, 48, 32), (7, 300, 32),
                                                 (1, 3000, 16), (2000, 3, 16)])
def test_both_resizes_give_tensorflows_pixels(height, width, size):
    from tf_retrieval.data.images import resize_and_crop, resize_and_crop_array

    image = np.random.default_rng(height + width).integers(0, 256, (height, width, 3)).astype(np.uint8)
    expected = _resize_then_crop(image, size)
    for actual in resize_and_crop(image, size).numpy(), resize_and_crop_array(image, size):
        assert actual.shape == (size, size, 3) and actual.dtype == np.float32
        # float rounding only (pixels are 0..255); it grows with the coordinates of long sides
        np.testing.assert_allclose(actual, expected, atol=0.05)


def test_a_very_long_image_costs_what_its_crop_does():
    import tracemalloc

    from tf_retrieval.data.images import resize_and_crop, resize_and_crop_array

    line = np.random.default_rng(0).integers(0, 256, (1, 20000, 3)).astype(np.uint8)  # resized: 224 x 4,480,000
    tracemalloc.start()
    out = resize_and_crop_array(line, 224)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5_000_000  # the whole resize would take 12 GB
    # every output row is the one input row, and the crop's 224 columns lie within a few input pixels of its centre
    np.testing.assert_allclose(out, np.broadcast_to(out[:1], out.shape))
    assert line[0, 9990:10010].min(axis=0).min() - 0.01 <= out.min() <= out.max() <= line[0, 9990:10010].max() + 0.01
    # the same pixels in TensorFlow, up to float32 sample positions near 4.5 million (a quarter pixel apart)
    np.testing.assert_allclose(resize_and_crop(line, 224).numpy(), out, atol=0.5)


def test_resize_and_crop_images_batches_images_of_any_sizes():
    from tf_retrieval.data.images import resize_and_crop_array, resize_and_crop_images

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(32, 32, 3), (50, 20, 3), (32, 32, 3)]]
    batch = resize_and_crop_images(images, 24)
    assert batch.shape == (3, 24, 24, 3) and batch.dtype == np.float32
    for image, resized in zip(images, batch):
        np.testing.assert_array_equal(resized, resize_and_crop_array(image, 24))
    assert resize_and_crop_images([], 24).shape == (0, 24, 24, 3)
    one_at_a_time = resize_and_crop_images((image for image in images), 24, count=3)  # a generator: decoded lazily
    np.testing.assert_array_equal(one_at_a_time, batch)
    with pytest.raises(InvalidInputError, match="C-contiguous float32 array"):
        resize_and_crop_array(images[0], 24, out=np.empty((24, 24, 3), np.float64))


def test_pixel_batches_name_an_image_that_does_not_decode():
    collection = ImageCollection("broken", ids=["good", "bad"], labels=[0, 0], class_names=["c"], splits=["all"] * 2,
                                 encoded=[encode(np.zeros((8, 8, 3), np.uint8)), b"not an image"])
    with pytest.raises(ImageDecodeError, match="bad: not an image"):
        list(collection.pixel_batches(image_size=16, batch_size=1, threads=2))
