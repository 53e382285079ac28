"""A real server on a free localhost port, called the way TF Serving's documented gRPC clients call it."""
import os
import shutil
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import IMAGE_SIZE, embed_in_process, export_tiny, photo, png, random_pngs, wait_for
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from tf_retrieval.errors import InvalidInputError, MissingError
from tf_retrieval.serving.client import EmbeddingClient
from tf_retrieval.serving.server import ModelRegistry, VersionPolicy, main, op_error_message, serve


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("models"))
    model = export_tiny(base)
    server = serve(base, port=0, poll_seconds=0, max_batch_size=4)
    yield model, base, server
    server.stop(grace=1)


@pytest.fixture
def client(served):
    with EmbeddingClient(f"127.0.0.1:{served[2].port}", "tiny") as c:
        yield c


def stubs(port):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return prediction_service_pb2_grpc.PredictionServiceStub(channel), model_service_pb2_grpc.ModelServiceStub(channel)


def predict_request(inputs, name="tiny", version=None, label=None, signature="", output_filter=()):
    request = predict_pb2.PredictRequest(output_filter=list(output_filter))
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def test_outputs_are_typed_float_val_fields_like_tf_serving(served, rng):
    model, _, server = served
    encoded = random_pngs(rng, 3)
    response = stubs(server.port)[0].Predict(predict_request({"images": np.array(encoded, object)}), timeout=30)
    embedding = response.outputs["embedding"]
    assert embedding.dtype == tf.float32.as_datatype_enum and embedding.tensor_content == b""
    assert [d.size for d in embedding.tensor_shape.dim] == [3, 8]
    expected = embed_in_process(model, encoded)
    np.testing.assert_allclose(np.array(embedding.float_val).reshape(3, 8), expected, atol=1e-5)
    np.testing.assert_array_equal(tf.make_ndarray(embedding), np.array(embedding.float_val, np.float32).reshape(3, 8))
    assert (response.model_spec.name, response.model_spec.version.value, response.model_spec.signature_name) == \
        ("tiny", 1, "serving_default")


def test_client_embeds_bytes_and_pixels_in_batches_under_the_server_limit(served, rng):
    model, _, server = served
    encoded = random_pngs(rng, 7)  # the server takes at most 4 per request
    with EmbeddingClient(f"127.0.0.1:{server.port}", "tiny", batch_size=3) as client:
        np.testing.assert_allclose(client.embed_bytes(encoded), embed_in_process(model, encoded), atol=1e-5)
        pixels = rng.uniform(0, 255, (5, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
        np.testing.assert_allclose(client.embed_pixels(pixels), model.predict(pixels, verbose=0), atol=1e-5)
    with pytest.raises(InvalidInputError, match="no images"):
        client.embed_bytes([])


def test_metadata_and_status(client):
    meta = client.metadata()
    assert meta["version"] == 1
    assert meta["signatures"]["serving_default"]["inputs"] == {"images": ("string", [-1])}
    assert meta["signatures"]["serving_default"]["outputs"] == {"embedding": ("float32", [-1, 8])}
    assert meta["signatures"]["embed_pixels"]["inputs"] == {"images": ("float32", [-1, IMAGE_SIZE, IMAGE_SIZE, 3])}
    assert client.status() == [(1, "AVAILABLE")]


@pytest.mark.parametrize("inputs, signature, output_filter, code, message", [
    ({"images": np.zeros((2, 16, 16, 3), np.float32)}, "", (), "INVALID_ARGUMENT", "input 'images' must be string, got float32"),
    ({"images": np.zeros((2, 15, 16, 3), np.float32)}, "embed_pixels", (), "INVALID_ARGUMENT", "must have shape [None, 16, 16, 3]"),
    ({"pixels": np.array([b"x"], object)}, "", (), "INVALID_ARGUMENT", "Sent extra: {pixels}. Missing but required: {images}."),
    ({"images": np.array([b"x"] * 5, object)}, "", (), "INVALID_ARGUMENT", "batch of 5 is over this server's limit of 4"),
    ({"images": np.array([b"x"], object)}, "nope", (), "FAILED_PRECONDITION", 'Serving signature key "nope" not found.'),
    ({"images": np.array([b"x"], object)}, "", ("scores",), "INVALID_ARGUMENT",
     "output tensor alias not found in signature: scores Outputs expected to be in the set {embedding}."),
])
def test_bad_requests_answer_tf_serving_codes_and_the_server_keeps_serving(served, client, inputs, signature,
                                                                            output_filter, code, message):
    with pytest.raises(grpc.RpcError) as error:
        stubs(served[2].port)[0].Predict(predict_request(inputs, signature=signature, output_filter=output_filter),
                                         timeout=30)
    assert error.value.code() == getattr(grpc.StatusCode, code)
    assert message in error.value.details()
    assert client.embed_pixels(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)).shape == (1, 8)


@pytest.mark.parametrize("dims, message", [([20000, IMAGE_SIZE, IMAGE_SIZE, 3], "batch of 20000 is over this server's limit of 4"),
                                            ([-1, IMAGE_SIZE, IMAGE_SIZE, 3], "must have shape [None, 16, 16, 3]"),
                                            ([0, IMAGE_SIZE, IMAGE_SIZE, 3], "input 'images' is an empty batch")])
def test_a_declared_shape_is_checked_before_the_tensor_is_built(served, dims, message):
    # one float_val and a shape: `make_ndarray` would repeat the value over the whole shape (here 61 MB for 62 bytes)
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "tiny", "embed_pixels"
    tensor = request.inputs["images"]
    tensor.dtype = tf.float32.as_datatype_enum
    for size in dims:
        tensor.tensor_shape.dim.add(size=size)
    tensor.float_val.append(0.0)
    with pytest.raises(grpc.RpcError) as error:
        stubs(served[2].port)[0].Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_an_unknown_dtype_number_is_invalid_argument(served, client):
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "tiny", "embed_pixels"
    request.inputs["images"].dtype = 999  # no TensorFlow dtype has this number
    with pytest.raises(grpc.RpcError) as error:
        stubs(served[2].port)[0].Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'images' must be float32, got dtype number 999" in error.value.details()
    assert client.embed_pixels(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)).shape == (1, 8)


