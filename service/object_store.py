"""Model packages from S3-compatible object storage: ``--repo s3://BUCKET/PREFIX``.

The bucket holds packages in the repository's layout, ``PREFIX/NAME/VERSION/manifest.json`` and
the files that manifest lists, or one package right under ``PREFIX`` (its manifest names the
model and the version). The server serves a local copy, the cache
(``REPO_CACHE/BUCKET/PREFIX/NAME/VERSION/``), as an ordinary repository; ``fetch()`` brings new
versions into it, at start and on every repository scan (``poll_interval_s``).

A version lands whole and checked, or not at all: its manifest first, then every file the
manifest lists, into a hidden staging directory of the cache (a name no model may have, so no
scan sees it); every file's size and sha256 are checked against the manifest; then one rename
puts the directory in place. A version whose download fails or whose files disagree with its
manifest is left out, logged and returned to the caller (the repository shows it as the model's
reason and counts it as a failed load); it is not fetched again until its objects change (their
ETags). A version number is immutable: one already in the cache is not fetched again.

Per model, the version fetched is the pinned one, else the highest in the bucket that arrives
intact: one that fails leaves the version below it (in the cache already, or fetched now), so a
replica that starts after a damaged upload serves the last good version.

The workers of a replica share the cache: one fetches at a time (an exclusive ``flock`` on a lock
file in the cache), and the others then find its versions there.

Credentials and endpoint come from boto3's standard chain: the ``AWS_*`` environment variables
(``AWS_ENDPOINT_URL`` for an S3-compatible server other than AWS), the shared config and
credentials files, web identity (IRSA on EKS) and the instance metadata service.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from ctrserve.export.package import (
    MANIFEST,
    PackageError,
    file_problems,
    read_manifest,
    valid_model_name,
)

from .settings import S3_SCHEME, ServiceSettings

log = logging.getLogger("ctrserve.object_store")

#: Staging directories of versions being fetched: hidden, so never a model of the cache.
STAGING_PREFIX = ".fetch-"
LOCK_FILE = ".fetch.lock"
#: What a failed download or a damaged or refused package raises.
FETCH_ERRORS = (PackageError, BotoCoreError, ClientError, Boto3Error, OSError)


@dataclass(frozen=True)
class FetchFailure:
    """A version that was not fetched, and why (``name`` is empty when the manifest of a
    package at the prefix itself could not be read)."""

    name: str
    version: int | None
    reason: str


@dataclass(frozen=True)
class RemoteVersion:
    """One package in the bucket: its key prefix and its objects' ETags (which change whenever
    an object is replaced). ``name`` and ``version`` are None for a package at the repository's
    prefix itself, whose manifest alone says them."""

    prefix: str
    etags: tuple[tuple[str, str], ...]
    name: str | None = None
    version: int | None = None


class ObjectStoreRepository:
    """The packages of an ``s3://`` repository, fetched into ``local_root``."""

    def __init__(self, url: str, cache: Path, models: list[str], pinned: dict[str, int]) -> None:
        bucket, _, prefix = url.removeprefix(S3_SCHEME).partition("/")
        if not url.startswith(S3_SCHEME) or not bucket:
            raise ValueError(f"{url!r} is not an object store repository (s3://BUCKET/PREFIX)")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"{S3_SCHEME}{bucket}/{self.prefix}".rstrip("/")
        self.local_root = Path(cache) / bucket / self.prefix
        self.models, self.pinned = models, pinned
        self._client = boto3.client("s3")
        #: Versions that failed, by key prefix, with their objects' ETags then.
        self._failed: dict[str, tuple[tuple[str, str], ...]] = {}
        #: The ETags of the package at the prefix itself once it is in the cache.
        self._root_fetched: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> ObjectStoreRepository:
        return cls(settings.repo, settings.repo_cache, settings.models, settings.versions)

    def fetch(self) -> list[FetchFailure]:
        """Brings the versions to serve into the cache (blocking: run it off the event loop);
        returns the versions that failed in this call. A bucket that cannot be listed is
        logged and fetches nothing."""
        self.local_root.mkdir(parents=True, exist_ok=True)
        with open(self.local_root / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for left_over in self.local_root.glob(f"{STAGING_PREFIX}*"):
                shutil.rmtree(left_over, ignore_errors=True)  # a fetch that was killed
            try:
                remote = self._list()
            except (BotoCoreError, ClientError) as error:
                log.error("%s: cannot list the bucket: %s", self.url, error)
                return []
            if remote and remote[0].name is None:
                return self._fetch_root(remote[0])
            return self._fetch_models(remote)

    # -- what the bucket holds ----------------------------------------------------------------

    def _list(self) -> list[RemoteVersion]:
        """The packages under the prefix: the one at the prefix itself (alone), else one per
        ``NAME/VERSION/`` that holds a manifest."""
        base = f"{self.prefix}/" if self.prefix else ""
        objects: dict[str, str] = {}
        for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base):
            for entry in page.get("Contents", []):
                objects[entry["Key"]] = entry["ETag"]
        if base + MANIFEST in objects:
            return [RemoteVersion(base, tuple(sorted(objects.items())))]
        grouped: dict[tuple[str, int], dict[str, str]] = {}
        for key, etag in objects.items():
            parts = key.removeprefix(base).split("/")
            version = _version_number(parts[1]) if len(parts) >= 3 else None
            if version is not None and valid_model_name(parts[0]):
                grouped.setdefault((parts[0], version), {})[key] = etag
        return [RemoteVersion(f"{base}{name}/{version}/", tuple(sorted(found.items())), name,
                              version)
                for (name, version), found in sorted(grouped.items())
                if f"{base}{name}/{version}/{MANIFEST}" in found]

    # -- fetching -----------------------------------------------------------------------------

    def _fetch_models(self, remote: list[RemoteVersion]) -> list[FetchFailure]:
        """Per model: the pinned version, else the highest that is here or arrives intact."""
        by_model: dict[str, dict[int, RemoteVersion]] = {}
        for found in remote:
            if found.name is not None and found.version is not None:
                by_model.setdefault(found.name, {})[found.version] = found
        failures = []
        for name, by_version in by_model.items():
            if self.models and name not in self.models:
                continue
            wanted = [self.pinned[name]] if name in self.pinned else sorted(by_version,
                                                                             reverse=True)
            for version in wanted:
                if (self.local_root / name / str(version)).is_dir() or version not in by_version:
                    break
                found = by_version[version]
                if self._failed.get(found.prefix) == found.etags:
                    continue  # failed before, and unchanged since
                failure = self._fetch_version(found)
                if failure is None:
                    break
                failures.append(failure)
        return failures

    def _fetch_root(self, found: RemoteVersion) -> list[FetchFailure]:
        """The package at the prefix itself, whatever model and version its manifest says."""
        if found.etags in (self._root_fetched, self._failed.get(found.prefix)):
            return []
        failure = self._fetch_version(found)
        return [failure] if failure else []

    def _fetch_version(self, found: RemoteVersion) -> FetchFailure | None:
        """Downloads one package into a staging directory, checks it against its manifest and
        renames it into place; the failure (also logged) when any step fails."""
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.local_root))
        name, version = found.name, found.version
        source = f"{S3_SCHEME}{self.bucket}/{found.prefix}"
        try:
            self._download(found.prefix + MANIFEST, staging / MANIFEST)
            manifest = read_manifest(staging)
            claimed = (manifest["name"], manifest["version"])
            if name is None:  # the package at the prefix: its manifest says what it is
                name, version = _claimed_version(claimed)
            elif claimed != (name, version):
                raise PackageError(f"the manifest says model {claimed[0]!r} version "
                                   f"{claimed[1]!r}, the keys say model {name!r} version "
                                   f"{version}")
            destination = self.local_root / name / str(version)
            if not destination.is_dir():
                for relative in _listed_files(manifest):
                    self._download(found.prefix + relative, _inside(staging, relative))
                if problems := file_problems(staging, manifest):
                    raise PackageError("damaged package: " + "; ".join(problems))
                destination.parent.mkdir(exist_ok=True)
                staging.rename(destination)
        except FETCH_ERRORS as error:
            self._failed[found.prefix] = found.etags
            where = f"version {version}" if version is not None else "the package"
            reason = f"{where} not fetched from {source}: {error}"
            log.error("model %s: %s", name or "?", reason)
            return FetchFailure(name or "", version, reason)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._failed.pop(found.prefix, None)
        if found.name is None:
            self._root_fetched = found.etags
        log.info("model %s: version %s fetched from %s into %s", name, version, source,
                 self.local_root)
        return None

    def _download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._client.download_file(self.bucket, key, str(path))


