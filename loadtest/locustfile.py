"""Locust scenarios for ctrserve: a realistic mix of the service's requests.

- ``rank candidates``: a ranking query as friendly JSON columns, its candidate count drawn from a
  long-tailed (lognormal) distribution with a mean near 270 (MLPerf's DLRM server queries);
- ``single row``: one row as friendly JSON (``{"rows": [...]}``);
- ``v2 binary``: Open Inference Protocol v2 with Triton's binary tensors, long-tailed counts;
- ``rank entities``: entity-keyed ``POST /v1/models/{name}/rank`` (features joined from the
  feature store), only when ``CTRSERVE_LOCUST_RANK`` is set (see below): it needs a model with a
  feature view and a loaded store (Redis).

Headless, bounded, loopback only by default (the host must be 127.0.0.0/8, localhost or
[::1]):

    CTRSERVE_LOCUST_PACKAGE=runs/demo/repo/demo/1 locust -f loadtest/locustfile.py --headless \\
        --host http://127.0.0.1:8000 -u 32 -r 32 --run-time 60s --csv runs/locust/demo

A staging cluster (docs/kubernetes.md) is a target only when named, exactly, besides the host:
``--allow-host staging.example.com`` (or ``CTRSERVE_LOCUST_ALLOW_HOST``) with
``--host https://staging.example.com``; any other host is still refused.

Settings (environment):

- ``CTRSERVE_LOCUST_PACKAGE``: the served model's package (its manifest and transform build the
  bodies; default ``runs/demo/repo/demo/1``); ``CTRSERVE_LOCUST_DATA``: raw rows (Parquet) to
  send instead of synthesised ones;
- ``CTRSERVE_LOCUST_MIX``: task weights, e.g. ``rank=4,single=4,v2=2,entities=2`` (the default);
- ``CTRSERVE_LOCUST_RANK``: JSON ``{"model": "rank", "entity": ["user", "u", 1000], "candidate":
  ["item", "i", 5000], "context": {"hour": 14}}``: ids ``u0..u999`` and ``i0..i4999``.

Bodies are built once when the file is imported; each answer is checked (status and the number
of probabilities).
"""

from __future__ import annotations

import ipaddress
import json
import os
from urllib.parse import urlsplit

import numpy as np
import orjson
from locust import FastHttpUser, between, events, task  # noqa: F401 - between for users

from ctrserve.loadtest.payloads import RowPool, candidate_counts

PACKAGE = os.environ.get("CTRSERVE_LOCUST_PACKAGE", "runs/demo/repo/demo/1")
DATA = os.environ.get("CTRSERVE_LOCUST_DATA") or None
MIX = dict(part.split("=") for part in os.environ.get(
    "CTRSERVE_LOCUST_MIX", "rank=4,single=4,v2=2,entities=2").split(",") if part)
RANK = json.loads(os.environ["CTRSERVE_LOCUST_RANK"]) if os.environ.get(
    "CTRSERVE_LOCUST_RANK") else None
BODIES = 200

_pool = RowPool(PACKAGE, rows=8192, data=DATA)
_rng = np.random.default_rng(0)
_sizes = candidate_counts(_rng, BODIES)
RANK_BODIES = _pool.bodies_of_sizes("columns", list(_sizes))
V2_BODIES = _pool.bodies_of_sizes("v2-binary", list(candidate_counts(_rng, BODIES)))
SINGLE_BODIES = _pool.bodies("rows", 1, BODIES)
MODEL = _pool.model


def _is_loopback(host: str) -> bool:
    name = urlsplit(host).hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@events.init_command_line_parser.add_listener
def _allow_host_flag(parser) -> None:
    parser.add_argument("--allow-host", default="", env_var="CTRSERVE_LOCUST_ALLOW_HOST",
                        help="a host name besides loopback that this file may target (a "
                             "staging cluster), exactly as in --host")


@events.init.add_listener
def _loopback_only(environment, **_) -> None:
    """Refuses any host but loopback and the one named by --allow-host."""
    host = environment.host or ""
    options = environment.parsed_options
    allowed = (options.allow_host if options is not None else "").lower()
    if not (_is_loopback(host) or (allowed and (urlsplit(host).hostname or "") == allowed)):
        raise SystemExit(f"ctrserve's locustfile only targets loopback addresses, not "
                         f"{host!r} (name a staging host with --allow-host)")


@events.test_start.add_listener
def _describe(environment, **_) -> None:
    print(f"ctrserve locust: model {MODEL}, ranking candidates per query: mean "
          f"{_sizes.mean():.0f}, p50 {np.median(_sizes):.0f}, p99 "
          f"{np.percentile(_sizes, 99):.0f}; rank entities "
          f"{'on' if RANK else 'off (CTRSERVE_LOCUST_RANK unset)'}", flush=True)


def _check_json(response, rows: int) -> None:
    if response.status_code != 200:
        # no text when the request never got an answer (the host unreachable)
        response.failure(f"status {response.status_code}: {(response.text or '')[:200]}")
        return
    got = len(orjson.loads(response.content)["probabilities"])
    if got != rows:
        response.failure(f"{got} probabilities for {rows} rows")


def _check_binary(response, rows: int) -> None:
    if response.status_code != 200:
        response.failure(f"status {response.status_code}: {(response.text or '')[:200]}")
        return
    header = int(response.headers["Inference-Header-Content-Length"])
    if len(response.content) - header != 4 * rows:
        response.failure(f"{len(response.content) - header} bytes of probabilities for {rows} "
                         "rows")


class ScoringUser(FastHttpUser):
    """One client: the mix of requests, back to back (add ``wait_time`` for think time)."""

    def on_start(self) -> None:
        self.k = int(_rng.integers(0, BODIES))

    def _next(self, bodies):
        self.k += 1
        return bodies[self.k % len(bodies)]

    @task(int(MIX.get("rank", 0)))
    def rank_candidates(self) -> None:
        body = self._next(RANK_BODIES)
        with self.client.post(body.path, data=body.data, headers=body.headers,
                              name="rank candidates (columns)", catch_response=True) as answer:
            _check_json(answer, body.rows)

    @task(int(MIX.get("single", 0)))
    def single_row(self) -> None:
        body = self._next(SINGLE_BODIES)
        with self.client.post(body.path, data=body.data, headers=body.headers,
                              name="single row (rows)", catch_response=True) as answer:
            _check_json(answer, 1)

    @task(int(MIX.get("v2", 0)))
    def v2_binary(self) -> None:
        body = self._next(V2_BODIES)
        with self.client.post(body.path, data=body.data, headers=body.headers,
                              name="v2 binary", catch_response=True) as answer:
            _check_binary(answer, body.rows)

    @task(int(MIX.get("entities", 0)) if RANK else 0)
    def rank_entities(self) -> None:
        if RANK is None:  # never picked then: its weight is 0
            return
        entity, prefix, count = RANK["entity"]
        candidate, item_prefix, items = RANK["candidate"]
        n = int(self._next(_sizes))
        chosen = _rng.integers(0, items, n)
        body = {"entities": {entity: f"{prefix}{int(_rng.integers(0, count))}"},
                "context": RANK.get("context", {}),
                "candidates": [{candidate: f"{item_prefix}{int(i)}"} for i in chosen]}
        with self.client.post(f"/v1/models/{RANK.get('model', MODEL)}/rank",
                              # locust annotates data as str | dict, but sends bytes as they are
                              data=orjson.dumps(body),  # type: ignore[arg-type]
                              headers={"Content-Type": "application/json"},
                              name="rank entities", catch_response=True) as answer:
            _check_json(answer, n)
