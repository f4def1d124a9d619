"""Run directories on object stores: ``s3://bucket/prefix/run`` and any other fsspec URL (``gs://``, ``memory://``).

An object store has no rename, no append and no directories, so this storage brings its
own commit strategy (:class:`~savegame.storage.commit.ManifestLastCommit`: data objects
first, the manifest last as the commit marker) and a lease instead of a file lock
(``lease_seconds``; see :mod:`savegame.run.lease`). ``rename`` and ``append`` exist for the
run's small bookkeeping (aliases, metrics history, moving a run aside) as copy-then-delete
and read-then-rewrite: each object is replaced whole, atomically, by one PUT.

On S3 (s3fs), tensor files go up as multipart uploads with parts in parallel and come back
through parallel ranged reads (:mod:`savegame.storage.s3io`); other stores use fsspec's files.
Transient errors are retried with bounded backoff, the others raise StorageError with the
URL and the remedy (:mod:`savegame.storage.retry`). Credentials and endpoints come from the
usual places (``AWS_*`` environment variables including ``AWS_ENDPOINT_URL``, config files)
or ``storage_options``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from typing import IO, Any, BinaryIO, TypeVar, cast

from savegame.errors import ConfigurationError, StorageError
from savegame.format import names as n
from savegame.storage.commit import ManifestLastCommit
from savegame.storage.retry import retried, translate
from savegame.storage.s3io import MultipartWrite, RangedFile, S3Client, unknown_options

T = TypeVar("T")

DEFAULT_LEASE_SECONDS = 60.0
"""How long a writer's lease lasts without renewal: a dead writer's run is taken over this long after it died."""

_OWN_OPTIONS = ("lease_seconds", "multipart_threshold")


class RemoteStorage:
    """Objects under ``url``; see the module docstring for what each operation means on an object store."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - fsspec comes with torch
            raise StorageError(f"{url!r} needs fsspec: pip install 'savegame[s3]'") from exc
        _check_url(url)
        options = dict(storage_options or {})
        self.lease_seconds = _lease_seconds(options.pop("lease_seconds", DEFAULT_LEASE_SECONDS))
        threshold = _threshold(options.pop("multipart_threshold", None))
        self.root = url.rstrip("/")
        self.commit = ManifestLastCommit()
        options.setdefault("use_listings_cache", False)  # other processes change the run: never list from a cache
        options.setdefault("skip_instance_cache", True)
        try:
            self.fs, self._base = fsspec.core.url_to_fs(self.root, **options)
        except ImportError as exc:
            raise StorageError(f"{url!r}: the client for this URL is not installed ({exc}); for s3:// install "
                               "'savegame[s3]' (s3fs)") from exc
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"{url!r} with storage_options {sorted(options)}: {exc}") from exc
        self._base = self._base.rstrip("/")
        self._s3 = S3Client(self.fs, self.url) if hasattr(self.fs, "_call_s3") else None
        unknown = unknown_options(self.fs) if self._s3 is not None else []
        if unknown:
            raise ConfigurationError(
                f"{url!r}: unknown storage_options {unknown}; for s3:// they are s3fs's (key, secret, token, "
                "endpoint_url, profile, anon, client_kwargs, config_kwargs, ...) and savegame's own "
                f"({', '.join(_OWN_OPTIONS)}); see docs/storage.md")
        self.ranged_reads = self._s3 is not None  # restores read each entry by range into its tensor
        if self._s3 is not None and threshold is not None:
            self._s3.single_put = threshold

    def url(self, path: str) -> str:
        """The URL of ``path`` (relative to the root), or of a full store path."""
        if path.startswith(self._base + "/") or path == self._base:
            path = path[len(self._base):].lstrip("/")
        return f"{self.root}/{path}" if path else self.root

    def _p(self, path: str) -> str:
        return f"{self._base}/{path}" if path else self._base

    def _do(self, action: str, path: str, fn: Callable[[], T]) -> T:
        return retried(fn, action, self.url(path))

    # -- reading ----------------------------------------------------------------------------
    def open_read(self, path: str) -> BinaryIO:
        if self._s3 is not None:
            return cast(BinaryIO, RangedFile(self._s3, self._p(path), self.size(path)))
        return cast(BinaryIO, self._do("read", path, lambda: self.fs.open(self._p(path), "rb")))

    def read_through(self, path: str, size: int) -> BinaryIO:
        """The object ``path`` of ``size`` bytes, to be read from start to end: on S3, one GET for all of it
        (on the local moto server every GET costs time in proportion to the object's size, whatever the range)."""
        if self._s3 is not None:
            return cast(BinaryIO, RangedFile(self._s3, self._p(path), size, ahead=size))
        return self.open_read(path)

    def size(self, path: str) -> int:
        return int(self._do("stat", path, lambda: self.fs.size(self._p(path))))

    def read_bytes(self, path: str) -> bytes:
        return bytes(self._do("read", path, lambda: self.fs.cat_file(self._p(path))))

    def exists(self, path: str) -> bool:
        """Whether an object, or any object below the prefix ``path/``, exists; the root always does."""
        if not path:
            return True
        if self._s3 is not None:
            return self._s3.exists(self._p(path))
        return bool(self._do("look for", path, lambda: self.fs.exists(self._p(path))))

    def list_dir(self, path: str) -> list[str]:
        """The names directly below ``path`` (objects and prefixes); empty where there is none."""
        full = self._p(path)

        def names() -> list[str]:
            try:
                entries = self.fs.ls(full, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != full]
        return sorted(set(self._do("list", path, names)))

    # -- writing ----------------------------------------------------------------------------
    def create(self, path: str) -> Any:
        """A new object, visible only once ``close()`` returns; refused when ``path`` exists (on S3 by the store
        itself, with ``If-None-Match: *``, when the object is committed)."""
        if self._s3 is not None:
            return MultipartWrite(self._s3, self._p(path))
        if self.exists(path):
            err = StorageError(f"could not create {self.url(path)!r}: it exists already")
            err.errno = errno.EEXIST
            raise err
        return _FileWrite(self, path)

    def put(self, path: str, data: bytes) -> None:
        """Write the whole object ``path`` in one atomic PUT, replacing any."""
        self._do("write", path, lambda: self.fs.pipe_file(self._p(path), data))

    def append(self, path: str, data: bytes) -> None:
        """No append on object stores: the object is read and rewritten whole (one writer holds the lease)."""
        old = self.read_bytes(path) if self.exists(path) else b""
        self.put(path, old + data)

    def makedirs(self, path: str) -> None:
        """Object stores have no directories; for the root, check that the bucket is there and reachable."""
        if path or self._s3 is None:
            return
        bucket = self._base.split("/", 1)[0]
        self._s3.call("head_bucket", "open the bucket of", self._base, Bucket=bucket)

    def rename(self, src: str, dst: str) -> None:
        """Copy then delete (no rename on object stores): an object whole, a checkpoint manifest last."""
        full = self._p(src)
        if self._do("stat", src, lambda: self.fs.isfile(full)):
            self._do("copy", src, lambda: self.fs.copy(full, self._p(dst)))
            self.remove(src)
            return
        files = sorted(self._do("list", src, lambda: self.fs.find(full)), key=lambda f: f.endswith(n.MANIFEST))
        for file in files:
            target = self._p(dst) + file[len(full):]
            self._do("copy", src, lambda f=file, t=target: self.fs.copy(f, t))  # type: ignore[misc]
        self.commit.delete(self, src)

    def remove(self, path: str) -> None:
        self._do("remove", path, lambda: self.fs.rm_file(self._p(path)))

    def remove_tree(self, path: str) -> None:
        full = self._p(path)

        def rm() -> None:
            files = self.fs.find(full)
            if files:
                self.fs.rm(files)
        self._do("remove", path, rm)

    def abort_uploads(self) -> list[str]:
        """Abort the unfinished uploads a killed writer left under the root (S3; other stores have none
        that outlive their writer). Only the lease holder calls this."""
        return [] if self._s3 is None else self._s3.abort_uploads(self._base)

    def fsync_dir(self, path: str) -> None:
        """Nothing to do: an object is durable when the request that wrote it returns."""