def test_an_undecodable_image_says_what_is_wrong(served, client):
    with pytest.raises(grpc.RpcError) as error:
        stubs(served[2].port)[0].Predict(predict_request({"images": np.array([b"definitely not an image"], object)}),
                                         timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == ("the model rejected the input: image 0: not an image of a known format "
                                     "(JPEG, PNG, BMP, GIF, WEBP, TIFF)")
    with pytest.raises(InvalidInputError, match="image 0: not an image of a known format"):
        client.embed_bytes([b"definitely not an image"])  # refused before it is sent


def test_phone_photos_and_other_formats_embed_as_indexed_on_tensorflow(served, client, rng):
    """The SavedModel's own decoder knows no EXIF orientation or TIFF: the server and the client hand it upright PNGs
    (`encoded_for_graph`), so a rotated photo embeds as indexing embedded it (upright), whoever sends it."""
    model, _, server = served
    pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    files = [photo(pixels, 6), photo(pixels, 8), photo(pixels, 1, format="TIFF"), photo(pixels, 3, format="PNG")]
    expected = embed_in_process(model, files)
    response = stubs(server.port)[0].Predict(predict_request({"images": np.array(files, object)}), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["embedding"]), expected, atol=1e-5)  # raw bytes sent
    np.testing.assert_allclose(client.embed_bytes(files), expected, atol=1e-5)
    assert not np.allclose(expected[0], expected[1], atol=1e-3)  # the turn matters to this model
    with pytest.raises(grpc.RpcError, match="pixels is over the limit") as error:  # checked before decoding
        stubs(server.port)[0].Predict(predict_request({"images": np.array([png(np.zeros((9000, 8000, 3), np.uint8))],
                                                                            object)}), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_savedmodel_of_another_kind_serves_unchanged(tmp_path):
    """Only a tf_retrieval export's `serving_default` decodes images as indexing does; any other model's signature
    runs as it is (here one that takes `x`)."""
    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def double(self, x):
            return {"y": 2 * x}

    module = Doubler()
    tf.saved_model.save(module, str(tmp_path / "doubler" / "1"), signatures={"serving_default": module.double})
    server = serve(str(tmp_path), port=0, poll_seconds=0, runtime="tf")
    try:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "doubler"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1, 2]], np.float32)))
        response = stubs(server.port)[0].Predict(request, timeout=30)
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs["y"]), [[2, 4]])
    finally:
        server.stop(grace=1)


