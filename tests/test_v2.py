"""The Open Inference Protocol v2 routes, proven with the real ``tritonclient[http]`` against a
real uvicorn on a free loopback port, in binary and JSON modes."""

import json
import shutil
import struct
from collections.abc import Callable

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from servers import ServiceProcess, request_rows
from tritonclient.utils import InferenceServerException

from ctrserve.models.schema import RawBatch
from ctrserve.models.transform import FeatureTransform
from ctrserve.service.errors import BadRequest, PayloadTooLarge
from ctrserve.service.features import RawColumns
from ctrserve.service.v2_codec import ModelSchema, decode_infer_request

ROWS = 48
MODES = ["binary", "json"]


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    repo = tmp_path_factory.mktemp("v2") / "repo"  # a copy: a test unloads and reloads
    shutil.copytree(trained["repo"], repo)
    # A queue delay long enough for concurrent requests to share batches on a busy machine.
    with ServiceProcess(repo, "--max-queue-delay-us", "20000") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    connection = triton.InferenceServerClient(server.url.removeprefix("http://"),
                                              concurrency=16)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def rows(trained) -> list[dict]:
    return request_rows(trained["rows_file"])[:ROWS]


@pytest.fixture(scope="module")
def friendly(server, rows) -> np.ndarray:
    """The friendly API's probabilities for ``rows``: what every v2 answer must equal."""
    response = httpx.post(server.url + "/v1/models/ctr/score", json={"rows": rows}, timeout=60)
    assert response.status_code == 200, response.text
    return np.array(response.json()["probabilities"])


@pytest.fixture(scope="module")
def transform(trained) -> FeatureTransform:
    return FeatureTransform.load(trained["repo"] / "ctr" / "1" / "transform")


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _tensor_inputs(transform: FeatureTransform, rows: list[dict],
                   binary: bool) -> list[triton.InferInput]:
    """``dense`` and ``sparse`` as a client computes them with the package's transform."""
    batch = RawBatch(labels=None, dense={
        e.name: np.array([np.nan if _missing(r.get(e.name)) else r[e.name] for r in rows])
        for e in transform.dense
    }, categorical={
        e.column.name: np.array([r.get(e.column.name) for r in rows], dtype=object)
        for e in transform.categorical
    })
    tensors = transform.transform(batch)
    dense = triton.InferInput("dense", list(tensors.dense.shape), "FP32")
    sparse = triton.InferInput("sparse", list(tensors.sparse.shape), "INT64")
    dense.set_data_from_numpy(tensors.dense, binary_data=binary)
    sparse.set_data_from_numpy(tensors.sparse, binary_data=binary)
    return [dense, sparse]


def _raw_inputs(transform: FeatureTransform, rows: list[dict], binary: bool,
                dense_type: str = "FP32", skip: str = "") -> list[triton.InferInput]:
    """One tensor per raw column: dense [N] (NaN: missing), categorical BYTES [N, 1] (empty:
    missing); the column ``skip`` is left out."""
    inputs = []
    for e in transform.dense:
        values = np.array([np.nan if _missing(r.get(e.name)) else r[e.name] for r in rows],
                          dtype=np.float32 if dense_type == "FP32" else np.float64)
        inputs.append(triton.InferInput(e.name, [len(rows)], dense_type))
        inputs[-1].set_data_from_numpy(values, binary_data=binary)
    for e in transform.categorical:
        name = e.column.name
        values = np.array([[b"" if _missing(r.get(name)) else str(r[name]).encode()]
                           for r in rows], dtype=object)
        inputs.append(triton.InferInput(name, [len(rows), 1], "BYTES"))
        inputs[-1].set_data_from_numpy(values, binary_data=binary)
    return [i for i in inputs if i.name() != skip]


def _infer(client: triton.InferenceServerClient, inputs: list[triton.InferInput],
           binary: bool, **options) -> np.ndarray:
    """tritonclient's defaults (no outputs named: ``binary_data_output``) in binary mode; the
    output asked for as JSON in JSON mode."""
    outputs = None if binary else [triton.InferRequestedOutput("probability", binary_data=False)]
    result = client.infer("ctr", inputs, outputs=outputs, **options)
    output = result.get_output("probability")
    assert ("binary_data_size" in output.get("parameters", {})) == binary
    assert output["datatype"] == "FP32"
    return result.as_numpy("probability")


