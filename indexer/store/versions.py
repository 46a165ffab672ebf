"""Versions of an index directory: what an update writes, and which one is served.

A build writes an index directory DIR (version 1: its files at the top of DIR, as always). Each
`tracin index CONFIG --out DIR --update` (or `--remove-ids FILE`) writes a new, complete index directory
beside it and switches to it:

    DIR/                       version 1 (the build), never changed by an update
    DIR/versions/v0001/        version 1 again, as hard links of DIR's files (written by the first update),
                               so that it can be served by its path once CURRENT names another version
    DIR/versions/v0002/        version 2: a whole index directory (manifest, FAISS index, ...); the files
                               it shares with its parent (checkpoints, an unchanged examples table ...)
                               are hard links where the filesystem allows, else copies
    DIR/versions/v0003/ ...
    DIR/CURRENT                which version is served: {"format", "version", "directory",
                               "manifest_sha256"} (JSON), written to a temporary file, fsynced and
                               renamed over the old pointer: the one atomic step of an update

`resolve(DIR)` is the version a server opens: the one CURRENT names (its manifest.json must have the sha256
the pointer records), else DIR itself. A directory without CURRENT (every index built before versions,
and every fresh build) is served as it is. Nothing a version holds is ever rewritten in place (a hard
link shares the inode with its parent), so a server that opened or memory-mapped an older version keeps
reading the bytes it verified, and every older version stays servable (`tracin serve DIR/versions/v0002`).

Crash safety: a version is staged in ``DIR/versions/.v<n>.tmp-<random>/``, renamed to ``v<n>`` when whole,
and only then does CURRENT move; a kill before that rename leaves the previous version served, and a
staged or renamed version that CURRENT does not name yet is removed by the next update (which holds the
build lock) before it writes that version again.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from indexer.store.manifest import MANIFEST

CURRENT = "CURRENT"
VERSIONS_DIR = "versions"
POINTER_FORMAT = "tracin-current/1"
VERSION_NAME = re.compile(r"^v(\d{4,9})$")
#: leftovers an interrupted update may leave inside DIR (removed by the next update, accepted by --force)
STAGING_NAME = re.compile(r"^\.v\d{4,9}\.tmp-[0-9a-f]{8}$")
POINTER_TMP_NAME = re.compile(rf"^\.{CURRENT}\.tmp-[0-9a-f]{{8}}$")
MAX_POINTER_BYTES = 4096


class VersionError(RuntimeError):
    """The CURRENT pointer of an index directory is damaged or names a version that does not fit it (one
    line); raised as `indexer.store.directory.IndexDirectoryError` by the callers that open indexes."""


@dataclass(frozen=True)
class Version:
    """One version of an index directory: `directory` (DIR, or DIR/versions/v<n>), its `number` (1 for DIR
    itself), `root` (DIR) and the sha256 of its manifest.json when a pointer named it."""

    directory: Path
    number: int
    root: Path
    manifest_sha256: str | None = None

    @property
    def name(self) -> str:
        return version_name(self.number) if self.number > 1 or self.directory != self.root else "base"


def version_name(number: int) -> str:
    """v0002 for version 2 (the folder name under versions/)."""
    return f"v{number:04d}"


def version_dir(root: Path, number: int) -> Path:
    """Where version `number` of the index directory `root` lives."""
    return Path(root) / VERSIONS_DIR / version_name(number)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_pointer(root: Path) -> dict | None:
    """The validated CURRENT pointer of `root` (None when there is none). VersionError (one line) when it is
    a link, too large, not JSON, of another format, or names anything but ``versions/v<n>``."""
    root = Path(root)
    file = root / CURRENT
    if not file.exists() and not file.is_symlink():
        return None
    if file.is_symlink() or not file.is_file():
        raise VersionError(f"{root}: {CURRENT} is not a regular file")
    if file.stat().st_size > MAX_POINTER_BYTES:
        raise VersionError(f"{root}: {CURRENT} is larger than a version pointer ({MAX_POINTER_BYTES} bytes)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise VersionError(f"{root}: {CURRENT} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != POINTER_FORMAT:
        raise VersionError(f"{root}: {CURRENT} is not a tracin version pointer (format {POINTER_FORMAT!r})")
    number, directory, digest = data.get("version"), data.get("directory"), data.get("manifest_sha256")
    if type(number) is not int or not 1 <= number < 10 ** 9:
        raise VersionError(f"{root}: {CURRENT} version must be a positive integer, got {number!r}")
    if directory != f"{VERSIONS_DIR}/{version_name(number)}":
        raise VersionError(f"{root}: {CURRENT} directory must be {VERSIONS_DIR}/{version_name(number)} for version "
                           f"{number}, got {str(directory)[:100]!r}")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise VersionError(f"{root}: {CURRENT} manifest_sha256 must be 64 lowercase hex digits")
    return data


def resolve(path: str | Path) -> Version:
    """The version of the index directory `path` to serve: the one its CURRENT names, else `path` itself.

    A version directory given directly (DIR/versions/v0002) is returned as it is. Raises VersionError (one
    line) when CURRENT is damaged, names a missing version, or the version's manifest.json is not the one
    the pointer recorded (a version swapped or edited after the switch)."""
    root = Path(path)
    pointer = read_pointer(root) if root.is_dir() else None
    if pointer is None:
        match = VERSION_NAME.match(root.name)
        if match and root.parent.name == VERSIONS_DIR:
            return Version(root, int(match.group(1)), root.parent.parent)
        return Version(root, _base_number(root), root)
    number = pointer["version"]
    directory = root / pointer["directory"]
    if directory.is_symlink() or not directory.is_dir():
        raise VersionError(f"{root}: {CURRENT} names version {number} ({pointer['directory']}), which is missing")
    manifest = directory / MANIFEST
    if not manifest.is_file() or manifest.is_symlink():
        raise VersionError(f"{root}: version {number} ({pointer['directory']}) has no {MANIFEST}")
    if _sha256(manifest) != pointer["manifest_sha256"]:
        raise VersionError(f"{root}: version {number} ({pointer['directory']}/{MANIFEST}) is not the manifest "
                           f"{CURRENT} switched to (edited or replaced after the switch)")
    return Version(directory, number, root, pointer["manifest_sha256"])


def _base_number(directory: Path) -> int:
    """The version number a manifest records (index_version.number), 1 when it records none."""
    try:
        raw = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        number = (raw.get("index_version") or {}).get("number")
    except (OSError, ValueError, AttributeError):
        return 1
    return number if type(number) is int and number >= 1 else 1


def write_pointer(root: Path, number: int, kill=None) -> Path:
    """Switch `root` to version `number` (DIR/versions/v<n>, whole and renamed into place): CURRENT is
    written to a temporary file, fsynced, renamed over the old pointer, and the directory fsynced.
    `kill(step)` is the test hook (`indexer.store.resume.kill_point`)."""
    from indexer.store.directory import fsync_path

    root = Path(root)
    directory = version_dir(root, number)
    data = {"format": POINTER_FORMAT, "version": number,
            "directory": f"{VERSIONS_DIR}/{version_name(number)}",
            "manifest_sha256": _sha256(directory / MANIFEST)}
    tmp = root / f".{CURRENT}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    if kill is not None:
        kill("pointer-written")
    os.replace(tmp, root / CURRENT)
    fsync_path(root)
    return root / CURRENT


def link_or_copy(source: Path, target: Path) -> str:
    """Make `target` a hard link to `source` ("link"), or a byte copy where the filesystem cannot link
    ("copy": another device, no hard links, too many links)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return "link"
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
            raise
    shutil.copyfile(source, target)
    return "copy"


