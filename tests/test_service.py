"""The scoring service end to end: a real uvicorn on a free loopback port serving real packages."""

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from servers import ServiceProcess, request_rows

from ctrserve.export.exporter import export_checkpoint
from ctrserve.models.data import DataConfig
from ctrserve.models.evaluate import evaluate

SCORE = "/v1/models/ctr/score"


def _offline(trained: dict, tmp_path: Path) -> np.ndarray:
    """``ctrserve evaluate``'s probabilities for the rows file, in order."""
    data = DataConfig(path=trained["data"].path, format="parquet",
                      spec_path=trained["data"].spec_path, test_path=str(trained["rows_file"]),
                      fractions=(0.9, 0.1))
    evaluate(trained["checkpoint"], data, "test", tmp_path / "p.txt")
    return np.loadtxt(tmp_path / "p.txt")


def _stats(url: str) -> dict:
    return httpx.get(f"{url}/v2/models/ctr/stats").json()["model_stats"][0]


async def _post_all(url: str, bodies: list[dict], limit: int = 200) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(SCORE, json=b) for b in bodies))


def test_http_scores_equal_the_offline_evaluation(trained, tmp_path):
    expected = _offline(trained, tmp_path)
    rows = request_rows(trained["rows_file"])
    columns = {name: [row.get(name) for row in rows] for name in rows[0]}
    with ServiceProcess(trained["repo"]) as server:
        by_rows = httpx.post(server.url + SCORE, json={"rows": rows}, timeout=60)
        by_columns = httpx.post(server.url + SCORE, json={"columns": columns}, timeout=60)
        versioned = httpx.post(server.url + "/v1/models/ctr/versions/1/score",
                               json={"rows": rows[:3]}, timeout=60)
    assert by_rows.status_code == 200, by_rows.text
    answer = by_rows.json()
    assert (answer["model"], answer["version"]) == ("ctr", 1)
    np.testing.assert_allclose(answer["probabilities"], expected, atol=2e-6, rtol=0)
    np.testing.assert_allclose(by_columns.json()["probabilities"], expected, atol=2e-6, rtol=0)
    np.testing.assert_allclose(versioned.json()["probabilities"], expected[:3], atol=2e-6,
                               rtol=0)


def test_concurrent_single_rows_are_batched_and_each_request_gets_its_own_rows(trained,
                                                                               tmp_path):
    expected = _offline(trained, tmp_path)
    rows = request_rows(trained["rows_file"])
    with ServiceProcess(trained["repo"], "--max-queue-delay-us", "20000") as server:
        before = _stats(server.url)
        single = asyncio.run(_post_all(server.url, [{"rows": [row]} for row in rows[:120]]))
        after = _stats(server.url)
        # 200 concurrent requests of mixed sizes (1 to 40 rows, from anywhere in the file).
        rng = np.random.default_rng(0)
        spans = [(int(s), int(s + n)) for s, n in zip(rng.integers(0, 260, 200),
                                                      rng.integers(1, 41, 200), strict=True)]
        mixed = asyncio.run(_post_all(server.url, [{"rows": rows[a:b]} for a, b in spans]))
    assert all(r.status_code == 200 for r in single)
    got = np.array([r.json()["probabilities"][0] for r in single])
    np.testing.assert_allclose(got, expected[:120], atol=2e-6, rtol=0)
    batches = after["execution_count"] - before["execution_count"]
    assert after["inference_count"] - before["inference_count"] == 120
    assert 1 <= batches < 120  # single rows shared batches
    sizes = {s["batch_size"]: s["count"] for s in after["batch_stats"]}
    assert sum(size * count for size, count in sizes.items()) == after["inference_count"]
    assert max(sizes) > 1
    for (a, b), response in zip(spans, mixed, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["probabilities"], expected[a:b], atol=2e-6,
                                   rtol=0)


def test_requests_larger_than_a_batch_are_split_and_reassembled(trained, tmp_path):
    expected = _offline(trained, tmp_path)
    rows = request_rows(trained["rows_file"])
    with ServiceProcess(trained["repo"], "--max-batch-rows", "64") as server:
        response = httpx.post(server.url + SCORE, json={"rows": rows}, timeout=60)
        stats = _stats(server.url)
    np.testing.assert_allclose(response.json()["probabilities"], expected, atol=2e-6, rtol=0)
    assert max(s["batch_size"] for s in stats["batch_stats"]) <= 64
    assert stats["execution_count"] >= 300 // 64


def test_a_full_queue_answers_503_with_retry_after(trained):
    rows = request_rows(trained["rows_file"])[:50]
    with ServiceProcess(trained["repo"], "--max-queue-rows", "100",
                        "--max-queue-delay-us", "300000") as server:
        responses = asyncio.run(_post_all(server.url, [{"rows": rows}] * 40))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}
    assert codes.count(503) > 0 and codes.count(200) > 0
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1"
    assert "queue" in rejected.json()["error"]