def _stats(server: ServiceProcess) -> dict:
    return httpx.get(f"{server.url}/v2/models/ctr/stats").json()["model_stats"][0]


def test_health_readiness_and_metadata(client, transform):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("ctr") and client.is_model_ready("ctr", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("ctr", "7")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("ctr")
    assert client.get_model_metadata("ctr", "1") == metadata
    assert (metadata["name"], metadata["versions"]) == ("ctr", ["1"])
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "dense", "datatype": "FP32", "shape": [-1, 13]},
                                  {"name": "sparse", "datatype": "INT64", "shape": [-1, 5]}]
    assert metadata["outputs"] == [{"name": "probability", "datatype": "FP32", "shape": [-1]}]
    parameters = metadata["parameters"]
    assert parameters["execution_provider"] == "CPUExecutionProvider"
    assert parameters["table_rows"] == transform.table_sizes
    raw = {i["name"]: (i["datatype"], i["shape"]) for i in parameters["raw_inputs"]}
    assert raw == {**{f"I{k}": ("FP32", [-1]) for k in range(1, 14)},
                   **{f"C{k}": ("BYTES", [-1]) for k in range(1, 6)}}


@pytest.mark.parametrize("mode", MODES)
def test_transformed_tensors_score_like_the_friendly_api(client, server, rows, friendly,
                                                         transform, mode):
    binary = mode == "binary"
    before = _stats(server)
    got = _infer(client, _tensor_inputs(transform, rows, binary), binary)
    versioned = _infer(client, _tensor_inputs(transform, rows[:5], binary), binary,
                       model_version="1")
    after = _stats(server)
    np.testing.assert_allclose(got, friendly, atol=2e-6, rtol=0)
    np.testing.assert_allclose(versioned, friendly[:5], atol=2e-6, rtol=0)
    assert after["inference_count"] - before["inference_count"] == ROWS + 5  # the batcher's


@pytest.mark.parametrize("mode", MODES)
def test_raw_columns_are_transformed_by_the_server(client, server, rows, friendly, transform,
                                                   mode):
    binary = mode == "binary"
    got = _infer(client, _raw_inputs(transform, rows, binary,
                                     dense_type="FP32" if binary else "FP64"), binary)
    np.testing.assert_allclose(got, friendly, atol=2e-6, rtol=0)
    # A column left out is missing in every row, as in the friendly API.
    without = [{k: v for k, v in r.items() if k != "C3"} for r in rows]
    expected = httpx.post(server.url + "/v1/models/ctr/score", json={"rows": without},
                          timeout=60).json()["probabilities"]
    got = _infer(client, _raw_inputs(transform, rows, binary, skip="C3"), binary)
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


def test_concurrent_v2_requests_share_batches_and_get_their_own_rows(client, server, rows,
                                                                     friendly, transform):
    spans = [(start, start + 3) for start in range(0, ROWS - 3, 2)]
    before = _stats(server)
    pending = [client.async_infer("ctr", (_raw_inputs if k % 2 else _tensor_inputs)(
        transform, rows[a:b], True)) for k, (a, b) in enumerate(spans)]
    results = [p.get_result().as_numpy("probability") for p in pending]
    after = _stats(server)
    for (a, b), got in zip(spans, results, strict=True):
        np.testing.assert_allclose(got, friendly[a:b], atol=2e-6, rtol=0)
    assert after["inference_count"] - before["inference_count"] == 3 * len(spans)
    assert after["execution_count"] - before["execution_count"] < len(spans)


def test_the_request_id_comes_back(client, transform, rows):
    result = client.infer("ctr", _tensor_inputs(transform, rows[:2], True), request_id="r-17")
    assert result.get_response()["id"] == "r-17"


class _Truncated(triton.InferInput):
    """An input whose binary data loses its last 8 bytes on the way (its binary_data_size does
    not): tritonclient has no public way to send a damaged body."""

    def _get_binary_data(self) -> bytes:
        return super()._get_binary_data()[:-8]


