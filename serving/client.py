"""Thin TF Serving clients for the embedder, over gRPC (`tensorflow_serving.apis` stubs) or REST (the standard library).

Both work unchanged against real `tensorflow_model_server` and against `tf_retrieval.serving.server`, and have the same
methods (`embed_bytes`, `embed_pixels`, `metadata`, `status`, `embedding_space`); `connect(address, model)` picks one
by the address:

    embedder = connect("localhost:8500", "baseline")          # gRPC
    embedder = connect("http://localhost:8501", "baseline")   # REST
    embedder = connect("host1:8500,host2:8500", "baseline")   # replicas: requests spread, a failed one retried
    vectors = embedder.embed_bytes([jpeg, png, ...])          # float32 [n, d], sent in requests of `batch_size` images
    embedder.check_embedding_space(config.embedding_space(), "the index")  # refuses another model's vectors

Errors: the server refusing a request raises `InvalidInputError`, an unknown model or version `MissingError`, an
unreachable server `ConnectionError`.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import urllib.error
import urllib.request
from typing import Iterator, Sequence

import grpc
import numpy as np

from tf_retrieval.errors import InvalidInputError, MissingError

DEFAULT_BATCH_SIZE = 64
_BYTES_SIGNATURE, _PIXELS_SIGNATURE = "serving_default", "embed_pixels"
#: The signature, without inputs, that answers what the model's vectors are (`ModelConfig.embedding_space`).
MODEL_INFO_SIGNATURE = "model_info"

logger = logging.getLogger(__name__)
#: Held while a client checks what a server's vectors are (re-entrant: a client of replicas checks each of them).
_CHECK_LOCK = threading.RLock()


def connect(address: str, model_name: str, version: int | None = None, *, timeout: float = 30.0,
            batch_size: int = DEFAULT_BATCH_SIZE) -> EmbeddingClient | RestEmbeddingClient | ReplicatedClient:
    """A client for the model server at `address`: "http(s)://host:port" is TF Serving's REST API, "host:port" its
    gRPC; several addresses separated by commas are replicas of one model (`ReplicatedClient`)."""
    addresses = [a.strip() for a in address.split(",") if a.strip()]
    if len(addresses) > 1:
        return ReplicatedClient([connect(a, model_name, version, timeout=timeout, batch_size=batch_size)
                                 for a in addresses])
    if not addresses:
        raise InvalidInputError(f"no server address in {address!r}")
    address = addresses[0]
    if address.startswith(("http://", "https://")):
        return RestEmbeddingClient(address, model_name, version, timeout=timeout, batch_size=batch_size)
    return EmbeddingClient(address.removeprefix("grpc://"), model_name, version, timeout=timeout, batch_size=batch_size)


def _raise_for(kind: str, message: str, address: str):
    """Turns a server error ("invalid", "not_found", "unavailable"; other kinds: RuntimeError) into the library's."""
    if kind == "invalid":
        raise InvalidInputError(f"TF Serving rejected the request: {message}") from None
    if kind == "not_found":
        raise MissingError(f"TF Serving at {address}: {message}") from None
    if kind == "unavailable":
        raise ConnectionError(f"TF Serving at {address} is not reachable: {message}") from None
    raise RuntimeError(f"TF Serving at {address} failed: {message}") from None


