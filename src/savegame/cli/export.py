"""``export``: a checkpoint's model weights as a plain file for inference.

Formats by suffix: ``.safetensors`` (``safetensors.torch.save_file``), ``.pt`` /
``.pth`` (a plain ``{key: tensor}`` dict, loadable with ``torch.load(weights_only=True)``),
``.npz`` (``numpy.savez``). Files are written to a temporary name and renamed into place;
an existing output is replaced only if it is a regular file (never a link, directory,
FIFO or device).
The checkpoint is verified first, byte by byte (with a progress bar on terminals).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import click
import numpy as np
import torch

import savegame
from savegame.cli._app import CliError
from savegame.cli._output import console, human_bytes, nbytes
from savegame.cli._paths import CHECKPOINT, atomic_output, check_output, locate
from savegame.cli._progress import ByteProgress, verify_bytes
from savegame.storage.urls import join

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMATS = (".safetensors", ".pt", ".pth", ".npz")


@click.command("export")
@click.argument("ckpt", type=CHECKPOINT)
@click.option("--to", "target", required=True, type=click.Path(dir_okay=False),
              help="Output file: .safetensors, .pt/.pth or .npz (a regular file there is replaced).")
@click.option("--state", "state_name", help="Which state to export (default: 'model', else the only state of tensors).")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), help="Cast floating-point tensors to this dtype.")
def export(ckpt: str, target: str, state_name: str | None, dtype: str | None) -> None:
    """Write the weights of one state of CKPT (a checkpoint dir, or a run dir: its newest) to a file."""
    suffix = os.path.splitext(target)[1].lower()
    if suffix not in FORMATS:
        raise click.UsageError(f"--to {target!r}: unknown format {suffix or '(no suffix)'!r}; "
                               f"use one of {', '.join(FORMATS)}")
    check_output(target)  # before the work: a directory, link, FIFO or device is never replaced
    storage, name = locate(ckpt)
    with ByteProgress() as bar:
        verify_bytes(storage, name, bar)
        loaded = savegame.load(join(storage.root, name), mmap=True, verify=False)  # verified just now
        chosen = pick_state(loaded["state"] or {}, state_name)
        weights = flatten(loaded["state"][chosen], chosen)
        cast = DTYPES[dtype] if dtype else None
        bar.phase(f"exporting {chosen}", sum(nbytes(t) for t in weights.values()))
        tensors, tied = prepare(weights, cast, separate=suffix == ".safetensors", tick=bar.advance)
        bar.describe(f"writing {target}")
        notes = _write(tensors, target, suffix, step=loaded["step"])
    out = console()
    size = sum(nbytes(t) for t in tensors.values())
    out.print(f"exported {len(tensors)} tensors ({human_bytes(size)}) of state {chosen!r} from {name} "
              f"to {target}" + (f" as {dtype}" if dtype else ""))
    if tied:
        out.print(f"note: {tied} tensor(s) shared storage with another (tied weights)"
                  + ("; safetensors cannot share, so each was written as its own copy" if suffix == ".safetensors"
                     else "; they still share it in the file"))
    for note in notes:
        out.print(f"note: {note}")


def pick_state(states: Mapping[str, Any], wanted: str | None) -> str:
    """``wanted``, else "model", else the only state that is a dict of tensors."""
    if wanted is not None:
        if wanted not in states:
            raise CliError(f"--state {wanted!r}: no such state; the checkpoint has {', '.join(states) or 'none'}")
        return wanted
    if "model" in states:
        return "model"
    candidates = [name for name, value in states.items() if _is_weights(value)]
    if len(candidates) == 1:
        return candidates[0]
    listed = ", ".join(states) or "none"
    raise CliError(f"cannot tell which state holds the model (states: {listed}); choose one with --state")


def _is_weights(value: Any) -> bool:
    return (isinstance(value, Mapping) and bool(value)
            and all(isinstance(k, str) and isinstance(v, (torch.Tensor, np.ndarray)) for k, v in value.items()))


def flatten(value: Any, name: str) -> dict[str, torch.Tensor]:
    """A state as {dotted key: tensor}; anything but (nested) str-keyed tensors is refused."""
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []

    def walk(item: Any, path: str) -> None:
        if isinstance(item, torch.Tensor):
            out[path] = item
        elif isinstance(item, np.ndarray):
            out[path] = torch.from_numpy(np.array(item))
        elif isinstance(item, Mapping) and all(isinstance(k, str) for k in item):
            for key, child in item.items():
                walk(child, f"{path}.{key}" if path else key)
        else:
            bad.append(path or "(the state itself)")

    walk(value, "")
    if bad or not out:
        what = f"non-tensor values at {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else "") if bad else "no tensors"
        raise CliError(f"state {name!r} is not model weights ({what}); choose another with --state")
    return out


def prepare(weights: Mapping[str, torch.Tensor], cast: torch.dtype | None, *, separate: bool,
            tick: Any = None) -> tuple[dict[str, torch.Tensor], int]:
    """Contiguous CPU copies with their own storage, cast if asked; and how many were tied.

    A loaded checkpoint maps its tensors out of one shared file buffer, so each is
    copied (saving a view would save the whole buffer). Tensors that were the same
    tensor (tied weights) stay one tensor unless ``separate`` (safetensors refuses sharing).
    """
    copies: dict[tuple[Any, ...], torch.Tensor] = {}
    out, tied = {}, 0
    for key, tensor in weights.items():
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if identity in copies and tensor.numel():
            tied += 1
            out[key] = copies[identity].clone() if separate else copies[identity]
        else:
            wanted = cast if cast is not None and tensor.is_floating_point() else tensor.dtype
            out[key] = copies[identity] = tensor.detach().to("cpu", wanted, copy=True).contiguous()
        if tick is not None:
            tick(nbytes(tensor))
    return out, tied


def _write(tensors: dict[str, torch.Tensor], target: str, suffix: str, *, step: int) -> list[str]:
    notes: list[str] = []
    with atomic_output(target) as tmp:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata={"format": "pt", "source": "savegame", "step": str(step)})
        elif suffix == ".npz":
            arrays = {key: _numpy(key, t, notes) for key, t in tensors.items()}
            with open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a name
                np.savez(f, **arrays)  # type: ignore[arg-type]
        else:
            with open(tmp, "wb") as f:
                torch.save(tensors, f)
    return notes


def _numpy(key: str, tensor: torch.Tensor, notes: list[str]) -> np.ndarray:
    try:
        return tensor.numpy()
    except TypeError:  # bfloat16, float8 ...: not NumPy dtypes
        wide = torch.complex64 if tensor.is_complex() else torch.float32
        if not notes:
            notes.append(f"NumPy has no {str(tensor.dtype).removeprefix('torch.')}: such tensors were written "
                         f"as {str(wide).removeprefix('torch.')} (first: {key})")
        return tensor.to(wide).numpy()