def _with(inputs: list[triton.InferInput], name: str, datatype: str, values: np.ndarray,
          binary: bool = True) -> list[triton.InferInput]:
    """``inputs`` with the input ``name`` replaced by (or, if absent, given) ``values``."""
    given = triton.InferInput(name, list(values.shape), datatype)
    given.set_data_from_numpy(values, binary_data=binary)
    return [i for i in inputs if i.name() != name] + [given]


def _truncated(inputs: list[triton.InferInput], rows: int) -> list[triton.InferInput]:
    last = _Truncated("sparse", [rows, 5], "INT64")
    last.set_data_from_numpy(np.ones((rows, 5), np.int64))
    return [*inputs[:-1], last]


ERRORS: list[tuple[str, Callable, str, str]] = [
    ("unknown model", lambda c, i: c.infer("nope", i), "404", "unknown model 'nope'"),
    ("unknown version", lambda c, i: c.infer("ctr", i, model_version="7"), "404",
     "model 'ctr' version 7 is not served (serving version 1)"),
    ("unknown metadata", lambda c, i: c.get_model_metadata("nope"), "404",
     "unknown model 'nope'"),
    ("wrong shape", lambda c, i: c.infer("ctr", _with(i, "sparse", "INT64", np.ones(
        (4, 3), np.int64))), "400", "input 'sparse': shape [4, 3], expected [N, 5]"),
    ("wrong shape, JSON", lambda c, i: c.infer("ctr", _with(i, "sparse", "INT64", np.ones(
        (4, 5, 1), np.int64), binary=False)), "400",
     "input 'sparse': shape [4, 5, 1], expected [N, 5]"),
    ("batch sizes differ", lambda c, i: c.infer("ctr", _with(i, "sparse", "INT64", np.ones(
        (3, 5), np.int64))), "400", "inputs have different batch sizes"),
    ("wrong datatype", lambda c, i: c.infer("ctr", _with(i, "sparse", "FP32", np.ones(
        (4, 5), np.float32))), "400", "input 'sparse': datatype 'FP32' is not accepted "
     "(expected INT64)"),
    ("wrong datatype, JSON", lambda c, i: c.infer("ctr", _with(i, "dense", "FP64", np.ones(
        (4, 13)), binary=False)), "400", "input 'dense': datatype 'FP64' is not accepted "
     "(expected FP32)"),
    ("id outside its table", lambda c, i: c.infer("ctr", _with(i, "sparse", "INT64", np.ones(
        (4, 5), np.int64) + np.eye(4, 5, 3, np.int64) * 10**9)), "400",
     "input 'sparse', row 0, column 3 (C4): id 1000000001 is outside the table's rows [0, "),
    ("negative id", lambda c, i: c.infer("ctr", _with(i, "sparse", "INT64", -np.ones(
        (4, 5), np.int64))), "400", "id -1 is outside"),
    ("truncated binary payload", lambda c, i: c.infer("ctr", _truncated(i, 4)), "400",
     "input 'sparse': binary_data_size 160 runs past the end of the body (152 bytes left)"),
    ("unknown input", lambda c, i: c.infer("ctr", _with(i, "extra", "FP32", np.ones(
        4, np.float32))), "400", "unknown input 'extra'"),
    ("unknown output", lambda c, i: c.infer("ctr", i, outputs=[
        triton.InferRequestedOutput("logit")]), "400", "unknown output 'logit'"),
]


