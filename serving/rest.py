"""TF Serving's REST API (the one `tensorflow_model_server --rest_api_port` serves) over a `ServingCore`.

    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]             model status (GetModelStatus as JSON)
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata    signature defs (GetModelMetadata as JSON)
    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict     {"instances": [...]} -> {"predictions": [...]}
                                                                  {"inputs": ...}      -> {"outputs": ...}

As in TF Serving, JSON becomes a PredictRequest typed by the signature's inputs (binary strings as {"b64": "..."}), the
request runs through the same code as gRPC, outputs come back as JSON (string outputs whose name ends in "_bytes" as
{"b64": "..."}), and errors are {"error": "message"} with the HTTP status of their gRPC code (400, 404, ...).
"""
from __future__ import annotations

import base64
import binascii
import http.server
import json
import logging
import re
import socket
import threading
import urllib.parse

import grpc
import numpy as np

from tf_retrieval.serving.server import (REST_MAX_CONNECTIONS, REST_TIMEOUT_SECONDS, ServingCore, ServingError,
                                          check_rest_limits, invalid_argument)

logger = logging.getLogger(__name__)

_NAME_AND_VERSION = r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?"
_PREDICT_PATH = re.compile(_NAME_AND_VERSION + r":(classify|regress|predict)", re.IGNORECASE)
_MODEL_PATH = re.compile(r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?",
                         re.IGNORECASE)
_HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
                grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
                grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNIMPLEMENTED: 501,
                grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504}


class RestApi:
    """Answers REST requests: `handle(method, path, body)` -> (HTTP status, JSON-able payload)."""

    def __init__(self, core: ServingCore):
        self.core = core

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        """One request; errors become TF Serving's {"error": message} with the matching HTTP status."""
        try:
            return 200, self._dispatch(method, path, body)
        except ServingError as error:
            return _HTTP_STATUS.get(error.code, 500), {"error": str(error)}
        except Exception as exc:  # a bug: answer 500 and keep serving
            logger.exception("REST %s %s failed", method, path)
            return 500, {"error": f"internal error: {type(exc).__name__}: {exc}"}

    def _dispatch(self, method: str, path: str, body: bytes) -> dict:
        if method == "POST" and (match := _PREDICT_PATH.fullmatch(path)):
            name, version, label, verb = match.groups()
            if verb.lower() != "predict":
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"{verb} is not served: these models are embedders "
                                                                  "(use :predict)")
            return self._predict(_model_spec(name, version, label), body)
        if method == "GET" and (match := _MODEL_PATH.fullmatch(path)):
            name, version, label, metadata = match.groups()
            if not name:
                raise invalid_argument("Missing model name in request.")
            spec = _model_spec(name, version, label)
            return self._metadata(spec) if metadata else self._status(spec)
        if not path.lower().startswith("/v1/"):
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"no such path: {path} (the REST API lives under /v1/models/)")
        raise invalid_argument(f"Malformed request: {method} {path}")

    def _status(self, spec) -> dict:
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_status_pb2

        response = self.core.status(get_model_status_pb2.GetModelStatusRequest(model_spec=spec))
        return json_format.MessageToDict(response, always_print_fields_with_no_presence=True)

    def _metadata(self, spec) -> dict:
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=["signature_def"])
        response = self.core.metadata(request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)

        def to_dict(message):
            return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)

        return {"model_spec": to_dict(response.model_spec), "metadata": {"signature_def": to_dict(signature_map)}}

    def _predict(self, spec, body: bytes) -> dict:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        document = _parse_json(body)
        signature_name = document.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise invalid_argument("'signature_name' key must be a string value.")
        spec.signature_name = signature_name
        servable = self.core.resolve(spec)
        spec.version.value = servable.version  # the version whose signature typed the JSON answers it
        _, signature_def, _, _ = servable.signature(signature_name)
        dtypes = {name: tf.dtypes.as_dtype(info.dtype) for name, info in signature_def.inputs.items()}
        if ("instances" in document) == ("inputs" in document):
            raise invalid_argument("Missing 'inputs' or 'instances' key" if "inputs" not in document else
                                   "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist")
        rows = "instances" in document
        if not dtypes and (rows or not _is_named(document["inputs"])):
            raise invalid_argument(f'signature "{signature_name}" takes no inputs: send "inputs": {{}}')
        arrays = _rows_to_arrays(document["instances"], dtypes) if rows else _columns_to_arrays(document["inputs"], dtypes)
        request = predict_pb2.PredictRequest(model_spec=spec)
        for name, array in arrays.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array, dtype=dtypes[name]))
        response = self.core.predict_on(servable, request)
        outputs = {name: tf.make_ndarray(proto) for name, proto in sorted(response.outputs.items())}
        return _predictions(outputs) if rows else _outputs(outputs)


