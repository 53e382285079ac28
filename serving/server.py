"""A server that speaks TF Serving's protocols over TF Serving's model directories.

`tensorflow_model_server` cannot be installed everywhere (it is not on PyPI), so this server implements the same services from
`tensorflow-serving-api` — gRPC PredictionService (`Predict`, `GetModelMetadata`) and ModelService (`GetModelStatus`), plus
TF Serving's REST API (`serving.rest`) — over the same `<base_path>/<model_name>/<version>/` SavedModel layout, with the
standard gRPC health service. Clients written for TF Serving work unchanged against it, and the exported models run unchanged
on real TF Serving (see docs/serving.md).

Behaviour follows TF Serving: outputs are typed proto fields (`float_val`, ...); a request without a version gets the newest
loaded one; a polling thread applies the version policy (by default only the newest version on disk stays loaded); bad
requests get INVALID_ARGUMENT, unknown models or versions NOT_FOUND, and the server keeps serving.

With `runtime="litert"` (or "litert-fp16", float16 arithmetic) a version exported with its LiteRT flatbuffer
(`assets.extra/model.tflite`, `tfr export`) answers its two signatures through LiteRT (several times faster on a CPU;
images decoded as at index time); its SavedModel
still defines the signatures, checks the inputs and answers every other call. Versions without the file run on
TensorFlow.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import os
import re
import signal
import sys
import threading
from typing import Sequence

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from tf_retrieval.errors import InvalidInputError, MissingError, PortUnavailableError
from tf_retrieval import flags

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_SIGNATURE = "serving_default"


class ServingError(Exception):
    """A request error with the gRPC status code it answers with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def invalid_argument(message: str) -> ServingError:
    """A ServingError with INVALID_ARGUMENT, the status of a request that is wrong in itself (REST: 400)."""
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _dtype_name(enum: int) -> str:
    """A TensorProto dtype number's name ("float32", ...), or the number where it names no TensorFlow dtype."""
    import tensorflow as tf

    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return f"dtype number {enum}"


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk are served, like TF Serving's `model_version_policy`.

    `parse` reads "latest" (the newest version), "latest:N" (the N newest), "all", or "specific:1,3".
    """

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, argument = text.strip().partition(":")
        try:
            if kind == "latest":
                policy = cls("latest", int(argument) if argument else 1)
            elif kind == "all" and not argument:
                policy = cls("all")
            elif kind == "specific":
                policy = cls("specific", versions=tuple(sorted({int(v) for v in argument.split(",")})))
            else:
                raise ValueError
        except ValueError:
            policy = None
        if policy is None or policy.num_versions < 1 or any(v < 1 for v in policy.versions):
            raise InvalidInputError(f"version policy {text!r} is not one of 'latest', 'latest:N' (N >= 1), 'all', "
                                    "'specific:V[,V...]'")
        return policy

    def select(self, available: Sequence[int]) -> set[int]:
        """The versions to serve out of those `available`."""
        if self.kind == "latest":
            return set(sorted(available)[-self.num_versions:])
        if self.kind == "specific":
            return set(available) & set(self.versions)
        return set(available)

    def __str__(self) -> str:
        if self.kind == "latest":
            return "latest" if self.num_versions == 1 else f"latest:{self.num_versions}"
        return "specific:" + ",".join(map(str, self.versions)) if self.kind == "specific" else "all"


@dataclasses.dataclass
class LoadedVersion:
    """One loaded SavedModel version: its callable signatures and their SignatureDef protos; `fast` holds the
    signatures answered by LiteRT instead (`litert_signatures`), and `decoded` a tf_retrieval export's
    `serving_default` on TensorFlow, its images decoded as at index time (`_decoded_as_indexed`)."""

    name: str
    version: int
    path: str
    model: object
    signature_defs: dict
    fast: dict = dataclasses.field(default_factory=dict)
    decoded: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, name: str, version: int, path: str, runtime: str = "tf") -> LoadedVersion:
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        saved_model = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved_model.ParseFromString(f.read())
        signature_defs = dict(saved_model.meta_graphs[0].signature_def)
        signature_defs.pop("__saved_model_init_op", None)
        from tf_retrieval.features.litert import LITERT_PRECISIONS

        image_size = _export_image_size(path)
        fast = litert_signatures(path, LITERT_PRECISIONS[runtime], image_size) if runtime in LITERT_PRECISIONS else {}
        model = tf.saved_model.load(path)
        decoded = {}
        if not fast and image_size and {DEFAULT_SIGNATURE, "embed_pixels"} <= set(signature_defs):
            embed_pixels = model.signatures["embed_pixels"]
            decoded[DEFAULT_SIGNATURE] = _decoded_as_indexed(
                lambda pixels: embed_pixels(images=tf.constant(pixels)), image_size)
        return cls(name, version, path, model, signature_defs, fast, decoded)

    def signature(self, signature_name: str):
        """(name, SignatureDef, concrete function, function that runs it) of a signature ("" is `serving_default`);
        FAILED_PRECONDITION if absent."""
        name = signature_name or DEFAULT_SIGNATURE
        if name not in self.signature_defs:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f'Serving signature key "{name}" not found. Signatures of {self.name} version '
                               f"{self.version}: {sorted(self.signature_defs)}")
        function = self.model.signatures[name]
        return name, self.signature_defs[name], function, self.fast.get(name) or self.decoded.get(name) or function


def _export_image_size(path: str) -> int | None:
    """The image size a tf_retrieval export says it takes (`assets.extra/config.json`); None for other SavedModels."""
    import json

    try:
        with open(os.path.join(path, "assets.extra", "config.json"), encoding="utf-8") as f:
            return int(json.load(f)["image_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _decoded_as_indexed(embed_pixels, image_size: int):
    """`serving_default` of a tf_retrieval export: each image decoded as at index time (`decode_image`: EXIF
    orientation, every format it reads, its size limits checked from the header) and resized by the shared resize,
    then `embed_pixels` (LiteRT's, or the SavedModel's own on TensorFlow): a file embeds alike on either runtime."""
    import numpy as np

    from tf_retrieval.data.images import decode_image, resize_and_crop_array

    def embed_bytes(images):
        try:
            decoded = [decode_image(data, name=f"image {i}") for i, data in enumerate(images.numpy())]
        except ValueError as exc:  # ImageDecodeError, with TF Serving's status
            raise invalid_argument(f"the model rejected the input: {exc}") from None
        return embed_pixels(np.stack([resize_and_crop_array(image, image_size) for image in decoded]))

    return embed_bytes


def litert_signatures(path: str, precision: str = "fp32", image_size: int | None = None) -> dict:
    """The exported signatures of a version, run by LiteRT (in `precision`: "fp32" or "fp16") on its
    `assets.extra/model.tflite`: {name: function of the checked input tensors -> {"embedding": array}}; empty when the
    version has no flatbuffer (or LiteRT fails on it). `image_size`: the export's (default: read from its config)."""
    from tf_retrieval.features.litert import load_litert
    from tf_retrieval.serving.export import LITERT_FILE

    image_size = image_size or _export_image_size(path)
    try:
        with open(os.path.join(path, LITERT_FILE), "rb") as f:
            model, _ = load_litert(f.read(), precision)
    except FileNotFoundError:
        return {}
    except Exception as exc:  # noqa: BLE001 - a flatbuffer LiteRT cannot run: TensorFlow still serves the version
        logger.warning("%s: LiteRT cannot run %s (%s: %s); serving it with TensorFlow", path, LITERT_FILE,
                       type(exc).__name__, exc)
        return {}
    if image_size is None:
        logger.warning("%s: no image size in assets.extra/config.json; serving it with TensorFlow", path)
        return {}
    return {"serving_default": _decoded_as_indexed(lambda pixels: {"embedding": model(pixels)}, image_size),
            "embed_pixels": lambda images: {"embedding": model(images.numpy())}}


