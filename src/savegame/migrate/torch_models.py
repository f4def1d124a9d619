"""Models of the globals ``torch.load(weights_only=True)`` allows, for the dry run of :mod:`.preflight`.

Each model accepts what a genuine ``torch.save`` file passes and charges the bytes
the real call would make importing cost; nothing is allocated. Callables torch
allows but ``torch.save`` never calls directly (tensor and storage classes, whose
constructors allocate whatever size they are given) are :class:`Refused`, as are
the tensor kinds savegame cannot store (sparse, quantized, nested, wrapper
subclasses). Plain values (dtypes, layouts, devices, sizes) are the real objects.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from functools import cache
from typing import Any, Self

import torch

from savegame.errors import UnsafeCheckpointError
from savegame.migrate import budget
from savegame.migrate.allowlist import PLAIN_PYTHON


class DryStorage:
    """A storage of ``nbytes`` bytes, as a persistent id declares it."""

    def __init__(self, nbytes: int, itemsize: int) -> None:
        self.nbytes, self.itemsize = nbytes, itemsize


class DryTensor:
    """A tensor that was sized, not built. BUILD on a tensor (``Tensor.set_``) is sized too."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) >= 3 and isinstance(state[0], DryStorage):
            budget.charge_tensor(state[2], state[0].itemsize, state[0].nbytes)


class Refused:
    """A global torch allows that a torch.save file never calls: calling it (REDUCE or NEWOBJ) is refused."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        if isinstance(cls, Refused):  # NEWOBJ: cls.__new__(cls, *args) with cls this very object
            raise UnsafeCheckpointError(cls.refusal())
        return super().__new__(cls)

    def __init__(self, name: str, why: str = "") -> None:
        self.name, self.why = name, why

    def refusal(self) -> str:
        return (f"refused a pickle that calls {self.name}(...) directly: "
                + (self.why or "torch.save never writes that, and it can allocate any amount of memory"))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(self.refusal())


def storage_itemsize(storage_type: Any) -> int:
    """Bytes per element of the storage type named in a persistent id."""
    if storage_type is UNTYPED:
        return 1
    if isinstance(storage_type, torch.serialization.StorageType):
        return int(storage_type.dtype.itemsize)
    raise UnsafeCheckpointError(f"refused a storage record of type {storage_type!r:.80}")


def _view(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> DryTensor:
    """_rebuild_tensor, _rebuild_tensor_v2 and _rebuild_tensor_v3."""
    if not isinstance(storage, DryStorage):
        raise UnsafeCheckpointError("refused a tensor rebuilt on something that is not one of the file's storages")
    itemsize = storage.itemsize
    if len(rest) >= 3 and isinstance(rest[2], torch.dtype):  # v3 views an untyped storage as ``dtype``
        itemsize = rest[2].itemsize
    budget.charge_tensor(size, itemsize, storage.nbytes)
    return DryTensor()


def _parameter(data: Any = None, *rest: Any) -> Any:
    return data


def _from_numpy(data: Any, *rest: Any) -> DryTensor:
    return DryTensor()  # the array itself was charged when it was built


def _meta(*args: Any) -> DryTensor:
    return DryTensor()  # a meta tensor holds no data


def _from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if not (callable(func) and isinstance(args, tuple)):
        raise UnsafeCheckpointError("refused a malformed torch._tensor._rebuild_from_type_v2 call")
    return func(*args)


def stand_in(name: str) -> type:
    """An inert class standing for a global neither torch nor savegame allows (nothing is imported)."""
    return _stand_in(name)


@cache
def _stand_in(name: str) -> type:
    def refuse_new(cls: type, *args: Any, **kwargs: Any) -> Any:
        return object.__new__(cls)

    return type("NotLoaded", (), {"global_name": name, "__new__": refuse_new,
                                  "__init__": lambda self, *a, **k: None, "__setstate__": lambda self, s: None})


UNTYPED = Refused("torch.storage.UntypedStorage")
_UNSTORABLE = "savegame cannot store {} tensors, so it does not import them"
_REBUILDERS: dict[str, Any] = {
    "_rebuild_tensor": _view, "_rebuild_tensor_v2": _view, "_rebuild_tensor_v3": _view,
    "_rebuild_parameter": _parameter, "_rebuild_parameter_with_state": _parameter,
    "_rebuild_device_tensor_from_numpy": _from_numpy, "_rebuild_device_tensor_from_cpu_tensor": _parameter,
    "_rebuild_meta_tensor_no_storage": _meta,
}
_HARMLESS = {"collections.OrderedDict": OrderedDict, "collections.Counter": Counter, "torch.Size": torch.Size,
             "torch.device": torch.device, "torch.serialization._get_layout": torch.serialization._get_layout,
             "builtins.set": set, "builtins.complex": complex}


def _torch_allowed() -> dict[str, Any]:
    """torch's own list of weights-only globals (private, so read defensively)."""
    getter = getattr(getattr(torch, "_weights_only_unpickler", None), "_get_allowed_globals", None)
    allowed: dict[str, Any] = getter() if callable(getter) else {}
    return allowed


def _model(name: str, obj: Any) -> Any:
    if name in _HARMLESS:
        return _HARMLESS[name]
    if name in PLAIN_PYTHON:  # bytearray and _codecs.encode: the guarded, charged versions
        return PLAIN_PYTHON[name]
    if name == "torch.nn.parameter.Parameter":
        return _parameter
    if name == "torch._tensor._rebuild_from_type_v2":
        return _from_type
    if name.startswith("torch._utils._rebuild_"):
        short = name.rsplit(".", 1)[1]
        kind = short.removeprefix("_rebuild_").removesuffix("_tensor").replace("_", " ")
        return _REBUILDERS.get(short) or Refused(name, _UNSTORABLE.format(kind or "such"))
    if name == "torch.storage.UntypedStorage":
        return UNTYPED
    if callable(obj) or isinstance(obj, type):
        return Refused(name)
    return obj  # dtypes, layouts, qschemes, legacy storage types: plain values


#: Every global the dry run resolves, by dotted name: torch's weights-only list, modelled.
MODELS: dict[str, Any] = {name: _model(name, obj) for name, obj in _torch_allowed().items()}
MODELS.update({name: _model(name, None) for name in _HARMLESS if name not in MODELS})
