"""TF Serving's REST API on a real server on 127.0.0.1, called with a plain HTTP client (urllib), and the REST client."""
import base64
import json
import shutil
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
from serving_helpers import IMAGE_SIZE, embed_in_process, export_tiny, png, random_pngs, wait_for

from tf_retrieval.errors import InvalidInputError, MissingError
from tf_retrieval.serving.client import EmbeddingClient, ReplicatedClient, RestEmbeddingClient, connect
from tf_retrieval.serving.server import serve


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("models"))
    model = export_tiny(base)
    server = serve(base, port=0, rest_port=0, poll_seconds=0, max_batch_size=4)
    yield model, server, f"http://127.0.0.1:{server.rest_port}"
    server.stop(grace=1)


def http(url, payload=None, method=None):
    """(HTTP status, parsed JSON body) of one request."""
    data = payload if isinstance(payload, bytes) or payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["Content-Type"] == "application/json"
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def b64(data):
    return {"b64": base64.b64encode(data).decode()}


def test_model_status_is_tf_servings_json(served):
    url = served[2]
    available = {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                           "status": {"error_code": "OK", "error_message": ""}}]}
    assert http(f"{url}/v1/models/tiny") == (200, available)
    assert http(f"{url}/v1/models/tiny/versions/1") == (200, available)
    assert http(f"{url}/v1/models/tiny/versions/7") == (404, {"error": "Could not find version 7 of model tiny"})
    assert http(f"{url}/v1/models/nope") == (404, {"error": "Could not find any versions of model nope"})
    assert http(f"{url}/v1/models/tiny/labels/stable") == (400, {"error": "Unrecognized servable version label: stable"})