@dataclasses.dataclass
class VersionState:
    """A version's state as GetModelStatus reports it: LOADING, AVAILABLE or END (unloaded, or failed with `error`)."""

    state: str
    error: str = ""


class ModelRegistry:
    """Loaded versions of the models under a base path, kept in step with the disk and the version policy by `refresh()`.

    Args:
      base_path: either one model's directory (integer version sub-directories; give `model_name`) or a directory of
        model directories (each sub-directory with versions is a model, named after it).
      model_name: the served name when `base_path` is one model's directory; otherwise serve only this model.
      version_policy: which versions on disk are loaded (`VersionPolicy` or its text form); by default the newest.
      runtime: "litert" (versions with a LiteRT flatbuffer answer their signatures through it), "litert-fp16" (the same
        in float16 arithmetic) or "tf".
    """

    def __init__(self, base_path: str, model_name: str | None = None, version_policy: VersionPolicy | str = "latest",
                 runtime: str = "litert"):
        from tf_retrieval.features.litert import RUNTIMES

        if runtime not in RUNTIMES:
            raise InvalidInputError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        self.runtime = runtime
        self.base_path = os.path.abspath(base_path)
        self.model_name = model_name
        self.policy = VersionPolicy.parse(version_policy) if isinstance(version_policy, str) else version_policy
        self._models: dict[str, dict[int, LoadedVersion]] = {}
        self._states: dict[str, dict[int, VersionState]] = {}
        self._failed: dict[tuple[str, int], tuple] = {}  # (name, version) -> `_fingerprint` of the files that failed
        self._lock = threading.Lock()

    def _model_dirs(self) -> dict[str, str]:
        if not os.path.isdir(self.base_path):
            raise MissingError(f"model base path not found: {self.base_path}")
        if _versions_on_disk(self.base_path):
            return {self.model_name or os.path.basename(self.base_path): self.base_path}
        dirs = {name: os.path.join(self.base_path, name) for name in sorted(os.listdir(self.base_path))
                if _versions_on_disk(os.path.join(self.base_path, name))}
        if self.model_name:
            dirs = {name: path for name, path in dirs.items() if name == self.model_name}
        return dirs

    def refresh(self) -> None:
        """Loads the versions the policy wants and unloads the others; a version that fails to load is skipped.

        New versions load before old ones unload (as TF Serving's availability-preserving policy does), so a model keeps
        serving while it changes version, and keeps its old version when the new one cannot be loaded.
        """
        dirs = self._model_dirs()
        for name in sorted(set(dirs) | set(self._models)):
            on_disk = _versions_on_disk(dirs[name]) if name in dirs else {}
            loaded = set(self.versions(name))
            for version in sorted(self.policy.select(self._loadable(name, on_disk)) - loaded):
                self._load(name, version, on_disk[version])
            wanted = self.policy.select(self._loadable(name, on_disk))
            for version in sorted(set(self.versions(name)) - wanted):
                with self._lock:
                    del self._models[name][version]
                    self._states[name][version] = VersionState("END")
                logger.info("unloaded model %s version %d (%s)", name, version,
                            "removed from disk" if version not in on_disk else f"version policy {self.policy}")

    def _loadable(self, name: str, on_disk: dict[int, str]) -> list[int]:
        return [v for v, path in on_disk.items()
                if (name, v) not in self._failed or self._failed[(name, v)] != _fingerprint(path)]

    def _load(self, name: str, version: int, path: str) -> None:
        with self._lock:
            self._states.setdefault(name, {})[version] = VersionState("LOADING")
        files = _fingerprint(path)  # before loading: files that change while a load fails make it try again
        try:
            loaded = LoadedVersion.load(name, version, path, self.runtime)
        except Exception as exc:  # a broken version must not stop the server; it is retried when its files change
            logger.exception("could not load %s version %d from %s", name, version, path)
            self._failed[(name, version)] = files
            with self._lock:
                self._states[name][version] = VersionState("END", f"{type(exc).__name__}: {exc}")
            return
        self._failed.pop((name, version), None)
        with self._lock:
            self._models.setdefault(name, {})[version] = loaded
            self._states[name][version] = VersionState("AVAILABLE")
        logger.info("loaded model %s version %d (%s)", name, version, "LiteRT" if loaded.fast else "TensorFlow")

    def get(self, name: str, version: int | None = None) -> LoadedVersion:
        """The requested version (the newest loaded when None); NOT_FOUND (TF Serving's message) otherwise."""
        with self._lock:
            versions = self._models.get(name) or {}
            if version is None and versions:
                return versions[max(versions)]
            if version in versions:
                return versions[version]
        request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
        known = f"loaded versions of {name}: {sorted(versions)}" if versions else f"served models: {self.names()}"
        raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request} ({known})")

    def states(self, name: str) -> dict[int, VersionState]:
        """Every version of `name` the server has seen, with its state (unloaded versions stay, as END)."""
        with self._lock:
            return dict(self._states.get(name, {}))

    def versions(self, name: str) -> list[int]:
        """The loaded versions of `name`, ascending."""
        with self._lock:
            return sorted(self._models.get(name, {}))

    def names(self) -> list[str]:
        """The names of the models with at least one loaded version."""
        with self._lock:
            return sorted(name for name, versions in self._models.items() if versions)