def versions(root: Path) -> list[int]:
    """The version numbers whose folders exist under DIR/versions/ (whole ones, sorted)."""
    folder = Path(root) / VERSIONS_DIR
    if not folder.is_dir():
        return []
    out = []
    for entry in folder.iterdir():
        match = VERSION_NAME.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            out.append(int(match.group(1)))
    return sorted(out)


def remove_unserved(root: Path, current: int, keep: int | None = None) -> list[str]:
    """Remove what an interrupted update left under DIR/versions/ (staging folders, versions newer than the
    current one, which CURRENT never named) and a stale pointer temporary; with `keep`, also the versions
    older than the `keep` newest (never the current one, never DIR's own version 1). The caller holds the
    build lock. Returns the names removed."""
    root = Path(root)
    removed = []
    folder = root / VERSIONS_DIR
    for entry in root.iterdir():
        if POINTER_TMP_NAME.match(entry.name) and not entry.is_dir():
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    if not folder.is_dir():
        return removed
    numbers = versions(root)
    kept = set(n for n in numbers if n <= current)
    if keep is not None:
        kept = set(sorted(kept)[-max(1, keep):]) | {current}
    for entry in sorted(folder.iterdir()):
        match = VERSION_NAME.match(entry.name)
        stale = STAGING_NAME.match(entry.name) or (match and int(match.group(1)) not in kept)
        if stale and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(f"{VERSIONS_DIR}/{entry.name}")
    return removed