def test_requests_are_split_by_bytes_as_well_as_by_count(served, client, rng):
    sent = []
    embed = client._embed
    client._embed = lambda images, *args: sent.append(len(images)) or embed(images, *args)
    encoded = random_pngs(rng, 6)
    client.max_request_bytes = 2 * max(map(len, encoded))  # room for two images
    np.testing.assert_allclose(client.embed_bytes(encoded), embed_in_process(served[0], encoded), atol=1e-5)
    assert sent == [2, 2, 2]
    sent.clear()
    client.max_request_bytes = 1  # an image over the budget goes alone
    client.embed_bytes(encoded[:3])
    assert sent == [1, 1, 1]
    with pytest.raises(InvalidInputError, match="no images given"):
        client.embed_pixels(np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))


def test_the_litert_runtime_answers_like_tensorflow_and_survives_bad_images(tmp_path, rng):
    base = str(tmp_path)
    model = export_tiny(base, litert=True)
    encoded = random_pngs(rng, 3)
    pixels = rng.uniform(0, 255, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    answers = {}
    for runtime in ("litert", "litert-fp16", "tf"):
        server = serve(base, port=0, poll_seconds=0, runtime=runtime)
        try:
            assert bool(server.registry.get("tiny").fast) == (runtime != "tf")
            with EmbeddingClient(f"127.0.0.1:{server.port}", "tiny") as client:
                with pytest.raises(InvalidInputError, match="image 1: not an image"):
                    client.embed_bytes([encoded[0], b"not an image"])
                answers[runtime] = client.embed_bytes(encoded), client.embed_pixels(pixels)  # still serving
        finally:
            server.stop(grace=1)
    np.testing.assert_allclose(answers["litert"][0], embed_in_process(model, encoded), atol=1e-5)
    np.testing.assert_allclose(answers["litert"][1], model.predict(pixels, verbose=0), atol=1e-5)
    np.testing.assert_allclose(answers["litert"][0], answers["tf"][0], atol=1e-5)
    for fp32, fp16 in zip(answers["litert"], answers["litert-fp16"]):  # float16 rounding only
        cosine = np.sum(fp16 * fp32, axis=1) / np.linalg.norm(fp16, axis=1) / np.linalg.norm(fp32, axis=1)
        assert cosine.min() >= 0.999
    with pytest.raises(InvalidInputError, match="unknown runtime 'onnx'"):
        ModelRegistry(base, runtime="onnx")


def test_op_error_message_drops_the_graph_trace():
    traced = ("Graph execution error:\n\nDetected at node 'DecodeImage' defined at (most recent call last):\n"
              '  File "x.py", line 3, in f\n    decode(x)\nNode: \'DecodeImage\'\nbad image data\n'
              "\t [[{{node DecodeImage}}]] [Op:__inference_fn_42]")
    assert op_error_message(traced) == "bad image data"
    assert op_error_message("Incompatible shapes: [2] vs. [3] [Op:AddV2] name: add") == \
        "Incompatible shapes: [2] vs. [3]"


def test_version_labels_are_invalid_argument_as_on_tf_serving_without_labels(served):
    predict, models = stubs(served[2].port)
    message = "Unrecognized servable version label: stable"
    calls = [lambda: predict.Predict(predict_request({"images": np.array([b"x"], object)}, label="stable"), timeout=30),
             lambda: predict.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
                 model_spec={"name": "tiny", "version_label": "stable"}, metadata_field=["signature_def"]), timeout=30),
             lambda: models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(
                 model_spec={"name": "tiny", "version_label": "stable"}), timeout=30)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details() == message


def test_unknown_model_or_version_is_not_found(served):
    predict, models = stubs(served[2].port)
    for name, version, message in (("nope", None, "Servable not found for request: Latest(nope)"),
                                   ("tiny", 7, "Servable not found for request: Specific(tiny, 7)")):
        with pytest.raises(grpc.RpcError) as error:
            predict.Predict(predict_request({"images": np.array([b"x"], object)}, name=name, version=version), timeout=30)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and message in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "nope"}), timeout=30)
    assert error.value.details() == "Could not find any versions of model nope"
    with pytest.raises(MissingError, match="Could not find version 7 of model tiny"):
        EmbeddingClient(f"127.0.0.1:{served[2].port}", "tiny", version=7).status()