def test_a_slow_request_times_out_with_a_clear_error(trained):
    rows = request_rows(trained["rows_file"])[:2]
    with ServiceProcess(trained["repo"], "--request-timeout-ms", "50",
                        "--max-queue-delay-us", "400000", "--max-batch-rows", "100000") as server:
        response = httpx.post(server.url + SCORE, json={"rows": rows}, timeout=30)
    assert response.status_code == 504
    assert "50 ms" in response.json()["error"]


@pytest.fixture(scope="module")
def server(trained):
    with ServiceProcess(trained["repo"], "--max-queue-delay-us", "2000") as running:
        yield running


@pytest.mark.parametrize("body,status,message", [
    (b'{"rows": [{"nope": 1}]}', 400, "row 0: unknown column 'nope'"),
    (b'{"rows": [{"I1": "many"}]}', 400, "column 'I1', row 0: 'many' is not a number"),
    (b'{"columns": {"C2": [1, 2.5]}}', 400, "column 'C2', row 1"),
    (b'{"columns": {"C2": [1, 2], "I1": [1]}}', 400, "different lengths"),
    (b'{"rows": [{"C1": 1}, {"C1": "x7"}]}', 400, "column 'C1', row 1: 'x7' is not an integer"),
    (b"not json", 400, "not valid JSON"),
    (b'{"rows": 3}', 400, '"rows" must be a list'),
    (b"{}", 400, '"rows"'),
])
def test_client_mistakes_are_400s_naming_the_column_and_row(trained, server, body, status,
                                                            message):
    good = {"rows": request_rows(trained["rows_file"])[:3]}
    concurrent = asyncio.run(_post_all(server.url, [good] * 5))
    response = httpx.post(server.url + SCORE, content=body, timeout=30)
    unknown = httpx.post(server.url + "/v1/models/other/score", json=good, timeout=30)
    wrong_version = httpx.post(server.url + "/v1/models/ctr/versions/7/score", json=good,
                               timeout=30)
    assert response.status_code == status
    assert message in response.json()["error"]
    assert all(r.status_code == 200 for r in concurrent)
    assert unknown.status_code == 404 and "unknown model 'other'" in unknown.json()["error"]
    assert wrong_version.status_code == 404
    assert "version 7 is not served" in wrong_version.json()["error"]


def test_a_bad_value_fails_only_its_own_request_in_a_shared_batch(trained, server):
    rows = request_rows(trained["rows_file"])[:4]
    bad = [*rows[:2], {**rows[2], "C1": "not-a-number"}]
    before = _stats(server.url)
    responses = asyncio.run(_post_all(server.url, [{"rows": rows}, {"rows": bad},
                                                   {"rows": rows}] * 5))
    after = _stats(server.url)
    assert [r.status_code for r in responses] == [200, 400, 200] * 5
    assert "column 'C1', row 2" in responses[1].json()["error"]
    assert after["execution_count"] - before["execution_count"] < 15  # they shared batches
    assert after["inference_count"] - before["inference_count"] == 10 * 4


def test_openapi_documents_the_score_route_with_examples(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    body = spec["paths"]["/v1/models/{name}/score"]["post"]["requestBody"]
    assert set(body["content"]["application/json"]["examples"]) == {"rows", "columns"}
    assert httpx.get(server.url + "/docs").status_code == 200


def test_batching_can_be_switched_off(trained):
    rows = request_rows(trained["rows_file"])
    with ServiceProcess(trained["repo"], "--no-batching") as server:
        responses = asyncio.run(_post_all(server.url, [{"rows": [row]} for row in rows[:40]]))
        stats = _stats(server.url)
    assert all(r.status_code == 200 for r in responses)
    assert stats["execution_count"] == stats["inference_count"] == 40


def test_polling_serves_a_new_version_without_a_call(trained, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(trained["repo"], repo)
    body = {"rows": request_rows(trained["rows_file"])[:2]}
    with ServiceProcess(repo, "--poll-interval-s", "0.2") as server:
        assert httpx.post(server.url + SCORE, json=body).json()["version"] == 1
        export_checkpoint(trained["checkpoint"], repo, "ctr", version=2, log=lambda _: None)
        _wait_for(lambda: httpx.post(server.url + SCORE, json=body).json()["version"] == 2)


class _SteadyLoad:
    """Threads posting requests back to back until stopped; records every answer."""

    def __init__(self, url: str, body: dict, threads: int = 4) -> None:
        self.url, self.body = url, body
        self.answers: list[tuple[int, int | None]] = []
        #: Each thread's versions in the order its requests were answered.
        self.versions_by_thread: list[list[int | None]] = [[] for _ in range(threads)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(versions,))
                         for versions in self.versions_by_thread]

    def _run(self, versions: list[int | None]) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for _ in range(100_000):
                if self._stop.is_set():
                    return
                response = client.post(SCORE, json=self.body)
                version = response.json().get("version") if response.status_code == 200 else None
                versions.append(version)
                self.answers.append((response.status_code, version))

    def __enter__(self) -> "_SteadyLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met in time")


