"""Files that are either whole or absent, and caches that are checked before they are believed.

Every write goes to a temporary name beside its target, is flushed to disk (fsync), then renamed, so a
reader (or a run killed half-way) sees the old file or the new one, never a part. Files and folders get
the permissions the user's umask gives (``tempfile`` alone would make them private: 0600 / 0700).

A cache file (``write_cache``) has a ``<name>.sha256`` beside it; ``read_cache`` returns its text only
when the digest matches, and otherwise deletes both and returns None, so the caller rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DIGEST_SUFFIX = ".sha256"


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What ``open(path, "w")`` would give a new file: 0644 under the usual umask 022."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """What ``mkdir`` would give a new folder: 0755 under the usual umask 022."""
    return 0o777 & ~current_umask()


def make_temp_folder(beside: Path) -> Path:
    """A new empty folder next to ``beside`` (``.<name>.tmp-XXXX``) with the umask's permissions."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.tmp-", dir=beside.parent))
    tmp.chmod(folder_mode())
    return tmp


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name beside ``path``, fsync, then rename: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_cache(path: Path, text: str) -> None:
    """Write a cache file and, after it, its digest (a file without a matching digest is not believed)."""
    data = text.encode("utf-8")
    write_bytes_atomic(path, data)
    write_text_atomic(Path(str(path) + DIGEST_SUFFIX), digest(data) + "\n")


def discard_cache(path: Path) -> None:
    Path(path).unlink(missing_ok=True)
    Path(str(path) + DIGEST_SUFFIX).unlink(missing_ok=True)


def read_cache(path: Path) -> str | None:
    """The text of a cache file whose digest matches; None (after removing it, with a warning) when the
    file or its digest is missing, unreadable or does not match: the caller rebuilds it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
        expected = Path(str(path) + DIGEST_SUFFIX).read_text().strip()
    except OSError as err:
        expected, why = None, f"unreadable ({err.strerror or err})"
    else:
        why = "its digest is missing or does not match its content"
    if expected is not None and expected == digest(data):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            why = "it is not UTF-8 text"
    log.warning("cache file %s is rebuilt: %s", path, why)
    discard_cache(path)
    return None


def read_json_cache(path: Path, valid) -> object | None:
    """A JSON cache file's content when its digest matches and ``valid(content)`` holds; else None (the
    file is removed with a warning and the caller rebuilds it)."""
    text = read_cache(path)
    if text is None:
        return None
    try:
        content = json.loads(text)
    except ValueError:
        content = None
    if content is not None and valid(content):
        return content
    log.warning("cache file %s is rebuilt: its content is not what sppx writes there", path)
    discard_cache(path)
    return None


MANIFEST = "sppx-manifest.json"


def write_manifest(folder: Path) -> None:
    """Record the sha256 of every file in ``folder`` in its manifest (written last)."""
    folder = Path(folder)
    digests = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json_atomic(folder / MANIFEST, digests)


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_matches(folder: Path, names: list[str] | None = None) -> bool:
    """Whether ``folder``'s files (or only ``names``) still have the digests its manifest records; a
    folder without a manifest, or with a file missing, does not match."""
    folder = Path(folder)
    try:
        digests = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(digests, dict) or not digests:
        return False
    for name in names if names is not None else list(digests):
        path = folder / name
        if name not in digests or not path.is_file() or file_digest(path) != digests[name]:
            return False
    return True