def _versions_on_disk(directory: str) -> dict[int, str]:
    if not os.path.isdir(directory):
        return {}
    paths = {entry: os.path.join(directory, entry) for entry in os.listdir(directory)}
    return {int(entry): path for entry, path in paths.items()
            if entry.isdigit() and int(entry) > 0 and os.path.isfile(os.path.join(path, "saved_model.pb"))}


def _fingerprint(version_dir: str) -> tuple:
    """The files of a version directory with their sizes and times: a version that failed to load is tried again when
    this changes (a copy that had written `saved_model.pb` before `variables/` completes, say)."""
    files = []
    for directory, _, names in os.walk(version_dir):
        for name in names:
            try:
                info = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            files.append((os.path.relpath(os.path.join(directory, name), version_dir), info.st_size, info.st_mtime_ns))
    return tuple(sorted(files))


def op_error_message(message: str) -> str:
    """The op's own error out of TensorFlow's "Graph execution error" text (without the header, node trace and op suffix).

    "Graph execution error:\\n\\nDetected at node ...\\n<stack traces unavailable>\\nUnknown image file format. ...\\n\\t [[{{node
    DecodeImage}}]] [Op:__inference_...]" -> "Unknown image file format. ..."
    """
    header = re.compile(r"Graph execution error:|Detected at node |<stack traces unavailable>|Node: ")
    lines = [line for line in message.splitlines()
             if line.strip() and not line[0].isspace() and not header.match(line)]
    text = re.sub(r"\s*\[\[.*?\]\]|\s*\[Op:[^\]]*\](?: name: \S*)?", "", " ".join(lines)).strip()
    return text or message.strip()


