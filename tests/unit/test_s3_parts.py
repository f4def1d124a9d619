"""How an S3 upload gathers a file into requests (no server needed; the requests are recorded)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savegame.errors import StorageError
from savegame.storage import s3io
from savegame.storage.s3io import PART, ChainBody, MultipartWrite, S3Client, part_size


class Recording(S3Client):
    """An S3 client whose requests are recorded instead of sent: the upload logic without a server."""

    def __init__(self, single_put: int = s3io.SINGLE_PUT) -> None:
        class Fs:
            @staticmethod
            def split_path(path: str) -> tuple[str, str, None]:
                bucket, _, key = path.partition("/")
                return bucket, key, None
        super().__init__(Fs(), lambda p: f"s3://{p}")
        self.single_put = single_put
        self.requests: list[tuple[str, int | None, bytes]] = []
        self.lock = threading.Lock()

    def announced(self) -> dict[str, Any]:
        return {}

    def call(self, method: str, action: str, path: str, *, body: list[memoryview] | None = None, **kwargs: Any) -> Any:
        data = b""
        if body is not None:  # read the body the way botocore does: in chunks until empty
            reader, chunks = ChainBody(body), []
            while chunk := reader.read(1 << 16):
                chunks.append(bytes(chunk))
            data = b"".join(chunks)
        with self.lock:
            self.requests.append((method, kwargs.get("PartNumber"), data))
        if method == "create_multipart_upload":
            return {"UploadId": "u1"}
        if method == "upload_part":
            return {"ETag": f"e{kwargs['PartNumber']}", "ChecksumCRC32": "c"}
        return {}

    def sent(self) -> tuple[list[int], bytes]:
        parts = sorted((n, d) for m, n, d in self.requests if m == "upload_part")
        singles = [d for m, _, d in self.requests if m == "put_object"]
        if singles:
            return [len(singles[0])], singles[0]
        return [len(d) for _, d in parts], b"".join(d for _, d in parts)


def pattern(n: int, seed: int = 0) -> bytearray:
    cycle = bytes((i * 131 + seed) % 256 for i in range(251))  # no period shared with the part size
    return bytearray((cycle * (n // 251 + 1))[:n])


def all_slots_free(client: S3Client) -> bool:
    free = [client.slots.acquire(blocking=False) for _ in range(s3io.PARALLEL)]
    for taken in free:
        if taken:
            client.slots.release()
    return all(free)


@settings(deadline=None, max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 3 * PART), st.booleans()), max_size=6))
def test_written_and_lent_bytes_arrive_whole_and_in_order(chunks: list[tuple[int, bool]]) -> None:
    client = Recording()
    upload = MultipartWrite(client, "bucket/run/file")
    expected = bytearray()
    for k, (size, lent) in enumerate(chunks):
        data = pattern(size, k)
        expected += data
        (upload.lend if lent else upload.write)(memoryview(data))
    upload.close()
    sizes, data = client.sent()
    assert data == expected
    if len(expected) <= s3io.SINGLE_PUT:
        assert [m for m, _, _ in client.requests] == ["put_object"]
    else:  # every part but the last is full; the completion lists them all
        assert sizes[:-1] == [part_size(k + 1) for k in range(len(sizes) - 1)] and 0 < sizes[-1] <= part_size(len(sizes))
        assert [m for m, _, _ in client.requests][-1] == "complete_multipart_upload"
    assert all_slots_free(client)


def test_written_bytes_are_copied_and_lent_ones_are_not() -> None:
    client = Recording()
    upload = MultipartWrite(client, "bucket/run/file")
    lent, written = pattern(3 * PART, 1), pattern(100, 2)
    upload.write(memoryview(written))
    upload.lend(memoryview(lent))
    written[:] = bytes(100)  # the caller may change written bytes at once
    upload.close()
    assert client.sent()[1] == bytes(pattern(100, 2)) + bytes(lent)
    assert len(client.buffers._free) == 1  # one pooled buffer held the 100 copied bytes, none the lent ones


def test_a_larger_multipart_threshold_makes_a_larger_first_part() -> None:
    client = Recording(single_put=3 * PART)
    upload = MultipartWrite(client, "bucket/run/file")
    upload.write(memoryview(pattern(3 * PART)))
    upload.close()
    assert [m for m, _, _ in client.requests] == ["put_object"]  # up to the threshold: one request
    client = Recording(single_put=3 * PART)
    upload = MultipartWrite(client, "bucket/run/file")
    upload.write(memoryview(pattern(3 * PART + 1)))
    upload.close()
    assert client.sent()[0] == [3 * PART, 1]


def test_multipart_threshold_zero_sends_every_file_in_parts() -> None:
    client = Recording(single_put=0)
    upload = MultipartWrite(client, "bucket/run/file")
    upload.write(memoryview(pattern(100)))
    upload.close()
    assert [m for m, _, _ in client.requests] == ["create_multipart_upload", "upload_part", "complete_multipart_upload"]
    assert client.sent() == ([100], bytes(pattern(100)))


def test_abort_waits_for_parts_on_the_wire_and_frees_every_slot() -> None:
    """Lent bytes may change once abort() returns: no part may still be reading them then. Parts not started
    yet never start, and give their slots back (a cancelled one would not: uploads would hang for good)."""
    sending, release = threading.Event(), threading.Event()
    finished: list[int] = []

    class Slow(Recording):
        def call(self, method: str, action: str, path: str, **kwargs: Any) -> Any:
            if method == "upload_part":
                if kwargs["PartNumber"] == 1:
                    sending.set()
                    release.wait(10)
                finished.append(kwargs["PartNumber"])
            return super().call(method, action, path, **kwargs)
    client = Slow()
    client.pool = s3io.ThreadPoolExecutor(max_workers=1)  # part 1 on the wire, the next ones queued behind it
    upload = MultipartWrite(client, "bucket/run/file")
    for k in range(4):
        upload.lend(memoryview(pattern(PART, k)))
    assert sending.wait(10)
    threading.Timer(0.2, release.set).start()
    upload.abort()
    assert release.is_set() and finished == [1]  # part 1 ended before abort() returned; 2 and 3 never went
    assert all_slots_free(client) and len(client.buffers._free) == 0  # lent parts held no pooled buffer


def test_parts_grow_so_ten_thousand_of_them_hold_more_than_s3_stores() -> None:
    sizes = [part_size(k) for k in range(1, s3io.MAX_PARTS + 1)]
    assert sizes[0] == PART and max(sizes) <= s3io.MAX_PART
    assert sum(sizes) > 5 * 10**12  # S3's largest object: 5 TB
    assert sizes == sorted(sizes)


def test_a_failed_part_stops_the_upload_and_gives_everything_back() -> None:
    class Failing(Recording):
        def call(self, method: str, action: str, path: str, **kwargs: Any) -> Any:
            if method == "upload_part" and kwargs.get("PartNumber") == 2:
                raise StorageError("could not upload a part of s3://bucket/run/file: access denied")
            return super().call(method, action, path, **kwargs)
    client = Failing()
    upload = MultipartWrite(client, "bucket/run/file")
    with pytest.raises(StorageError, match="access denied"):
        try:  # as the writer does: a failed write aborts the file
            for k in range(12):
                upload.lend(memoryview(pattern(PART, k)))
            upload.close()
        except StorageError:
            upload.abort()
            raise
    assert [m for m, _, _ in client.requests][-1] == "abort_multipart_upload"
    assert "complete_multipart_upload" not in [m for m, _, _ in client.requests]
    assert all_slots_free(client)


def test_chain_body_reads_across_pieces_seeks_and_knows_its_length() -> None:
    pieces = [memoryview(b"abc"), memoryview(b""), memoryview(b"defgh")]
    body = ChainBody(pieces)
    assert len(body) == 8
    assert bytes(body.read(2)) == b"ab" and bytes(body.read(5)) == b"c"  # a read stops at a piece's end
    assert bytes(body.read(-1)) == b"defgh" and body.read(4) == b"" and body.tell() == 8
    body.seek(4)
    assert bytes(body.read(10)) == b"efgh"
    body.seek(-3, 2)
    assert bytes(body.read()) == b"fgh"
    body.seek(1)
    assert bytes(body.read()) == b"bcdefgh"  # the rest, across pieces
    with pytest.raises(ValueError):
        body.seek(-9, 2)
    assert len(ChainBody([])) == 0 and ChainBody([]).read() == b""
