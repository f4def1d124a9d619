"""Verbs that read one or two checkpoints: ``inspect`` and ``diff``."""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

import savegame
from savegame.cli._app import FINDING
from savegame.cli._output import (
    console,
    echo_json,
    human_age,
    human_bytes,
    jsonable,
    key_text,
    metrics_text,
    nbytes,
    new_table,
    number,
    short,
    tensor_text,
)
from savegame.cli._paths import CHECKPOINT, locate
from savegame.cli._progress import ByteProgress, verify_bytes
from savegame.cli._tree import (
    Diff,
    describe,
    diff_trees,
    is_tensor,
    structural,
    tensor_row,
    walk_tensors,
)
from savegame.engine import reader
from savegame.format import compression
from savegame.format import names as n
from savegame.storage.urls import is_url, join, open_storage, split_url

CKPT = CHECKPOINT
# Keys that mark a state as a data-loader (or sampler) position; its small scalar fields are shown.
DATA_KEYS = ("batches_consumed", "samples_consumed", "position", "epoch", "batch_idx")
MAX_ROWS = 30  # tensors listed per state before "... N more"


def _load(path: str) -> tuple[str, dict[str, Any], Mapping[str, Any]]:
    """(checkpoint path, manifest, loaded tree) of a checkpoint dir or a run dir's newest checkpoint."""
    storage, name = locate(path)
    where = join(storage.root, name)
    return where, reader.read_manifest(storage, name), savegame.load(where, mmap=True, verify=False)


