"""The cache directory: where partial downloads grow and published files live.

Layout under the configured cache directory::

    partial/<md5>.part   bytes of a download under way (never served)
    files/<md5>          a verified, published file

Paths are built from an MD5 the cache has already checked (32 lower-case hex digits), never from a
name a station or the CSMS sent, so no request can reach outside the directory. A file moves from
``partial/`` to ``files/`` by a rename on the same file system, after an fsync: a published file is
always complete. Blocking work (hashing a whole file, fsync, directory scans) runs in a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import trio

from .model import normalise_md5

log = logging.getLogger("ocpp_lc.firmware")

_HASH_CHUNK_BYTES = 1024 * 1024


class ContentStore:
    """The files of the cache directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.partial_dir = root / "partial"

    def prepare(self) -> None:
        """Create the directories (0750) if missing; OSError if that is impossible."""
        for directory in (self.root, self.files_dir, self.partial_dir):
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)

    def file_path(self, md5: str) -> Path:
        """The published file for ``md5`` (which must already be a checked MD5)."""
        return self.files_dir / _checked(md5)

    def partial_path(self, md5: str) -> Path:
        """The partial download for ``md5``."""
        return self.partial_dir / f"{_checked(md5)}.part"

    def partial_size(self, md5: str) -> int:
        """Bytes already downloaded for ``md5`` (0 if none)."""
        try:
            return self.partial_path(md5).stat().st_size
        except FileNotFoundError:
            return 0

    async def hash_partial(self, md5: str) -> tuple[Any, int]:
        """An MD5 object fed with the partial file's bytes, and their count (to resume a download)."""
        if not self.partial_size(md5):
            return hashlib.md5(usedforsecurity=False), 0  # nothing to read: no thread needed
        return await trio.to_thread.run_sync(_hash_file, self.partial_path(md5))

    async def hash_file(self, md5: str) -> tuple[str, int]:
        """The MD5 (hex) and size of the published file for ``md5``; OSError if it cannot be read."""
        digest, size = await trio.to_thread.run_sync(_hash_file, self.file_path(md5))
        return digest.hexdigest(), size

    async def publish(self, md5: str) -> int:
        """Make the complete partial file the published file; returns its size. OSError on failure."""
        return await trio.to_thread.run_sync(self._publish_sync, md5)

    def _publish_sync(self, md5: str) -> int:
        source, target = self.partial_path(md5), self.file_path(md5)
        with source.open("rb") as file:
            os.fsync(file.fileno())
            size = os.fstat(file.fileno()).st_size
        os.replace(source, target)
        _fsync_dir(self.files_dir)
        return size

    def delete_partial(self, md5: str) -> None:
        """Remove the partial file for ``md5`` if there is one."""
        _unlink(self.partial_path(md5))

    def delete_file(self, md5: str) -> None:
        """Remove the published file for ``md5`` if there is one (its space is free at once)."""
        _unlink(self.file_path(md5))

    def remove_strays(self, files: set[str], partials: set[str]) -> list[str]:
        """Delete what no index entry accounts for (left by a crash); returns the names removed."""
        removed: list[str] = []
        for directory, keep, suffix in ((self.files_dir, files, ""), (self.partial_dir, partials, ".part")):
            for path in directory.iterdir():
                stem = path.name[: -len(suffix)] if suffix and path.name.endswith(suffix) else path.name
                if stem in keep and path.name == stem + suffix and path.is_file() and not path.is_symlink():
                    continue
                if path.is_dir() and not path.is_symlink():
                    continue  # not ours to judge; never recurse into deletions
                _unlink(path)
                removed.append(str(path.relative_to(self.root)))
        return removed


def _checked(md5: str) -> str:
    if normalise_md5(md5) != md5:
        raise ValueError(f"not a lower-case MD5: {md5[:40]!r}")
    return md5


def _hash_file(path: Path) -> tuple[Any, int]:
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    try:
        with path.open("rb") as file:
            while chunk := file.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        pass
    return digest, size


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("firmware cache: cannot remove %s: %s", path, error.strerror or error)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
