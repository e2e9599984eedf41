"""The model package: what ``ctrserve export`` writes and the server loads.

A repository holds ``<repo>/<name>/<version>/`` (Triton's layout; versions are positive
integers), or is itself one package: what KServe's storage initializer leaves in ``/mnt/models``
when an InferenceService's storageUri names a package; such a repository holds the one version
of the one model its manifest names (``root_package``). A package directory holds:

- ``model.onnx`` (and ``model.onnx.data`` when the tensors pass protobuf's 2 GB limit);
- ``transform/transform.json`` and ``transform/vocabulary.npz``: the feature transform;
- ``manifest.json``: format version, name, version, inputs and outputs, the raw feature schema,
  each table's scheme and bytes, training metrics, the export's parity result, and the size and
  sha256 of every other file.

This module reads and verifies packages with numpy and the standard library only: the server
imports it, and it must not pull in torch or onnx. The server reads a repository's versions with
``load_version``, which also refuses a package whose manifest names another model or version
than its directory. Directories whose names are not integers (the exporter's hidden staging
directories among them) are not versions.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
TRANSFORM_DIR = "transform"
#: The name of every graph node that reads rows of a stored table (an embedding gather, in the
#: graph or in a function body): the server checks these run on the GPU
#: (``service/placement.py``). ONNX Runtime keeps a body node's name, with a prefix, when it
#: inlines the function.
LOOKUP_NODE = "lookup"
_HASH_CHUNK = 1 << 20
#: Model names, one rule for the exporter and the server: a plain directory name of letters,
#: digits, ``_``, ``.`` and ``-`` (no separators, spaces or leading dot), at most 128 characters.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class PackageError(Exception):
    """A package that is missing, damaged or of a format this version cannot read."""


def valid_model_name(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(directory: Path) -> dict[str, dict]:
    """Size and sha256 of every file under ``directory`` except the manifest, by relative path."""
    records = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            relative = path.relative_to(directory).as_posix()
            records[relative] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    return records


def file_problems(directory: Path, manifest: dict, check_hashes: bool = True) -> list[str]:
    """What is wrong with the package's files, against the manifest's records (empty if all's
    well). Sizes are checked first, so a truncated file is named as such without hashing it."""
    problems = []
    for relative, record in manifest.get("files", {}).items():
        path = directory / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif path.stat().st_size != record["bytes"]:
            problems.append(f"{relative}: {path.stat().st_size:,} bytes, the manifest says "
                            f"{record['bytes']:,} (truncated or replaced)")
        elif check_hashes and sha256_of(path) != record["sha256"]:
            problems.append(f"{relative}: sha256 mismatch (the file is damaged)")
    return problems


@dataclass(frozen=True)
class Package:
    directory: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def transform_path(self) -> Path:
        return self.directory / TRANSFORM_DIR


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise PackageError(f"{directory}: no such package directory")
    if not path.is_file():
        raise PackageError(f"{directory}: not a model package ({MANIFEST} is missing)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PackageError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise PackageError(f"{path}: unsupported format_version {found!r} "
                           f"(this version reads {FORMAT_VERSION})")
    for key in ("name", "version", "inputs", "outputs", "tables", "files"):
        if key not in manifest:
            raise PackageError(f"{path}: the manifest has no {key!r}")
    return manifest


def load_package(directory: str | Path, verify: bool = True) -> Package:
    """Reads a package's manifest and, with ``verify``, checks every file's size and sha256."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        problems = file_problems(directory, manifest)
        if problems:
            raise PackageError(f"{directory}: damaged package: " + "; ".join(problems))
    return Package(directory, manifest)


def load_version(repo: str | Path, name: str, version: int, verify: bool = True) -> Package:
    """The package of version ``version`` of ``name`` (``version_directory``), refused when its
    manifest names another model or version (a version directory copied under a new number,
    say): served, it would answer under numbers that are not the ones the repository shows, and
    every scan for a newer version would load it again. Every problem found is named, damaged
    files included."""
    directory = version_directory(repo, name, version)
    manifest = read_manifest(directory)
    problems = []
    claimed = (manifest["name"], manifest["version"])
    if claimed != (name, version):
        problems.append(f"the manifest says model {claimed[0]!r} version {claimed[1]!r}, the "
                        f"directory is model {name!r} version {version} (copied from another "
                        "version? export it again to this number)")
    if verify and (damaged := file_problems(directory, manifest)):
        problems.append("damaged package: " + "; ".join(damaged))
    if problems:
        raise PackageError(f"{directory}: " + "; ".join(problems))
    return Package(directory, manifest)


def files_fingerprint(directory: str | Path) -> tuple[tuple[str, int, int], ...]:
    """Relative path, size and modification time of every file under ``directory``: it changes
    whenever a file is written, replaced or removed (no hashing: cheap enough to take on every
    repository scan)."""
    directory = Path(directory)
    entries = []
    for path in sorted(directory.rglob("*")):
        try:
            status = path.stat()
        except OSError:  # removed while we walked: the next scan sees the change
            continue
        if S_ISREG(status.st_mode):
            entries.append((path.relative_to(directory).as_posix(), status.st_size,
                            status.st_mtime_ns))
    return tuple(entries)


def root_package(repo: str | Path) -> tuple[str, int] | None:
    """The model and version of the package ``repo`` itself is, if it is one (a manifest that
    names a valid model name and a positive version; whether the rest of it is sound is
    ``load_version``'s to say, with the reason); None for a repository of ``NAME/VERSION/``
    directories."""
    path = Path(repo) / MANIFEST
    try:
        manifest = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict):
        return None
    name, version = manifest.get("name"), manifest.get("version")
    if isinstance(name, str) and valid_model_name(name) and isinstance(version, int) and (
            version > 0):
        return name, version
    return None


def version_directory(repo: str | Path, name: str, version: int) -> Path:
    """Where version ``version`` of ``name`` lies: ``repo`` itself when it is that package, else
    ``repo/name/version``."""
    if root_package(repo) == (name, version):
        return Path(repo)
    return Path(repo) / name / str(version)


def model_versions(repo: str | Path, name: str) -> list[int]:
    """The versions of ``name`` in a repository, ascending (a repository that is one package
    has its one version)."""
    root = root_package(repo)
    if root is not None:
        return [root[1]] if root[0] == name else []
    return versions(Path(repo) / name)


def versions(model_directory: str | Path) -> list[int]:
    """The integer version directories of one model in a repository, ascending."""
    model_directory = Path(model_directory)
    if not model_directory.is_dir():
        return []
    return sorted(
        int(child.name) for child in model_directory.iterdir()
        if child.is_dir() and child.name.isascii() and child.name.isdigit()
        and int(child.name) > 0
    )


def models_on_disk(repo: str | Path, names: list[str]) -> list[str]:
    """Those of ``names`` (every model of the repository when empty) that have a version in
    ``repo``."""
    if not names:
        return model_names(repo)
    return [name for name in names if valid_model_name(name) and model_versions(repo, name)]


def model_names(repo: str | Path) -> list[str]:
    """The models of a repository: directories with a valid model name and at least one version,
    lying inside the repository (a symbolic link out of it is not a model); for a repository
    that is one package, its model."""
    repo = Path(repo)
    if not repo.is_dir():
        return []
    if (package := root_package(repo)) is not None:
        return [package[0]]
    root = repo.resolve()
    return sorted(
        child.name for child in repo.iterdir()
        if child.is_dir() and valid_model_name(child.name)
        and child.resolve().is_relative_to(root) and versions(child)
    )
