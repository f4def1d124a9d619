"""``import_checkpoint``: detect a foreign checkpoint's layout and translate it.

Files are read with :func:`~.safe_load.safe_torch_load` (never full unpickling),
each under a byte budget (:mod:`.budget`). A file that needs a refused global is
refused unless the caller opts in:

* ``trust=True``: the classes the file names are imported and allowed (see :mod:`.trust`);
* ``drop_unsafe=True``: objects that need a refused global are replaced by inert
  stand-ins (nothing is imported or called) and dropped; the import fails if any
  of them was needed for the state it imports rather than for a left-out key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from savegame.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    SavegameError,
    StorageError,
    UnsafeCheckpointError,
)
from savegame.migrate import (
    accelerate,
    bare_state_dict,
    flat_rng,
    format_v1,
    hf_trainer,
    lightning,
    nested_rng,
    state_dicts,
)
from savegame.migrate.budget import check_max_bytes
from savegame.migrate.builder import Draft
from savegame.migrate.files import list_dir
from savegame.migrate.restricted_unpickler import restricted_unpickle
from savegame.migrate.result import ForeignCheckpoint
from savegame.migrate.safe_load import load_with_stand_ins, safe_torch_load
from savegame.migrate.stand_ins import stand_in_name, stand_ins_in
from savegame.migrate.weights import load_weights, read_safetensors

log = logging.getLogger("savegame.migrate")

# Most specific first: every layout below has a "model"-like key the later ones also match.
FILE_LAYOUTS = (lightning, format_v1, state_dicts, nested_rng, flat_rng, bare_state_dict)
DIRECTORY_LAYOUTS = (hf_trainer, accelerate)
LAYOUTS = tuple(m.LAYOUT for m in (*FILE_LAYOUTS, *DIRECTORY_LAYOUTS))


def import_checkpoint(src: str | Path, *, trust: bool = False, drop_unsafe: bool = False, step: int | None = None,
                      max_bytes: int | None = None, progress: Callable[[int], None] | None = None,
                      rename: Mapping[str, str] | None = None) -> ForeignCheckpoint:
    """Translate the foreign checkpoint file or directory ``src`` into a savegame state tree.

    ``step`` replaces the step the file records (best values and early stopping the
    tool saved without a step take it too); ``max_bytes`` bounds what loading each
    file may allocate (default: a small multiple of its size, see :mod:`.budget`);
    ``progress`` is called with byte counts as files are read; ``rename`` gives
    imported states other names (``{"optimizer_1": "disc_optimizer"}``).

    Raises CheckpointNotFoundError if ``src`` does not exist, ConfigurationError for
    an unrecognised layout (naming the keys or files found), UnsafeCheckpointError
    for a file that needs a global outside the allowlist (naming it and where it
    sits) or too much memory, CorruptCheckpointError for damaged files and malformed
    states, StorageError when a file or directory cannot be read.
    """
    for name, flag in (("trust", trust), ("drop_unsafe", drop_unsafe)):
        if not isinstance(flag, bool):
            raise ConfigurationError(f"{name} must be True or False, got {flag!r}")
    if step is not None and (type(step) is not int or step < 0):
        raise ConfigurationError(f"step must be a non-negative int or None, got {step!r}")
    check_max_bytes(max_bytes)
    renames = _check_rename(rename)
    path = Path(src)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} does not exist")
    loader = _Loader(trust=trust, drop_unsafe=drop_unsafe, max_bytes=max_bytes, progress=progress)
    try:
        layout, draft = _import_directory(path, loader) if path.is_dir() else _import_file(path, loader)
        draft.rename(renames)
        result = draft.finish(layout.LAYOUT, step=step, step_from_epoch=layout.COUNTS_EPOCHS)
    except CorruptCheckpointError as exc:
        if loader.dropped:  # the "malformed" value is most likely one drop_unsafe replaced
            raise UnsafeCheckpointError(f"{exc}; note that drop_unsafe=True dropped "
                                        f"{loader.describe_dropped()}, which the import needs") from exc
        raise
    except SavegameError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc
    except RecursionError as exc:
        raise CorruptCheckpointError(f"{path} holds values nested too deeply to import") from exc
    result = loader.check(result)
    log.info("imported %s as %s: step %d, %d states, left out: %s", path, result.layout, result.step,
             len(result.tree["state"]), ", ".join(result.left_out) or "nothing")
    return result


def _check_rename(rename: Mapping[str, str] | None) -> dict[str, str]:
    if rename is None:
        return {}
    if not isinstance(rename, Mapping):
        raise ConfigurationError(f"rename must be a dict of old state name -> new name, got {type(rename).__name__}")
    for old, new in rename.items():
        if not isinstance(old, str) or not isinstance(new, str) or not new or new.startswith((".", "$")):
            raise ConfigurationError(f"rename {old!r} -> {new!r}: names are strings, the new one non-empty and "
                                     "not starting with '.' or '$'")
    return dict(rename)


def input_bytes(src: str | Path) -> int:
    """The bytes an import of ``src`` reads at most: its size, or the sizes of the files in it."""
    path = Path(src)
    try:
        if path.is_dir():
            return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _import_file(path: Path, loader: _Loader) -> tuple[Any, Draft]:
    if path.suffix == ".safetensors":
        state, _ = load_weights(path, loader)
        return bare_state_dict, bare_state_dict.convert(state)
    checkpoint = loader.load_torch(path)
    whole = stand_in_name(checkpoint)
    if whole is not None:
        raise UnsafeCheckpointError(f"{path} is one {whole} object as a whole, which savegame does not load: "
                                    f"there is nothing to import without it. {_WHOLE_OBJECT_REMEDY}")
    if isinstance(checkpoint, torch.nn.Module):  # torch.save(model), loaded with trust=True
        return bare_state_dict, bare_state_dict.convert_module(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise ConfigurationError(f"{path} holds a {type(checkpoint).__name__}, neither a dict nor a whole "
                                 f"torch.nn.Module: not a checkpoint layout savegame can import (supported: "
                                 f"{', '.join(LAYOUTS)})")
    for layout in FILE_LAYOUTS:
        if layout.matches(checkpoint):
            with _malformed(path, layout.LAYOUT):
                return layout, layout.convert(checkpoint)
    keys = ", ".join(sorted(repr(k) for k in checkpoint)[:40]) or "none"
    raise ConfigurationError(f"{path}: unknown checkpoint layout; its top-level keys are {keys}. Supported "
                             f"layouts: {', '.join(LAYOUTS)} (see docs/migrate.md)")


_WHOLE_OBJECT_REMEDY = (
    "If it is a model saved whole (torch.save(model)) and you trust the file's author, trust=True (savegame "
    "migrate --trust) imports its state_dict(); otherwise re-save it where you trust it as "
    "torch.save(model.state_dict(), path).")


def _import_directory(path: Path, loader: _Loader) -> tuple[Any, Draft]:
    for layout in DIRECTORY_LAYOUTS:
        if layout.matches(path):
            with _malformed(path, layout.LAYOUT):
                return layout, layout.convert(path, loader)
    files = ", ".join(list_dir(path)[:40]) or "none"
    raise ConfigurationError(f"{path}: unknown checkpoint directory layout; its files are {files}. Supported "
                             f"directories: Hugging Face Trainer checkpoint-N/ (trainer_state.json) and "
                             f"Accelerate save_state (random_states_0.pkl)")


@contextmanager
def _malformed(path: Path, layout: str) -> Iterator[None]:
    """Foreign data of the right layout but an unexpected shape is a damaged checkpoint."""
    try:
        yield
    except SavegameError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        raise CorruptCheckpointError(f"{path} looks like a {layout} checkpoint but a value in it has an "
                                     f"unexpected shape: {type(exc).__name__}: {exc}") from exc


def _modules_as_state_dicts(file: Path, loaded: Any) -> Any:
    """A trusted ``torch.save({"model": model, ...})``: whole modules under top-level keys become their state dicts.

    (A file that is one module as a whole is imported by :func:`_import_file`, which reports it.)
    """
    if not isinstance(loaded, Mapping) or not any(isinstance(v, torch.nn.Module) for v in loaded.values()):
        return loaded
    modules = [str(k) for k, v in loaded.items() if isinstance(v, torch.nn.Module)]
    log.info("%s: importing the state_dict() of the whole modules under %s", file, ", ".join(modules))
    return {k: v.state_dict() if isinstance(v, torch.nn.Module) else v for k, v in loaded.items()}


@dataclass
class _Loader:
    """Reads each file of one import with the import's settings; remembers what it dropped.

    Implements :class:`~.files.Loader`.
    """

    trust: bool
    drop_unsafe: bool
    max_bytes: int | None = None
    progress: Callable[[int], None] | None = None
    dropped: list[tuple[str, str, str]] = field(default_factory=list)  # (file, where, global)

    def load_torch(self, file: Path) -> Any:
        try:
            loaded = safe_torch_load(file, trust=self.trust, max_bytes=self.max_bytes, progress=self.progress)
        except UnsafeCheckpointError as refusal:
            if self.trust:
                raise
            return self._without_unsafe(file, refusal)
        return _modules_as_state_dicts(file, loaded) if self.trust else loaded

    def load_pickle(self, file: Path) -> Any:
        loaded = restricted_unpickle(file, max_bytes=self.max_bytes)
        self._read(file)
        return loaded

    def load_safetensors(self, file: Path) -> dict[str, torch.Tensor]:
        loaded = read_safetensors(file)
        self._read(file)
        return loaded

    def _read(self, file: Path) -> None:
        if self.progress is not None:
            self.progress(file.stat().st_size)

    def _without_unsafe(self, file: Path, refusal: UnsafeCheckpointError) -> Any:
        try:
            loaded = load_with_stand_ins(file, max_bytes=self.max_bytes, progress=self.progress)
        except UnsafeCheckpointError:
            raise refusal from None  # a module torch blocks outright, or too much memory: the first message says it
        found = list(stand_ins_in(loaded))
        if not found:
            raise refusal
        if [place for place, _ in found] == ["<top level>"]:  # dropping it would leave nothing to import
            raise UnsafeCheckpointError(f"{refusal} The whole file is one {found[0][1]} object. "
                                        f"{_WHOLE_OBJECT_REMEDY}") from refusal
        if not self.drop_unsafe:
            where = "; ".join(f"{name} at {place}" for place, name in found[:8])
            raise UnsafeCheckpointError(
                f"{refusal} It sits at: {where}. To import without those objects (they are never "
                "constructed) pass drop_unsafe=True (savegame migrate --drop-unsafe).") from refusal
        self.dropped += [(file.name, place, name) for place, name in found]
        log.warning("drop_unsafe=True: not loading %s", self.describe_dropped())
        return loaded

    def describe_dropped(self) -> str:
        return "; ".join(f"{name} at {file}:{place}" for file, place, name in self.dropped[:8])

    def check(self, result: ForeignCheckpoint) -> ForeignCheckpoint:
        """Refuse a result that still holds a stand-in; report what was dropped."""
        needed = list(stand_ins_in(result.tree, "tree"))
        if needed:
            where = "; ".join(f"{name} at {place}" for place, name in needed[:8])
            raise UnsafeCheckpointError(
                f"the imported state needs objects savegame does not load ({where}); drop_unsafe=True drops "
                "only objects under keys the import leaves out. Pass trust=True only if you trust the "
                "file's author.")
        notes = [f"{file}: {place} (needs {name}; dropped, never loaded)" for file, place, name in self.dropped]
        return replace(result, left_out=[*result.left_out, *notes]) if notes else result
