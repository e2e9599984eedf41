"""One error policy over every protocol (``service/dataplane.py``; the table in
``docs/architecture.md``): the friendly API, the Open Inference Protocol v2 and ranking answer
the same status for the same situation, through a real server."""

from __future__ import annotations

import shutil

import httpx
import pytest
from servers import ServiceProcess, request_rows

from ctrserve.service.dataplane import version_number

#: The policy: situation -> (status, whether Retry-After is sent).
POLICY = {
    "served": (200, False),
    "unknown model": (404, False),
    "version not served": (404, False),
    "version not a number": (404, False),
    "version zero": (404, False),
    "known, not loaded": (503, True),
}
#: The model and version each situation names (None: the route without a version).
SITUATIONS = {
    "served": ("ctr", None),
    "unknown model": ("nope", None),
    "version not served": ("ctr", "7"),
    "version not a number": ("ctr", "latest"),
    "version zero": ("ctr", "0"),
    "known, not loaded": ("broken", None),
}


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    repo = tmp_path_factory.mktemp("policy") / "repo"
    shutil.copytree(trained["repo"], repo)
    shutil.copytree(repo / "ctr", repo / "broken")
    with open(repo / "broken" / "1" / "model.onnx", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff" * 16)
    # Readiness waits for every model of the repository: wait for ctr alone.
    with ServiceProcess(repo, ready_path="/v2/models/ctr/ready") as running:
        yield running


def _v1_score(url: str, name: str, version: str | None, rows: list[dict]) -> httpx.Response:
    path = f"/v1/models/{name}" + (f"/versions/{version}" if version else "") + "/score"
    return httpx.post(url + path, json={"rows": rows}, timeout=60)


def _v2_infer(url: str, name: str, version: str | None, rows: list[dict]) -> httpx.Response:
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    columns = {key for row in rows for key in row}
    dense = sorted(c for c in columns if c.startswith("I"))
    inputs = [{"name": c, "datatype": "FP32", "shape": [len(rows)],
               "data": [float("nan") if row.get(c) is None else row[c] for row in rows]}
              for c in dense[:2]]
    return httpx.post(url + path, json={"inputs": inputs}, timeout=60)


def _v2_metadata(url: str, name: str, version: str | None, _: list[dict]) -> httpx.Response:
    return httpx.get(url + f"/v2/models/{name}" + (f"/versions/{version}" if version else ""),
                     timeout=60)


def _v2_ready(url: str, name: str, version: str | None, _: list[dict]) -> httpx.Response:
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/ready"
    return httpx.get(url + path, timeout=60)


def _rank(url: str, name: str, version: str | None, _: list[dict]) -> httpx.Response:
    return httpx.post(url + f"/v1/models/{name}/rank", json={"candidates": [{}]}, timeout=60)


ROUTES = {"v1 score": _v1_score, "v2 infer": _v2_infer, "v2 metadata": _v2_metadata,
          "v2 ready": _v2_ready, "ranking": _rank}
#: Every route in every situation, but versions on ranking, which has no versioned route.
CASES = [(route, situation) for route in ROUTES for situation in SITUATIONS
         if not (route == "ranking" and SITUATIONS[situation][1] is not None)]


@pytest.mark.parametrize(("route", "situation"), CASES)
def test_every_protocol_answers_each_situation_with_the_same_status(server, trained, route,
                                                                    situation):
    name, version = SITUATIONS[situation]
    rows = request_rows(trained["rows_file"])[:2]
    response = ROUTES[route](server.url, name, version, rows)
    status, retry = POLICY[situation]
    if route == "ranking" and situation == "served":
        status = 404  # served, but this model has no feature view to rank with
        assert "has no feature view" in response.json()["error"]
    assert response.status_code == status, response.text
    assert ("retry-after" in response.headers) == retry
    if status != 200:
        assert set(response.json()) == {"error"}
    if situation == "known, not loaded":
        assert "model 'broken' is not loaded: version 1 failed to load" in response.json()["error"]


def test_the_load_body_and_the_path_read_versions_alike():
    assert version_number("12") == version_number(12) == 12
    for wrong in ("0", 0, -3, "1.5", 1.5, "", " 2", "²", True, None):
        with pytest.raises(ValueError):
            version_number(wrong)
