"""Hostile request bodies against a real server: every value bounded in memory and time before it
joins a batch, deep JSON answered 400 naming where, error messages that never echo a whole value,
requests the queue can never hold (413, not 503), and the value rules training and serving share
(integers in hex columns, NUL and other control characters)."""

import asyncio
import json
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from servers import ServiceProcess
from test_redis import RedisServer

from ctrserve.export.exporter import export_checkpoint
from ctrserve.export.package import load_package
from ctrserve.models.data import DataConfig
from ctrserve.models.dlrm import ModelConfig
from ctrserve.models.keys import EXPECTED, InvalidValueError, to_keys
from ctrserve.models.readers import iter_batches
from ctrserve.models.schema import CategoricalColumn, DatasetSpec, LabelRule
from ctrserve.models.train import TrainConfig, fit
from ctrserve.models.transform import TransformConfig
from ctrserve.service.batcher import Batcher, BatchingConfig
from ctrserve.service.errors import PayloadTooLarge
from ctrserve.service.features import RawColumns
from ctrserve.service.runtime import load_runtime
from ctrserve.service.settings import ServiceSettings

MODEL = "hostile"
SCORE = f"/v1/models/{MODEL}/score"
INFER = f"/v2/models/{MODEL}/infer"
RANK = f"/v1/models/{MODEL}/rank"
#: C1 hexadecimal, C2 text, C3 integers, user_id text (the user entity's key); I1, I2 dense.
SPEC = DatasetSpec(label=LabelRule("label"), dense=("I1", "I2"), categorical=(
    CategoricalColumn("C1", "hex"), CategoricalColumn("C2", "string"),
    CategoricalColumn("C3", "int"), CategoricalColumn("user_id", "string")), format="parquet")
VIEW = {"entities": {"user": {"key_column": "user_id", "columns": ["C2", "I2"],
                              "source": "users.parquet"}},
        "context": ["C1", "C3", "I1"]}
HEX_IDS = ["68fd1e64", "8cf07265", "5a9ed9b0", "ae46a29d", "f0cf0024", "1"]
WORDS = ["red", "green", "blue", "héllo", "naïve", "ünïcode"]
#: Nesting that orjson parses (it refuses more than 1,024 levels) but repr and isinstance walks
#: recurse on.
DEEP = 1000
DEEP_LIST = "[" * DEEP + "]" * DEEP
DEEP_OBJECT = '{"a":' * DEEP + "1" + "}" * DEEP
#: The longest error body a test accepts: a message names the place, never the whole value.
SHORT = 600


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    """A model over a hex, a text and an integer column and a user entity, exported with a
    feature view whose embedded store reads ``users.parquet``."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(11)
    n_rows, users = 3000, [f"u{i}" for i in range(40)]
    user_words = rng.choice(WORDS, len(users))
    user_i2 = rng.exponential(size=len(users)).round(2)
    picks = rng.integers(0, len(users), n_rows)
    pq.write_table(pa.table({
        "label": rng.integers(0, 2, n_rows), "I1": rng.normal(size=n_rows).round(3),
        "I2": user_i2[picks], "C1": rng.choice(HEX_IDS, n_rows), "C2": user_words[picks],
        "C3": rng.integers(0, 30, n_rows), "user_id": np.array(users)[picks],
    }), root / "data.parquet")
    SPEC.save(root / "spec.json")
    data = DataConfig(path=str(root / "data.parquet"), format="parquet",
                      spec_path=str(root / "spec.json"), split="random")
    fit(data, ModelConfig(dim=8, bottom=(16,), top=(16,)),
        TrainConfig(epochs=1, batch_size=256, progress=False), TransformConfig(),
        str(root / "ckpt"))
    repo = root / "repo"
    export_checkpoint(root / "ckpt", repo, MODEL, log=lambda _: None)
    pq.write_table(pa.table({"user_id": users, "C2": user_words, "I2": user_i2}),
                   repo / MODEL / "users.parquet")
    (repo / MODEL / "feature_view.json").write_text(json.dumps(VIEW))
    return {"root": root, "repo": repo, "users": users}


@pytest.fixture(scope="module")
def server(hostile):
    with ServiceProcess(hostile["repo"], "--max-queue-delay-us", "2000") as running:
        yield running


def _good_rows(count: int) -> list[dict]:
    return [{"I1": 0.5 * i, "I2": 1.0, "C1": HEX_IDS[i % len(HEX_IDS)],
             "C2": WORDS[i % len(WORDS)], "C3": i % 30, "user_id": f"u{i % 40}"}
            for i in range(count)]


def _v2_json(*inputs: dict) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def _bytes_tensor(name: str, elements: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A v2 body with one binary BYTES input, and its header-length header."""
    payload = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = _v2_json({"name": name, "datatype": "BYTES", "shape": [len(elements)],
                       "parameters": {"binary_data_size": len(payload)}})
    return header + payload, {"Inference-Header-Content-Length": str(len(header))}


