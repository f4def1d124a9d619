"""Write the golden distributed (format v3) checkpoint into data/v3 (run by hand, then commit).

A 2-rank FSDP2 job (gloo, CPU) saves step 7; what savegame.load reads from it now is
stored beside it (expected.safetensors, expected.json) so the test compares future
readers against these bytes, never against numbers recomputed on another machine.
Never regenerate an existing version's files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

import savegame
from tests.compat.golden_v3 import flatten
from tests.distributed import launch

if __name__ == "__main__":
    out = Path(__file__).with_name("data") / "v3"
    if out.exists():
        sys.exit(f"{out} exists: golden files are never regenerated")
    launch.run(str(Path(launch.__file__).with_name("_worker.py")), 2, "golden", str(out))
    for junk in out.iterdir():
        if junk.name != "step-0000000007":
            junk.unlink()
    tree = savegame.load(out / "step-0000000007")
    tensors, values = flatten({"state": tree["state"], "ranks": tree["ranks"]})
    save_file(tensors, str(out / "expected.safetensors"))
    (out / "expected.json").write_text(json.dumps(values, indent=1, sort_keys=True))
    print(f"wrote {out}")