def test_latest_policy_serves_only_the_newest_version_and_keeps_old_states(tmp_path, rng):
    first = export_tiny(tmp_path, seed=0)
    server = serve(str(tmp_path), port=0, poll_seconds=0.2)
    address = f"127.0.0.1:{server.port}"
    pixels = rng.uniform(0, 255, (1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    try:
        second = export_tiny(tmp_path, seed=1)  # version 2
        assert wait_for(lambda: server.registry.versions("tiny") == [2])
        assert EmbeddingClient(address, "tiny").status() == [(2, "AVAILABLE"), (1, "END")]
        np.testing.assert_allclose(EmbeddingClient(address, "tiny").embed_pixels(pixels),
                                   second.predict(pixels, verbose=0), atol=1e-5)
        with pytest.raises(MissingError, match=r"Specific\(tiny, 1\)"):
            EmbeddingClient(address, "tiny", version=1).embed_pixels(pixels)
        shutil.rmtree(tmp_path / "tiny" / "2")  # the newest on disk is 1 again
        assert wait_for(lambda: server.registry.versions("tiny") == [1])
        np.testing.assert_allclose(EmbeddingClient(address, "tiny").embed_pixels(pixels),
                                   first.predict(pixels, verbose=0), atol=1e-5)
    finally:
        server.stop(grace=1)


def test_version_policies_and_a_broken_version(tmp_path):
    for seed in range(3):
        export_tiny(tmp_path, seed=seed)
    for policy, versions in (("latest", [3]), ("latest:2", [2, 3]), ("all", [1, 2, 3]), ("specific:1,3,9", [1, 3])):
        registry = ModelRegistry(str(tmp_path), version_policy=policy)
        registry.refresh()
        assert registry.versions("tiny") == versions, policy
    broken = tmp_path / "tiny" / "4"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    registry.policy = VersionPolicy.parse("latest")
    registry.refresh()  # version 4 fails to load: 3 keeps serving, instead of nothing
    assert registry.versions("tiny") == [3]
    assert registry.states("tiny")[4].state == "END" and registry.states("tiny")[4].error
    registry.refresh()  # not retried while its files stay as they are
    assert registry.states("tiny")[4].state == "END"


def half_copied_version(tmp_path):
    """A registry serving version 1 of `tiny`, and (source, target) of version 2 with only saved_model.pb copied yet."""
    export_tiny(tmp_path / "source", seed=1)
    export_tiny(tmp_path / "served")
    registry = ModelRegistry(str(tmp_path / "served"))
    registry.refresh()
    source, target = tmp_path / "source" / "tiny" / "1", tmp_path / "served" / "tiny" / "2"
    target.mkdir()
    shutil.copy2(source / "saved_model.pb", target / "saved_model.pb")
    return registry, source, target


def copy_the_rest(source, target):
    for entry in source.iterdir():
        if entry.is_dir() and not (target / entry.name).exists():
            shutil.copytree(entry, target / entry.name)


def test_a_version_copied_in_pb_first_loads_once_its_variables_arrive(tmp_path):
    """`cp -r` or rsync of a version can write saved_model.pb before variables/: the first load fails, and the version
    loads when the copy completes, though saved_model.pb itself did not change again."""
    registry, source, target = half_copied_version(tmp_path)
    registry.refresh()
    assert registry.versions("tiny") == [1] and registry.states("tiny")[2].state == "END"
    copy_the_rest(source, target)
    registry.refresh()
    assert registry.versions("tiny") == [2] and registry.states("tiny")[2].state == "AVAILABLE"


def test_a_copy_that_completes_while_its_load_fails_is_loaded_next_time(tmp_path, monkeypatch):
    from tf_retrieval.serving.server import LoadedVersion

    registry, source, target = half_copied_version(tmp_path)
    load = LoadedVersion.load.__func__

    def load_while_the_copy_completes(cls, name, version, path, runtime="tf"):
        try:
            return load(cls, name, version, path, runtime)
        finally:  # the rest of the copy lands while the load fails
            copy_the_rest(source, target)

    monkeypatch.setattr(LoadedVersion, "load", classmethod(load_while_the_copy_completes))
    registry.refresh()
    assert registry.states("tiny")[2].state == "END"
    registry.refresh()
    assert registry.versions("tiny") == [2]


def test_version_policy_texts():
    for bad in ("newest", "latest:0", "specific:", "all:2"):
        with pytest.raises(InvalidInputError, match="version policy"):
            VersionPolicy.parse(bad)


def test_a_second_server_on_a_served_port_fails_to_start(served, tmp_path, capsys):
    from tf_retrieval.cli import main as tfr

    base, server = served[1], served[2]
    with pytest.raises(OSError, match=f"cannot serve gRPC on 127.0.0.1:{server.port}"):
        serve(base, port=server.port, poll_seconds=0)
    assert tfr(["serve", "--model-base-path", base, "--port", str(server.port)]) == 2  # one line, no traceback
    assert capsys.readouterr().err.startswith(f"tfr: error: cannot serve gRPC on 127.0.0.1:{server.port}: the address")
    with_rest = serve(base, port=0, rest_port=0, poll_seconds=0)
    try:
        with pytest.raises(OSError, match=f"cannot serve REST on 127.0.0.1:{with_rest.rest_port}"):
            serve(base, port=0, rest_port=with_rest.rest_port, poll_seconds=0)
    finally:
        with_rest.stop(grace=1)
    with pytest.raises(MissingError, match="no loadable SavedModel versions"):
        serve(str(tmp_path), port=0)
    assert main(["--model_base_path", str(tmp_path / "missing"), "--port", "0"]) == 2
    for flag, value in (("--max_workers", "0"), ("--max_batch_size", "0"), ("--file_system_poll_wait_seconds", "nan"),
                        ("--port", "70000")):
        with pytest.raises(SystemExit):  # argparse's usage error, exit 2, not a traceback
            main(["--model_base_path", base, flag, value])
        assert f"{flag}: must be" in capsys.readouterr().err


def test_health_and_graceful_stop_on_sigterm(served):
    server = serve(served[1], port=0, poll_seconds=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="tiny"), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    handler = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    server.wait_for_signal(grace=1)  # what `tfr serve` blocks in
    with pytest.raises(ConnectionError, match="is not reachable"):
        EmbeddingClient(f"127.0.0.1:{server.port}", "tiny", timeout=2).status()
    assert signal.getsignal(signal.SIGTERM) == handler


def test_each_models_health_follows_the_models_on_disk(tmp_path):
    export_tiny(tmp_path, "first")
    server = serve(str(tmp_path), port=0, poll_seconds=0.2)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))

    def status(name):
        try:
            return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
        except grpc.RpcError as error:
            return error.code()

    try:
        assert status("first") == health_pb2.HealthCheckResponse.SERVING
        assert status("second") == grpc.StatusCode.NOT_FOUND
        export_tiny(tmp_path, "second")
        assert wait_for(lambda: status("second") == health_pb2.HealthCheckResponse.SERVING)
        shutil.rmtree(tmp_path / "first")
        assert wait_for(lambda: status("first") == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert status("") == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=1)