def _post(url: str, path: str, body: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + path, content=body, headers=headers, timeout=120)


# -- 1. one long value: bounded memory, no stall --------------------------------------------------

def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _huge_body(path: str, size: int) -> tuple[str, bytes, dict[str, str] | None]:
    """A route and a body of about ``size`` bytes whose bulk is one categorical value."""
    text = b"7" * (size - 200)
    if path == "friendly rows":
        return SCORE, b'{"rows": [{"C3": 1}, {"C2": "' + text + b'"}]}', None
    if path == "friendly columns":
        return SCORE, b'{"columns": {"C1": ["1", "' + text + b'"]}}', None
    if path == "v2 JSON":
        return INFER, (b'{"inputs": [{"name": "C2", "datatype": "BYTES", "shape": [2], '
                       b'"data": ["1", "' + text + b'"]}]}'), None
    return INFER, *_bytes_tensor("C2", [b"1", text])


#: Just under the default max_body_bytes (64 MiB).
HUGE_BODY = 64 * 1024 * 1024 - 4096


@pytest.mark.parametrize("path", ["friendly rows", "friendly columns", "v2 JSON", "v2 binary"])
def test_a_value_just_under_the_body_limit_costs_a_small_multiple_of_it_and_stalls_no_one(
        server, path):
    route, bad_body, headers = _huge_body(path, HUGE_BODY)
    good = json.dumps({"rows": _good_rows(16)}).encode()
    stop, answers = threading.Event(), []

    def client() -> None:
        with httpx.Client(timeout=60) as session:
            for _ in range(10_000):
                if stop.is_set():
                    return
                started = time.monotonic()
                try:
                    code: int | str = session.post(server.url + SCORE, content=good).status_code
                except httpx.HTTPError as error:
                    code = type(error).__name__
                answers.append((started, time.monotonic() - started, code))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        pid = int(_post(server.url, SCORE, good).headers["x-worker-pid"])  # the one that serves
        before = _status_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
        sent = time.monotonic()
        bad = _post(server.url, route, bad_body, headers)
        answered = time.monotonic()
        peak = _status_kib(pid, "VmHWM")
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    rise = (peak - before) * 1024
    overlapping = [a for a in answers if a[0] < answered and a[0] + a[1] > sent]
    print(f"\n{path}: body {len(bad_body) / 2**20:.1f} MiB answered {bad.status_code} in "
          f"{answered - sent:.2f} s ({len(bad.content)} bytes); peak RSS +{rise / 2**20:.1f} MiB "
          f"({rise / len(bad_body):.1f}x the body); {len(overlapping)} good requests overlapped "
          f"it, slowest {max((a[1] for a in overlapping), default=0):.2f} s; "
          f"{len(answers)} good in all")
    assert bad.status_code == 400, bad.text
    assert "column 'C2', row 1" in bad.text or "column 'C1', row 1" in bad.text, bad.text
    assert len(bad.content) < SHORT
    assert rise < 8 * len(bad_body)
    assert answers and all(code == 200 for _, _, code in answers)
    assert overlapping and max(a[1] for a in overlapping) < 30


