"""Redis: the online feature store behind ranking requests, rollout across replicas, and Redis
faults, against a real redis-server started here on a free loopback port."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import redis
from servers import HOST, ServiceProcess, free_port

from ctrserve.demo import RANK_VIEW
from ctrserve.export.exporter import export_checkpoint
from ctrserve.models.data import DataConfig
from ctrserve.models.dlrm import ModelConfig
from ctrserve.models.embeddings.scheme_settings import EmbeddingConfig, QRSettings
from ctrserve.models.generate import EntityConfig, write_entities, write_entity_joined
from ctrserve.models.train import TrainConfig, fit
from ctrserve.models.transform import TransformConfig


class RedisServer:
    """redis-server on a free loopback port, its data kept across restarts (append-only file)."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None:
            if os.environ.get("CI"):
                raise RuntimeError("redis-server is missing: scripts/setup.sh installs it")
            pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.directory = directory
        self.process: subprocess.Popen | None = None
        self.client: redis.Redis | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host=HOST, port=self.port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)

    def reads_processed(self) -> int:
        """Redis's count of reads from client sockets; this client's connection stays open, so
        each call adds exactly its own one read (a new connection's handshake adds several)."""
        if self.client is None:
            self.client = redis.Redis(host=HOST, port=self.port)
        return int(self.client.info("stats")["total_reads_processed"])


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ranked(tmp_path_factory) -> dict:
    """A model trained on users x items interactions, exported with a feature view."""
    root = tmp_path_factory.mktemp("ranking")
    write_entities(EntityConfig(n_users=300, n_items=120, n_rows=8000, seed=2), root,
                   progress=False)
    data = DataConfig(path=str(write_entity_joined(root)), format="parquet",
                      spec_path=str(root / "spec.json"), split="random")
    model = ModelConfig(dim=8, bottom=(16,), top=(16,), embeddings=EmbeddingConfig(
        default=QRSettings(min_rows=50, collisions=4)))
    fit(data, model, TrainConfig(epochs=1, batch_size=256, progress=False), TransformConfig(),
        str(root / "ckpt"))
    repo = root / "repo"
    export_checkpoint(root / "ckpt", repo, "rank", log=lambda _: None)
    for name in ("users.parquet", "items.parquet"):
        shutil.copy(root / name, repo / "rank" / name)
    (repo / "rank" / "feature_view.json").write_text(json.dumps(RANK_VIEW))
    return {"root": root, "repo": repo, "checkpoint": root / "ckpt",
            "users": pq.read_table(root / "users.parquet").to_pylist(),
            "items": pq.read_table(root / "items.parquet").to_pylist()}


def _load_features(redis_url: str, root: Path) -> None:
    for entity, key, name in (("user", "user_id", "users"), ("item", "item_id", "items")):
        result = subprocess.run(
            [sys.executable, "-m", "ctrserve", "features", "load", "--redis", redis_url,
             "--entity", entity, "--key-column", key, str(root / f"{name}.parquet"),
             "--no-progress"],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr


def _rank_body(ranked: dict, user: int, items: list[int]) -> dict:
    return {"entities": {"user": ranked["users"][user]["user_id"]},
            "context": {"hour": 14, "device": "ios"},
            "candidates": [{"item": ranked["items"][i]["item_id"]} for i in items]}


def _same_rows_inline(ranked: dict, user: int, items: list[int]) -> list[dict]:
    """What the ranking request joins, written out by hand as friendly rows."""
    rows = []
    for i in items:
        row = {**ranked["users"][user], **ranked["items"][i], "hour": 14, "device": "ios"}
        rows.append(row)
    return rows


def test_ranking_joins_stored_features_in_one_round_trip(ranked, redis_server):
    _load_features(redis_server.url, ranked["root"])
    items = list(range(0, 60, 3))
    body = _rank_body(ranked, 5, items)
    quiet = {"CTRSERVE_CONTROL_INTERVAL_S": "1000"}  # no periodic control reads in the count
    with ServiceProcess(ranked["repo"], "--redis-url", redis_server.url, env=quiet) as server:
        inline = httpx.post(server.url + "/v1/models/rank/score",
                            json={"rows": _same_rows_inline(ranked, 5, items)}, timeout=60)
        httpx.post(server.url + "/v1/models/rank/rank", json=body, timeout=60)  # warm
        redis_server.reads_processed()  # opens the counting connection
        before = redis_server.reads_processed()
        answers = [httpx.post(server.url + "/v1/models/rank/rank", json=body, timeout=60)
                   for _ in range(5)]
        after = redis_server.reads_processed()
        missing = httpx.post(server.url + "/v1/models/rank/rank", timeout=60, json={
            "entities": {"user": "nobody"}, "candidates": [{"item": "nothing"}]})
        metrics = httpx.get(server.url + "/metrics").text
    assert inline.status_code == 200, inline.text
    for answer in answers:
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["probabilities"],
                                   inline.json()["probabilities"], atol=1e-6, rtol=0)
    assert after - before == len(answers) + 1  # one read per request, plus this INFO's own
    assert missing.status_code == 200
    assert missing.json()["missing_entities"] == ["user:nobody", "item:nothing"]
    assert 'ctrserve_missing_entities_total{entity="user",model="rank"} 1.0' in metrics