def test_metadata_is_tf_servings_json(served):
    status, metadata = http(f"{served[2]}/v1/models/tiny/metadata")
    assert status == 200
    assert metadata["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert signatures["serving_default"]["method_name"] == "tensorflow/serving/predict"
    images = signatures["serving_default"]["inputs"]["images"]
    assert images["dtype"] == "DT_STRING" and images["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
    embedding = signatures["embed_pixels"]["outputs"]["embedding"]
    assert embedding["dtype"] == "DT_FLOAT" and [d["size"] for d in embedding["tensor_shape"]["dim"]] == ["-1", "8"]
    assert http(f"{served[2]}/v1/models/tiny/versions/1/metadata")[1] == metadata


def test_predict_row_and_columnar_formats(served, rng):
    model, _, url = served
    encoded = random_pngs(rng, 3)
    expected = embed_in_process(model, encoded)
    status, answer = http(f"{url}/v1/models/tiny:predict", {"instances": [b64(e) for e in encoded]})
    assert status == 200 and list(answer) == ["predictions"]
    np.testing.assert_allclose(answer["predictions"], expected, atol=1e-5)
    for body in ({"inputs": [b64(e) for e in encoded]}, {"inputs": {"images": [b64(e) for e in encoded]}},
                 {"signature_name": "serving_default", "inputs": [b64(e) for e in encoded]}):
        status, answer = http(f"{url}/v1/models/tiny/versions/1:predict", body)
        assert status == 200 and list(answer) == ["outputs"]
        np.testing.assert_allclose(answer["outputs"], expected, atol=1e-5)
    pixels = rng.uniform(0, 255, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    status, answer = http(f"{url}/v1/models/tiny:predict", {"signature_name": "embed_pixels",
                                                            "instances": [{"images": p} for p in pixels.tolist()]})
    assert status == 200
    np.testing.assert_allclose(answer["predictions"], model.predict(pixels, verbose=0), atol=1e-5)


def test_rest_floats_are_the_exact_float32_values_grpc_returns(served, rng):
    _, server, url = served
    encoded = random_pngs(rng, 2)
    with EmbeddingClient(f"127.0.0.1:{server.port}", "tiny") as grpc_client:
        over_grpc = grpc_client.embed_bytes(encoded)
    body = json.dumps({"instances": [b64(e) for e in encoded]}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models/tiny:predict", data=body), timeout=30) as r:
        text = r.read().decode()
    np.testing.assert_array_equal(np.array(json.loads(text)["predictions"], np.float32), over_grpc)
    assert max(len(number) for number in text.replace("[", " ").replace("]", " ").replace(",", " ").split()[2:]) <= 16


@pytest.mark.parametrize("path, body, status, message", [
    ("tiny:predict", b"{not json", 400, "JSON Parse error"),
    ("tiny:predict", [1, 2], 400, "Is not object"),
    ("tiny:predict", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "JSON Parse error: nested too deeply"),
    ("tiny:predict", {"inputs": {"images": ["x"], "imagez": ["y"]}}, 400, "Sent extra: {imagez}"),
    ("tiny:predict", {"signature_name": 3, "instances": []}, 400, "'signature_name' key must be a string value."),
    ("tiny:predict", {"nothing": []}, 400, "Missing 'inputs' or 'instances' key"),
    ("tiny:predict", {"inputs": [], "instances": []}, 400, "expecting only one of 'inputs' or 'instances'"),
    ("tiny:predict", {"instances": []}, 400, "No values in 'instances' array"),
    ("tiny:predict", {"instances": [{"pixels": "x"}]}, 400, "keys must be equal to: images"),
    ("tiny:predict", {"signature_name": "embed_pixels", "instances": ["x"]}, 400,
     'JSON Value: "x" Type: String is not of expected type: float'),
    ("tiny:predict", {"signature_name": "embed_pixels", "inputs": [[[[1.0, 2.0, 3.0]]], [[[1.0, 2.0]]]]}, 400,
     "JSON Value: [1.0, 2.0] is not dense: expected a tensor of shape [2, 1, 1, 3]"),
    ("tiny:predict", {"signature_name": "embed_pixels", "inputs": [[[[1.0, 2.0, 3.0]]], [1.0]]}, 400,
     "JSON Value: 1.0 found at incorrect level: 3 in the JSON DOM. Expected at level: 4"),
    ("tiny:predict", {"instances": [{"b64": "%%%"}]}, 400, "Unable to base64 decode"),
    ("tiny:predict", {"instances": ["not an image"]}, 400,
     "the model rejected the input: image 0: not an image of a known format (JPEG, PNG, BMP, GIF, WEBP, TIFF)"),
    ("tiny:predict", {"instances": ["x"] * 5}, 400, "batch of 5 is over this server's limit of 4"),
    ("tiny:predict", {"signature_name": "nope", "instances": ["x"]}, 400, 'Serving signature key "nope" not found.'),
    ("nope:predict", {"instances": ["x"]}, 404, "Servable not found for request: Latest(nope)"),
    ("tiny/versions/7:predict", {"instances": ["x"]}, 404, "Servable not found for request: Specific(tiny, 7)"),
    ("tiny/versions/99999999999999999999:predict", {"instances": ["x"]}, 400, "version 99999999999999999999 is out of range"),
    ("tiny/labels/stable:predict", {"instances": ["x"]}, 400, "Unrecognized servable version label: stable"),
    ("tiny:classify", {"examples": []}, 501, "classify is not served"),
])
def test_errors_are_tf_servings_error_json(served, path, body, status, message):
    answer_status, answer = http(f"{served[2]}/v1/models/{path}", body)
    assert answer_status == status and list(answer) == ["error"]
    assert message in answer["error"]


def test_paths_outside_the_api(served):
    url = served[2]
    assert http(f"{url}/v1/models") == (400, {"error": "Missing model name in request."})
    assert http(f"{url}/v1/models/tiny:predict")[0] == 400  # GET on a POST path: malformed
    assert http(f"{url}/index.html")[0] == 404


def test_a_client_sending_a_body_over_the_limit_hears_why(tmp_path, rng):
    """The refused body is read and dropped, so the client gets the 413, not a reset; one that asks first
    (`Expect: 100-continue`, as curl does) is told before it sends."""
    export_tiny(str(tmp_path))
    server = serve(str(tmp_path), port=0, rest_port=0, poll_seconds=0, max_message_bytes=100_000)
    try:
        client = RestEmbeddingClient(f"http://127.0.0.1:{server.rest_port}", "tiny")
        noise = png(rng.integers(0, 255, (1500, 1500, 3), dtype=np.uint8))  # 6.8 MB: more than the sockets buffer
        with pytest.raises(InvalidInputError, match="over the limit of 100000"):
            client.embed_bytes([noise])
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as connection:
            connection.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n"
                               b"Expect: 100-continue\r\n\r\n")
            assert connection.recv(1 << 16).startswith(b"HTTP/1.1 413 ")  # not "100 Continue"
        assert client.status() == [(1, "AVAILABLE")]
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("headers, status, message", [
    ({"Content-Length": "-1"}, 400, "Content-Length must be a number of bytes, got '-1'"),
    ({"Content-Length": "abc"}, 400, "Content-Length must be a number of bytes, got 'abc'"),
    ({"Content-Length": "2000"}, 413, "request body of 2000 bytes is over the limit of 1000"),
    ({"Transfer-Encoding": "chunked"}, 411, "chunked request bodies are not supported"),
])
def test_a_body_the_server_cannot_bound_is_refused_and_it_keeps_serving(tmp_path, headers, status, message):
    import http.client as http_client

    export_tiny(str(tmp_path))
    server = serve(str(tmp_path), port=0, rest_port=0, poll_seconds=0, max_message_bytes=1000)
    try:
        connection = http_client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
        connection.putrequest("POST", "/v1/models/tiny:predict")
        for key, value in headers.items():
            connection.putheader(key, value)
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == status and message in json.loads(response.read())["error"]
        connection.close()
        assert http(f"http://127.0.0.1:{server.rest_port}/v1/models/tiny")[0] == 200
    finally:
        server.stop(grace=1)


def test_connections_over_the_limit_get_a_503_and_stalled_ones_are_closed(tmp_path):
    export_tiny(str(tmp_path))
    server = serve(str(tmp_path), port=0, rest_port=0, poll_seconds=0, rest_max_connections=2,
                   rest_timeout_seconds=1.0)
    url = f"http://127.0.0.1:{server.rest_port}/v1/models/tiny"
    stalled = []
    try:
        for _ in range(2):  # two requests whose bodies never come: they hold both places
            connection = socket.create_connection(("127.0.0.1", server.rest_port), timeout=30)
            connection.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            stalled.append(connection)
        status, body = http(url)
        assert status == 503
        assert body == {"error": "the server is busy: 2 connections are being served; retry later"}
        for connection in stalled:  # after the 1 s timeout the server closes them without an answer
            assert connection.recv(1024) == b""
        assert wait_for(lambda: http(url)[0] == 200, seconds=10)
    finally:
        for connection in stalled:
            connection.close()
        server.stop(grace=1)


@pytest.mark.parametrize("options, message", [({"rest_max_connections": 0}, "rest_max_connections must be at least 1"),
                                              ({"rest_timeout_seconds": 0}, "rest_timeout_seconds must be above 0")])
def test_rest_limits_are_checked_before_anything_binds(tmp_path, options, message):
    with pytest.raises(InvalidInputError, match=message):
        serve(str(tmp_path), port=0, rest_port=0, poll_seconds=0, **options)


def test_connect_picks_rest_or_grpc_and_both_embed_alike(served, rng):
    model, server, url = served
    rest, grpc_client = connect(url, "tiny", batch_size=3), connect(f"127.0.0.1:{server.port}", "tiny", batch_size=3)
    assert isinstance(rest, RestEmbeddingClient) and isinstance(grpc_client, EmbeddingClient)
    encoded = random_pngs(rng, 7)  # over the server's 4 per request: the clients split it
    np.testing.assert_array_equal(rest.embed_bytes(encoded), grpc_client.embed_bytes(encoded))
    np.testing.assert_allclose(rest.embed_bytes(encoded), embed_in_process(model, encoded), atol=1e-5)
    pixels = rng.uniform(0, 255, (5, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    np.testing.assert_array_equal(rest.embed_pixels(pixels), grpc_client.embed_pixels(pixels))
    assert rest.metadata() == grpc_client.metadata()
    assert rest.status() == grpc_client.status() == [(1, "AVAILABLE")]
    with pytest.raises(InvalidInputError, match="not an image of a known format"):
        rest.embed_bytes([b"not an image"])
    with pytest.raises(MissingError, match=r"Latest\(nope\)"):
        connect(url, "nope").embed_bytes(encoded[:1])
    with pytest.raises(MissingError, match="Could not find version 3 of model tiny"):
        connect(url, "tiny", version=3).status()


def test_clients_check_the_embedding_space_a_model_states(tmp_path, caplog):
    space = "v1:tiny-16px-avg-random:identity"
    export_tiny(tmp_path, "said", embedding_space=space)
    export_tiny(tmp_path, "unsaid")  # exported before model_info existed
    server = serve(str(tmp_path), port=0, rest_port=0, poll_seconds=0)
    grpc_address, url = f"127.0.0.1:{server.port}", f"http://127.0.0.1:{server.rest_port}"
    try:
        for address in (grpc_address, url, f"{grpc_address},{url}"):  # gRPC, REST, replicas
            said, unsaid = connect(address, "said"), connect(address, "unsaid")
            assert said.embedding_space() == space and unsaid.embedding_space() is None
            said.check_embedding_space(space, "the index")
            with pytest.raises(InvalidInputError, match=f"the served model 'said' gives {space} vectors, but the index "
                                                        "needs v1:tiny-16px-flip-avg-random:identity vectors"):
                said.check_embedding_space(space.replace("px-", "px-flip-"), "the index")
            caplog.clear()
            unsaid.check_embedding_space(space, "the index")  # cannot say: trusted, with a warning
            assert "the served model 'unsaid' does not say what its vectors are" in caplog.text
        # the model_info signature takes no inputs: a request with some is a clear refusal, not a server error
        status, answer = http(f"{url}/v1/models/said:predict", {"signature_name": "model_info", "instances": [1]})
        assert status == 400 and 'signature "model_info" takes no inputs: send "inputs": {}' in answer["error"]
    finally:
        server.stop(grace=1)


def test_a_checked_client_keeps_to_its_version_and_checks_the_next_one(tmp_path, rng):
    """A model exported again under its name while a client is in use: the same kind of vectors are taken up, another
    model's are refused on every request, never mixed into the answers, until the server serves the right kind again."""
    space, other = "v1:tiny-16px-avg-random:identity", "v1:tiny-16px-flip-avg-random:identity"
    export_tiny(tmp_path, "m", seed=0, embedding_space=space)
    server = serve(str(tmp_path), port=0, rest_port=0, poll_seconds=0.2)
    pixels = rng.uniform(0, 255, (1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    clients = [connect(f"127.0.0.1:{server.port}", "m"), connect(f"http://127.0.0.1:{server.rest_port}", "m")]
    try:
        for client in clients:
            client.check_embedding_space(space, "the index")
            assert client.metadata()["version"] == 1
        retrained = export_tiny(tmp_path, "m", seed=1, embedding_space=space)  # version 2, the same kind of vectors
        assert wait_for(lambda: server.registry.versions("m") == [2])
        for client in clients:
            np.testing.assert_allclose(client.embed_pixels(pixels), retrained.predict(pixels, verbose=0), atol=1e-5)
            assert client.metadata()["version"] == 2
        export_tiny(tmp_path, "m", seed=2, embedding_space=other)  # version 3: another model
        assert wait_for(lambda: server.registry.versions("m") == [3])
        for client in clients:
            for _ in range(2):  # refused each time, not only the first
                with pytest.raises(InvalidInputError, match=f"gives {other} vectors, but the index needs {space} vectors"):
                    client.embed_pixels(pixels)
        shutil.rmtree(tmp_path / "m" / "3")  # the newest on disk is version 2 again
        assert wait_for(lambda: server.registry.versions("m") == [2])
        for client in clients:
            np.testing.assert_allclose(client.embed_pixels(pixels), retrained.predict(pixels, verbose=0), atol=1e-5)
        # a client of one version keeps to it, as asked
        with pytest.raises(MissingError, match=r"Specific\(m, 1\)"):
            connect(f"127.0.0.1:{server.port}", "m", version=1).embed_pixels(pixels)
    finally:
        server.stop(grace=1)


def test_every_replica_is_checked_one_unreachable_before_its_first_request(tmp_path, rng):
    space, other = "v1:tiny-16px-avg-random:identity", "v1:tiny-16px-flip-avg-random:identity"
    export_tiny(tmp_path / "a", "m", embedding_space=space)
    export_tiny(tmp_path / "b", "m", embedding_space=other)
    servers = [serve(str(tmp_path / folder), port=0, poll_seconds=0) for folder in ("a", "b")]
    addresses = [f"127.0.0.1:{s.port}" for s in servers]
    pixels = rng.uniform(0, 255, (1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    try:
        for order in (addresses, addresses[::-1]):
            with pytest.raises(InvalidInputError, match=f"gives {other} vectors"):
                connect(",".join(order), "m").check_embedding_space(space, "the index")
        servers[1].stop(grace=1)
        client = ReplicatedClient([connect(address, "m", timeout=5) for address in addresses], retry_after=0)
        client.check_embedding_space(space, "the index")  # b is down: checked when it answers again
        assert client.embed_pixels(pixels).shape == (1, 8)
        servers[1] = serve(str(tmp_path / "b"), port=servers[1].port, poll_seconds=0)

        refusals = []

        def refused():  # a answers; b, once its channel has reconnected, is checked first and refused
            if not refusals:
                try:
                    client.embed_pixels(pixels)
                except InvalidInputError as exc:
                    refusals.append(str(exc))
            return bool(refusals)

        assert wait_for(refused, seconds=30) and f"gives {other} vectors" in refusals[0]
    finally:
        for server in servers:
            server.stop(grace=1)


def test_replicas_at_different_versions_answer_their_embedding_space(tmp_path):
    space = "v1:tiny-16px-avg-random:identity"
    export_tiny(tmp_path / "a", "m", embedding_space=space)
    for _ in range(2):
        export_tiny(tmp_path / "b", "m", embedding_space=space)  # b serves version 2, a version 1
    servers = [serve(str(tmp_path / folder), port=0, poll_seconds=0) for folder in ("a", "b")]
    try:
        client = connect(",".join(f"127.0.0.1:{s.port}" for s in servers), "m")
        for _ in range(4):  # round robin: the version and its question must go to the same replica
            assert client.embedding_space() == space
            assert client.metadata()["version"] in (1, 2)
    finally:
        for server in servers:
            server.stop(grace=1)


def test_a_kept_alive_connection_is_not_served_after_stop(served):
    import http.client as http_client

    server = serve(served[1].registry.base_path, port=0, rest_port=0, poll_seconds=0)
    connection = http_client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    connection.request("GET", "/v1/models/tiny")
    assert connection.getresponse().read() and connection.sock is not None  # kept alive
    server.stop(grace=1)
    connection.request("POST", "/v1/models/tiny:predict", body=json.dumps({"instances": ["x"]}))
    response = connection.getresponse()
    assert response.status == 503 and json.loads(response.read()) == {"error": "the server is shutting down"}
    assert response.getheader("Connection") == "close"


def test_rest_client_on_a_closed_port_is_a_connection_error(served):
    server = serve(served[1].registry.base_path, port=0, rest_port=0, poll_seconds=0)
    url = f"http://127.0.0.1:{server.rest_port}"
    assert connect(url, "tiny").status() == [(1, "AVAILABLE")]
    server.stop(grace=1)
    with pytest.raises(ConnectionError, match="is not reachable"):
        connect(url, "tiny", timeout=2).status()
