"""The ``ctrserve`` command itself: help, version, the serve flags derived from the settings, and
refusals that name their reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version

import pytest
from servers import ServiceProcess

from ctrserve.service.settings import ENV_PREFIX, ServiceSettings


def ctrserve(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The command in a subprocess; help is laid out 200 columns wide (no wrapped words)."""
    return subprocess.run([sys.executable, "-m", "ctrserve", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env={**os.environ, "COLUMNS": "200"})


def test_a_bare_command_prints_the_commands_and_version_prints_the_version():
    bare = ctrserve()
    assert bare.returncode == 0
    for command in ("train", "export", "serve", "bench"):
        assert command in bare.stdout
    shown = ctrserve("--version")
    assert shown.returncode == 0 and shown.stdout.strip() == f"ctrserve {version('ctrserve')}"


def test_every_setting_is_a_serve_flag_with_its_default_and_the_environment_is_named():
    usage = ctrserve("serve", "--help").stdout
    for name, field in ServiceSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in usage, flag
        if field.annotation is bool:
            assert f"--no-{name.replace('_', '-')}" in usage
    assert f"{ENV_PREFIX}MAX_BATCH_ROWS" in usage
    assert "(default: model-repository)" in usage


def test_flags_win_over_the_environment_which_wins_over_the_defaults(monkeypatch):
    from ctrserve.cli import build_parser

    monkeypatch.setenv("CTRSERVE_PORT", "9123")
    monkeypatch.setenv("CTRSERVE_MAX_BATCH_ROWS", "64")
    args = build_parser("serve").parse_args(
        ["serve", "--max-batch-rows", "128", "--models", "a", "--models", "b", "--no-batching",
         "--versions", '{"a": 3}'])
    settings = ServiceSettings(_cli_settings_source=args.settings_source(parsed_args=args))
    assert (settings.port, settings.max_batch_rows) == (9123, 128)
    assert settings.models == ["a", "b"] and settings.versions == {"a": 3}
    assert settings.batching is False and settings.redis_namespace == "ctrserve"


def test_serve_refuses_a_repository_with_nothing_to_serve(tmp_path):
    (tmp_path / "models" / "embeddings").mkdir(parents=True)  # a source folder, say
    default = ctrserve("serve", cwd=tmp_path)
    assert default.returncode == 1
    assert "no model to serve: model-repository holds no model package" in default.stderr
    source = ctrserve("serve", "--repo", str(tmp_path / "models"))
    assert source.returncode == 1 and "holds no model package" in source.stderr
    invalid = ctrserve("serve", "--repo", str(tmp_path), "--workers", "0")
    assert invalid.returncode == 1
    assert "invalid settings: workers: Input should be greater than or equal to 1" in \
        invalid.stderr


def test_serve_stops_when_no_package_of_the_repository_loads(trained, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(trained["repo"], repo)
    (repo / "ctr" / "1" / "model.onnx").write_bytes(b"not a model")
    server = ServiceProcess(repo)
    try:
        deadline = time.monotonic() + 90
        while server.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        log = server.log()
    finally:
        server.stop()
    assert server.process.returncode not in (None, 0), log
    assert "no model to serve from" in log and "ctr: version 1 failed to load" in log


@pytest.mark.parametrize("name", ["my model", ".hidden", "a/b", "x" * 129, "ünï"])
def test_export_refuses_names_the_server_would_never_serve(trained, tmp_path, name):
    exported = ctrserve("export", str(trained["checkpoint"]), "--repo", str(tmp_path),
                        "--name", name)
    assert exported.returncode == 1
    assert f"invalid model name {name!r}" in exported.stderr
    assert not any(tmp_path.iterdir())
