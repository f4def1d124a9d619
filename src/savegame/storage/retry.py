"""Errors of object stores: transient ones are retried with bounded backoff, the others become StorageError.

Transient: the store is busy or failed on its side (5xx, throttling: s3fs turns them into
``OSError`` with ``EBUSY`` or ``EREMOTEIO``), or the connection broke (reset, timeout).
Permanent: no bucket, access denied, no credentials; they are raised at once, with the URL
and what to do. A failed operation never touches what is already committed.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from savegame.errors import SavegameError, StorageError

log = logging.getLogger("savegame.storage")

T = TypeVar("T")

ATTEMPTS = 5  # the first try and four retries
BACKOFF = 0.2  # seconds before the first retry, doubled after each, at most MAX_BACKOFF
MAX_BACKOFF = 5.0

_TRANSIENT_ERRNO = {errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ECONNRESET, errno.ECONNABORTED,
                    errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN}
_TRANSIENT_NAMES = ("ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError", "ConnectTimeoutError",
                    "HTTPClientError", "ClientPayloadError", "ServerDisconnectedError", "ClientOSError",
                    "IncompleteRead", "ResponseStreamingError", "ProtocolError")
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
_TRANSIENT_TEXT = ("SlowDown", "reduce your request rate", "ServiceUnavailable", "InternalError", "RequestTimeout",
                   "Throttl", "503", "500 ", "502", "504")


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` may succeed: a 5xx, throttling, or a broken connection."""
    if isinstance(exc, (FileNotFoundError, PermissionError, FileExistsError, SavegameError)):
        return False
    s3code = _code(exc)
    if s3code is not None:
        return s3code in _TRANSIENT_CODES
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return True
    return any(text in str(exc) for text in _TRANSIENT_TEXT)


def retried(fn: Callable[[], T], action: str, url: str, *, attempts: int = ATTEMPTS) -> T:
    """``fn()``, retried on transient errors with bounded exponential backoff; any failure left is a StorageError."""
    delay = BACKOFF
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise translate(exc, action, url, attempt) from exc
            log.warning("could not %s %s (%s: %s); retrying in %.1f s (attempt %d of %d)", action, url,
                        type(exc).__name__, exc, delay, attempt + 1, attempts)
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)
    raise AssertionError("unreachable")  # pragma: no cover


def translate(exc: BaseException, action: str, url: str, attempts: int = 1) -> StorageError:
    """A StorageError saying what failed on which URL and what to do; earlier checkpoints are untouched."""
    bucket = bucket_of(url)
    name = type(exc).__name__
    text = str(exc) or name
    s3code = _code(exc)
    if s3code in ("404", "NoSuchKey", "NotFound"):
        exc = FileNotFoundError(text)
    elif s3code in ("403", "AccessDenied"):
        exc = PermissionError(text)
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        code, remedy = errno.EACCES, (
            "no credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or a "
            "config file), or pass storage_options={'key': ..., 'secret': ...}")
    elif isinstance(exc, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text \
            or "SignatureDoesNotMatch" in text:
        code, remedy = errno.EACCES, (
            f"access denied: check that the credentials in use may list, read, write and delete objects in "
            f"{bucket!r} (AWS_PROFILE, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or storage_options' key and "
            "secret)")
    elif "NoSuchBucket" in text or "bucket does not exist" in text.lower() or (
            isinstance(exc, FileNotFoundError) and action == "open the bucket of"):
        code, remedy = errno.ENOENT, f"the bucket {bucket!r} does not exist: create it, or fix the URL"
    elif isinstance(exc, FileNotFoundError):
        code, remedy = errno.ENOENT, "it does not exist"
    elif isinstance(exc, FileExistsError) or "PreconditionFailed" in text:
        code, remedy = errno.EEXIST, "it exists already"
    elif is_transient(exc):
        code, remedy = errno.EIO, (
            f"the store kept failing after {attempts} attempt(s) (a transient error: busy, throttled or a broken "
            "connection); try again later; earlier checkpoints are intact")
    else:
        code, remedy = errno.EIO, "check the URL, the endpoint (AWS_ENDPOINT_URL) and the store; earlier " \
                                  "checkpoints are intact"
    err = StorageError(f"could not {action} {url!r}: {name}: {text}; {remedy}")
    err.errno = code
    return err


def _code(exc: BaseException) -> str | None:
    """The error code of a botocore ClientError (``"NoSuchBucket"``, ``"404"``...), else None."""
    response = getattr(exc, "response", None)
    error = response.get("Error") if isinstance(response, dict) else None
    return str(error.get("Code")) if isinstance(error, dict) and error.get("Code") is not None else None


def bucket_of(url: str) -> str:
    """The bucket (or container) of ``proto://bucket/key``."""
    rest = url.split("://", 1)[-1]
    return rest.split("/", 1)[0]
