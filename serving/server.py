"""A gRPC server that speaks TF Serving's protocol over TF Serving's model directories.

`tensorflow_model_server` cannot be installed everywhere (it is not on PyPI), so this server implements the same services from
`tensorflow-serving-api` — PredictionService (`Predict`, `GetModelMetadata`) and ModelService (`GetModelStatus`) — over the
same `<base_path>/<model_name>/<version>/` SavedModel layout, plus the standard gRPC health service. Clients written for TF
Serving work unchanged against it, and the exported models run unchanged on real TF Serving (see docs/serving.md).

Behaviour follows TF Serving: a request without a version gets the newest one; new version directories are picked up by a
polling thread and removed ones unloaded; bad tensors get INVALID_ARGUMENT, unknown models or versions NOT_FOUND, and the
server keeps serving.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import os
import signal
import sys
import threading
from typing import Sequence

import grpc
import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ServingError(Exception):
    """An error with the gRPC status code it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class LoadedVersion:
    """One loaded SavedModel version: its callable signatures and their SignatureDef protos."""

    name: str
    version: int
    path: str
    model: object
    signature_defs: dict

    @classmethod
    def load(cls, name: str, version: int, path: str) -> LoadedVersion:
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        saved_model = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved_model.ParseFromString(f.read())
        signature_defs = dict(saved_model.meta_graphs[0].signature_def)
        signature_defs.pop("__saved_model_init_op", None)
        return cls(name, version, path, tf.saved_model.load(path), signature_defs)

    def signature(self, signature_name: str):
        name = signature_name or "serving_default"
        if name not in self.model.signatures:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"model {self.name} version {self.version} has no signature {name!r}; "
                               f"it has {sorted(self.model.signatures.keys())}")
        return name, self.model.signatures[name]


class ModelRegistry:
    """Loaded versions of the models under a base path, kept in step with the disk by `refresh()`.

    Args:
      base_path: either one model's directory (integer version sub-directories; give `model_name`) or a directory of
        model directories (each sub-directory with versions is a model, named after it).
      model_name: the served name when `base_path` is one model's directory.
    """

    def __init__(self, base_path: str, model_name: str | None = None):
        self.base_path = os.path.abspath(base_path)
        self.model_name = model_name
        self._models: dict[str, dict[int, LoadedVersion]] = {}
        self._lock = threading.Lock()

    def _model_dirs(self) -> dict[str, str]:
        if not os.path.isdir(self.base_path):
            raise FileNotFoundError(f"model base path not found: {self.base_path}")
        if _versions_on_disk(self.base_path):
            return {self.model_name or os.path.basename(self.base_path): self.base_path}
        dirs = {name: os.path.join(self.base_path, name) for name in sorted(os.listdir(self.base_path))
                if os.path.isdir(os.path.join(self.base_path, name)) and _versions_on_disk(os.path.join(self.base_path, name))}
        if self.model_name:
            dirs = {name: path for name, path in dirs.items() if name == self.model_name}
        return dirs

    def refresh(self) -> None:
        """Loads versions that appeared on disk and unloads those that disappeared."""
        for name, directory in self._model_dirs().items():
            on_disk = _versions_on_disk(directory)
            loaded = self._models.get(name, {})
            for version in sorted(set(on_disk) - set(loaded)):
                try:
                    new = LoadedVersion.load(name, version, on_disk[version])
                except Exception:  # a half-written or broken version must not stop the server
                    logger.exception("could not load %s version %d from %s", name, version, on_disk[version])
                    continue
                with self._lock:
                    self._models.setdefault(name, {})[version] = new
                logger.info("loaded model %s version %d", name, version)
            for version in sorted(set(loaded) - set(on_disk)):
                with self._lock:
                    del self._models[name][version]
                logger.info("unloaded model %s version %d (removed from disk)", name, version)

    def get(self, name: str, version: int | None = None) -> LoadedVersion:
        """The requested version (newest when None); NOT_FOUND otherwise."""
        with self._lock:
            versions = self._models.get(name)
            if not versions:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: model {name!r} is not served "
                                   f"(served: {sorted(k for k, v in self._models.items() if v)})")
            if version is None:
                return versions[max(versions)]
            if version not in versions:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: model {name!r} has no "
                                                              f"version {version} (available: {sorted(versions)})")
            return versions[version]

    def versions(self, name: str) -> list[int]:
        with self._lock:
            return sorted(self._models.get(name, {}))

    def names(self) -> list[str]:
        with self._lock:
            return sorted(name for name, versions in self._models.items() if versions)