def _check_spec(model_spec) -> None:
    """INVALID_ARGUMENT, in TF Serving's words, for a ModelSpec without a name or with a version label (none is set)."""
    if not model_spec.name:
        raise invalid_argument("ModelSpec has no name specified.")
    if model_spec.WhichOneof("version_choice") == "version_label":
        raise invalid_argument(f"Unrecognized servable version label: {model_spec.version_label}")


class ServingCore:
    """The request handling behind both APIs (gRPC and REST): proto requests in, proto responses out.

    Errors are raised as `ServingError` with TF Serving's status codes (and its messages where clients may match them).
    """

    def __init__(self, registry: ModelRegistry, max_batch_size: int = 1024):
        self.registry = registry
        self.max_batch_size = max_batch_size

    def resolve(self, model_spec) -> LoadedVersion:
        """The loaded version a ModelSpec asks for (newest without a version; labels are not configured here)."""
        _check_spec(model_spec)
        return self.registry.get(model_spec.name,
                                 model_spec.version.value if model_spec.HasField("version") else None)

    def predict(self, request):
        """PredictRequest -> PredictResponse, outputs as typed fields (`float_val`, ...) like TF Serving's default."""
        return self.predict_on(self.resolve(request.model_spec), request)

    def predict_on(self, servable: LoadedVersion, request):
        """`predict` on a version resolved already (REST types its JSON by that version's signature: the same
        version answers, even where the poller unloads it meanwhile)."""
        from tensorflow_serving.apis import predict_pb2

        signature_name, signature_def, function, run = servable.signature(request.model_spec.signature_name)
        wanted = list(request.output_filter) or list(signature_def.outputs)
        for alias in wanted:
            if alias not in signature_def.outputs:
                raise invalid_argument(f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                                       f"the set {{{','.join(sorted(signature_def.outputs))}}}.")
        if len(set(wanted)) != len(wanted):
            raise invalid_argument(f"duplicate output tensor alias in output_filter {wanted}")
        outputs = self._run(run, self._inputs(request, function, signature_name))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature_name
        for alias in wanted:
            response.outputs[alias].CopyFrom(tensor_to_proto_field(outputs[alias]))
        return response

    def _inputs(self, request, function, signature_name: str) -> dict:
        import tensorflow as tf

        specs = function.structured_input_signature[1]
        if set(request.inputs) != set(specs):
            extra, missing = sorted(set(request.inputs) - set(specs)), sorted(set(specs) - set(request.inputs))
            raise invalid_argument(f'inputs do not match signature "{signature_name}". Sent extra: {{{",".join(extra)}}}. '
                                   f'Missing but required: {{{",".join(missing)}}}.')
        inputs = {}
        for key, spec in specs.items():
            proto = request.inputs[key]
            if proto.dtype != spec.dtype.as_datatype_enum:
                raise invalid_argument(f"input {key!r} must be {spec.dtype.name}, got {_dtype_name(proto.dtype)}")
            # the declared shape first: `make_ndarray` fills it (one value repeated), so a few bytes could ask for gigabytes
            shape = [dim.size for dim in proto.tensor_shape.dim]
            if proto.tensor_shape.unknown_rank or min(shape, default=0) < 0 or not spec.shape.is_compatible_with(shape):
                raise invalid_argument(f"input {key!r} must have shape {spec.shape.as_list()} (None = any), got {shape}")
            if shape and shape[0] > self.max_batch_size:
                raise invalid_argument(f"batch of {shape[0]} is over this server's limit of {self.max_batch_size}")
            if shape and shape[0] == 0:
                raise invalid_argument(f"input {key!r} is an empty batch")
            try:
                value = tf.make_ndarray(proto)
            except Exception as exc:  # malformed TensorProto content
                raise invalid_argument(f"input {key!r} is not a valid tensor: {exc}") from None
            inputs[key] = tf.constant(value, dtype=spec.dtype)
        return inputs

    @staticmethod
    def _run(function, inputs) -> dict:
        import tensorflow as tf

        try:
            return function(**inputs)
        except tf.errors.InvalidArgumentError as exc:
            raise invalid_argument(f"the model rejected the input: {op_error_message(exc.message or str(exc))}") from None

    def metadata(self, request):
        """GetModelMetadataRequest -> GetModelMetadataResponse (the `signature_def` field, the only one TF Serving has)."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        if not request.metadata_field:
            raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise invalid_argument(f"Metadata field {field} is not supported")
        servable = self.resolve(request.model_spec)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def status(self, request):
        """GetModelStatusRequest -> GetModelStatusResponse: every version seen, newest first, as TF Serving lists them."""
        from tensorflow_serving.apis import get_model_status_pb2

        spec = request.model_spec
        _check_spec(spec)
        states = self.registry.states(spec.name)
        if spec.HasField("version"):
            if spec.version.value not in states:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Could not find version {spec.version.value} of model {spec.name}")
            states = {spec.version.value: states[spec.version.value]}
        elif not states:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in sorted(states, reverse=True):
            entry = response.model_version_status.add(version=version)
            entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(states[version].state)
            entry.status.SetInParent()  # always present, as in TF Serving ("error_code": "OK" in REST)
            if states[version].error:
                entry.status.error_code = grpc.StatusCode.UNKNOWN.value[0]
                entry.status.error_message = states[version].error
        return response


def tensor_to_proto_field(tensor):
    """A tf.Tensor (or numpy array) as a TensorProto with typed fields (`float_val`, `int64_val`, `string_val`, ...),
    like TF Serving's `Tensor::AsProtoField`; dtypes without a typed field use `tensor_content`."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    value = tensor.numpy() if hasattr(tensor, "numpy") else tensor
    dtype = tf.as_dtype(tensor.dtype)
    field = {tf.float32: "float_val", tf.float64: "double_val", tf.int32: "int_val", tf.int16: "int_val",
             tf.int8: "int_val", tf.uint8: "int_val", tf.uint16: "int_val", tf.int64: "int64_val", tf.bool: "bool_val",
             tf.string: "string_val", tf.uint32: "uint32_val", tf.uint64: "uint64_val"}.get(dtype)
    if field is None:
        return tf.make_tensor_proto(value)
    proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum,
                                   tensor_shape=tf.TensorShape(value.shape).as_proto())
    getattr(proto, field).extend(value.ravel().tolist())
    return proto


