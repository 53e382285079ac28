"""Durable files: atomic writes of files and folders, file digests, and a JSON records store.

Every artefact of the project (configs, catalogs, indexes, feature caches, model exports, reports, benchmark results) is
written through these helpers, so a crash or a failed write leaves either the old file or the new one, never a mix.

    with atomic_write("report.md") as f:          # a file: temp file beside it, fsync, rename over it
        f.write(text)
    write_json("catalog.json", catalog)            # the same for JSON
    with atomic_directory("indexes/cifar10") as tmp:   # a folder: filled in a temp folder, then swapped in
        ...
    file_digest("vectors.npy")                     # sha256 hex digest
    RecordStore("benchmarks/results/retrieval.json", key=("protocol", "model")).merge(records)
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from typing import IO, Any, Callable, Iterator, Sequence, TypeVar

from tf_retrieval.errors import InvalidInputError

T = TypeVar("T")


def file_digest(path: str | os.PathLike, *, fsync: bool = False) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks; `fsync` first flushes it to disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_name(text: str) -> str:
    """`text` as a file name: runs of characters other than letters, digits, '_', '.' and '-' become '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def value_digest(value: Any) -> str:
    """The sha256 hex digest of a JSON-serialisable value (keys sorted: equal values, equal digests)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """Opens a temp file beside `path` for writing; on success it is fsynced and renamed over `path`.

    On an exception the temp file is removed and `path` keeps its old content. Parent folders are created.

    Args:
      path: the file to (re)write.
      mode: "w" (text) or "wb" (binary).
      encoding: text encoding (ignored in binary mode).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files with mode 'w' or 'wb', not {mode!r}")
    path = os.path.realpath(os.fspath(path))  # a link is written through, not replaced by a file
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, _mode_for(path, 0o666))
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _mode_for(path: str | None, base: int) -> int:
    """The permission bits for a temp file (`base` 0o666) or folder (0o777) that will replace `path`: those of `path`
    where it is one of the same kind, else `base` less the process umask (what `open()` or `os.mkdir()` would give;
    mkstemp and mkdtemp give owner-only)."""
    if path is not None and (os.path.isdir(path) if base == 0o777 else os.path.isfile(path)):
        return stat.S_IMODE(os.stat(path).st_mode)
    return base & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (changing it races other threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, value: Any, **dump_options: Any) -> None:
    """Writes `value` as JSON to `path` atomically (`json.dump` options such as indent pass through)."""
    with atomic_write(path) as f:
        json.dump(value, f, **dump_options)


def read_json_value(path: str | os.PathLike, key: str, cast: Callable[[Any], T], default: T) -> T:
    """`cast(value[key])` of the JSON object in `path`; `default` when the file, the key or a castable value is missing."""
    try:
        with open(path) as f:
            return cast(json.load(f)[key])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_write(path) as f:
        f.write(text)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive advisory lock (flock) on `path`, a folder or a lock file (created if need be), until the
    block ends: processes that lock the same path take turns."""
    import fcntl

    path = os.fspath(path)
    descriptor = os.open(path, os.O_RDONLY if os.path.isdir(path) else os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def save_with_digest(save, folder: str, stem: str, suffix: str) -> str:
    """Saves through `save(path)` into `folder`, then names the file `<stem>-<sha256[:10]><suffix>`, so that the name
    changes whenever the content does (file names are part of model ids and cache keys). Returns the final path,
    absolute (it goes into model configs, which other folders read)."""
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=folder)  # one per save, however many
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, _mode_for(None, 0o666))
        path = os.path.join(folder, f"{stem}-{file_digest(tmp, fsync=True)[:10]}{suffix}")  # on disk before its name
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[str]:
    """Yields an empty temp folder beside `target`; on success it is fsynced and swapped in for `target`.

    The swap is atomic where Linux offers renameat2(RENAME_EXCHANGE); elsewhere the old folder is renamed aside and put
    back if the second rename fails. On an exception the temp folder is removed and `target` is left as it was.
    """
    target = os.path.realpath(os.fspath(target))  # a linked folder is replaced where the link points
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, _mode_for(target, 0o777))  # after the caller wrote into it: an old folder's mode may not let it
        fsync_tree(tmp)
        _replace_dir(tmp, target)
        fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new folder on failure, the old one after the swap


def digest_tree(root: str, *, fsync: bool = False) -> dict[str, str]:
    """{relative posix path: sha256} of every file under `root` (fsyncing files and folders with `fsync`)."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            path = os.path.join(folder, name)
            files[os.path.relpath(path, root).replace(os.sep, "/")] = file_digest(path, fsync=fsync)
        if fsync:
            fsync_dir(folder)
    return dict(sorted(files.items()))


def fsync_tree(root: str) -> None:
    """fsyncs every file and folder under `root` (without reading the files)."""
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def fsync_dir(path: str) -> None:
    """fsyncs a folder entry list (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths with Linux renameat2(RENAME_EXCHANGE); False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _replace_dir(new: str, target: str) -> None:
    """Moves the folder `new` to `target`, replacing a folder there; what is left at `new` is the caller's to delete."""
    if not os.path.exists(target):
        os.rename(new, target)
    elif not _exchange(new, target):
        backup = new + "-old"
        os.rename(target, backup)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)


def record_key(record: dict, fields: Sequence[str]) -> tuple:
    """The values of `fields` in `record` (None where missing; lists, as JSON gives them, as tuples)."""
    return tuple(tuple(value) if isinstance(value, list) else value for value in (record.get(f) for f in fields))


class RecordStore:
    """A JSON list of records (dicts) that keeps one record per key.

    Args:
      path: the JSON file (created on the first `merge`).
      key: the fields that identify a record; a missing field counts as None.
    """

    def __init__(self, path: str | os.PathLike, key: Sequence[str]):
        self.path = os.fspath(path)
        self.key = tuple(key)

    def key_of(self, record: dict) -> tuple:
        """The values of the key fields (`record_key`)."""
        return record_key(record, self.key)

    def load(self) -> list[dict]:
        """The stored records (an empty list when the file does not exist).

        Raises:
          InvalidInputError: a file that is not a JSON list of records (a hand edit gone wrong, say): fix or move it.
        """
        if not os.path.exists(self.path):
            return []
        try:
            with open(self.path, encoding="utf-8") as f:
                records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"{self.path} is not valid JSON ({exc}): fix it or move it away") from None
        except IsADirectoryError:
            raise InvalidInputError(f"{self.path} is a folder, not a records file (a .json file)") from None
        if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
            raise InvalidInputError(f"{self.path} holds no JSON list of records: fix it or move it away")
        return records

    def merge(self, records: Sequence[dict]) -> list[dict]:
        """Adds `records`, each replacing a stored record with the same key (the newest wins within `records` too);
        saves atomically and returns the whole list. Stored records keep their order; new keys are appended.
        Concurrent merges into one file (two evaluations finishing together) take turns: none loses the other's."""
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        with exclusive_lock(folder):  # the folder, not the file: the file is replaced by each write
            merged = {self.key_of(record): record for record in self.load()}
            merged.update((self.key_of(record), record) for record in records)
            result = list(merged.values())
            write_json(self.path, result, indent=1)
        return result