def _tiny_values_body(path: str, size: int) -> tuple[str, bytes]:
    """A route and a body of about ``size`` bytes holding millions of one-byte values."""
    values = b",".join([b"1"] * (size // 2 - 100))
    if path == "friendly columns":
        return SCORE, b'{"columns": {"C3": [' + values + b"]}}"
    if path == "v2 JSON":
        return INFER, (b'{"inputs": [{"name": "C3", "datatype": "INT64", "shape": [1], '
                       b'"data": [' + values + b"]}]}")
    return RANK, b'{"candidates": [{}], "context": {"C3": [' + values + b"]}}"


@pytest.mark.parametrize("path", ["friendly columns", "v2 JSON", "ranking"])
def test_a_body_of_millions_of_tiny_values_is_refused_before_it_is_parsed(server, path):
    """Parsed, each value would be a Python object: 16 to 26 times the body."""
    route, body = _tiny_values_body(path, HUGE_BODY)
    pid = int(_post(server.url, SCORE, json.dumps({"rows": _good_rows(1)}).encode())
              .headers["x-worker-pid"])
    before = _status_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    sent = time.monotonic()
    refused = _post(server.url, route, body)
    seconds = time.monotonic() - sent
    rise = (_status_kib(pid, "VmHWM") - before) * 1024
    print(f"\n{path}: {len(body) / 2**20:.1f} MiB of tiny values answered "
          f"{refused.status_code} in {seconds:.2f} s; peak RSS +{rise / 2**20:.1f} MiB "
          f"({rise / len(body):.1f}x the body)")
    assert refused.status_code == 413, refused.text
    assert "JSON values" in refused.json()["error"]
    assert rise < 4 * len(body)


# -- 1. the limit on every path ---------------------------------------------------------------

def _rows(*rows: dict) -> bytes:
    return json.dumps({"rows": list(rows)}).encode()


def _rank(entities: dict | None = None, context: dict | None = None,
          candidates: list | None = None) -> bytes:
    return json.dumps({"entities": entities or {}, "context": context or {},
                       "candidates": candidates if candidates is not None else [{}]}).encode()


LONG_TEXT = "x" * 257  # one byte over the default max_value_bytes
LONG_HEX = "1" * 17
OVER_LIMIT = [
    ("friendly rows, text", SCORE, _rows({"C2": "ok"}, {"C2": LONG_TEXT}), "column 'C2', row 1"),
    ("friendly rows, 129 two-byte characters", SCORE, _rows({"C2": "é" * 129}),
     "column 'C2', row 0"),
    ("friendly rows, integer column", SCORE, _rows({"C3": "1" * 257}), "column 'C3', row 0"),
    ("friendly columns, hex", SCORE, json.dumps({"columns": {"C1": ["ab", LONG_HEX]}}).encode(),
     "column 'C1', row 1"),
    ("v2 JSON BYTES", INFER, _v2_json({"name": "C2", "datatype": "BYTES", "shape": [2, 1],
                                       "data": [["ok"], [LONG_TEXT]]}), "column 'C2', row 1"),
    ("v2 binary BYTES", INFER, _bytes_tensor("C1", [b"ab", LONG_HEX.encode()]),
     "column 'C1', row 1"),
    ("ranking entity id", RANK, _rank(entities={"user": LONG_TEXT}), "entities: the user id"),
    ("ranking context", RANK, _rank(context={"C1": LONG_HEX}), "column 'C1', row 0"),
    ("ranking candidate entity id", RANK, _rank(candidates=[{}, {"user": LONG_TEXT}]),
     "candidate 1: the user id"),
    ("ranking candidate context", RANK, _rank(candidates=[{"C1": "ab"}, {"C1": LONG_HEX}]),
     "column 'C1', row 1"),
]


@pytest.mark.parametrize("route,body,where", [c[1:] for c in OVER_LIMIT],
                         ids=[c[0] for c in OVER_LIMIT])
def test_a_value_over_its_columns_limit_is_refused_on_every_path(server, route, body, where):
    content, headers = body if isinstance(body, tuple) else (body, None)
    response = _post(server.url, route, content, headers)
    assert response.status_code == 400, response.text
    assert where in response.json()["error"]
    assert "is longer than" in response.json()["error"]
    assert len(response.content) < SHORT


AT_LIMIT = [
    (SCORE, _rows({"C2": "x" * 256, "C1": "f" * 16, "C3": "1" * 18})),
    (SCORE, _rows({"C2": "é" * 128})),
    (INFER, _bytes_tensor("C2", ["é".encode() * 128])),
    (RANK, _rank(entities={"user": "u" * 256}, context={"C1": "F" * 16},
                 candidates=[{"user": "u1"}])),
]


@pytest.mark.parametrize("route,body", AT_LIMIT)
def test_a_value_at_its_columns_limit_is_scored(server, route, body):
    content, headers = body if isinstance(body, tuple) else (body, None)
    response = _post(server.url, route, content, headers)
    assert response.status_code == 200, response.text


def test_stored_values_over_the_limit_or_not_text_are_refused_naming_where(hostile, tmp_path):
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    try:
        store = redis.Redis.from_url(redis_server.url)
        store.hset("ctrserve:user:u1", mapping={"C2": "x" * 32, "I2": "1.5"})
        store.hset("ctrserve:user:u2", mapping={"C2": "x" * 33})
        store.hset("ctrserve:user:u3", mapping={"C2": b"\xff\xfe"})
        store.hset("ctrserve:user:u4", mapping={"C2": "ok", "I2": "many"})
        with ServiceProcess(hostile["repo"], "--redis-url", redis_server.url,
                            "--max-value-bytes", "32") as server:
            answers = {user: _post(server.url, RANK, _rank(
                entities={"user": user}, candidates=[{"C3": 1}, {"C3": 2}]))
                for user in ("u1", "u2", "u3", "u4")}
    finally:
        redis_server.stop()
    assert answers["u1"].status_code == 200, answers["u1"].text
    assert len(answers["u1"].json()["probabilities"]) == 2
    for user, where in (("u2", "user 'u2', column 'C2': the stored value of 33 bytes is longer "
                               "than 32 bytes"),
                        ("u3", "user 'u3', column 'C2': the stored value is not UTF-8 text"),
                        ("u4", "column 'I2', row 0: 'many' is not a number")):
        assert answers[user].status_code == 400, answers[user].text
        assert where in answers[user].json()["error"]


# -- 2. deep JSON: 400 naming where ---------------------------------------------------------

def _deep(template: str, nested: str = DEEP_LIST) -> str:
    """``template`` with ``nested`` (a JSON value 1,000 levels deep) in place of ``@``."""
    return template.replace("@", nested)


C1_BYTES = '{"name": "C1", "datatype": "BYTES", "shape": [1], "data": ["ab"]}'
DEEP_BODIES = [
    ("score rows, dense", SCORE, _deep('{"rows": [{"I1": @}]}'), "column 'I1', row 0"),
    ("score rows, categorical", SCORE, _deep('{"rows": [{"C2": @}]}', DEEP_OBJECT),
     "column 'C2', row 0"),
    ("score columns, dense", SCORE, _deep('{"columns": {"I2": [1, @]}}'), "column 'I2', row 1"),
    ("score columns, categorical", SCORE, _deep('{"columns": {"C1": [@]}}'),
     "column 'C1', row 0"),
    ("score columns, a column", SCORE, _deep('{"columns": {"C3": @}}', DEEP_OBJECT),
     "column 'C3'"),
    ("score columns", SCORE, _deep('{"columns": @}'), '"columns"'),
    ("score rows", SCORE, _deep('{"rows": @}'), "row 0"),
    ("versioned score", f"/v1/models/{MODEL}/versions/1/score", _deep('{"rows": [{"C3": @}]}'),
     "column 'C3', row 0"),
    ("v2 datatype", INFER, _deep('{"inputs": [{"name": "C1", "datatype": @, "shape": [1], '
                                 '"data": ["1"]}]}'), "input 'C1': datatype"),
    ("v2 BYTES data", INFER, _deep('{"inputs": [{"name": "C1", "datatype": "BYTES", '
                                   '"shape": [1], "data": @}]}'), "input 'C1'"),
    ("v2 FP32 data", INFER, _deep('{"inputs": [{"name": "I1", "datatype": "FP32", '
                                  '"shape": [2, 1], "data": [[1], [@]]}]}'), "input 'I1'"),
    ("v2 sparse data", INFER, _deep('{"inputs": [{"name": "sparse", "datatype": "INT64", '
                                    '"shape": [1, 4], "data": @}]}'), "input 'sparse'"),
    ("v2 outputs name", INFER, _deep('{"inputs": [' + C1_BYTES + '], "outputs": [{"name": @}]}'),
     "unknown output"),
    ("v2 outputs parameters", INFER, _deep('{"inputs": [' + C1_BYTES + '], "outputs": '
                                           '[{"name": "probability", "parameters": @}]}'),
     "output 'probability': parameters"),
    ("v2 input name", INFER, _deep('{"inputs": [{"name": @}]}'), "string name"),
    ("v2 shape", INFER, _deep('{"inputs": [{"name": "C1", "datatype": "BYTES", "shape": @}]}'),
     "input 'C1': shape"),
    ("v2 binary_data_size", INFER, _deep('{"inputs": [{"name": "C1", "datatype": "BYTES", '
                                         '"shape": [1], "parameters": '
                                         '{"binary_data_size": @}}]}'), "binary_data_size"),
    ("v2 id", INFER, _deep('{"inputs": [' + C1_BYTES + '], "id": @}', DEEP_OBJECT), '"id"'),
    ("v2 parameters", INFER, _deep('{"inputs": [' + C1_BYTES + '], "parameters": @}'),
     '"parameters"'),
    # NaN sends the header to the standard library's parser, which recurses as deep as it goes.
    ("v2 NaN and deeper than orjson reads", INFER,
     _deep('{"inputs": [{"name": "I1", "datatype": "FP32", "shape": [1], "data": [NaN]}], '
           '"x": @}', "[" * 5000 + "]" * 5000), "not valid JSON"),
    ("versioned v2", f"/v2/models/{MODEL}/versions/1/infer",
     _deep('{"inputs": [{"name": "C1", "datatype": @, "shape": [1], "data": ["1"]}]}',
           DEEP_OBJECT), "input 'C1': datatype"),
    ("rank entities", RANK, _deep('{"entities": {"user": @}, "candidates": [{}]}'),
     "entities: the user id"),
    ("rank entities object", RANK, _deep('{"entities": @, "candidates": [{}]}'), '"entities"'),
    ("rank context", RANK, _deep('{"context": {"I1": @}, "candidates": [{}]}'),
     "column 'I1', row 0"),
    ("rank candidates", RANK, _deep('{"candidates": @}'), "candidate 0"),
    ("rank candidate entity", RANK, _deep('{"candidates": [{"user": @}]}', DEEP_OBJECT),
     "candidate 0: the user id"),
    ("rank candidate context", RANK, _deep('{"candidates": [{}, {"C1": @}]}'),
     "column 'C1', row 1"),
]


@pytest.mark.parametrize("route,body,where", [c[1:] for c in DEEP_BODIES],
                         ids=[c[0] for c in DEEP_BODIES])
def test_json_nested_a_thousand_deep_anywhere_is_a_400_naming_where(server, route, body, where):
    response = _post(server.url, route, body.encode())
    assert response.status_code == 400, response.text
    assert where in response.json()["error"], response.json()["error"]
    assert len(response.content) < SHORT


# -- 3. errors never echo a whole value -------------------------------------------------------

MEGABYTE = "z" * 1_000_000
ECHOES = [
    ("unknown column in a row", SCORE, _rows({MEGABYTE: 1})),
    ("unknown column", SCORE, json.dumps({"columns": {MEGABYTE: [1]}}).encode()),
    ("text as a number", SCORE, _rows({"I1": MEGABYTE})),
    ("v2 unknown input", INFER, _v2_json({"name": MEGABYTE, "datatype": "BYTES", "shape": [1],
                                          "data": ["1"]})),
    ("v2 datatype", INFER, _v2_json({"name": "C1", "datatype": MEGABYTE, "shape": [1],
                                     "data": ["1"]})),
    ("v2 text as FP32", INFER, _v2_json({"name": "I1", "datatype": "FP32", "shape": [1],
                                         "data": [MEGABYTE]})),
    ("v2 output name", INFER, json.dumps({"inputs": [json.loads(C1_BYTES)],
                                          "outputs": [{"name": MEGABYTE}]}).encode()),
    ("rank unknown entity", RANK, json.dumps({"entities": {MEGABYTE: 1},
                                              "candidates": []}).encode()),
    ("rank unknown context", RANK, json.dumps({"candidates": [{MEGABYTE: 1}]}).encode()),
    # within the length limit, refused by the transform in the batch: its message is cut too
    ("the transform's message", SCORE, _rows({"C2": "y" * 200 + "\u0001"})),
]


@pytest.mark.parametrize("route,body", [c[1:] for c in ECHOES], ids=[c[0] for c in ECHOES])
def test_errors_show_a_short_start_of_a_value_never_all_of_it(server, route, body):
    response = _post(server.url, route, body)
    assert response.status_code == 400, response.text[:300]
    assert len(response.content) < SHORT, response.text[:300]


# -- 4. what the queue can never hold ---------------------------------------------------------

def test_a_request_the_queue_can_never_hold_is_413_on_every_route(server):
    rows = ServiceSettings().max_queue_rows + 1
    answers = {
        "score": _post(server.url, SCORE, json.dumps({"rows": [{}] * rows}).encode()),
        "v2": _post(server.url, INFER, _v2_json({"name": "C1", "datatype": "BYTES",
                                                 "shape": [rows], "data": [""] * rows})),
        "rank": _post(server.url, RANK, _rank(candidates=[{}] * rows)),
    }
    for route, response in answers.items():
        assert response.status_code == 413, (route, response.text)
        assert "retry-after" not in response.headers
        assert "65,536" in response.json()["error"]


def test_settings_whose_row_limits_disagree_are_refused(hostile):
    defaults = ServiceSettings()
    assert defaults.max_request_rows == defaults.max_queue_rows == 65_536
    assert ServiceSettings(max_queue_rows=100).max_request_rows == 100
    assert ServiceSettings(max_queue_rows=100, max_request_rows=40).max_request_rows == 40
    with pytest.raises(ValueError, match="larger than max_queue_rows"):
        ServiceSettings(max_request_rows=100_000)
    refused = subprocess.run(
        [sys.executable, "-m", "ctrserve", "serve", "--repo", str(hostile["repo"]),
         "--max-request-rows", "100000"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert ("invalid settings: max_request_rows: Value error, 100,000 is larger than "
            "max_queue_rows (65,536)") in refused.stderr, refused.stderr


def test_the_batcher_answers_413_for_more_rows_than_its_queue_holds(hostile):
    runtime = load_runtime(load_package(hostile["repo"] / MODEL / "1"), "cpu")

    def features(rows: int) -> RawColumns:
        return RawColumns(rows, {"I1": np.zeros(rows), "I2": np.zeros(rows)},
                          {name: np.full(rows, None, dtype=object)
                           for name in ("C1", "C2", "C3", "user_id")})

    async def score() -> tuple[Exception | None, np.ndarray]:
        batcher = Batcher(runtime, BatchingConfig(max_queue_rows=8))
        try:
            try:
                await batcher.score(features(9))
                refused = None
            except PayloadTooLarge as error:
                refused = error
            return refused, await batcher.score(features(8))
        finally:
            await batcher.close()

    refused, fitting = asyncio.run(score())
    assert refused is not None and "9 rows in one request" in refused.message
    assert len(fitting) == 8


# -- 5. the value rules -------------------------------------------------------------------------

def _score(server, *rows: dict) -> httpx.Response:
    return _post(server.url, SCORE, _rows(*rows))


def test_an_integer_in_a_hex_column_is_the_same_number_as_its_hex_text(server):
    number = 0x68FD1E64  # 1761418852
    as_text = _score(server, {"C1": "68fd1e64"}, {"C1": "68FD1E64"}, {"C1": "0068fd1e64"})
    as_number = _score(server, {"C1": number}, {"C1": 2**64 - 1})
    v2 = _post(server.url, INFER, *_bytes_tensor("C1", [b"68fd1e64"]))
    assert as_text.status_code == as_number.status_code == v2.status_code == 200, as_number.text
    first = as_text.json()["probabilities"][0]
    assert as_text.json()["probabilities"] == pytest.approx([first] * 3, abs=1e-6)
    assert as_number.json()["probabilities"][0] == pytest.approx(first, abs=1e-6)
    assert v2.json()["outputs"][0]["data"][0] == pytest.approx(first, abs=1e-6)


VALUE_ERRORS = [
    ("hex: a negative integer", {"C1": -5}, "-5 is not " + EXPECTED["hex"]),
    ("hex: 2**64", b'{"rows": [{"C3": 1}, {"C1": 18446744073709551616}]}',
     "1.8446744073709552e+19 is not " + EXPECTED["hex"] + " (a JSON number with a fraction or "
     "an exponent, or an integer past 64 bits, is a float)"),
    ("hex: a trailing NUL", {"C1": "6\u0000"}, "'6\\x00' is not " + EXPECTED["hex"]),
    ("hex: a prefix", {"C1": "0x68fd1e64"}, "'0x68fd1e64' is not " + EXPECTED["hex"]),
    ("hex: a fraction", {"C1": 1.5}, "1.5 is not " + EXPECTED["hex"]),
    ("string: a NUL", {"C2": "6\u0000"}, "'6\\x00' is not " + EXPECTED["string"]),
    ("string: a control character", {"C2": "a\u0001b"}, "'a\\x01b' is not " + EXPECTED["string"]),
    ("string: a tab", {"C2": "red\t"}, "'red\\t' is not " + EXPECTED["string"]),
    ("int: past int64", {"C3": 2**63}, "9223372036854775808 is not " + EXPECTED["int"]),
    ("int: a newline", {"C3": "7\n"}, "'7\\n' is not " + EXPECTED["int"]),
    ("int: a bool", {"C3": True}, "True is not " + EXPECTED["int"]),
]


@pytest.mark.parametrize("row,message", [c[1:] for c in VALUE_ERRORS],
                         ids=[c[0] for c in VALUE_ERRORS])
def test_a_value_its_column_does_not_take_is_a_400_saying_what_was_expected(server, row,
                                                                           message):
    body = row if isinstance(row, bytes) else _rows({"C3": 1}, row)
    response = _post(server.url, SCORE, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "row 1: " in error and message in error, error
    assert "decimal point" not in error


def test_v2_bytes_keep_a_nul_and_text_columns_take_integers_as_decimal_text(server):
    nul = _post(server.url, INFER, *_bytes_tensor("C1", [b"6\x00"]))
    assert nul.status_code == 400 and "column 'C1', row 0: '6\\x00'" in nul.json()["error"]
    same = _score(server, {"C2": 42, "C3": "7"}, {"C2": "42", "C3": 7})
    assert same.status_code == 200, same.text
    first, second = same.json()["probabilities"]
    assert first == pytest.approx(second, abs=1e-6)


def test_training_reads_hex_integers_and_control_characters_as_serving_does(tmp_path):
    number = 0x68FD1E64
    keys = [to_keys("C1", "hex", values)[0].tolist() for values in (
        np.array([number]), np.array([number], dtype=object), np.array(["68fd1e64"], dtype=object),
        np.array(["68fd1e64"]))]
    assert keys == [[number]] * 4
    spec = DatasetSpec(label=None, categorical=(CategoricalColumn("C1", "hex"),),
                       format="parquet")
    pq.write_table(pa.table({"C1": pa.array([number, None], pa.int64())}), tmp_path / "n.parquet")
    batch = next(iter_batches(tmp_path / "n.parquet", spec))
    assert to_keys("C1", "hex", batch.categorical["C1"])[0].tolist() == [number, 0]
    for kind, values in (("hex", np.array([-1])), ("hex", np.array(["ab", "6\x00"], dtype=object)),
                         ("string", np.array(["a", "6\x00"], dtype=object)),
                         ("string", np.array(["a", "b\x7fc"])),
                         ("int", np.array(["1", "2\n"], dtype=object))):
        with pytest.raises(InvalidValueError, match=r"column 'C1', row \d: .* is not "):
            to_keys("C1", kind, values)