def _answer(method, request, context):
    """Runs a ServingCore method for a gRPC call; a ServingError ends the call with its status code."""
    try:
        return method(request)
    except ServingError as error:
        context.abort(error.code, str(error))


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService: Predict and GetModelMetadata (Classify/Regress answer UNIMPLEMENTED)."""

    def __init__(self, core: ServingCore):
        self.core = core

    def Predict(self, request, context):
        return _answer(self.core.predict, request, context)

    def GetModelMetadata(self, request, context):
        return _answer(self.core.metadata, request, context)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService: GetModelStatus (versions follow the file system, so no config reloads)."""

    def __init__(self, core: ServingCore):
        self.core = core

    def GetModelStatus(self, request, context):
        return _answer(self.core.status, request, context)


class Server:
    """A running server: `.port` (gRPC), `.rest_port` (None without REST), `.registry`, `.stop(grace)`, `.wait()`."""

    def __init__(self, grpc_server, port: int, rest, registry: ModelRegistry, stop_event: threading.Event, health):
        self._server, self.port, self._rest, self.registry = grpc_server, port, rest, registry
        self.rest_port = rest.port if rest else None
        self._stop_event, self._health = stop_event, health

    def stop(self, grace: float | None = 5.0) -> None:
        """Stops accepting requests and lets in-flight ones finish within `grace` seconds."""
        self._stop_event.set()
        self._health.enter_graceful_shutdown()
        if self._rest:
            self._rest.stop()
        self._server.stop(grace).wait()
        logger.info("server on port %d stopped", self.port)

    def wait(self) -> None:
        """Blocks until the server has stopped."""
        self._server.wait_for_termination()

    def wait_for_signal(self, grace: float = 10.0) -> None:
        """Blocks until SIGINT (Ctrl-C) or SIGTERM, then stops gracefully (from the main thread; elsewhere: `wait()`)."""
        if threading.current_thread() is not threading.main_thread():
            return self.wait()
        received = threading.Event()

        def on_signal(signum, frame):
            logger.info("signal %d: shutting down", signum)
            received.set()

        previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not received.wait(1.0) and not self._stop_event.is_set():
                pass
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.stop(grace)


