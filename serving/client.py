"""A thin TF Serving client for the embedder, built on the `tensorflow_serving.apis` stubs only.

It works unchanged against real `tensorflow_model_server` and against `serving.server`.
"""
from __future__ import annotations

from typing import Sequence

import grpc
import numpy as np


class EmbeddingClient:
    """Embeds images through a TF Serving PredictionService.

    Args:
      address: "host:port" of the gRPC server.
      model_name: the served model.
      version: a model version; None for the server's newest.
      timeout: seconds per call.
      max_message_bytes: gRPC message limit for large batches.
    """

    def __init__(self, address: str, model_name: str, version: int | None = None, timeout: float = 30.0,
                 max_message_bytes: int = 64 * 1024 * 1024):
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.address, self.model_name, self.version, self.timeout = address, model_name, version, timeout
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self._channel = grpc.insecure_channel(address, options=options)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _spec(self, spec, signature_name: str | None = None):
        spec.name = self.model_name
        if self.version is not None:
            spec.version.value = self.version
        if signature_name:
            spec.signature_name = signature_name

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ConnectionError(f"TF Serving at {self.address} is not reachable: {error.details()}") from None
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(f"TF Serving rejected the request: {error.details()}") from None
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise LookupError(f"TF Serving at {self.address}: {error.details()}") from None
            raise

    def predict(self, inputs: dict[str, np.ndarray], signature_name: str = "serving_default") -> dict[str, np.ndarray]:
        """Raw Predict: named input arrays -> named output arrays."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, signature_name)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        response = self._call(self._predict.Predict, request)
        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    def embed_bytes(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Encoded images (JPEG/PNG/...) -> float32 [n, d] through the `serving_default` signature."""
        if len(encoded) == 0:
            raise ValueError("embed_bytes: no images given")
        return self.predict({"images": np.array(list(encoded), dtype=object)})["embedding"]

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [n, s, s, 3] pixels in 0..255 -> float32 [n, d] through the `embed_pixels` signature."""
        return self.predict({"images": np.asarray(pixels, dtype=np.float32)}, "embed_pixels")["embedding"]

    def metadata(self) -> dict:
        """Signature names -> {"inputs"/"outputs": {name: (dtype, shape)}} from GetModelMetadata."""
        import tensorflow as tf
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec)
        request.metadata_field.append("signature_def")
        response = self._call(self._predict.GetModelMetadata, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)

        def describe(tensors):
            return {key: (tf.dtypes.as_dtype(t.dtype).name, [d.size for d in t.tensor_shape.dim]) for key, t in tensors.items()}

        return {"version": response.model_spec.version.value,
                "signatures": {name: {"inputs": describe(s.inputs), "outputs": describe(s.outputs)}
                               for name, s in signatures.signature_def.items()}}

    def status(self) -> list[tuple[int, str]]:
        """(version, state name) of each served version."""
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec)
        response = self._call(self._models.GetModelStatus, request)
        return [(s.version, get_model_status_pb2.ModelVersionStatus.State.Name(s.state))
                for s in response.model_version_status]