def test_hot_swap_under_load_fails_no_request_and_a_broken_version_leaves_the_old_one(
        trained, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(trained["repo"], repo)
    body = {"rows": request_rows(trained["rows_file"])[:20]}
    with ServiceProcess(repo) as server, _SteadyLoad(server.url, body) as load:
        _wait_for(lambda: len(load.answers) > 20)
        export_checkpoint(trained["checkpoint"], repo, "ctr", version=2, log=lambda _: None)
        swapped = httpx.post(server.url + "/v2/repository/models/ctr/load", timeout=120)
        assert swapped.status_code == 200 and swapped.json()["version"] == 2
        _wait_for(lambda: load.answers[-1] == (200, 2))
        seen = len(load.answers)
        broken = repo / "ctr" / "3"
        shutil.copytree(repo / "ctr" / "2", broken)
        with open(broken / "model.onnx", "r+b") as handle:
            handle.seek(100)
            handle.write(b"\xff" * 16)
        refused = httpx.post(server.url + "/v2/repository/models/ctr/load", timeout=120)
        _wait_for(lambda: len(load.answers) > seen + 20)
        index = httpx.post(server.url + "/v2/repository/index", timeout=30).json()
    assert refused.status_code == 400
    assert "version 3 failed to load" in refused.json()["error"]
    assert "sha256 mismatch" in refused.json()["error"]
    codes = {code for code, _ in load.answers}
    assert codes == {200}, f"failed requests during the swap: {codes}"
    for versions in load.versions_by_thread:
        assert versions[0] == 1 and versions[-1] == 2
        assert versions == sorted(versions)  # once a client saw version 2, never 1 again
    (entry,) = index
    assert entry["state"] == "READY" and entry["version"] == "2"
    assert "version 3 failed to load" in entry["reason"]


def test_load_and_unload_through_one_worker_take_effect_in_both(trained, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(trained["repo"], repo)
    export_checkpoint(trained["checkpoint"], repo, "ctr", version=2, log=lambda _: None)
    body = {"rows": request_rows(trained["rows_file"])[:2]}
    token = {"Authorization": "Bearer s3cret"}

    def answers(count: int = 24) -> set:
        seen = set()
        for _ in range(count):  # a fresh connection each time: the kernel spreads them
            response = httpx.post(server.url + SCORE, json=body, timeout=30)
            seen.add((response.status_code, response.json().get("version")))
        return seen

    with ServiceProcess(repo, "--workers", "2", "--admin-token", "s3cret",
                        env={"CTRSERVE_CONTROL_INTERVAL_S": "0.1"}) as server:
        pids = {httpx.get(server.url + "/v2/health/live").headers.get("x-worker-pid")
                for _ in range(30)}
        assert answers() == {(200, 2)}
        denied = httpx.post(server.url + "/v2/repository/models/ctr/unload", timeout=30)
        assert denied.status_code == 401
        assert httpx.post(server.url + "/v2/repository/models/ctr/unload", headers=token,
                          timeout=60).status_code == 200
        _wait_for(lambda: answers(8) == {(503, None)})
        assert answers() == {(503, None)}
        pinned = httpx.post(server.url + "/v2/repository/models/ctr/load", headers=token,
                            json={"parameters": {"version": 1}}, timeout=120)
        assert pinned.status_code == 200 and pinned.json()["version"] == 1
        _wait_for(lambda: answers(8) == {(200, 1)})
        assert answers() == {(200, 1)}
    assert len(pids) == 2, f"requests reached {pids}"
    record = json.loads((repo / ".ctrserve" / "control.json").read_text())
    assert record["models"]["ctr"] == {"loaded": True, "version": 1}


def test_column_parts_keep_their_missing_values_when_batched():
    """The batcher joins int columns with nulls (masked from MASKED_FROM_ROWS rows, objects
    below), plain int columns and text columns without losing a missing value."""
    from ctrserve.service.batcher import _concatenate
    from ctrserve.service.friendly import MASKED_FROM_ROWS, _categorical

    long = [7, None] * MASKED_FROM_ROWS
    masked = _categorical("C1", "int", long, len(long))
    short = _categorical("C1", "int", [None, 3], 2)
    plain = _categorical("C1", "int", [4, 5], 2)
    text = _categorical("C1", "int", ["x9", None], 2)
    assert isinstance(masked, np.ma.MaskedArray) and short.dtype == object
    joined = _concatenate([masked, plain])
    assert isinstance(joined, np.ma.MaskedArray)
    assert joined.filled(-1).tolist() == [7, -1] * MASKED_FROM_ROWS + [4, 5]
    mixed = _concatenate([plain, masked, short, text])
    assert mixed.dtype == object
    assert mixed.tolist() == [4, 5, *long, None, 3, "x9", None]