def summarize(where: str, doc: Mapping[str, Any], ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """What ``inspect`` shows, as plain data (the --json output)."""
    states = ckpt["state"] or {}
    tensors = {name: [tensor_row(k, t) for k, t in walk_tensors(value)] for name, value in states.items()}
    rng = ckpt["rng"] or {}
    files = [{"name": f, "bytes": _size(n.file_path(where, f))} for f in reader.data_files(doc)]
    run = ckpt["run"] or {}
    types = ckpt.get("types") or {}
    return {
        "path": where, "name": os.path.basename(where),
        "versions": {"savegame": ckpt["savegame_version"], "torch": ckpt["torch_version"],
                     "format": doc[n.M_VERSION]},
        "step": ckpt["step"], "epoch": ckpt["epoch"], "metrics": ckpt["metrics"], "extra": ckpt["extra"],
        "time": ckpt["time"], "pinned": doc.get(n.M_PINNED) is True,
        "bytes": reader.data_bytes(doc), "files": files, "compressed": _compressed(doc),
        "states": {name: {"tensors": len(rows), "bytes": sum(r["bytes"] for r in rows), "type": types.get(name)}
                   for name, rows in tensors.items()},
        "tensors": tensors,
        "rng": {"python": rng.get("python") is not None, "numpy": rng.get("numpy") is not None,
                "torch": rng.get("torch") is not None, "cuda": len(rng.get("cuda") or [])},
        "data": {name: _scalars(value) for name, value in states.items() if _is_data_position(value)},
        "run": {"best": run.get("best") or {}, "early_stopping": run.get("early_stopping")},
    }


def _compressed(doc: Mapping[str, Any]) -> dict[str, int] | None:
    """Entries stored compressed (format v5): how many, their bytes as stored and before compression."""
    entries = doc[n.M_ENTRIES]
    packed = compression.compressed(entries)
    if not packed:
        return None
    return {"entries": len(packed), "stored_bytes": sum(entries[n.E_END][e] - entries[n.E_START][e] for e in packed),
            "raw_bytes": sum(entries[n.E_RAW][e] for e in packed)}


def _is_data_position(value: Any) -> bool:
    return isinstance(value, Mapping) and any(k in value for k in DATA_KEYS)


def _scalars(value: Mapping[str, Any]) -> dict[str, Any]:
    return {key_text(k): v for k, v in value.items() if v is None or isinstance(v, (bool, int, float, str))}


def _size(path: str) -> int:
    try:
        if is_url(path):
            parent, name = split_url(path)
            return open_storage(parent).size(name)
        return os.path.getsize(path)
    except OSError:  # StorageError is one too
        return 0


# -- inspect -------------------------------------------------------------------------------

@click.command("inspect")
@click.argument("ckpt", type=CKPT)
@click.option("--tree", "show_tree", is_flag=True, help="Print the whole nested state tree.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with --tree: the tree too).")
def inspect_cmd(ckpt: str, show_tree: bool, as_json: bool) -> None:
    """Show what checkpoint CKPT holds (a checkpoint directory, or a run directory: its newest)."""
    where, doc, loaded = _load(ckpt)
    report = summarize(where, doc, loaded)
    if as_json:
        if show_tree:
            report["tree"] = {k: loaded[k] for k in (n.TREE_STATE, n.TREE_RNG, n.TREE_RUN, n.TREE_TYPES)}
        echo_json(report)
        return
    out = console()
    _print_header(out, report)
    if show_tree:
        tree = Tree(report["name"])
        for key in (n.TREE_STATE, n.TREE_RNG, n.TREE_RUN):
            _add_branch(tree, key, loaded[key])
        out.print(tree)
    else:
        _print_tensors(out, report)
    _print_extras(out, report)


def _print_header(out: Console, r: dict[str, Any]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    when = datetime.datetime.fromtimestamp(r["time"]).isoformat(sep=" ", timespec="seconds") if r["time"] else "?"
    v = r["versions"]
    for key, value in (("checkpoint", r["path"]), ("step", str(r["step"])),
                       ("epoch", "" if r["epoch"] is None else str(r["epoch"])),
                       ("metrics", metrics_text(r["metrics"] or {})), ("extra", short(r["extra"], 100)),
                       ("saved", f"{when} ({human_age(r['time'])} ago)" + (", pinned" if r["pinned"] else "")),
                       ("versions", f"savegame {v['savegame']}, torch {v['torch']}, format {v['format']}"),
                       ("size", f"{human_bytes(r['bytes'])} of tensor data in {len(r['files'])} file(s)")):
        grid.add_row(key, value)
    packed = r.get("compressed")
    if packed:
        grid.add_row("compressed", f"{packed['entries']} entries: {human_bytes(packed['raw_bytes'])} stored in "
                                   f"{human_bytes(packed['stored_bytes'])} (zstd)")
    out.print(grid)
    states = new_table("states", "state", "type", "tensors", "bytes", right=("tensors", "bytes"))
    for name, info in r["states"].items():
        states.add_row(name, info["type"] or "-", str(info["tensors"]), human_bytes(info["bytes"]))
    out.print(states)


def _print_tensors(out: Console, r: dict[str, Any]) -> None:
    for name, rows in r["tensors"].items():
        if not rows:
            continue
        table = new_table(f"{name}: tensors", "key", "dtype", "shape", "bytes", right=("bytes",))
        for row in rows[:MAX_ROWS]:
            table.add_row(row["key"], row["dtype"], str(row["shape"]), human_bytes(row["bytes"]))
        out.print(table)
        if len(rows) > MAX_ROWS:
            out.print(f"... and {len(rows) - MAX_ROWS} more tensors in {name} (--tree or --json lists all)")


def _print_extras(out: Console, r: dict[str, Any]) -> None:
    rng = r["rng"]
    kinds = [k for k in ("python", "numpy", "torch") if rng[k]] + ([f"cuda x{rng['cuda']}"] if rng["cuda"] else [])
    out.print(f"rng: {', '.join(kinds) or 'none'}")
    for name, fields in r["data"].items():
        out.print(f"data position ({name}): " + ", ".join(f"{k}={number(v)}" for k, v in fields.items()))
    for metric, best in r["run"]["best"].items():
        entries = ", ".join(f"{number(v)} at step {s}" for v, s in best.get("entries", []))
        out.print(f"best {metric} ({best.get('mode')}): {entries}")
    stopping = r["run"]["early_stopping"]
    if stopping:
        shown = {k: v for k, v in stopping.items() if k != "config"}
        config = stopping.get("config") or {}
        out.print("early stopping: " + ", ".join(f"{k}={number(v)}" for k, v in shown.items())
                  + (f" (patience {config.get('patience')})" if "patience" in config else ""))


def _add_branch(node: Tree, key: str, value: Any) -> None:
    if is_tensor(value):
        node.add(f"{key}: {tensor_text(value)} ({human_bytes(nbytes(value))})")
    elif isinstance(value, Mapping) and value:
        branch = node.add(key)
        for k, v in value.items():
            _add_branch(branch, key_text(k), v)
    elif isinstance(value, (list, tuple)) and structural(value):
        branch = node.add(f"{key} ({type(value).__name__} of {len(value)})")
        for i, v in enumerate(value):
            _add_branch(branch, f"[{i}]", v)
    else:
        node.add(f"{key} = {short(value)}")


# -- diff ----------------------------------------------------------------------------------

@click.command("diff")
@click.argument("a", type=CKPT)
@click.argument("b", type=CKPT)
@click.option("--exit-code", is_flag=True, help="Exit 1 when the checkpoints differ (like git diff --exit-code).")
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
def diff(a: str, b: str, exit_code: bool, as_json: bool) -> None:
    """Compare checkpoints A and B: changed, added and removed tensors, and differing values.

    Tensors count as changed unless bit-identical; the save time is not compared.
    """
    with ByteProgress() as bar:
        for path in (a, b):  # a damaged copy would show up as differences: check every byte first
            verify_bytes(*locate(path), bar)
        (where_a, _, tree_a), (where_b, _, tree_b) = _load(a), _load(b)
        parts_a, parts_b = _comparable(tree_a), _comparable(tree_b)
        bar.phase("comparing", sum(nbytes(t) for _, t in walk_tensors(parts_a)))
        result = diff_trees(parts_a, parts_b, out=Diff(tick=bar.advance))
    if as_json:
        echo_json(_diff_json(where_a, where_b, result))
    else:
        _print_diff(console(), where_a, where_b, result)
    if exit_code and not result.same:
        click.get_current_context().exit(FINDING)


def _comparable(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if k != "time"}


def _plain(value: Any) -> Any:
    return jsonable(value) if value is None or isinstance(value, (bool, int, float, str)) else describe(value)


def _diff_json(a: str, b: str, d: Diff) -> dict[str, Any]:
    return {
        "a": a, "b": b, "same": d.same, "identical_tensors": d.same_tensors,
        "changed": [{"key": c.key, "a": c.a, "b": c.b, "max_abs": c.max_abs, "max_rel": c.max_rel}
                    for c in d.changed],
        "added": [{"key": k, "what": w} for k, w in d.added],
        "removed": [{"key": k, "what": w} for k, w in d.removed],
        "values": [{"key": k, "a": _plain(x), "b": _plain(y)} for k, x, y in d.values],
    }


def _print_diff(out: Console, a: str, b: str, d: Diff) -> None:
    out.print(f"A: {a}\nB: {b}")
    if d.changed:
        table = new_table("changed tensors", "tensor", "A", "B", "max abs diff", "max rel diff",
                          right=("max abs diff", "max rel diff"))
        for c in d.changed:
            table.add_row(c.key, c.a, c.b, _num(c.max_abs), _num(c.max_rel))
        out.print(table)
    if d.added or d.removed:
        table = new_table("added / removed", "", "key", "what")
        for sign, style, rows in (("-", "red", d.removed), ("+", "green", d.added)):
            for key, what in rows:
                table.add_row(Text(sign, style=style), key, what)
        out.print(table)
    if d.values:
        table = new_table("different values", "key", "A", "B")
        for key, x, y in d.values:
            table.add_row(key, describe(x), describe(y))
        out.print(table)
    if d.same:
        out.print(f"identical: {d.same_tensors} tensors and every value are equal (save time not compared)")
    else:
        out.print(f"{len(d.changed)} tensor(s) changed, {len(d.added)} added, {len(d.removed)} removed, "
                  f"{len(d.values)} value(s) differ; {d.same_tensors} tensor(s) identical")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