class _Embedder:
    """What both clients share: batching, checking what the served vectors are, reading metadata and status protos."""

    model_name: str
    batch_size: int
    #: The version asked for (None: the server's newest).
    version: int | None = None
    #: The version `check_embedding_space` checked, which a client of the newest version embeds with from then on.
    _pinned: int | None = None
    #: (expected, needed_by) of the last `check_embedding_space` that passed.
    _checked: tuple[str, str] | None = None

    #: The most bytes of images put in one request (a single larger image goes alone, for the server to refuse).
    max_request_bytes: int = 32 * 1024 * 1024

    def embed_bytes(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Encoded images (JPEG/PNG/...) -> float32 [n, d] through the `serving_default` signature.

        Each image is sent as the model's graph reads it as indexing does (`encoded_for_graph`: a photo with an EXIF
        orientation is sent upright, as PNG), so any server, the real TF Serving included, embeds what the index holds.

        Raises:
          ImageDecodeError: an image that is not usable (checked here, before anything is sent).
        """
        from tf_retrieval.data.images import encoded_for_graph

        images = np.empty(len(encoded), dtype=object)
        images[:] = [encoded_for_graph(data, name=f"image {i}") for i, data in enumerate(encoded)]
        return self._batched(images, _BYTES_SIGNATURE)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [n, s, s, 3] pixels in 0..255 -> float32 [n, d] through the `embed_pixels` signature."""
        return self._batched(np.asarray(pixels, dtype=np.float32), _PIXELS_SIGNATURE)

    def _batched(self, images: np.ndarray, signature_name: str) -> np.ndarray:
        if len(images) == 0:
            raise InvalidInputError("no images given")
        return np.concatenate([self._embed_checked(images[start:stop], signature_name)
                               for start, stop in self._requests(images)])

    def _requests(self, images: np.ndarray) -> Iterator[tuple[int, int]]:
        """(start, stop) of each request: at most `batch_size` images and `max_request_bytes` of them."""
        start, size = 0, 0
        for position, image in enumerate(images):
            cost = self._cost(image)
            if position > start and (position - start == self.batch_size or size + cost > self.max_request_bytes):
                yield start, position
                start, size = position, 0
            size += cost
        yield start, len(images)

    def _cost(self, image) -> int:
        """The bytes one image (encoded bytes, or a pixel array) adds to a request."""
        return len(image) if isinstance(image, bytes) else image.nbytes

    def _serving_version(self) -> int | None:
        """The version requests for vectors go to: the checked one, else the one asked for."""
        return self.version if self._pinned is None else self._pinned

    def _embed_checked(self, images: np.ndarray, signature_name: str) -> np.ndarray:
        """`_embed` on the version `check_embedding_space` checked; where the server has dropped it since (a client of
        the newest version), the newest is checked the same way before it answers (until one passes, none does)."""
        pinned = self._pinned
        try:
            return self._embed(images, signature_name, self.version if pinned is None else pinned)
        except MissingError:
            if pinned is None:  # never checked (a check pins and records what it checked together): nothing to redo
                raise
            with _CHECK_LOCK:
                if self._pinned == pinned:  # not re-checked by another thread meanwhile
                    self.check_embedding_space(*self._checked)
            return self._embed(images, signature_name, self._pinned)

    def _embed(self, images: np.ndarray, signature_name: str, version: int | None) -> np.ndarray:
        raise NotImplementedError

    def metadata(self) -> dict:
        """{"version": served version, "signatures": {name: {"inputs"/"outputs": {tensor: (dtype, shape)}}}}."""
        import tensorflow as tf

        version, signatures = self._metadata(self._serving_version())

        def describe(tensors):
            return {key: (tf.dtypes.as_dtype(t.dtype).name, [d.size for d in t.tensor_shape.dim])
                    for key, t in tensors.items()}

        return {"version": version, "signatures": {name: {"inputs": describe(s.inputs), "outputs": describe(s.outputs)}
                                                   for name, s in signatures.signature_def.items()}}

    def _metadata(self, version: int | None):
        """(version, SignatureDefMap proto) of `version` (None: the newest)."""
        raise NotImplementedError

    def embedding_space(self) -> str | None:
        """What the served model's vectors are (`ModelConfig.embedding_space`, answered by its `model_info`
        signature, which `tfr export` writes); None for a model exported without it."""
        return self._space_of(*self._metadata(self._serving_version()))

    def _space_of(self, version: int, signatures) -> str | None:
        """`embedding_space` of `version`, whose signatures (a SignatureDefMap proto) are given."""
        if MODEL_INFO_SIGNATURE not in signatures.signature_def:
            return None
        return str(np.asarray(self._model_info(version)).ravel()[0])

    def _model_info(self, version: int):
        """The `embedding_space` output of `version`'s `model_info` signature."""
        raise NotImplementedError

    def check_embedding_space(self, expected: str, needed_by: str) -> None:
        """Refuses a served model whose vectors are not `expected` (an embedding space, `ModelConfig.embedding_space`)
        as `needed_by` (e.g. "the index at ...") needs them. A model exported without `model_info` cannot say: it is
        trusted, with a warning, as is a server that refuses to answer it.

        A client of the server's newest version checks the newest, and then embeds with the version it checked; once
        the server has dropped that one (a model exported again under its name), the next request checks the new
        newest the same way first, so another model's vectors are refused, never mixed into the answers.
        """
        with _CHECK_LOCK:
            version, signatures = self._metadata(self.version)
            try:
                served, why = self._space_of(version, signatures), f"exported without the {MODEL_INFO_SIGNATURE} signature"
            except InvalidInputError as exc:  # a server that does not take a Predict without inputs
                served, why = None, str(exc)
            if served is None:
                logger.warning("the served model %r does not say what its vectors are (%s): trusting that they are the "
                               "%s vectors %s needs", self.model_name, why, expected, needed_by)
            elif served != expected:
                raise InvalidInputError(f"the served model {self.model_name!r} gives {served} vectors, but {needed_by} "
                                        f"needs {expected} vectors: serve that model (`tfr export --model-config` its "
                                        f"model.json)")
            self._checked, self._pinned = (expected, needed_by), version

    def status(self) -> list[tuple[int, str]]:
        """(version, state name) of each version the server knows, as it lists them (TF Serving: newest first)."""
        from tensorflow_serving.apis import get_model_status_pb2

        return [(s.version, get_model_status_pb2.ModelVersionStatus.State.Name(s.state))
                for s in self._status().model_version_status]

    def _status(self):
        """GetModelStatusResponse proto."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EmbeddingClient(_Embedder):
    """Embeds images through a TF Serving gRPC PredictionService.

    Args:
      address: "host:port" of the gRPC server.
      model_name: the served model.
      version: a model version; None for the server's newest.
      timeout: seconds per call.
      batch_size: the most images sent in one request (longer lists are split).
      max_message_bytes: gRPC message limit (the server's is 64 MB too); requests carry at most half of it in images.
    """

    def __init__(self, address: str, model_name: str, version: int | None = None, timeout: float = 30.0,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_message_bytes: int = 64 * 1024 * 1024):
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.address, self.model_name, self.version, self.timeout = address, model_name, version, timeout
        self.batch_size, self.max_request_bytes = batch_size, max_message_bytes // 2
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self._channel = grpc.insecure_channel(address, options=options)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _spec(self, spec, version: int | None, signature_name: str | None = None):
        spec.name = self.model_name
        if version is not None:
            spec.version.value = version
        if signature_name:
            spec.signature_name = signature_name

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            kind = {grpc.StatusCode.INVALID_ARGUMENT: "invalid", grpc.StatusCode.FAILED_PRECONDITION: "invalid",
                    grpc.StatusCode.NOT_FOUND: "not_found", grpc.StatusCode.UNAVAILABLE: "unavailable",
                    grpc.StatusCode.DEADLINE_EXCEEDED: "unavailable",
                    grpc.StatusCode.CANCELLED: "unavailable"}.get(error.code(), error.code().name)  # CANCELLED: the
            # server stopped while answering (this client never cancels)
            _raise_for(kind, error.details(), self.address)

    def predict(self, inputs: dict[str, np.ndarray], signature_name: str = _BYTES_SIGNATURE, *,
                version: int | None = None) -> dict[str, np.ndarray]:
        """Raw Predict: named input arrays -> named output arrays (one request, no batching), of `version` (default:
        the one the client embeds with)."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, self._serving_version() if version is None else version, signature_name)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        response = self._call(self._predict.Predict, request)
        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    def _embed(self, images: np.ndarray, signature_name: str, version: int | None) -> np.ndarray:
        return self.predict({"images": images}, signature_name, version=version)["embedding"]

    def _model_info(self, version: int):
        answer = self.predict({}, MODEL_INFO_SIGNATURE, version=version)["embedding_space"]
        return [v.decode("utf-8") for v in answer.ravel()]

    def _metadata(self, version: int | None):
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, version)
        response = self._call(self._predict.GetModelMetadata, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        return response.model_spec.version.value, signatures

    def _status(self):
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, self.version)
        return self._call(self._models.GetModelStatus, request)


