"""How ctrserve installs: a regular (non-editable) wheel holds every module, the serving image's
files serve a package without the training code, torch or the benchmark extra, and the command
line names what an installation lacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
from servers import ServiceProcess, request_rows

ROOT = Path(__file__).resolve().parents[1]
SCORE = "/v1/models/ctr/score"
#: What the serving image does not install (torch and onnx: the train extra; the rest: bench).
ABSENT_FROM_SERVING = ("torch", "onnx", "onnxscript", "matplotlib", "aiohttp", "locust")


def _serving_stage() -> list[str]:
    """The Dockerfile's ``serving-base`` stage, one instruction per item."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stage, inside = [], False
    for line in text.splitlines():
        if line.startswith("FROM "):
            inside = line.split()[-1] == "serving-base"
        elif inside and line.strip() and not line.startswith("#"):
            stage.append(line.strip())
    return stage


def _serving_tree(target: Path) -> Path:
    """The project files the serving stage copies, laid out as in the image, with the links its
    RUN makes; returns the folder to put on ``sys.path``."""
    for instruction in _serving_stage():
        words = instruction.split()
        if words[0] == "COPY" and not words[1].startswith("--"):
            *sources, destination = words[1:]
            for source in sources:
                if source in ("pyproject.toml", "README.md"):
                    continue
                path = ROOT / source
                where = target / destination
                if path.is_dir():
                    shutil.copytree(path, where, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    where.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, where / path.name)
        elif words[0] == "RUN" and words[1:3] == ["ln", "-s"]:
            *links, folder = words[3:words.index("&&")]
            for link in links:
                (target / folder / Path(link).name).symlink_to(link)
    return target


def _blocked_imports(tree: Path) -> str:
    """Python run first in a child: the serving tree first on the path, and what the image does
    not install made unimportable."""
    absent = ", ".join(repr(name) for name in ABSENT_FROM_SERVING)
    return (f"import sys\nsys.path.insert(0, {str(tree)!r})\n"
            f"for name in ({absent},):\n    sys.modules[name] = None\n")


def test_the_serving_image_files_serve_a_package_without_training_code_or_torch(trained,
                                                                                 tmp_path):
    tree = _serving_tree(tmp_path / "image")
    assert not (tree / "models" / "train.py").exists()
    assert not (tree / "loadtest").exists()
    rows = request_rows(trained["rows_file"])[:5]
    prefix = _blocked_imports(tree) + "import ctrserve\nprint('from', ctrserve.__file__)\n"
    with ServiceProcess(trained["repo"], python_prefix=prefix) as server:
        response = httpx.post(server.url + SCORE, json={"rows": rows}, timeout=60)
        log = server.log()
    assert response.status_code == 200, response.text
    assert len(response.json()["probabilities"]) == 5
    assert f"from {tree}" in log


def test_commands_missing_from_an_installation_name_what_to_install(tmp_path):
    tree = _serving_tree(tmp_path / "image")
    code = _blocked_imports(tree) + "from ctrserve.cli import main\nsys.exit(main(sys.argv[1:]))"
    train = subprocess.run(
        [sys.executable, "-c", code, "train", "--data", "x.tsv", "--out", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=120)
    assert train.returncode == 1
    assert ("ctrserve train: error: this installation has no ctrserve.models.embeddings"
            in train.stderr)
    assert "Traceback" not in train.stderr
    # In the development tree the module is there but its extra is not.
    dev = _blocked_imports(ROOT).replace(f"sys.path.insert(0, {str(ROOT)!r})\n", "")
    bench = subprocess.run(
        [sys.executable, "-c", dev + "from ctrserve.cli import main\nsys.exit(main(sys.argv[1:]))",
         "demo", "--workdir", str(tmp_path / "demo"), "--once"],
        capture_output=True, text=True, timeout=120)
    assert bench.returncode == 1
    assert "pip install 'ctrserve[train]'" in bench.stderr and "Traceback" not in bench.stderr


def test_a_regular_install_holds_every_module_and_runs_from_any_directory(tmp_path):
    """``pip install .`` (a wheel, not an editable install) from the repository's files."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(wheels), str(ROOT)], check=True, timeout=600)
    (wheel,) = wheels.glob("ctrserve-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                    str(site), str(wheel)], check=True, timeout=600)
    modules = {path.relative_to(site).as_posix() for path in (site / "ctrserve").rglob("*.py")}
    in_tree = {f"ctrserve/{path.relative_to(ROOT).as_posix()}"
               for folder in ("models", "export", "service", "loadtest")
               for path in (ROOT / folder).rglob("*.py")}
    assert in_tree <= modules
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = subprocess.run(
        [sys.executable, "-c", "import ctrserve, ctrserve.models.transform, ctrserve.service.app;"
                               "print(ctrserve.__file__)"],
        cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True,
        text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == str(site / "ctrserve" / "__init__.py")
    usage = subprocess.run([sys.executable, "-m", "ctrserve", "--help"], cwd=elsewhere,
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == 0 and "serve" in usage.stdout