#: REST connections served at once, and seconds a REST connection may stall, by default.
REST_MAX_CONNECTIONS = 64
REST_TIMEOUT_SECONDS = 30.0


def check_rest_limits(max_connections: int, timeout_seconds: float) -> None:
    """Raises InvalidInputError unless at least 1 REST connection and a timeout above 0 seconds are allowed."""
    if max_connections < 1:
        raise InvalidInputError(f"rest_max_connections must be at least 1, got {max_connections}")
    if not timeout_seconds > 0:
        raise InvalidInputError(f"rest_timeout_seconds must be above 0, got {timeout_seconds}")


def serve(model_base_path: str, model_name: str | None = None, *, host: str = "127.0.0.1", port: int = 8500,
          rest_port: int | None = None, poll_seconds: float = 2.0, max_workers: int = 8, max_batch_size: int = 1024,
          version_policy: VersionPolicy | str = "latest", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
          runtime: str = "litert", rest_max_connections: int = REST_MAX_CONNECTIONS,
          rest_timeout_seconds: float = REST_TIMEOUT_SECONDS, block: bool = False) -> Server:
    """Loads the models under `model_base_path` and serves them over gRPC (and REST when `rest_port` is given).

    Args:
      model_base_path: a model directory (`<version>/saved_model.pb`) or a directory of model directories.
      model_name: the served name of a single model directory; otherwise serve only this model of the base path.
      host, port: where gRPC listens (port 0: any free port, see `Server.port`).
      rest_port: TF Serving's REST API port (0: any free port); None serves no REST API.
      poll_seconds: how often the disk is checked for new or removed versions (0: never).
      max_workers: gRPC worker threads; max_batch_size: the most images one request may carry.
      version_policy: "latest" (default), "latest:N", "all" or "specific:1,3" (see `VersionPolicy`).
      runtime: "litert" (default: versions exported with their LiteRT flatbuffer run on it), "litert-fp16" (the same in
        float16 arithmetic) or "tf".
      rest_max_connections: REST connections served at once; one more is answered 503.
      rest_timeout_seconds: a REST connection that stalls this long (reading or writing) is closed.
      block: serve until SIGINT/SIGTERM, then stop gracefully before returning.

    Returns:
      the running `Server` (stopped already when `block`).

    Raises:
      MissingError: no SavedModel under the base path. PortUnavailableError (an OSError): a port is in use.
      InvalidInputError: a bad version policy.
    """
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from tf_retrieval.runtime import single_threaded_blas
    from tf_retrieval.serving.rest import RestServer

    check_rest_limits(rest_max_connections, rest_timeout_seconds)  # before anything binds
    single_threaded_blas()
    registry = ModelRegistry(model_base_path, model_name, version_policy, runtime)
    registry.refresh()
    if not registry.names():
        raise MissingError(f"no loadable SavedModel versions under {model_base_path} "
                           "(expected <model>/<version>/saved_model.pb): export one with `tfr export`")
    core = ServingCore(registry, max_batch_size)
    options = [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]  # with SO_REUSEPORT a second server on the same port would start silently
    grpc_server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(core), grpc_server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core), grpc_server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    try:
        bound = grpc_server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio raises where older versions returned 0
        bound = 0
    if bound == 0:
        raise PortUnavailableError(f"cannot serve gRPC on {host}:{port}: the address is in use (another server?) or "
                                   "not available")
    try:
        rest = None if rest_port is None else RestServer(core, host, rest_port, max_body_bytes=max_message_bytes,
                                                         max_connections=rest_max_connections,
                                                         timeout_seconds=rest_timeout_seconds)
    except OSError as exc:
        grpc_server.stop(None)
        raise PortUnavailableError(f"cannot serve REST on {host}:{rest_port}: {exc.strerror or exc}") from None
    grpc_server.start()
    if rest:
        rest.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reported: set[str] = set()

    def report_health() -> None:
        """Each model's health: SERVING while it has a loaded version, NOT_SERVING once it has none (removed)."""
        names = set(registry.names())
        for name in sorted(names | reported):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING if name in names
                                else health_pb2.HealthCheckResponse.NOT_SERVING)
        reported.update(names)

    report_health()
    stop_event = threading.Event()
    if poll_seconds > 0:
        threading.Thread(target=_poll, args=(registry, poll_seconds, stop_event, report_health), name="model-poller",
                         daemon=True).start()
    logger.info("serving %s on %s (gRPC port %d%s), version policy %s",
                {name: registry.versions(name) for name in registry.names()}, host, bound,
                f", REST port {rest.port}" if rest else "", registry.policy)
    server = Server(grpc_server, bound, rest, registry, stop_event, health_servicer)
    if block:
        server.wait_for_signal()
    return server


