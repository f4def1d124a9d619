"""Bulk transfers to and from S3: multipart uploads with parts in parallel, ranged reads in parallel.

Both run through s3fs's own asynchronous client (its event loop, its credentials), from a
small thread pool, so several parts are on the wire at once. An upload holds at most
``PARALLEL + 1`` parts in memory (one being filled, the rest in flight): the tensor bytes go
from the staging buffers into a part and onto the network, never into a whole-file copy.
The object appears only when the upload completes (S3 commits a multipart upload atomically),
and with ``If-None-Match: *`` where the store supports it, so it never replaces another object.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from savegame.storage.retry import retried

PART = 16 << 20  # 10,000 parts (S3's limit) of 16 MB: tensor files up to 160 GB (shards are 1 GB by default)
PARALLEL = 8


class S3Client:
    """Calls of s3fs's asynchronous client from any thread, with retries and translated errors."""

    def __init__(self, fs: Any, url_of: Callable[[str], str]) -> None:
        self.fs, self.url_of = fs, url_of
        self.pool = ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="savegame-s3")
        self.conditional = True  # If-None-Match on new objects, until the store says it does not support it

    def call(self, method: str, action: str, path: str, **kwargs: Any) -> Any:
        from fsspec.asyn import sync
        return retried(lambda: sync(self.fs.loop, self.fs._call_s3, method, **kwargs), action, self.url_of(path))

    def where(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    def put_new(self, path: str, data: bytes) -> None:
        """Create ``path`` holding ``data``; refused (FileExistsError inside a StorageError) if it exists."""
        bucket, key = self.where(path)
        extra = {"IfNoneMatch": "*"} if self.conditional else {}
        self.call("put_object", "create", path, Bucket=bucket, Key=key, Body=data, **extra)

    def read_range(self, path: str, start: int, end: int) -> bytes:
        from fsspec.asyn import sync
        data = retried(lambda: sync(self.fs.loop, self.fs._cat_file, path, start=start, end=end), "read",
                       self.url_of(path))
        return bytes(data)

    def read_into(self, path: str, start: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes of ``path`` from ``start``, in ranged reads of PART bytes in parallel."""
        def piece(lo: int) -> None:
            hi = min(lo + PART, view.nbytes)
            data = self.read_range(path, start + lo, start + hi)
            if len(data) != hi - lo:
                raise EOFError(f"{self.url_of(path)}: {len(data)} bytes at offset {start + lo}, {hi - lo} expected")
            view[lo:hi] = data
        for future in [self.pool.submit(piece, lo) for lo in range(0, view.nbytes, PART)]:
            future.result()


class MultipartWrite:
    """A new S3 object written in parts, several at once; it exists only after ``close()``."""

    def __init__(self, client: S3Client, path: str) -> None:
        self._client, self._path = client, path
        self._bucket, self._key = client.where(path)
        self._buffer = bytearray()
        self._upload: str | None = None
        self._parts: list[Future[str]] = []
        self._slots = threading.BoundedSemaphore(PARALLEL)

    def write(self, data: memoryview) -> None:
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        while view.nbytes:
            take = min(PART - len(self._buffer), view.nbytes)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == PART:
                self._send(bytes(self._buffer))
                self._buffer.clear()

    def _send(self, part: bytes) -> None:
        if self._upload is None:
            reply = self._client.call("create_multipart_upload", "start an upload of", self._path,
                                      Bucket=self._bucket, Key=self._key)
            self._upload = str(reply["UploadId"])
        number = len(self._parts) + 1
        self._slots.acquire()  # at most PARALLEL parts in flight: memory stays bounded
        self._parts.append(self._client.pool.submit(self._upload_part, number, part))

    def _upload_part(self, number: int, part: bytes) -> str:
        try:
            reply = self._client.call("upload_part", "upload a part of", self._path, Bucket=self._bucket,
                                      Key=self._key, UploadId=self._upload, PartNumber=number, Body=part)
            return str(reply["ETag"])
        finally:
            self._slots.release()

    def close(self) -> None:
        if self._upload is None:  # small: one request
            self._client.put_new(self._path, bytes(self._buffer))
            return
        try:
            if self._buffer:
                self._send(bytes(self._buffer))
            tags = [future.result() for future in self._parts]
            parts = [{"PartNumber": k + 1, "ETag": tag} for k, tag in enumerate(tags)]
            extra = {"IfNoneMatch": "*"} if self._client.conditional else {}
            self._client.call("complete_multipart_upload", "complete the upload of", self._path,
                              Bucket=self._bucket, Key=self._key, UploadId=self._upload,
                              MultipartUpload={"Parts": parts}, **extra)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for future in self._parts:
            future.cancel()
        if self._upload is None:
            return
        upload, self._upload = self._upload, None
        try:
            self._client.call("abort_multipart_upload", "abort the upload of", self._path, Bucket=self._bucket,
                              Key=self._key, UploadId=upload)
        except Exception:  # the store discards unfinished uploads by its lifecycle rules; the error that led here matters
            pass


class RangedFile:
    """A read-only file over an object: small reads are one ranged GET each, big ``readinto`` are parallel."""

    def __init__(self, client: S3Client, path: str, size: int) -> None:
        self._client, self._path, self._size, self._pos = client, path, size, 0

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b""
        data = self._client.read_range(self._path, self._pos, end)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(view.nbytes, self._size - self._pos))
        if count:
            self._client.read_into(self._path, self._pos, view[:count])
        self._pos += count
        return count

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self._size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        pass

    def __enter__(self) -> RangedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