class _FileWrite:
    """A new object through an fsspec file (stores other than S3); it appears when closed."""

    def __init__(self, storage: RemoteStorage, path: str) -> None:
        self._storage, self._path = storage, path
        self._file: IO[bytes] = storage._do("create", path, lambda: storage.fs.open(storage._p(path), "wb"))

    def write(self, data: memoryview) -> None:
        try:
            self._file.write(data)
        except Exception as exc:
            raise translate(exc, "write", self._storage.url(self._path)) from exc

    def close(self) -> None:
        try:
            self._file.close()
        except Exception as exc:
            raise translate(exc, "write", self._storage.url(self._path)) from exc

    def abort(self) -> None:
        discard = getattr(self._file, "discard", None)
        try:
            discard() if callable(discard) else self._file.close()
        except Exception:  # the object is being discarded; the error that led here is what matters
            pass


_BUCKET_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "r2")


def _check_url(url: str) -> None:
    """Refuse a URL that names no place in the store (``s3://``, ``s3:///run``): fsspec would take what is
    left for a local path."""
    scheme, _, rest = url.partition("://")
    if not rest.strip("/") or (scheme.lower() in _BUCKET_STORES and rest.startswith("/")):
        raise ConfigurationError(f"{url!r} names no bucket: write {scheme}://BUCKET/path/to/run")


def _threshold(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5 << 30:
        raise ConfigurationError("storage_options['multipart_threshold'] must be a number of bytes from 0 to 5 GiB "
                                 f"(S3's largest single PUT), got {value!r}")
    return value


def _lease_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < 1e9:
        raise ConfigurationError(f"storage_options['lease_seconds'] must be a positive number of seconds, got {value!r}")
    return float(value)
