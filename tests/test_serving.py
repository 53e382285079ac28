"""A real server on a free localhost port, called with real gRPC clients (tensorflow-serving-api stubs)."""
import io
import os
import shutil
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving.client import EmbeddingClient
from serving.server import serve
from tf_retrieval.backbones import build_backbone
from tf_retrieval.data import decode_image, resize_and_crop
from tf_retrieval.export import build_embedding_model, export_model


def png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = build_embedding_model(build_backbone("mobilenet_v2", 32, "avg", weights=None))
    base = str(tmp_path_factory.mktemp("models"))
    export_model(model, base, "tiny", image_size=32)
    server = serve(base, port=0, poll_seconds=0.2, max_batch_size=16)
    yield model, base, server
    server.stop(grace=1)


@pytest.fixture
def client(served):
    with EmbeddingClient(f"127.0.0.1:{served[2].port}", "tiny") as c:
        yield c


def test_predict_bytes_and_pixels_equal_the_in_process_model(served, client, rng):
    model = served[0]
    images = [rng.integers(0, 255, (36, 40, 3), dtype=np.uint8) for _ in range(3)]
    encoded = [png(i) for i in images]
    expected = model.predict(np.stack([resize_and_crop(decode_image(b), 32).numpy() for b in encoded]), verbose=0)
    np.testing.assert_allclose(client.embed_bytes(encoded), expected, atol=1e-5)
    pixels = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(client.embed_pixels(pixels), model.predict(pixels, verbose=0), atol=1e-5)


def test_metadata_and_status(client):
    meta = client.metadata()
    assert meta["version"] == 1
    assert meta["signatures"]["serving_default"]["inputs"] == {"images": ("string", [-1])}
    assert meta["signatures"]["serving_default"]["outputs"] == {"embedding": ("float32", [-1, 1280])}
    assert meta["signatures"]["embed_pixels"]["inputs"] == {"images": ("float32", [-1, 32, 32, 3])}
    assert client.status() == [(1, "AVAILABLE")]


def raw_predict(port, inputs, name="tiny", version=None, signature=""):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return stub.Predict(request, timeout=30)


@pytest.mark.parametrize("inputs, signature, message", [
    ({"images": np.zeros((2, 32, 32, 3), np.float32)}, "", "input 'images' must be string, got float32"),
    ({"images": np.zeros((2, 31, 32, 3), np.float32)}, "embed_pixels", "must have shape [None, 32, 32, 3]"),
    ({"pixels": np.array([b"x"], object)}, "", "takes inputs ['images'], got ['pixels']"),
    ({"images": np.array([b"definitely not an image"], object)}, "", "the model rejected the input"),
    ({"images": np.array([b"x"] * 17, object)}, "", "batch of 17 is over this server's limit of 16"),
    ({"images": np.array([b"x"], object)}, "nope", "has no signature 'nope'"),
])
def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving(served, client, inputs, signature, message):
    with pytest.raises(grpc.RpcError) as error:
        raw_predict(served[2].port, inputs, signature=signature)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert client.embed_pixels(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 1280)


def test_unknown_model_or_version_is_not_found(served):
    for name, version, message in (("nope", None, "model 'nope' is not served"), ("tiny", 7, "has no version 7")):
        with pytest.raises(grpc.RpcError) as error:
            raw_predict(served[2].port, {"images": np.array([b"x"], object)}, name=name, version=version)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and message in error.value.details()
    with pytest.raises(LookupError, match="is not served"):
        EmbeddingClient(f"127.0.0.1:{served[2].port}", "nope").status()


def test_new_versions_are_picked_up_and_old_ones_stay_addressable(served, rng):
    model, base, server = served
    other = build_embedding_model(build_backbone("mobilenet_v2", 32, "max", weights=None))
    export_model(other, base, "tiny", image_size=32)  # version 2
    pixels = rng.uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    deadline = time.time() + 30
    while server.registry.versions("tiny") != [1, 2] and time.time() < deadline:
        time.sleep(0.1)
    address = f"127.0.0.1:{server.port}"
    assert EmbeddingClient(address, "tiny").status() == [(1, "AVAILABLE"), (2, "AVAILABLE")]
    np.testing.assert_allclose(EmbeddingClient(address, "tiny").embed_pixels(pixels), other.predict(pixels, verbose=0),
                               atol=1e-5)
    np.testing.assert_allclose(EmbeddingClient(address, "tiny", version=1).embed_pixels(pixels),
                               model.predict(pixels, verbose=0), atol=1e-5)
    shutil.rmtree(os.path.join(base, "tiny", "2"))
    while server.registry.versions("tiny") != [1] and time.time() < deadline:
        time.sleep(0.1)
    assert server.registry.versions("tiny") == [1]


def test_health_and_graceful_stop(served, tmp_path):
    base = served[1]
    server = serve(base, port=0, poll_seconds=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    server.stop(grace=1)
    with pytest.raises(ConnectionError, match="is not reachable"):
        EmbeddingClient(f"127.0.0.1:{server.port}", "tiny", timeout=2).status()
    with pytest.raises(FileNotFoundError, match="no SavedModel versions"):
        serve(str(tmp_path), port=0)