def _version_number(text: str) -> int | None:
    """The version a key's directory name stands for: a positive integer written plainly (a
    cache directory is named by the number, so ``01`` would name another directory)."""
    if text.isascii() and text.isdigit() and text == str(int(text)) and int(text) > 0:
        return int(text)
    return None


def _claimed_version(claimed: tuple[object, object]) -> tuple[str, int]:
    """The model and version a manifest claims, refused unless they are a valid model name and
    a positive integer (they become the cache's directory names)."""
    name, version = claimed
    if not (isinstance(name, str) and valid_model_name(name)
            and isinstance(version, int) and version > 0):
        raise PackageError(f"the manifest names model {name!r} version {version!r}: not a "
                           "model name and a positive integer")
    return name, version


def _listed_files(manifest: dict) -> list[str]:
    """The files a manifest lists, refused unless each has its size and sha256 (a manifest
    from a bucket may be anything that parses)."""
    files = manifest["files"]
    if not (isinstance(files, dict) and all(
            isinstance(record, dict) and isinstance(record.get("bytes"), int)
            and isinstance(record.get("sha256"), str) for record in files.values())):
        raise PackageError("the manifest's files are not records of size and sha256 by name")
    return list(files)


def _inside(directory: Path, relative: str) -> Path:
    """``directory / relative`` for a file the manifest lists, refused when the name could
    leave the package or name no file (absolute, ``..``, ``.`` or empty parts)."""
    parts = relative.split("/")
    if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise PackageError(f"the manifest lists {relative!r}: not a file inside the package")
    return directory.joinpath(*parts)