class RestEmbeddingClient(_Embedder):
    """Embeds images through TF Serving's REST API (`{"instances": [{"b64": ...}]}` -> `{"predictions": ...}`).

    Args:
      url: "http://host:port" of the REST API (TF Serving's is on 8501).
      model_name, version, timeout, batch_size: as for `EmbeddingClient`.
    """

    def __init__(self, url: str, model_name: str, version: int | None = None, timeout: float = 30.0,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        self.url, self.model_name, self.version, self.timeout = url.rstrip("/"), model_name, version, timeout
        self.batch_size = batch_size

    def _model_url(self, version: int | None) -> str:
        version_path = f"/versions/{version}" if version is not None else ""
        return f"{self.url}/v1/models/{urllib.request.quote(self.model_name, safe='')}{version_path}"

    def _request(self, url: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = error.read()
            try:
                message = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {error.code}: {body[:200].decode('utf-8', 'replace')}"
            kind = {400: "invalid", 411: "invalid", 413: "invalid", 404: "not_found",
                    503: "unavailable"}.get(error.code, f"HTTP {error.code}")
            _raise_for(kind, message, self.url)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            _raise_for("unavailable", str(getattr(error, "reason", error)), self.url)

    def _cost(self, image) -> int:
        # base64 for bytes; a float written in JSON takes up to 20 characters ("123.45677947998047, ")
        return 4 * len(image) // 3 + 16 if isinstance(image, bytes) else image.size * 20

    def _embed(self, images: np.ndarray, signature_name: str, version: int | None) -> np.ndarray:
        if images.dtype == object:
            instances = [{"b64": base64.b64encode(image).decode("ascii")} for image in images]
        else:
            instances = images.tolist()
        predictions = self._request(f"{self._model_url(version)}:predict",
                                    {"signature_name": signature_name, "instances": instances})["predictions"]
        if predictions and isinstance(predictions[0], dict):  # several outputs: one object per instance
            predictions = [p["embedding"] for p in predictions]
        return np.asarray(predictions, dtype=np.float32)

    def _model_info(self, version: int):
        outputs = self._request(f"{self._model_url(version)}:predict",
                                {"signature_name": MODEL_INFO_SIGNATURE, "inputs": {}})["outputs"]
        return outputs["embedding_space"] if isinstance(outputs, dict) else outputs

    def _metadata(self, version: int | None):
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        answer = self._request(f"{self._model_url(version)}/metadata")
        signatures = json_format.ParseDict(answer["metadata"]["signature_def"], get_model_metadata_pb2.SignatureDefMap(),
                                           ignore_unknown_fields=True)
        return int(answer["model_spec"]["version"]), signatures

    def _status(self):
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_status_pb2

        return json_format.ParseDict(self._request(self._model_url(self.version)),
                                     get_model_status_pb2.GetModelStatusResponse(),
                                     ignore_unknown_fields=True)


class ReplicatedClient(_Embedder):
    """One model served by several servers (replicas): requests go round-robin over them, and a request that finds its
    replica unreachable (`ConnectionError`: refused, timed out, shutting down) is sent again to the next one. A replica
    that failed is skipped for `retry_after` seconds, then tried again. Refusals (bad input, unknown model) are not
    retried: every replica would answer the same.

    Args:
      replicas: clients of the same model (`EmbeddingClient` / `RestEmbeddingClient`, e.g. from `connect`).
      retry_after: seconds a failed replica is left out.
    """

    def __init__(self, replicas: Sequence[_Embedder], retry_after: float = 5.0):
        import itertools

        if not replicas:
            raise InvalidInputError("ReplicatedClient needs at least one replica")
        names = {replica.model_name for replica in replicas}
        if len(names) != 1:
            raise InvalidInputError(f"replicas must serve one model, got {sorted(names)}")
        self.replicas, self.retry_after = list(replicas), retry_after
        self.model_name, self.batch_size = replicas[0].model_name, min(r.batch_size for r in replicas)
        self.max_request_bytes = min(r.max_request_bytes for r in replicas)
        self._turn = itertools.count()
        self._down: dict[int, float] = {}  # replica -> time it failed
        self._unchecked: set[int] = set()  # replicas `check_embedding_space` could not reach yet
        self._lock = threading.Lock()
        self.failovers = 0  # requests sent again after a replica failed

    def _order(self) -> list[int]:
        """Replicas to try, starting at the next in turn; those that failed lately go last."""
        import time

        start = next(self._turn) % len(self.replicas)
        order = [(start + i) % len(self.replicas) for i in range(len(self.replicas))]
        now = time.monotonic()
        with self._lock:
            down = {i for i, since in self._down.items() if now - since < self.retry_after}
        return [i for i in order if i not in down] + [i for i in order if i in down]

    def _call(self, name: str, *args):
        import time

        failures = []
        for number in self._order():
            try:
                if number in self._unchecked:
                    self._check_replica(number)
                answer = getattr(self.replicas[number], name)(*args)
            except ConnectionError as exc:
                failures.append(str(exc))
                with self._lock:
                    self._down[number] = time.monotonic()
                    self.failovers += 1
                continue
            with self._lock:
                self._down.pop(number, None)
            return answer
        raise ConnectionError(f"no replica of {self.model_name} answered: {'; '.join(failures)}")

    def check_embedding_space(self, expected: str, needed_by: str) -> None:
        """Checks each replica (`_Embedder.check_embedding_space`: each then embeds with the version it checked); a
        replica that cannot be reached now is checked before its first request."""
        with _CHECK_LOCK:
            self._checked, self._unchecked = (expected, needed_by), set(range(len(self.replicas)))
            failures = []
            for number in range(len(self.replicas)):
                try:
                    self._check_replica(number)
                except ConnectionError as exc:
                    failures.append(str(exc))
            if len(failures) == len(self.replicas):
                raise ConnectionError(f"no replica of {self.model_name} answered: {'; '.join(failures)}")

    def _check_replica(self, number: int) -> None:
        with _CHECK_LOCK:
            if number in self._unchecked:
                self.replicas[number].check_embedding_space(*self._checked)
                self._unchecked.discard(number)

    def _cost(self, image) -> int:
        return max(replica._cost(image) for replica in self.replicas)

    def _embed(self, images: np.ndarray, signature_name: str, version: int | None) -> np.ndarray:
        return self._call("_embed_checked", images, signature_name)  # each replica's own version

    def metadata(self) -> dict:
        return self._call("metadata")  # one replica's, of the version it serves

    def embedding_space(self) -> str | None:
        return self._call("embedding_space")  # the version and its answer from the same replica

    def _status(self):
        return self._call("_status")

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()
