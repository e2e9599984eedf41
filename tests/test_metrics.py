"""/metrics against a real server: counts, histograms, rejections, data quality, memory, and
several workers."""

import asyncio
import json

import httpx
from prometheus_client.parser import text_string_to_metric_families
from servers import ServiceProcess, request_rows

SCORE = "/v1/models/ctr/score"
ROUTE = "/v1/models/{name}/score"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}, parsed by prometheus_client's parser."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(SCORE, json=b) for b in bodies))


def test_counts_histograms_and_memory_match_what_was_sent(trained):
    rows = request_rows(trained["rows_file"])
    manifest = json.loads((trained["repo"] / "ctr" / "1" / "manifest.json").read_text())
    with ServiceProcess(trained["repo"], "--max-queue-delay-us", "5000") as server:
        good = asyncio.run(_post_all(server.url, [{"rows": rows[i:i + 3]} for i in range(0, 21,
                                                                                          3)]))
        bad = [httpx.post(server.url + SCORE, json={"rows": [{"nope": 1}]}) for _ in range(2)]
        made_up = [httpx.post(server.url + f"/v1/models/nosuch{i}/score", json={"rows": rows[:1]})
                   for i in range(3)]
        stats = httpx.get(server.url + "/v2/models/ctr/stats").json()["model_stats"][0]
        samples = scrape(server.url)
    assert [r.status_code for r in good] == [200] * 7 and [r.status_code for r in bad] == [400] * 2
    assert value(samples, "ctrserve_requests_total", model="ctr", route=ROUTE, status="200") == 7
    assert value(samples, "ctrserve_requests_total", model="ctr", route=ROUTE, status="400") == 2
    assert value(samples, "ctrserve_request_seconds_count", model="ctr", route=ROUTE) == 9
    # Names the repository does not have are counted without a model: no series per made-up name.
    assert [r.status_code for r in made_up] == [404] * 3
    assert value(samples, "ctrserve_requests_total", model="", route=ROUTE, status="404") == 3
    assert not any(dict(labels).get("model", "").startswith("nosuch") for _, labels in samples)
    labels = {"model": "ctr", "version": "1"}
    assert value(samples, "ctrserve_scored_rows_total", **labels) == 21
    assert value(samples, "ctrserve_batch_rows_sum", **labels) == 21
    assert value(samples, "ctrserve_batch_rows_count", **labels) == stats["execution_count"]
    assert value(samples, "ctrserve_compute_seconds_count", **labels) == stats["execution_count"]
    assert value(samples, "ctrserve_transform_seconds_count", **labels) == stats["execution_count"]
    assert value(samples, "ctrserve_queue_wait_seconds_count", **labels) == 7
    assert value(samples, "ctrserve_batch_rows_bucket", le="+Inf", **labels) == stats[
        "execution_count"]
    mean = (value(samples, "ctrserve_probability_sum_total", **labels)
            / value(samples, "ctrserve_scored_rows_total", **labels))
    served = [p for r in good for p in r.json()["probabilities"]]
    assert abs(mean - sum(served) / len(served)) < 1e-5
    # Memory series equal the manifest's bytes.
    for table in manifest["tables"]:
        assert value(samples, "ctrserve_embedding_bytes", table=table["table"],
                     **labels) == table["bytes"]
    assert value(samples, "ctrserve_model_embedding_bytes", **labels) == manifest["bytes"][
        "embeddings"]
    ratio = manifest["bytes"]["full_embeddings"] / manifest["bytes"]["embeddings"]
    assert abs(value(samples, "ctrserve_compression_ratio", **labels) - ratio) < 1e-9
    assert value(samples, "ctrserve_model_active", model="ctr", version="1",
                 provider="CPUExecutionProvider") == 1
    assert value(samples, "ctrserve_process_resident_bytes") > 50e6
    assert value(samples, "ctrserve_model_load_seconds_count", model="ctr") == 1


def test_rejections_after_a_full_queue(trained):
    rows = request_rows(trained["rows_file"])[:50]
    with ServiceProcess(trained["repo"], "--max-queue-rows", "100",
                        "--max-queue-delay-us", "300000") as server:
        responses = asyncio.run(_post_all(server.url, [{"rows": rows}] * 30))
        samples = scrape(server.url)
    refused = sum(r.status_code == 503 for r in responses)
    assert refused > 0
    assert value(samples, "ctrserve_rejections_total", model="ctr", reason="queue_full") == refused
    assert value(samples, "ctrserve_requests_total", model="ctr", status="503") == refused


def test_missing_and_out_of_vocabulary_values_are_counted_per_column(trained):
    # C1 holds ids 0..49 in training: 10**12 was never seen. 4 unseen, 3 missing (2 null, 1
    # left out), 3 known values.
    c1 = [10**12] * 4 + [None, None] + [3, 4, 5]
    rows = [{"C1": v, "I1": 1.0} for v in c1] + [{"I1": None}]
    with ServiceProcess(trained["repo"]) as server:
        response = httpx.post(server.url + SCORE, json={"rows": rows})
        samples = scrape(server.url)
    assert response.status_code == 200
    assert value(samples, "ctrserve_feature_oov_total", model="ctr", column="C1") == 4
    assert value(samples, "ctrserve_feature_missing_total", model="ctr", column="C1") == 3
    assert value(samples, "ctrserve_feature_missing_total", model="ctr", column="I1") == 1
    assert value(samples, "ctrserve_feature_missing_total", model="ctr", column="C2") == 10


def test_two_workers_add_up_and_keep_their_gauges(trained):
    rows = request_rows(trained["rows_file"])[:2]
    with ServiceProcess(trained["repo"], "--workers", "2") as server:
        pids = []
        for _ in range(40):  # a new connection each time: the kernel spreads them
            response = httpx.post(server.url + SCORE, json={"rows": rows})
            assert response.status_code == 200
            pids.append(response.headers["x-worker-pid"])
        samples = scrape(server.url)
    assert len(set(pids)) == 2
    assert value(samples, "ctrserve_requests_total", model="ctr", route=ROUTE,
                 status="200") == 40
    assert value(samples, "ctrserve_scored_rows_total", model="ctr") == 80
    rss_pids = {dict(labels)["pid"] for (name, labels) in samples
                if name == "ctrserve_process_resident_bytes"}
    assert rss_pids == set(pids)
    assert value(samples, "ctrserve_model_active", model="ctr", version="1",
                 provider="CPUExecutionProvider") == 1
