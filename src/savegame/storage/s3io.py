"""Bulk transfers to and from S3: multipart uploads with parts in parallel, streamed ranged reads.

Both run through a botocore client with s3fs's settings (:class:`S3Client`), from a small
thread pool, so several parts are on the wire at once. The tensor bytes go from the staging
buffers onto the network as they are: the writer lends them (they stay unchanged until the
file is closed), and each part is sent as views of them, never copied into a part or a
whole-file buffer. Only bytes written without that promise (a file's header) are copied,
into a few reused buffers. At most PARALLEL parts are in flight.
The object appears only when the upload completes (S3 commits a multipart upload atomically),
and with ``If-None-Match: *`` where the store supports it, so it never replaces another object.
A file is read back as one ranged GET streamed into the caller's buffer (see :class:`RangedFile`).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import inspect
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from savegame.errors import StorageError
from savegame.storage.retry import retried

PART = 8 << 20
"""The size of an upload's parts (after every 1,000 parts it doubles, see :func:`part_size`). On the local moto
server 8 MiB parts went up 10-25% faster than 16 MiB or larger ones (BENCHMARKS.md)."""
PARTS_PER_SIZE = 1000
MAX_PARTS = 10_000  # S3's limit: with parts growing, one file may hold 8 TB (S3 stores objects up to 5 TB)
MAX_PART = 5 << 30  # S3's largest part (and single PUT)
CHUNK = 8 << 20  # bytes taken from a download stream at a time
PARALLEL = 8
SINGLE_PUT = PART
"""Files up to this size go up in one PUT, larger ones as multipart uploads with PARALLEL parts in flight.
With each part's checksum named at completion (and CRC32 announced when the upload starts) a multipart
upload beat one PUT on the local moto server at 256 MB and 1 GB, and matched boto3's own
``upload_fileobj``; without them moto took seconds to complete one (BENCHMARKS.md). The store option
``multipart_threshold`` moves this limit (the first part then holds that many bytes)."""
WINDOW = 1 << 20  # the least a ranged GET asks for: a small read never makes the server send the whole file
SKIP = 1 << 16  # a seek this far forward inside the current response reads through rather than starts a new GET


def part_size(number: int, first: int = PART) -> int:
    """The size of part ``number`` (counted from 1) of an upload whose first part holds ``first`` bytes: PART
    for the next 999, then doubling after every 1,000 parts, up to 4 GiB. So 10,000 parts hold 8 TB."""
    return first if number == 1 else PART << min(9, (number - 1) // PARTS_PER_SIZE)


class S3Client:
    """Calls of a botocore S3 client from any thread, with retries and translated errors.

    The client is built from the s3fs file system's own settings (credentials, endpoint,
    profile, client and config options), so it reaches the same store as s3fs does, and its
    requests carry s3fs's per-request options (:meth:`extra`). Bulk
    transfers go through it rather than s3fs's asynchronous client: on the same server,
    botocore (urllib3) moved a 128 MB object 2x faster up and 4x faster down than
    aiobotocore (aiohttp) did (see BENCHMARKS.md).
    """

    def __init__(self, fs: Any, url_of: Callable[[str], str]) -> None:
        self.fs, self.url_of = fs, url_of
        self.pool = ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="savegame-s3")
        self.conditional = True  # If-None-Match on new objects (S3 and moto refuse to replace then)
        self.slots = threading.BoundedSemaphore(PARALLEL)
        self.buffers = BufferPool()
        self.single_put = SINGLE_PUT
        self._client: Any = None
        self._lock = threading.Lock()
        self._extra: dict[str, dict[str, Any]] = {}

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = sync_client(self.fs)
            return self._client

    def announced(self) -> dict[str, Any]:
        """The checksum a new multipart upload announces: CRC32 (the one botocore computes for every part)
        unless the client computes checksums only where required (``AWS_REQUEST_CHECKSUM_CALCULATION=
        when_required``, for stores that refuse them)."""
        wanted = getattr(self.client.meta.config, "request_checksum_calculation", None)
        return {"ChecksumAlgorithm": "CRC32"} if wanted in (None, "when_supported") else {}

    def call(self, method: str, action: str, path: str, *, body: list[memoryview] | None = None, **kwargs: Any) -> Any:
        """``method`` of the client with ``kwargs`` (and s3fs's per-request options), retried; ``body``, views
        sent one after the other as the request's body, is read afresh by every attempt."""
        kwargs = {**self.extra(method), **kwargs}

        def attempt() -> Any:
            return getattr(self.client, method)(**kwargs, **({} if body is None else {"Body": ChainBody(body)}))
        return retried(attempt, action, self.url_of(path))

    def extra(self, method: str) -> dict[str, Any]:
        """The per-request options of the s3fs file system (``s3_additional_kwargs`` such as
        ``ServerSideEncryption`` or ``SSECustomerKey``, and ``RequestPayer`` with ``requester_pays``)
        that the client method ``method`` takes, as s3fs adds them to its own requests."""
        cached = self._extra.get(method)
        if cached is None:  # two threads may both work it out: the same answer
            wanted = {**(getattr(self.fs, "s3_additional_kwargs", None) or {}),
                      **(getattr(self.fs, "req_kw", None) or {})}
            members: Any = ()
            if wanted:
                meta = self.client.meta
                members = meta.service_model.operation_model(meta.method_to_api_mapping[method]).input_shape.members
            cached = self._extra[method] = {k: v for k, v in wanted.items() if k in members}
        return cached

    def where(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    def abort_uploads(self, prefix: str) -> list[str]:
        """Abort the unfinished multipart uploads under ``prefix/`` (a killed writer's); return their keys."""
        bucket, key = self.where(prefix)
        reply = self.call("list_multipart_uploads", "list the unfinished uploads of", prefix, Bucket=bucket,
                          Prefix=f"{key}/")
        aborted = []
        for upload in reply.get("Uploads", ()):
            self.call("abort_multipart_upload", "abort the upload of", prefix, Bucket=bucket, Key=upload["Key"],
                      UploadId=upload["UploadId"])
            aborted.append(str(upload["Key"]))
        return aborted

    def exists(self, path: str) -> bool:
        """Whether ``path`` is an object or a prefix of some (``path/...``): one listing request."""
        bucket, key = self.where(path)
        reply = self.call("list_objects_v2", "look for", path, Bucket=bucket, Prefix=key, Delimiter="/")
        return any(o["Key"] == key for o in reply.get("Contents", ())) or \
            any(p["Prefix"] == key + "/" for p in reply.get("CommonPrefixes", ()))

    def put_new(self, path: str, pieces: list[memoryview]) -> None:
        """Create ``path`` holding ``pieces`` one after the other (sent from where they are, no copy); refused
        (FileExistsError inside a StorageError) if it exists."""
        bucket, key = self.where(path)
        self.call("put_object", "create", path, body=pieces, Bucket=bucket, Key=key, **self.if_new())

    def if_new(self) -> dict[str, Any]:
        """The condition that makes a request creating an object fail where one exists, if the store takes it."""
        return {"IfNoneMatch": "*"} if self.conditional else {}


class BufferPool:
    """Buffers of PART bytes for the bytes a part copies (those written, not lent), reused: a new one only when
    every earlier one is in use, so after the first save no page is touched for the first time."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self) -> bytearray:
        with self._lock:
            return self._free.pop() if self._free else bytearray(PART)

    def give(self, buffers: list[bytearray]) -> None:
        with self._lock:
            self._free.extend(buffers)


class ChainBody:
    """A read-only file over several memoryviews, one after the other, for botocore's ``Body``: a read of ``n``
    bytes returns a view of one of them (stopping at its end), never a copy."""

    def __init__(self, pieces: list[memoryview]) -> None:
        self._pieces = pieces
        self._ends = list(itertools.accumulate(p.nbytes for p in pieces))
        self._size = self._ends[-1] if pieces else 0
        self._pos = 0

    def read(self, n: int | None = -1) -> memoryview:
        if self._pos >= self._size:
            return memoryview(b"")
        if n is None or n < 0:  # the rest: one piece's as a view, several joined (a copy; botocore reads in chunks)
            rest = []
            while chunk := self.read(self._size):
                rest.append(chunk)
            return rest[0] if len(rest) == 1 else memoryview(b"".join(rest))
        k = bisect.bisect_right(self._ends, self._pos)
        piece, base = self._pieces[k], self._ends[k] - self._pieces[k].nbytes
        end = min(piece.nbytes, self._pos - base + n)
        out = piece[self._pos - base:end]
        self._pos += out.nbytes
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = offset if whence == 0 else self._pos + offset if whence == 1 else self._size + offset
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return self._size


_LOADER: list[Any] = []
_LOADER_LOCK = threading.Lock()


def unknown_options(fs: Any) -> list[str]:
    """The options of the s3fs file system ``fs`` that neither s3fs nor botocore knows: s3fs passes the ones it
    does not take itself on to botocore's session, which would refuse them only at the first request."""
    import botocore.session
    known = inspect.signature(botocore.session.Session).parameters
    return sorted(str(k) for k in getattr(fs, "kwargs", {}) if k not in known)


def sync_client(fs: Any) -> Any:
    """A botocore S3 client with the settings of the s3fs file system ``fs``."""
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config
    session = botocore.session.Session(**getattr(fs, "kwargs", {}))
    with _LOADER_LOCK:  # the service models are read once per process (0.1 s each time otherwise)
        if not _LOADER:
            _LOADER.append(session.get_component("data_loader"))
        session.register_component("data_loader", _LOADER[0])
    init = {"aws_access_key_id": fs.key, "aws_secret_access_key": fs.secret, "aws_session_token": fs.token,
            "endpoint_url": fs.endpoint_url}
    init = {k: v for k, v in init.items() if v}
    config = {"max_pool_connections": 2 * PARALLEL, **fs.config_kwargs}
    if fs.anon:
        init = {k: v for k, v in init.items() if k == "endpoint_url"}
        config["signature_version"] = UNSIGNED
    return session.create_client("s3", config=Config(**config), **{**init, **fs.client_kwargs})


class MultipartWrite:
    """A new S3 object written in parts, several at once; it exists only after ``close()``.

    What is written is gathered for the next request as views: lent bytes (:meth:`lend`) as they
    are, other bytes copied into buffers the client reuses. A file of up to ``single_put`` bytes
    goes up in one PUT; a larger one as a multipart upload whose parts (see :func:`part_size`)
    are sent as soon as they are full, at most PARALLEL per client in flight.
    """

    def __init__(self, client: S3Client, path: str) -> None:
        self._client, self._path = client, path
        self._bucket, self._key = client.where(path)
        self._first = min(MAX_PART, max(PART, client.single_put))
        self._pieces: list[memoryview] = []  # the bytes of the next request, in order
        self._owned: list[bytearray] = []  # the pooled buffers holding its copied bytes
        self._room = memoryview(b"")  # what is left of the last of them
        self._size = 0  # bytes in _pieces
        self._upload: str | None = None
        self._parts: list[Future[dict[str, str]]] = []
        self._aborted = False  # parts not yet started then return at once (their slot and buffers given back)

    def write(self, data: memoryview) -> None:
        """Copy ``data`` into the next request: the caller may change it once this returns."""
        view = _bytes(data)
        while view.nbytes:
            view = self._gather(view, copy=True)

    def lend(self, data: memoryview) -> None:
        """Send ``data`` from where it is: its bytes must stay unchanged until ``close()`` or ``abort()`` returns."""
        view = _bytes(data)
        while view.nbytes:
            view = self._gather(view, copy=False)

    def _gather(self, view: memoryview, copy: bool) -> memoryview:
        """Add what the next request has room for from ``view`` (sending it first if it is full); return the rest."""
        limit = part_size(len(self._parts) + 1, self._first)
        if self._size == limit:  # full and more is coming: it is a part (the file needs a multipart upload)
            self._send()
            limit = part_size(len(self._parts) + 1, self._first)
        take = min(view.nbytes, limit - self._size)
        if copy:
            self._copy(view[:take])
        else:
            self._pieces.append(view[:take])
        self._size += take
        return view[take:]

    def _copy(self, view: memoryview) -> None:
        while view.nbytes:
            if not self._room.nbytes:
                self._owned.append(self._client.buffers.take())
                self._room = memoryview(self._owned[-1])
            take = min(self._room.nbytes, view.nbytes)
            self._room[:take] = view[:take]
            self._pieces.append(self._room[:take])
            self._room, view = self._room[take:], view[take:]

    def _next_request(self) -> tuple[list[memoryview], list[bytearray]]:
        """The gathered views and the buffers they hold, handed over; gathering starts anew."""
        taken = self._pieces, self._owned
        self._pieces, self._owned, self._room, self._size = [], [], memoryview(b""), 0
        return taken

    def _send(self) -> None:
        pieces, owned = self._next_request()
        try:
            if self._upload is None:
                reply = self._client.call("create_multipart_upload", "start an upload of", self._path,
                                          Bucket=self._bucket, Key=self._key, **self._client.announced())
                self._upload = str(reply["UploadId"])
            number = len(self._parts) + 1
            if number > MAX_PARTS:
                raise StorageError(f"could not write {self._client.url_of(self._path)!r}: more than {MAX_PARTS:,} parts "
                                   "(over 8 TB), more than S3 stores in one object; save with a smaller shard_bytes")
            failed = next((f for f in self._parts if f.done() and f.exception() is not None), None)
            if failed is not None:  # stop at the first failed part: the upload cannot complete
                failed.result()
        except BaseException:
            self._client.buffers.give(owned)
            raise
        self._client.slots.acquire()  # at most PARALLEL parts in flight: memory stays bounded
        try:
            self._parts.append(self._client.pool.submit(self._upload_part, number, pieces, owned))
        except RuntimeError:  # the interpreter is exiting (a save completed at exit): no pool, the part here
            done: Future[dict[str, str]] = Future()
            done.set_result(self._upload_part(number, pieces, owned))
            self._parts.append(done)

    def _upload_part(self, number: int, pieces: list[memoryview], owned: list[bytearray]) -> dict[str, str]:
        """Upload one part; its ETag and checksum, as the completion lists them."""
        try:
            if self._aborted:
                return {}
            reply = self._client.call("upload_part", "upload a part of", self._path, body=pieces, Bucket=self._bucket,
                                      Key=self._key, UploadId=self._upload, PartNumber=number)
            return {k: v for k, v in reply.items() if k == "ETag" or k.startswith("Checksum")}  # as completion wants
        finally:
            self._client.slots.release()
            self._client.buffers.give(owned)

    def close(self) -> None:
        if self._upload is None and self._size <= self._client.single_put:  # up to the threshold: one request
            pieces, owned = self._next_request()
            try:
                self._client.put_new(self._path, pieces)
            finally:
                self._client.buffers.give(owned)
            return
        try:
            if self._size or not self._parts:
                self._send()
            tags = [future.result() for future in self._parts]
            parts = [{"PartNumber": k + 1, **tag} for k, tag in enumerate(tags)]
            self._client.call("complete_multipart_upload", "complete the upload of", self._path,
                              Bucket=self._bucket, Key=self._key, UploadId=self._upload,
                              MultipartUpload={"Parts": parts}, **self._client.if_new())
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard the upload. Parts already on the wire are let finish first (they read lent bytes); those
        not yet started return at once. None is cancelled: a cancelled part would keep its slot and buffers."""
        self._client.buffers.give(self._next_request()[1])
        self._aborted = True
        concurrent.futures.wait(self._parts)
        if self._upload is None:
            return
        upload, self._upload = self._upload, None
        try:
            self._client.call("abort_multipart_upload", "abort the upload of", self._path, Bucket=self._bucket,
                              Key=self._key, UploadId=upload)
        except Exception:  # the store discards unfinished uploads by its lifecycle rules; the error that led here matters
            pass


def _bytes(data: memoryview) -> memoryview:
    """``data`` as one-dimensional bytes (a copy only where it is not contiguous: savegame never writes such)."""
    if not data.contiguous:
        return memoryview(data.tobytes())
    return data.cast("B") if data.format != "B" or data.ndim != 1 else data


class RangedFile:
    """A read-only file over an object, read as one ranged GET streamed from the current position.

    Reading on from where the last read stopped continues the same response, so reading a tensor
    file (its header, then its whole data section straight into the caller's buffer) costs one
    request; a seek elsewhere starts a new ranged GET there. A transient failure mid-stream is
    retried from the byte it stopped at.
    """

    def __init__(self, client: S3Client, path: str, size: int, ahead: int = WINDOW) -> None:
        self._client, self._path, self._size, self._pos = client, path, size, 0
        self._ahead = ahead  # the least a new GET asks for
        self._body: Any = None
        self._body_pos = self._body_end = -1

    def _next(self, n: int, into: memoryview | None = None, want: int = 0) -> Any:
        """Up to ``n`` bytes at the current position (fewer only at the end of the object): returned,
        or, with ``into``, read straight into it from the socket and counted. A new GET asks for the
        ``want`` bytes the caller is after (at least WINDOW), not the rest of the object."""
        def attempt() -> bytes | int:
            if self._body is not None and self._body_pos < self._pos <= min(self._body_pos + SKIP, self._body_end):
                self._body_pos += len(self._body.read(self._pos - self._body_pos))  # a short skip: read through
            if self._body is None or self._body_pos != self._pos or self._body_pos >= self._body_end:
                self._drop()
                bucket, key = self._client.where(self._path)
                end = min(self._size, self._pos + max(want, n, self._ahead))
                reply = self._client.client.get_object(Bucket=bucket, Key=key, Range=f"bytes={self._pos}-{end - 1}",
                                                       **self._client.extra("get_object"))
                self._body, self._body_pos, self._body_end = reply["Body"], self._pos, end
            raw: Any = getattr(self._body, "_raw_stream", None)  # urllib3's response: it reads into a buffer
            try:
                if into is not None and hasattr(raw, "readinto"):
                    got: bytes | int = int(raw.readinto(into[:n]))
                else:
                    got = bytes(self._body.read(n))
                    if into is not None:
                        into[:len(got)] = got
            except BaseException:
                self._drop()
                raise
            size = got if isinstance(got, int) else len(got)
            if into is not None and size == 0 and self._body_pos < self._body_end:
                self._drop()  # the response ended early: a broken connection, retried from here
                raise ConnectionError(f"the response ended at byte {self._body_pos} of {self._size}")
            self._body_pos += size
            return got
        got = retried(attempt, "read", self._client.url_of(self._path))
        self._pos += got if isinstance(got, int) else len(got)
        return got

    def read(self, n: int = -1) -> bytes:
        want = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        parts = []
        while want > 0 and (data := self._next(min(want, CHUNK), want=want)):
            parts.append(data)
            want -= len(data)
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count, done = max(0, min(view.nbytes, self._size - self._pos)), 0
        while done < count and (got := self._next(min(count - done, CHUNK), view[done:], count - done)):
            done += got if isinstance(got, int) else len(got)
        return done

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self._size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # the response is abandoned either way
                pass

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> RangedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