def _poll(registry: ModelRegistry, seconds: float, stop_event: threading.Event, refreshed) -> None:
    while not stop_event.wait(seconds):
        try:
            registry.refresh()
            refreshed()
        except Exception:
            logger.exception("model directory poll failed")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tf_retrieval.serving`: flags follow tensorflow_model_server's."""
    parser = argparse.ArgumentParser(prog="python -m tf_retrieval.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=flags.port, default=8500, help="gRPC port (0: any free port)")
    parser.add_argument("--rest_api_port", type=flags.port, default=8501, help="REST API port (0: no REST API)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    parser.add_argument("--model_base_path", required=True, help="a model directory, or a directory of model directories")
    parser.add_argument("--model_name", help="served name when --model_base_path is one model's directory")
    parser.add_argument("--model_version_policy", default="latest",
                        help="versions served: latest (default), latest:N, all, or specific:1,3")
    parser.add_argument("--file_system_poll_wait_seconds", type=flags.seconds, default=2.0,
                        help="how often to look for new / removed versions (0: never)")
    parser.add_argument("--max_workers", type=flags.positive_int, default=8)
    parser.add_argument("--rest_api_num_threads", type=int, default=REST_MAX_CONNECTIONS,
                        help="REST connections served at once, one thread each; one more gets a 503")
    parser.add_argument("--rest_api_timeout_in_ms", type=int, default=int(REST_TIMEOUT_SECONDS * 1000),
                        help="a REST connection that stalls this long is closed")
    parser.add_argument("--max_batch_size", type=flags.positive_int, default=1024)
    parser.add_argument("--max_message_mb", type=flags.positive_int, default=64)
    parser.add_argument("--runtime", choices=("litert", "litert-fp16", "tf"), default="litert",
                        help="litert (default): versions exported with a LiteRT flatbuffer run on it; litert-fp16: "
                             "the same in float16 arithmetic (faster on CPUs that have it); tf: TensorFlow")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = serve(args.model_base_path, args.model_name, host=args.host, port=args.port,
                       rest_port=args.rest_api_port or None, poll_seconds=args.file_system_poll_wait_seconds,
                       max_workers=args.max_workers, max_batch_size=args.max_batch_size,
                       version_policy=args.model_version_policy, max_message_bytes=args.max_message_mb * 1024 * 1024,
                       runtime=args.runtime, rest_max_connections=args.rest_api_num_threads,
                       rest_timeout_seconds=args.rest_api_timeout_in_ms / 1000)
    except (OSError, ValueError) as exc:
        print(f"serving: error: {exc}", file=sys.stderr)
        return 2
    print(f"serving on {args.host}:{server.port}", flush=True)  # the gRPC address, alone on the first line for scripts
    if server.rest_port:
        print(f"REST API on http://{args.host}:{server.rest_port}/v1/models/", flush=True)
    server.wait_for_signal()
    return 0
