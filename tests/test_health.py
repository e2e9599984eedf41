"""Health that means serving: readiness against the models a replica is to serve, explicit
unloads and loads, waiting for a volume filled after the start, versions refused once until
their files change, and ONNX Runtime's threads sized by the CPUs the process may use. Real
servers on loopback (``ServiceProcess``); cgroup files written in a temporary directory."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import ServiceProcess, request_rows, wait_until

from ctrserve.export.exporter import export_checkpoint
from ctrserve.export.package import PackageError, files_fingerprint, load_version
from ctrserve.service.runtime import cgroup_cpu_limit, cpu_threads, usable_cpus

INFO = ("--log-level", "info")


def _publish(source: Path, destination: Path, name: str | None = None) -> None:
    """Copies a model or version directory into place at once, as the exporter does (a hidden
    staging copy, then a rename), so that no scan sees half of it; with ``name``, a model
    directory's manifests are renamed to it (a second model from the first's files)."""
    staging = destination.parent / f".staging-{destination.name}"
    shutil.copytree(source, staging)
    for manifest in staging.glob("*/manifest.json") if name else []:
        record = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**record, "name": name}))
    staging.rename(destination)


def _repo_with_two_models(trained: dict, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(trained["repo"], repo)
    _publish(repo / "ctr", repo / "other", name="other")
    return repo


def _ready(server: ServiceProcess) -> httpx.Response:
    return httpx.get(server.url + "/v2/health/ready", timeout=10)


def _repository(server: ServiceProcess, name: str, action: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/repository/models/{name}/{action}", timeout=120)


def _score(server: ServiceProcess, name: str, rows: list[dict]) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{name}/score", json={"rows": rows}, timeout=60)


def _full_log(server: ServiceProcess) -> str:
    return server.log_path.read_text()


def _load_failures(server: ServiceProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "ctrserve_model_load_failures_total"
                    and sample.labels.get("model") == name):
                return sample.value
    return 0.0


# -- readiness: the models this replica is to serve ------------------------------------------

def test_an_explicit_unload_leaves_the_replica_ready_also_after_a_restart(trained, tmp_path):
    repo = _repo_with_two_models(trained, tmp_path)
    rows = request_rows(trained["rows_file"])[:2]
    with ServiceProcess(repo, *INFO) as server:  # every model of the repository: both
        assert _repository(server, "other", "unload").status_code == 200
        assert _ready(server).status_code == 200
        assert _score(server, "other", rows).status_code == 503
        assert _score(server, "ctr", rows).status_code == 200
        # The thread count, and where it comes from, is said once at start.
        assert "ONNX Runtime sessions run" in _full_log(server)
        assert "usable CPUs (the CPU" in _full_log(server)

    # The control record keeps `other` unloaded across the restart, and readiness with it.
    with ServiceProcess(repo, *INFO) as server:
        assert _ready(server).json() == {"ready": True}
        assert httpx.get(server.url + "/v2/models/other/ready", timeout=10).status_code == 503
        assert _repository(server, "other", "load").status_code == 200
        assert _ready(server).status_code == 200
        # Nothing served at all is not ready, whatever was asked for: the reason is in the
        # body, and in the log once, however often the probe asks.
        for name in ("ctr", "other"):
            assert _repository(server, name, "unload").status_code == 200
        probes = [_ready(server) for _ in range(5)]
        assert {p.status_code for p in probes} == {503}
        assert probes[0].json()["error"] == f"no model is served from {repo}"
        assert _full_log(server).count("not ready: no model is served") == 1
        assert _repository(server, "ctr", "load").status_code == 200
        assert _ready(server).status_code == 200
        # At the start, and once ctr was loaded again.
        assert _full_log(server).count("ready: serving ctr version 1") == 2


def test_a_repository_the_server_cannot_write_takes_loads_and_unloads_unrecorded(trained,
                                                                                 tmp_path):
    """A read-only volume (KServe's /mnt/models): the control record cannot be written, so a
    load or unload holds in the worker and says it was not recorded; never a 500. (A file where
    the record's folder should be makes the write fail for root too.)"""
    repo = _repo_with_two_models(trained, tmp_path)
    (repo / ".ctrserve").write_text("not a folder")
    rows = request_rows(trained["rows_file"])[:2]
    with ServiceProcess(repo, *INFO, "--workers", "1") as server:
        unloaded = _repository(server, "other", "unload")
        assert unloaded.status_code == 200, unloaded.text
        assert unloaded.json()["recorded"] is False
        assert _score(server, "other", rows).status_code == 503
        loaded = _repository(server, "other", "load")
        assert loaded.status_code == 200 and loaded.json()["recorded"] is False
        assert _score(server, "other", rows).status_code == 200
        time.sleep(2)  # a few control checks, each retrying the write
        log = _full_log(server)
        # Said once per change, not at every retry.
        assert log.count("cannot write the control record") == 2, log[-2000:]


def test_an_explicitly_loaded_model_is_waited_for_after_a_restart(trained, tmp_path):
    repo = _repo_with_two_models(trained, tmp_path)
    with ServiceProcess(repo, "--models", "ctr") as server:
        assert httpx.get(server.url + "/v2/models/other/ready", timeout=10).status_code == 503
        assert _repository(server, "other", "load").status_code == 200
        assert _ready(server).status_code == 200
    (repo / "other" / "1" / "model.onnx").write_bytes(b"not a model")

    # The record says `other` was loaded: it joins what readiness waits for, and it fails.
    server = ServiceProcess(repo, "--models", "ctr", ready_path="/v2/models/ctr/ready")
    with server:
        refused = _ready(server)
        assert refused.status_code == 503
        assert refused.json()["error"].startswith(
            "models not loaded: other (version 1 failed to load: ")
        assert _full_log(server).count("not ready: models not loaded: other") == 1
        assert _repository(server, "other", "unload").status_code == 200
        assert _ready(server).status_code == 200


# -- waiting for models ----------------------------------------------------------------------

def test_a_server_waits_for_a_volume_filled_after_it_starts(trained, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    server = ServiceProcess(repo, "--wait-for-models-s", "120", "--poll-interval-s", "0.5")
    try:
        time.sleep(2)
        assert server.process.poll() is None, server.log()  # waiting, not refusing
        _publish(trained["repo"] / "ctr", repo / "ctr")
        published = time.monotonic()
        server.wait_ready()
        ready_s = time.monotonic() - published
        # A model that appears later is loaded by the next scan.
        _publish(trained["repo"] / "ctr", repo / "other", name="other")
        published = time.monotonic()
        wait_until(lambda: httpx.get(server.url + "/v2/models/other/ready",
                                     timeout=10).status_code == 200, "other is loaded",
                   timeout=60)
        print(f"waiting server: ready {ready_s:.1f} s after the first package appeared, "
              f"the second model served {time.monotonic() - published:.1f} s after it did")
        assert _ready(server).status_code == 200
        assert f"no model package in {repo} yet: waiting up to 120 s" in _full_log(server)
    finally:
        server.stop()


def test_a_server_that_waits_in_vain_refuses_to_start(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    server = ServiceProcess(repo, "--wait-for-models-s", "1")
    try:
        server.process.wait(timeout=60)
    finally:
        server.stop()
    assert server.process.returncode == 1
    assert (f"no model to serve: {repo} holds no model package after waiting 1 s"
            in _full_log(server))


# -- a version whose manifest disagrees with its directory ------------------------------------

def test_a_manifest_that_disagrees_with_its_directory_is_refused(trained, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(trained["repo"], repo)
    shutil.copytree(repo / "ctr" / "1", repo / "ctr" / "2")
    _publish(repo / "ctr", repo / "other")  # `other`'s manifest still says `ctr`
    with pytest.raises(PackageError, match="the manifest says model 'ctr' version 1, the "
                                           "directory is model 'ctr' version 2"):
        load_version(repo, "ctr", 2)
    with pytest.raises(PackageError, match="the manifest says model 'ctr' version 1, the "
                                           "directory is model 'other' version 1"):
        load_version(repo, "other", 1)
    assert load_version(repo, "ctr", 1).version == 1
    before = files_fingerprint(repo / "ctr" / "2")
    manifest = repo / "ctr" / "2" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 1', '"version": 2'))
    assert files_fingerprint(repo / "ctr" / "2") != before


def test_a_copied_version_is_refused_once_and_loaded_when_fixed(trained, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(trained["repo"], repo)
    rows = request_rows(trained["rows_file"])[:2]
    poll_s = 0.3
    with ServiceProcess(repo, "--poll-interval-s", str(poll_s)) as server:
        # `cp -r ctr/1 ctr/2`, done at once: a manifest saying version 1 in directory 2.
        _publish(repo / "ctr" / "1", repo / "ctr" / "2")
        refusal = ("model ctr: version 2 failed to load: ")
        wait_until(lambda: refusal in _full_log(server), "the copy is refused", timeout=60)
        assert "the manifest says model 'ctr' version 1, the directory is model 'ctr' " \
               "version 2" in _full_log(server)
        time.sleep(10 * poll_s)  # ten more scans: none tries it again
        print(f"copied version: {_full_log(server).count(refusal)} refusal logged, "
              f"load failures {_load_failures(server, 'ctr'):.0f}, after {10 * poll_s:.0f} s "
              f"more of scans every {poll_s} s")
        assert _full_log(server).count(refusal) == 1
        assert _load_failures(server, "ctr") == 1
        scored = _score(server, "ctr", rows)
        assert scored.status_code == 200 and scored.json()["version"] == 1
        index = httpx.post(server.url + "/v2/repository/index", timeout=10).json()
        row = next(r for r in index if r["name"] == "ctr")
        assert (row["state"], row["version"], row["versions_on_disk"]) == ("READY", "1", [1, 2])
        assert _ready(server).status_code == 200

        # Fixed by a real export to that number: its files change, and the next scan loads it.
        export_checkpoint(trained["checkpoint"], repo, "ctr", version=2, overwrite=True,
                          log=lambda _: None)
        exported = time.monotonic()
        wait_until(lambda: _score(server, "ctr", rows).json()["version"] == 2,
                   "version 2 takes over", timeout=60)
        print(f"fixed version 2 served {time.monotonic() - exported:.1f} s after its export")
        assert _full_log(server).count(refusal) == 1
        assert _load_failures(server, "ctr") == 1


# -- ONNX Runtime threads: the CPUs this process may use -------------------------------------

AFFINITY = len(os.sched_getaffinity(0))


def _cgroup(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup mount in ``tmp_path/sys`` with ``files`` (relative path -> content), and a
    membership file like ``/proc/self/cgroup``."""
    root = tmp_path / "sys"
    root.mkdir(parents=True)
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(content)
    (tmp_path / "cgroup").write_text(membership)
    return root, tmp_path / "cgroup"


def test_cgroup_v2_quotas_of_the_cgroup_and_its_ancestors(tmp_path):
    root, membership = _cgroup(tmp_path, "0::/kubepods/pod1/ctrserve\n", {
        "kubepods/cpu.max": "max 100000\n",
        "kubepods/pod1/cpu.max": "50000 100000\n",  # the pod's limit: half a CPU
        "kubepods/pod1/ctrserve/cpu.max": "max 100000\n",
    })
    assert cgroup_cpu_limit(root, membership) == (0.5, str(root / "kubepods/pod1/cpu.max"))
    cpus, source = usable_cpus(root, membership)
    assert cpus == 1  # half a CPU counts as one
    if AFFINITY > 1:
        assert source == f"the CPU quota 0.5 in {root / 'kubepods/pod1/cpu.max'}"
    assert cpu_threads(1, 0, root, membership)[0] == 1
    assert cpu_threads(4, 0, root, membership)[0] == 1  # at least one
    assert cpu_threads(4, 3, root, membership) == (3, "intra_op_threads setting")


def test_a_container_sees_its_cgroup_v2_quota_at_the_root(tmp_path):
    root, membership = _cgroup(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_limit(root, membership) == (1.5, str(root / "cpu.max"))
    assert usable_cpus(root, membership)[0] == min(2, AFFINITY)
    unlimited = _cgroup(tmp_path / "unlimited", "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(*unlimited) is None


def test_cgroup_v1_quota_and_its_period(tmp_path):
    # Docker on cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's path,
    # the mount shows the container's own cgroup at its root.
    root, membership = _cgroup(tmp_path, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(root, membership) == (
        1.0, str(root / "cpu,cpuacct" / "cpu.cfs_quota_us"))
    assert usable_cpus(root, membership)[0] == 1
    assert cpu_threads(2, 0, root, membership)[0] == 1
    unlimited = _cgroup(tmp_path / "unlimited", "4:cpu,cpuacct:/\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(*unlimited) is None


def test_no_quota_leaves_the_affinity_divided_among_the_workers(tmp_path):
    root, membership = _cgroup(tmp_path, "0::/\n", {})
    assert usable_cpus(root, membership) == (AFFINITY, f"the CPU affinity of {AFFINITY} CPUs, "
                                                       "no CPU quota")
    assert cpu_threads(1, 0, root, membership)[0] == AFFINITY
    assert cpu_threads(AFFINITY + 1, 0, root, membership)[0] == 1


def test_a_process_pinned_to_one_core_runs_one_thread():
    taskset = shutil.which("taskset")
    if taskset is None:
        pytest.skip("taskset (util-linux) is not installed")
    code = ("from ctrserve.service.runtime import cpu_threads, usable_cpus\n"
            "print(cpu_threads(1, 0)[0], usable_cpus()[1])")
    pinned = subprocess.run([taskset, "-c", "0", sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=120)
    assert pinned.returncode == 0, pinned.stderr
    threads, source = pinned.stdout.strip().split(" ", 1)
    assert threads == "1", pinned.stdout
    assert source.startswith(("the CPU affinity of 1 CPUs", "the CPU quota")), source