def _model_spec(name: str, version: str | None, label: str | None):
    from tensorflow_serving.apis import model_pb2

    spec = model_pb2.ModelSpec(name=urllib.parse.unquote(name))
    if version is not None:
        if len(version) > 18:  # over int64: no such version
            raise invalid_argument(f"version {version} is out of range")
        spec.version.value = int(version)
    if label is not None:
        spec.version_label = urllib.parse.unquote(label)
    return spec


def _parse_json(body: bytes) -> dict:
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        document = json.loads(body)
    except ValueError as exc:  # also bad UTF-8
        raise invalid_argument(f"JSON Parse error: {exc}") from None
    except RecursionError:
        raise invalid_argument("JSON Parse error: nested too deeply") from None
    if not isinstance(document, dict):
        raise invalid_argument(f"JSON Value: {_excerpt(document)} Is not object")
    return document


def _excerpt(value, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _is_named(value) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _rows_to_arrays(instances, dtypes: dict) -> dict[str, np.ndarray]:
    """The row format: a list of instances, each a value (one input) or an object of named inputs."""
    if not isinstance(instances, list):
        raise invalid_argument("Excepting 'instances' to be an list/array")
    if not instances:
        raise invalid_argument("No values in 'instances' array")
    if not _is_named(instances[0]):
        if len(dtypes) > 1:
            raise invalid_argument("instances is a plain list, but expecting list of objects as multiple input "
                                   f"tensors required as per tensorinfo_map (inputs: {sorted(dtypes)})")
        (name, dtype), = dtypes.items()
        return {name: _json_to_array(instances, dtype)}
    columns: dict[str, list] = {name: [] for name in dtypes}
    for i, instance in enumerate(instances):
        if not _is_named(instance):
            raise invalid_argument(f"Expecting object but got list at item {i} of input list")
        if set(instance) != set(dtypes):
            raise invalid_argument(f"Failed to process element: {i} of 'instances' list. JSON object: "
                                   f"{_excerpt(instance)} keys must be equal to: {','.join(sorted(dtypes))}")
        for name, value in instance.items():
            columns[name].append(value)
    return {name: _json_to_array(values, dtypes[name]) for name, values in columns.items()}


def _columns_to_arrays(inputs, dtypes: dict) -> dict[str, np.ndarray]:
    """The columnar format: one value (one input) or an object of named inputs, each with its batch dimension."""
    if not _is_named(inputs):
        if len(dtypes) > 1:
            raise invalid_argument("inputs is a plain value/list, but expecting an object as multiple input tensors "
                                   f"required as per tensorinfo_map (inputs: {sorted(dtypes)})")
        (name, dtype), = dtypes.items()
        return {name: _json_to_array(inputs, dtype)}
    missing, extra = sorted(set(dtypes) - set(inputs)), sorted(set(inputs) - set(dtypes))
    if missing:
        raise invalid_argument(f"Missing named input: {missing[0]} in 'inputs' object.")
    if extra:
        raise invalid_argument(f"inputs do not match the signature. Sent extra: {{{','.join(extra)}}}")
    return {name: _json_to_array(inputs[name], dtype) for name, dtype in dtypes.items()}


def _json_to_array(value, dtype) -> np.ndarray:
    """Nested JSON lists -> an array of `dtype` (a tf.DType); the lists must be dense (same length at each level)."""
    import tensorflow as tf

    shape, probe = [], value
    while isinstance(probe, list):
        shape.append(len(probe))
        probe = probe[0] if probe else None
    leaves = []

    def visit(node, level):
        if isinstance(node, list):
            if level >= len(shape) or len(node) != shape[level]:
                raise invalid_argument(f"JSON Value: {_excerpt(node)} is not dense: expected a tensor of shape {shape}")
            for item in node:
                visit(item, level + 1)
        elif level != len(shape):
            raise invalid_argument(f"JSON Value: {_excerpt(node)} found at incorrect level: {level + 1} in the JSON DOM. "
                                   f"Expected at level: {len(shape)}")
        else:
            leaves.append(_json_leaf(node, dtype))

    visit(value, 0)
    try:
        return np.array(leaves, dtype=object if dtype == tf.string else dtype.as_numpy_dtype).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise invalid_argument(f"JSON values do not fit {dtype.name}: {exc}") from None


def _json_leaf(value, dtype):
    """One JSON scalar as a value of `dtype`, checked as TF Serving checks it."""
    if dtype.name == "string":
        if isinstance(value, str):
            return value.encode("utf-8")
        if _is_b64(value):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except binascii.Error:
                raise invalid_argument(f"Unable to base64 decode {_excerpt(value)}") from None
    elif dtype.is_bool:
        if isinstance(value, bool):
            return value
    elif dtype.is_floating and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return value
    elif dtype.is_integer and not isinstance(value, bool):
        if isinstance(value, int):
            return value
    json_type = {dict: "Object", list: "Array", str: "String", bool: "Bool", type(None): "Null"}.get(type(value), "Number")
    raise invalid_argument(f"JSON Value: {_excerpt(value)} Type: {json_type} is not of expected type: {dtype.name}")


def _to_json(name: str, array: np.ndarray):
    """An output array as nested JSON lists: float32 in its shortest exact form, strings as text or (names ending in
    "_bytes") as {"b64": ...}."""
    if array.dtype == object:
        if name.endswith("_bytes"):
            values = [{"b64": base64.b64encode(v).decode("ascii")} for v in array.ravel()]
        else:
            values = [v.decode("utf-8", "replace") for v in array.ravel()]
        return np.array(values, dtype=object).reshape(array.shape).tolist()
    if array.dtype == np.float32:  # str() of a float32 is its shortest round-trip form ("0.1", not 0.10000000149...)
        return np.array([float(str(v)) for v in array.ravel()]).reshape(array.shape).tolist()
    return array.tolist()


def _predictions(outputs: dict[str, np.ndarray]) -> dict:
    """{"predictions": [...]}: one entry per instance; an object of named outputs when there are several."""
    sizes = {name: (array.shape[0] if array.ndim else None) for name, array in outputs.items()}
    if None in sizes.values() or len(set(sizes.values())) > 1:
        raise invalid_argument(f"outputs have no common batch size for the row format (sizes: {sizes}); use 'inputs'")
    columns = {name: _to_json(name, array) for name, array in outputs.items()}
    if len(columns) == 1:
        return {"predictions": next(iter(columns.values()))}
    return {"predictions": [{name: column[i] for name, column in columns.items()} for i in range(sizes.popitem()[1])]}


def _outputs(outputs: dict[str, np.ndarray]) -> dict:
    """{"outputs": value} for one output, {"outputs": {name: value}} for several."""
    columns = {name: _to_json(name, array) for name, array in outputs.items()}
    return {"outputs": next(iter(columns.values())) if len(columns) == 1 else columns}


class _BoundedHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `max_connections` connection threads; one more is refused with a 503."""

    def __init__(self, address, handler, max_connections: int):
        self._places = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._places.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._places.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._places.release()

    def _refuse(self, request, client_address) -> None:
        logger.warning("REST: %d connections are being served; refused one from %s", self._max_connections,
                       client_address[0])
        body = json.dumps({"error": f"the server is busy: {self._max_connections} connections are being served; "
                                    "retry later"}).encode("utf-8")
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n").encode("ascii")
        try:
            request.settimeout(0.2)
            try:
                request.recv(65536)  # what the client sent already: closing on unread data would reset the connection
            except TimeoutError:
                pass
            request.sendall(head + body)
        except OSError:
            pass  # the client is gone: nothing to tell it
        finally:
            self.shutdown_request(request)


class RestServer:
    """The REST API on an HTTP server of its own (standard library, one thread per connection).

    At most `max_connections` connections are served at once: the next one is answered 503 and closed, so a flood of
    clients cannot exhaust the process's threads. A connection that sends or takes nothing for `timeout_seconds`
    (a stalled request body, an idle keep-alive) is closed and frees its place.

    Binding happens here, so a port in use raises OSError before anything starts; `start()` serves, `stop()` ends.
    """

    def __init__(self, core: ServingCore, host: str, port: int, max_body_bytes: int = 64 * 1024 * 1024,
                 max_connections: int = REST_MAX_CONNECTIONS, timeout_seconds: float = REST_TIMEOUT_SECONDS):
        check_rest_limits(max_connections, timeout_seconds)
        api, stopping = RestApi(core), threading.Event()
        self._stopping = stopping

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = timeout_seconds  # applied to the socket: reads and writes that stall this long end the connection

            def do_GET(self):
                refusal = (503, {"error": "the server is shutting down"}) if stopping.is_set() else self._refusal()
                if refusal is not None:
                    self.close_connection = True
                    self._answer(*refusal)
                    if self.headers.get("Content-Length", "0") != "0" or refusal[0] == 411:
                        self._drain()  # a body comes, or may: read it so the client hears the answer
                    return
                status, payload = api.handle(self.command, urllib.parse.urlsplit(self.path).path,
                                             self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self._answer(status, payload)

            def handle_expect_100(self):
                """A client that asks before sending its body (curl does, for large ones) hears the refusal first."""
                refusal = self._refusal()
                if refusal is None:
                    return super().handle_expect_100()
                self.close_connection = True
                self._answer(*refusal)
                return False

            def _refusal(self) -> tuple[int, dict] | None:
                """(status, payload) where the headers say the body cannot be read; None where it can."""
                declared = self.headers.get("Content-Length") or "0"
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    return 411, {"error": "chunked request bodies are not supported: send Content-Length"}
                if not (declared.isascii() and declared.isdigit()):
                    return 400, {"error": f"Content-Length must be a number of bytes, got {declared!r}"}
                if int(declared) > max_body_bytes:
                    return 413, {"error": f"request body of {declared} bytes is over the limit of {max_body_bytes}"}
                return None

            def _answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def _drain(self, seconds: float = 2.0) -> None:
                """Reads and drops what the client still sends of a refused body (for `seconds` at most), so that it
                hears the answer: closing on unread data resets the connection before the client reads it."""
                import time

                self.wfile.flush()
                deadline = time.monotonic() + seconds
                try:
                    self.connection.settimeout(0.2)
                    while time.monotonic() < deadline:
                        try:
                            if not self.connection.recv(1 << 16):
                                break
                        except TimeoutError:
                            continue
                except OSError:
                    pass  # the client is gone

            do_POST = do_GET

            def log_message(self, format, *args):
                logger.debug("REST %s: " + format, self.client_address[0], *args)

        server_class = type("RestHTTPServer", (_BoundedHTTPServer,),
                            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self._http = server_class((host, port), Handler, max_connections)
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="rest-api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops serving and closes the port (requests in progress finish on their own threads; open connections are
        answered 503 and closed)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._http.shutdown()
        self._http.server_close()