@pytest.mark.parametrize("call,status,message", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_errors_are_tritonclient_exceptions_with_our_message(client, transform, rows, call,
                                                             status, message):
    inputs = _tensor_inputs(transform, rows[:4], True)
    with pytest.raises(InferenceServerException) as raised:
        call(client, inputs)
    assert raised.value.status() == status
    assert message in raised.value.message()


def test_raw_columns_and_tensors_are_not_mixed_and_bad_raw_values_are_400s(client, transform,
                                                                           rows):
    raw = _raw_inputs(transform, rows[:4], True)
    cases = [
        (raw + _tensor_inputs(transform, rows[:4], True)[1:], "send either the tensors"),
        (_with(raw, "C2", "FP32", np.ones(4, np.float32)),
         "input 'C2': datatype 'FP32' is not accepted (expected BYTES)"),
        (_with(raw, "C2", "BYTES", np.array([b"1", b"x7", b"", b"3"], dtype=object)),
         "column 'C2', row 1: 'x7' is not an integer"),
        (_with(raw, "I4", "FP32", np.array([1, np.inf, 2, 3], np.float32)),
         "input 'I4', row 1: inf is not a finite number"),
    ]
    for inputs, message in cases:
        with pytest.raises(InferenceServerException) as raised:
            client.infer("ctr", inputs)
        assert (raised.value.status(), message in raised.value.message()) == ("400", True), \
            raised.value.message()


def test_plain_http_json_any_content_type_and_never_a_422(server):
    body = {"inputs": [{"name": "sparse", "datatype": "INT64", "shape": [2, 5],
                        "data": [[2, 3, 4, 2, 5], [0, 0, 0, 0, 0]]},
                       {"name": "dense", "datatype": "FP32", "shape": [2, 13],
                        "data": [0.5] * 26}]}
    url = server.url + "/v2/models/ctr/infer"
    answer = httpx.post(url, json=body, headers={"content-type": "text/plain"}, timeout=30)
    assert answer.status_code == 200, answer.text
    output = answer.json()["outputs"][0]
    assert (output["name"], output["shape"], len(output["data"])) == ("probability", [2], 2)
    for response, status, message in [
        (httpx.post(url, content=b"{not json", timeout=30), 400, "not valid JSON"),
        (httpx.post(url, content=b"[]", timeout=30), 400, "must be a JSON object"),
        (httpx.post(url, json={"inputs": 3}, timeout=30), 400, '"inputs" must be'),
        (httpx.post(url, json=body, headers={"Inference-Header-Content-Length": "99999"},
                    timeout=30), 400, "Inference-Header-Content-Length is 99999, but the body"),
        (httpx.get(server.url + "/v2/models/ctr/versions/latest", timeout=30), 404,
         "no version 'latest'"),
        (httpx.get(url, timeout=30), 405, "Method Not Allowed"),
    ]:
        assert response.status_code == status, response.text
        assert message in response.json()["error"]


def test_a_model_that_is_not_loaded_is_not_ready_and_answers_503(client, server, transform,
                                                                 rows):
    inputs = _tensor_inputs(transform, rows[:2], True)
    assert httpx.post(server.url + "/v2/repository/models/ctr/unload",
                      timeout=60).status_code == 200
    try:
        assert not client.is_model_ready("ctr") and not client.is_server_ready()
        with pytest.raises(InferenceServerException) as raised:
            client.infer("ctr", inputs)
        assert raised.value.status() == "503"
        assert "model 'ctr' is not loaded: unloaded" in raised.value.message()
    finally:
        assert httpx.post(server.url + "/v2/repository/models/ctr/load",
                          timeout=120).status_code == 200
    assert client.is_model_ready("ctr")
    assert len(_infer(client, inputs, True)) == 2


# The codec alone, on bodies tritonclient would not send.

SCHEMA = ModelSchema(n_dense=2, tables=("C1", "C2"), table_rows=np.array([5, 7], np.uint64),
                     dense_columns=("I1", "I2"), categorical_kinds={"C1": "int", "C2": "hex"})


def _body(inputs: list[dict], payload: bytes = b"", **fields) -> tuple[bytes, str | None]:
    header = json.dumps({"inputs": inputs, **fields}).encode()
    return header + payload, str(len(header)) if payload else None


def _element(text: bytes) -> bytes:
    return struct.pack("<I", len(text)) + text


def _bytes_input(size: int, shape: list[int]) -> dict:
    return {"name": "C2", "datatype": "BYTES", "shape": shape,
            "parameters": {"binary_data_size": size}}


SPARSE = {"name": "sparse", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}
DENSE = {"name": "dense", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 1]}
CODEC_ERRORS = [
    ("BYTES element past its size", _body([_bytes_input(9, [2])], _element(b"ab") +
                                          _element(b"cde")), "holds 1 of its 2 BYTES elements"),
    ("bytes left after BYTES", _body([_bytes_input(8, [1])], _element(b"ab") + b"zz"),
     "2 bytes are left after its 1 BYTES elements"),
    ("BYTES not UTF-8", _body([_bytes_input(6, [1])], _element(b"\xff\xfe")),
     "element 0 is not UTF-8 text"),
    ("fixed size mismatch", _body([{**SPARSE, "parameters": {"binary_data_size": 8}}],
                                  b"\0" * 8), "shape [1, 2] of INT64 needs 16 bytes"),
    ("unclaimed bytes", _body([{**SPARSE, "parameters": {"binary_data_size": 16}}, DENSE],
                              b"\0" * 20), "the inputs' binary_data_size add up to 16"),
    ("floats as INT64", _body([{**SPARSE, "data": [1.5, 2]}, DENSE]),
     "data are not all INT64 values"),
    ("ragged data", _body([{**SPARSE, "data": [[1], [2, 3]]}, DENSE]),
     "data is not a regular nested list"),
    ("data and shape disagree", _body([{**SPARSE, "data": [1, 2, 3]}, DENSE]),
     "shape [1, 2] holds 2 values, data has 3"),
    ("no data", _body([{k: v for k, v in SPARSE.items() if k != "data"}, DENSE]),
     "input 'sparse' has neither data nor binary_data_size"),
    ("shared memory", _body([{**SPARSE, "parameters": {"shared_memory_region": "r"}}]),
     "shared memory is not supported"),
    ("input twice", _body([SPARSE, SPARSE, DENSE]), "input 'sparse' is given twice"),
    ("dense missing", _body([SPARSE]), "input 'dense' is missing"),
    ("non-finite dense", _body([SPARSE, {**DENSE, "data": [1, float("inf")]}]),
     "input 'dense', row 0, column 1: inf is not a finite number"),
    ("classification", _body([SPARSE, DENSE], outputs=[
        {"name": "probability", "parameters": {"classification": 2}}]),
     "classification is not supported"),
    ("header length not a number", (b"{}", "ten"), "must be an integer"),
]