def _versions_on_disk(directory: str) -> dict[int, str]:
    versions = {}
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if entry.isdigit() and os.path.isfile(os.path.join(path, "saved_model.pb")):
            versions[int(entry)] = path
    return versions


def _requested_version(model_spec) -> int | None:
    if model_spec.HasField("version_label"):
        raise ServingError(grpc.StatusCode.NOT_FOUND,
                           f"version labels are not configured on this server (label {model_spec.version_label!r})")
    return model_spec.version.value if model_spec.HasField("version") else None


def _abort(context, error: Exception):
    if isinstance(error, ServingError):
        context.abort(error.code, str(error))
    raise error


class PredictionServicer:
    """tensorflow.serving.PredictionService over a `ModelRegistry`."""

    def __init__(self, registry: ModelRegistry, max_batch_size: int = 1024):
        self.registry = registry
        self.max_batch_size = max_batch_size

    def Predict(self, request, context):
        from tensorflow_serving.apis import predict_pb2

        try:
            servable = self.registry.get(request.model_spec.name, _requested_version(request.model_spec))
            signature_name, function = servable.signature(request.model_spec.signature_name)
            inputs = self._inputs(request, function, servable, signature_name)
            outputs = self._run(function, inputs)
        except ServingError as error:
            return _abort(context, error)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature_name
        wanted = set(request.output_filter) or set(outputs)
        unknown = wanted - set(outputs)
        if unknown:
            return _abort(context, ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                                f"output_filter names unknown outputs {sorted(unknown)}; "
                                                f"outputs are {sorted(outputs)}"))
        for key in wanted:
            response.outputs[key].CopyFrom(_to_proto(outputs[key]))
        return response

    def _inputs(self, request, function, servable, signature_name) -> dict:
        import tensorflow as tf

        specs = function.structured_input_signature[1]
        given, expected = set(request.inputs), set(specs)
        if given != expected:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"signature {signature_name!r} of {servable.name} takes inputs {sorted(expected)}, "
                               f"got {sorted(given)}")
        inputs = {}
        for key, spec in specs.items():
            proto = request.inputs[key]
            if proto.dtype != spec.dtype.as_datatype_enum:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"input {key!r} must be {spec.dtype.name}, got {tf.dtypes.as_dtype(proto.dtype).name}")
            try:
                value = tf.make_ndarray(proto)
            except Exception as exc:  # malformed TensorProto content
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input {key!r} is not a valid tensor: {exc}") from None
            if not spec.shape.is_compatible_with(value.shape):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"input {key!r} must have shape {spec.shape.as_list()} (None = any), got "
                                   f"{list(value.shape)}")
            if value.ndim and len(value) > self.max_batch_size:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"batch of {len(value)} is over this server's limit of {self.max_batch_size}")
            if value.ndim and len(value) == 0:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input {key!r} is an empty batch")
            inputs[key] = tf.constant(value, dtype=spec.dtype)
        return inputs

    @staticmethod
    def _run(function, inputs) -> dict:
        import tensorflow as tf

        try:
            return {key: value.numpy() for key, value in function(**inputs).items()}
        except tf.errors.InvalidArgumentError as exc:
            message = exc.message.splitlines()[0] if exc.message else str(exc)
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"the model rejected the input: {message}") from None

    def GetModelMetadata(self, request, context):
        from tensorflow_serving.apis import get_model_metadata_pb2

        try:
            if list(request.metadata_field) != ["signature_def"]:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"metadata_field must be ['signature_def'], got {list(request.metadata_field)}")
            servable = self.registry.get(request.model_spec.name, _requested_version(request.model_spec))
        except ServingError as error:
            return _abort(context, error)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def Classify(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Classify is not served: the models here are embedders (use Predict)")

    def Regress(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Regress is not served: the models here are embedders (use Predict)")

    def MultiInference(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not served (use Predict)")


class ModelServicer:
    """tensorflow.serving.ModelService (status only; reloading follows the file system)."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def GetModelStatus(self, request, context):
        from tensorflow_serving.apis import get_model_status_pb2
        from tensorflow_serving.apis import status_pb2

        try:
            requested = _requested_version(request.model_spec)
            name = request.model_spec.name
            versions = [self.registry.get(name, requested).version] if requested is not None else self.registry.versions(name)
            if not versions:
                self.registry.get(name)  # raises NOT_FOUND with the served names
        except ServingError as error:
            return _abort(context, error)
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in versions:
            entry = response.model_version_status.add()
            entry.version = version
            entry.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            entry.status.CopyFrom(status_pb2.StatusProto())
        return response

    def HandleReloadConfigRequest(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "config reloads are not supported: versions follow the file system")


def _to_proto(value: np.ndarray):
    import tensorflow as tf

    return tf.make_tensor_proto(value)


class Server:
    """A running server: `.port`, `.stop(grace)`, `.wait()`."""

    def __init__(self, grpc_server, port: int, registry: ModelRegistry, poller: threading.Thread | None,
                 stop_event: threading.Event, health):
        self._server, self.port, self.registry = grpc_server, port, registry
        self._poller, self._stop_event, self._health = poller, stop_event, health

    def stop(self, grace: float | None = 5.0) -> None:
        """Stops accepting requests and lets in-flight ones finish within `grace` seconds."""
        from grpc_health.v1 import health_pb2

        self._stop_event.set()
        self._health.enter_graceful_shutdown()
        self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.stop(grace).wait()
        logger.info("server on port %d stopped", self.port)

    def wait(self) -> None:
        self._server.wait_for_termination()


def serve(model_base_path: str, model_name: str | None = None, *, host: str = "127.0.0.1", port: int = 8500,
          max_workers: int = 8, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_batch_size: int = 1024,
          poll_seconds: float = 2.0) -> Server:
    """Loads the models under `model_base_path` and starts serving them (port 0 picks a free port).

    Returns:
      the running `Server`.
    """
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    registry = ModelRegistry(model_base_path, model_name)
    registry.refresh()
    if not registry.names():
        raise FileNotFoundError(f"no SavedModel versions under {model_base_path} "
                                "(expected <model>/<version>/saved_model.pb): export one with `tfr export`")
    options = [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(registry, max_batch_size), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(registry), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in registry.names():
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop_event = threading.Event()
    poller = None
    if poll_seconds > 0:
        def poll():
            while not stop_event.wait(poll_seconds):
                try:
                    registry.refresh()
                except Exception:
                    logger.exception("model directory poll failed")
        poller = threading.Thread(target=poll, name="model-poller", daemon=True)
        poller.start()
    logger.info("serving %s on %s:%d", {n: registry.versions(n) for n in registry.names()}, host, bound)
    return Server(server, bound, registry, poller, stop_event, health_servicer)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m serving`: flags follow tensorflow_model_server's."""
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    parser.add_argument("--model_base_path", required=True, help="a model directory, or a directory of model directories")
    parser.add_argument("--model_name", help="served name when --model_base_path is one model's directory")
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=2.0,
                        help="how often to look for new / removed versions (0: never)")
    parser.add_argument("--max_workers", type=int, default=8)
    parser.add_argument("--max_batch_size", type=int, default=1024)
    parser.add_argument("--max_message_mb", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = serve(args.model_base_path, args.model_name, host=args.host, port=args.port, max_workers=args.max_workers,
                       max_message_bytes=args.max_message_mb * 1024 * 1024, max_batch_size=args.max_batch_size,
                       poll_seconds=args.file_system_poll_wait_seconds)
    except (OSError, ValueError) as exc:
        print(f"serving: error: {exc}", file=sys.stderr)
        return 2
    print(f"serving on {args.host}:{server.port}", flush=True)
    done = threading.Event()

    def shutdown(signum, frame):
        logger.info("signal %d: shutting down", signum)
        server.stop(grace=10.0)
        done.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    done.wait()
    return 0
