"""Model packages from S3-compatible object storage (``--repo s3://BUCKET/PREFIX``), against a
real S3-compatible server: moto's server mode, started here on a free loopback port and stopped
by its PID, written to with boto3.

A served replica under a stream of requests: a new version uploaded is fetched, checked and
served with no failed request; a next version with one object damaged (its size kept, so only
the sha256 can tell) never lands in the cache nor serves, the old version keeps serving, and the
failure is reported (log, repository index, load-failure counter); a replica started afterwards
with an empty cache serves the last good version. In-process: a package right under the prefix,
a file the manifest lists that the bucket lacks (reported once, fetched once it is there), a
manifest naming a file outside the package, and the extra named when boto3 is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from servers import (
    HOST,
    ServiceProcess,
    free_port,
    request_rows,
    stop_group,
    wait_until,
)
from test_service import _SteadyLoad

from ctrserve.export.package import MANIFEST, load_version
from ctrserve.service.object_store import ObjectStoreRepository
from ctrserve.service.settings import ServiceSettings

MODEL_FILE = "model.onnx"


@dataclass
class S3Server:
    endpoint: str
    #: The environment a client of this server needs: boto3's standard variables only.
    env: dict[str, str]
    client: Any


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    directory = tmp_path_factory.mktemp("moto")
    port = free_port()
    endpoint = f"http://{HOST}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test-key",
           "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1",
           # no config or credentials file of this machine's user takes part
           "AWS_CONFIG_FILE": str(directory / "config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(directory / "credentials")}
    log = open(directory / "moto.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                          region_name=env["AWS_DEFAULT_REGION"])
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto's server exited:\n{(directory / 'moto.log').read_text()}")
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield S3Server(endpoint, env, client)
    finally:
        stop_group(process, timeout=15)
        log.close()


def _upload(client, bucket: str, prefix: str, package: Path, version: int,
            damaged: str | None = None) -> None:
    """Uploads a package under ``prefix`` as ``version`` (its manifest says so; the other files
    are the package's own, so the manifest's records of them hold), the manifest last, as a
    publisher should. ``damaged``: that file's middle byte flipped, its size kept."""
    manifest = json.loads((package / MANIFEST).read_text())
    manifest["version"] = version
    for relative in manifest["files"]:
        data = bytearray((package / relative).read_bytes())
        if relative == damaged:
            data[len(data) // 2] ^= 0xFF
        client.put_object(Bucket=bucket, Key=prefix + relative, Body=bytes(data))
    client.put_object(Bucket=bucket, Key=prefix + MANIFEST, Body=json.dumps(manifest).encode())


def _index_row(server: ServiceProcess, name: str) -> dict:
    index = httpx.post(f"{server.url}/v2/repository/index", json={}, timeout=10).json()
    (row,) = [row for row in index if row["name"] == name]
    return row


def _load_failures(server: ServiceProcess) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "ctrserve_model_load_failures_total"
               and sample.labels.get("model") == "ctr")


def test_new_versions_serve_under_load_and_a_damaged_one_never_does(trained, s3, tmp_path):
    bucket, prefix = "swap", "prod/repository"
    s3.client.create_bucket(Bucket=bucket)
    package = trained["repo"] / "ctr" / "1"
    _upload(s3.client, bucket, f"{prefix}/ctr/1/", package, 1)
    url, cache = f"s3://{bucket}/{prefix}", tmp_path / "cache"
    body = {"rows": request_rows(trained["rows_file"])[:4]}
    started = time.monotonic()
    with (ServiceProcess(url, "--repo-cache", str(cache), "--poll-interval-s", "0.3",
                         env=s3.env, log_dir=tmp_path) as server,
          _SteadyLoad(server.url, body) as load):
        wait_until(lambda: all(load.versions_by_thread) and len(load.answers) > 20,
                   "answers at version 1 on every client", timeout=90)
        _upload(s3.client, bucket, f"{prefix}/ctr/2/", package, 2)
        uploaded = time.monotonic()
        wait_until(lambda: load.answers[-1] == (200, 2), "version 2 served", timeout=90)
        print(f"version 2 served {time.monotonic() - uploaded:.1f} s after its upload "
              f"({len(load.answers)} answers so far)")

        _upload(s3.client, bucket, f"{prefix}/ctr/3/", package, 3, damaged=MODEL_FILE)
        wait_until(lambda: "version 3" in _index_row(server, "ctr")["reason"],
                   "the damaged version reported", timeout=90)
        reported = len(load.answers)
        wait_until(lambda: len(load.answers) > reported + 20, "answers after the report",
                   timeout=90)
        row = _index_row(server, "ctr")
        failures = _load_failures(server)
        log = server.log_path.read_text()
    statuses = {status for status, _ in load.answers}
    print(f"{len(load.answers)} answers in {time.monotonic() - started:.1f} s, statuses "
          f"{statuses}; index row {row}")
    assert statuses == {200}
    # Each client saw version 1, then version 2 from its first answer at 2 on.
    for versions in load.versions_by_thread:
        assert versions[0] == 1 and set(versions[versions.index(2):]) == {2}, versions
    assert row["state"] == "READY" and row["version"] == "2"
    assert f"{MODEL_FILE}: sha256 mismatch" in row["reason"] and url in row["reason"]
    assert failures >= 1 and "version 3 not fetched" in log
    local = cache / bucket / prefix / "ctr"
    assert sorted(p.name for p in local.iterdir()) == ["1", "2"]
    assert not list((cache / bucket / prefix).glob(".fetch-*"))

    # A replica that starts now, with an empty cache: version 3 fails and 2 serves.
    with ServiceProcess(url, "--repo-cache", str(tmp_path / "fresh"), env=s3.env,
                        log_dir=tmp_path) as fresh:
        scored = httpx.post(f"{fresh.url}/v1/models/ctr/score", json=body, timeout=30)
        assert scored.status_code == 200 and scored.json()["version"] == 2
        assert "version 3 not fetched" in _index_row(fresh, "ctr")["reason"]


