"""One way in: :func:`open_storage` turns a path or a URL into the Storage that serves it.

A plain path is a local directory (:class:`LocalStorage`); any other
``protocol://`` is an object store through fsspec (:class:`RemoteStorage`): ``s3://``,
``gs://``, ``az://``, ``memory://`` ...
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import Any

from savegame.errors import ConfigurationError
from savegame.storage.base import Storage
from savegame.storage.local import LocalStorage


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL of an object store (``s3://...``); ``file://`` and plain paths are not."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fspath(path)
    if not isinstance(text, str):
        return False
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isascii() and scheme.replace("+", "").replace("-", "").isalnum() \
        and scheme != "file" and len(scheme) > 1  # "c://" would be a Windows drive, not a protocol


def open_storage(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The storage rooted at ``path``: local for a path, fsspec for a URL (``storage_options`` go to fsspec,
    except ``lease_seconds``, the writer's lease on object stores)."""
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise ConfigurationError(f"storage_options must be a dict of fsspec options, got {storage_options!r}")
    text = os.fspath(path)
    if is_url(text):
        from savegame.storage.remote import RemoteStorage
        return RemoteStorage(text, storage_options)
    if storage_options:
        raise ConfigurationError(f"storage_options are for URLs (s3://...); {text!r} is a local path")
    return LocalStorage(text)


def split_url(url: str) -> tuple[str, str]:
    """(parent URL, last name) of ``url``, as ``os.path.split`` does for paths."""
    scheme, _, rest = url.rstrip("/").partition("://")
    head, name = posixpath.split(rest)
    return f"{scheme}://{head}", name


def join(root: str, name: str) -> str:
    """``root``/``name`` for a URL, ``os.path.join`` for a path."""
    return f"{root.rstrip('/')}/{name}" if is_url(root) else os.path.join(root, name)