def test_replicas_share_the_load_and_a_killed_one_loses_no_request(tmp_path, rng):
    """Two servers of one model behind one client: a load run in 4 threads loses nothing when one server stops in the
    middle; with every replica gone the client says so."""
    from tf_retrieval.serving.client import ReplicatedClient, connect

    model = export_tiny(str(tmp_path))
    servers = [serve(str(tmp_path), port=0, poll_seconds=0) for _ in range(2)]
    client = connect(",".join(f"127.0.0.1:{s.port}" for s in servers), "tiny", timeout=10)
    assert isinstance(client, ReplicatedClient) and len(client.replicas) == 2
    encoded = random_pngs(rng, 4)
    expected = embed_in_process(model, encoded)
    failures, answers, lock = [], [], threading.Lock()

    def load(count):
        for _ in range(count):
            try:
                got = client.embed_bytes(encoded)
                with lock:
                    answers.append(got)
            except Exception as exc:  # noqa: BLE001 - counted: the test wants none
                with lock:
                    failures.append(exc)

    threads = [threading.Thread(target=load, args=(40,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    while len(answers) < 40:
        time.sleep(0.01)
    servers[0].stop(grace=0)  # in the middle of the run
    for thread in threads:
        thread.join()
    assert failures == [] and len(answers) == 160
    assert all(np.abs(a - expected).max() < 1e-5 for a in answers)
    assert client.failovers >= 1
    servers[1].stop(grace=0)
    with pytest.raises(ConnectionError, match="no replica of tiny answered"):
        client.embed_bytes(encoded)
    client.close()