@pytest.mark.parametrize("body,message", [c[1:] for c in CODEC_ERRORS],
                         ids=[c[0] for c in CODEC_ERRORS])
def test_the_codec_refuses_malformed_bodies_with_a_400_naming_the_problem(body, message):
    with pytest.raises(BadRequest) as raised:
        decode_infer_request(*body, SCHEMA, 100)
    assert message in raised.value.message


def test_the_codec_reads_binary_and_json_inputs_and_picks_the_output_encoding():
    ids = np.array([[4, 6], [0, 0]], np.int64)
    body = _body([{"name": "sparse", "datatype": "INT64", "shape": [2, 2],
                   "parameters": {"binary_data_size": 32}},
                  {"name": "dense", "datatype": "FP32", "shape": [2, 2],
                   "data": [[1, 2], [3, 4]]}],
                 ids.tobytes(), parameters={"binary_data_output": True})
    decoded = decode_infer_request(*body, SCHEMA, 100)
    np.testing.assert_array_equal(decoded.features.sparse, ids)
    assert not decoded.features.sparse.flags.owndata  # a view of the body, not a copy
    np.testing.assert_array_equal(decoded.features.dense, [[1, 2], [3, 4]])
    assert decoded.binary_output
    as_json = [{"name": "probability", "parameters": {"binary_data": False}}]
    assert not decode_infer_request(*_body([SPARSE, DENSE], outputs=as_json), SCHEMA,
                                    100).binary_output
    with pytest.raises(PayloadTooLarge):
        decode_infer_request(*body, SCHEMA, 1)


def test_the_codec_gives_raw_columns_to_the_batcher_as_the_friendly_api_does():
    body = _body([_bytes_input(10, [2, 1]),
                  {"name": "I2", "datatype": "INT64", "shape": [2], "data": [3, 4]}],
                 _element(b"a1") + _element(b""))
    features = decode_infer_request(*body, SCHEMA, 100).features
    assert isinstance(features, RawColumns) and features.rows == 2
    assert list(features.categorical["C2"]) == ["a1", ""]  # "": missing
    assert list(features.categorical["C1"]) == [None, None]  # left out: missing
    np.testing.assert_array_equal(features.dense["I1"], [np.nan, np.nan])
    np.testing.assert_array_equal(features.dense["I2"], [3, 4])