def test_a_package_at_the_prefix_lands_under_its_name_and_version(trained, s3, tmp_path,
                                                                    monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    s3.client.create_bucket(Bucket="single")
    _upload(s3.client, "single", "models/ctr-3/", trained["repo"] / "ctr" / "1", 3)
    monkeypatch.setenv("CTRSERVE_REPO", "s3://single/models/ctr-3/")
    monkeypatch.setenv("CTRSERVE_REPO_CACHE", str(tmp_path / "cache"))
    settings = ServiceSettings()
    assert settings.repo_in_object_store
    store = ObjectStoreRepository.from_settings(settings)
    assert store.local_root == tmp_path / "cache" / "single" / "models" / "ctr-3"
    assert store.fetch() == [] and store.fetch() == []
    assert load_version(store.local_root, "ctr", 3).version == 3  # every file's sha256 again


def test_a_missing_file_is_reported_once_and_fetched_once_it_is_there(trained, s3, tmp_path,
                                                                       monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    s3.client.create_bucket(Bucket="partial")
    package = trained["repo"] / "ctr" / "1"
    _upload(s3.client, "partial", "ctr/1/", package, 1)
    missing = "transform/vocabulary.npz"
    s3.client.delete_object(Bucket="partial", Key=f"ctr/1/{missing}")
    store = ObjectStoreRepository("s3://partial", tmp_path / "cache", [], {})
    (failure,) = store.fetch()
    assert (failure.name, failure.version) == ("ctr", 1) and "s3://partial/ctr/1/" in (
        failure.reason)
    assert store.fetch() == []  # unchanged: not fetched again
    assert not (store.local_root / "ctr").exists()
    s3.client.put_object(Bucket="partial", Key=f"ctr/1/{missing}",
                         Body=(package / missing).read_bytes())
    assert store.fetch() == []
    assert load_version(store.local_root, "ctr", 1).version == 1


def test_a_manifest_naming_a_file_outside_the_package_is_refused(trained, s3, tmp_path,
                                                                  monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    s3.client.create_bucket(Bucket="escape")
    package = trained["repo"] / "ctr" / "1"
    _upload(s3.client, "escape", "repo/ctr/1/", package, 1)
    manifest = json.loads((package / MANIFEST).read_text())
    manifest["files"]["../../outside.bin"] = {"bytes": 1, "sha256": "0" * 64}
    s3.client.put_object(Bucket="escape", Key=f"repo/ctr/1/{MANIFEST}",
                         Body=json.dumps(manifest).encode())
    store = ObjectStoreRepository("s3://escape/repo", tmp_path / "cache", [], {})
    (failure,) = store.fetch()
    assert "not a file inside the package" in failure.reason
    assert not list((tmp_path / "cache").rglob("outside.bin"))
    assert not (store.local_root / "ctr").exists()


def test_serving_from_s3_without_boto3_names_the_extra(tmp_path):
    code = ("import sys\nsys.modules['boto3'] = None  # as if not installed\n"
            "from ctrserve.cli import main\n"
            f"sys.exit(main(['serve', '--repo', 's3://bucket/prefix', '--repo-cache', "
            f"{str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "it needs boto3: pip install 'ctrserve[s3]'" in done.stderr