def test_the_embedded_store_serves_the_same_ranking_without_redis(ranked):
    items = [1, 2, 3, 50]
    with ServiceProcess(ranked["repo"]) as server:
        ranked_answer = httpx.post(server.url + "/v1/models/rank/rank",
                                   json=_rank_body(ranked, 7, items), timeout=60)
        inline = httpx.post(server.url + "/v1/models/rank/score",
                            json={"rows": _same_rows_inline(ranked, 7, items)}, timeout=60)
        unknown = httpx.post(server.url + "/v1/models/rank/rank", timeout=60,
                             json={"entities": {"shop": "s1"}, "candidates": []})
    assert ranked_answer.status_code == 200, ranked_answer.text
    np.testing.assert_allclose(ranked_answer.json()["probabilities"],
                               inline.json()["probabilities"], atol=1e-6, rtol=0)
    assert unknown.status_code == 400 and "unknown entity 'shop'" in unknown.json()["error"]


def test_redis_down_fails_only_entity_requests_fast_and_recovers(ranked, redis_server):
    _load_features(redis_server.url, ranked["root"])
    body = _rank_body(ranked, 3, [1, 2])
    inline = {"rows": _same_rows_inline(ranked, 3, [1, 2])}
    with ServiceProcess(ranked["repo"], "--redis-url", redis_server.url,
                        "--redis-timeout-ms", "200") as server:
        assert httpx.post(server.url + "/v1/models/rank/rank", json=body).status_code == 200
        redis_server.stop()
        timings, codes = [], []
        for _ in range(5):
            started = time.monotonic()
            response = httpx.post(server.url + "/v1/models/rank/rank", json=body, timeout=30)
            timings.append(time.monotonic() - started)
            codes.append(response.status_code)
        error = response.json()["error"]
        inline_codes = [httpx.post(server.url + "/v1/models/rank/score", json=inline).status_code
                        for _ in range(5)]
        ready = httpx.get(server.url + "/v2/health/ready").status_code
        redis_server.start()
        deadline = time.monotonic() + 15
        recovered = None
        while time.monotonic() < deadline:
            recovered = httpx.post(server.url + "/v1/models/rank/rank", json=body, timeout=30)
            if recovered.status_code == 200:
                break
            time.sleep(0.1)
        metrics = httpx.get(server.url + "/metrics").text
    assert codes == [503] * 5 and "feature store" in error
    assert max(timings) < 0.2 + 1.0
    assert inline_codes == [200] * 5
    assert ready == 200  # Redis is not required for readiness unless configured
    assert recovered is not None and recovered.status_code == 200
    assert "ctrserve_feature_store_errors_total" in metrics


def _served_version(url: str) -> int | None:
    response = httpx.post(url + "/v1/models/rank/score", json={"rows": [{}]}, timeout=30)
    return response.json().get("version") if response.status_code == 200 else None


def _converge(urls: list[str], version: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_served_version(url) == version for url in urls):
            return
        time.sleep(0.1)
    raise AssertionError(f"replicas serve {[_served_version(u) for u in urls]}, not {version}")


def test_replicas_converge_on_a_loaded_version_even_when_redis_misses_the_notice(
        ranked, redis_server, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ranked["repo"], repo)
    export_checkpoint(ranked["checkpoint"], repo, "rank", version=2, log=lambda _: None)
    flags = ("--redis-url", redis_server.url)
    env = {"CTRSERVE_CONTROL_INTERVAL_S": "0.2"}
    with ServiceProcess(repo, *flags, env=env) as a, ServiceProcess(repo, *flags, env=env) as b:
        assert _served_version(a.url) == _served_version(b.url) == 2
        pinned = httpx.post(a.url + "/v2/repository/models/rank/load", timeout=60,
                            json={"parameters": {"version": 1}})
        assert pinned.status_code == 200 and pinned.json()["recorded"] is True
        _converge([a.url, b.url], 1)

        redis_server.stop()
        offline = httpx.post(a.url + "/v2/repository/models/rank/load", timeout=60,
                             json={"parameters": {"version": 2}})
        assert offline.status_code == 200 and offline.json()["recorded"] is False
        assert _served_version(a.url) == 2 and _served_version(b.url) == 1
        redis_server.start()
        _converge([a.url, b.url], 2)
        record = redis.Redis.from_url(redis_server.url).hget("ctrserve:control:models", "rank")
    assert json.loads(record) == {"loaded": True, "version": 2}
