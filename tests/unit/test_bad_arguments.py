"""Bad arguments get one ConfigurationError (or UnsupportedValueError) at the call, not at wait();
ints of any size round-trip."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch

import savegame
from savegame.errors import ConfigurationError, UnsupportedValueError
from savegame.format import codec


class Holder:
    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


@pytest.fixture
def ckpt(tmp_path):
    with savegame.Checkpointer(tmp_path / "run", {"model": torch.nn.Linear(2, 2)}) as c:
        yield c


@pytest.mark.parametrize("value", [10**400, Fraction(10**400, 3)], ids=["400-digit int", "huge Fraction"])
def test_a_metric_past_the_float_range_is_refused_at_the_call(ckpt, value):
    with pytest.raises(ConfigurationError, match="metric 'l'"):
        ckpt.save(1, metrics={"l": value})
    ckpt.wait()


@pytest.mark.parametrize("arg", ["step", "epoch"])
def test_steps_past_64_bits_are_refused_at_the_call(ckpt, arg):
    kwargs = {"step": 10**5000} if arg == "step" else {"step": 1, "epoch": 2**63}
    with pytest.raises(ConfigurationError, match=arg):
        ckpt.save(**kwargs)
    ckpt.wait()


@pytest.mark.parametrize("where", ["extra", "state"])
def test_ints_past_the_str_digit_limit_round_trip(tmp_path, where):
    big = [10**5000, -(2**20000) - 1, 2**8192, 2**8193]
    holder = Holder(big if where == "state" else 0)
    with savegame.Checkpointer(tmp_path / "run", {"h": holder}) as c:
        c.save(1, extra=big if where == "extra" else None)
        c.wait()
        holder.value = None
        info = c.restore()
    assert (holder.value if where == "state" else info.extra) == big
    loaded = savegame.load(tmp_path / "run")
    assert (loaded["state"]["h"]["value"] if where == "state" else loaded["extra"]) == big


def test_ints_up_to_8192_bits_stay_plain_json():
    """What older readers read: only ints that could never be written before get the new tag."""
    assert codec.encode(2**8192 - 1, None) == 2**8192 - 1
    assert codec.encode(-(2**8193), None) == {"$int": "-2" + "0" * 2048}
    assert codec.decode({"$int": "-2" + "0" * 2048}, ()) == -(2**8193)
    assert json.loads(json.dumps(codec.encode([10**400], None))) == [10**400]


@pytest.mark.parametrize("value", [np.ones(3, dtype=np.longdouble), np.longdouble(1) / 3],
                         ids=["array", "scalar"])
def test_long_double_is_refused_at_the_call(tmp_path, value):
    with savegame.Checkpointer(tmp_path / "run", {"h": Holder(value)}) as c:
        with pytest.raises(UnsupportedValueError, match="state.h.value"):
            c.save(1)
        c.wait()


def test_a_run_dir_with_a_nul_character_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="run_dir"):
        savegame.Checkpointer(f"{tmp_path}/a\0b", {"model": torch.nn.Linear(2, 2)})


@pytest.mark.parametrize("fmt", ["{step!z}", "{step:zz}", "{val_loss:d}"])
def test_a_name_format_that_cannot_be_filled_is_refused_at_construction(tmp_path, fmt):
    with pytest.raises(ConfigurationError, match="name_format"):
        savegame.Checkpointer(tmp_path / "run", {"model": torch.nn.Linear(2, 2)}, name_format=fmt)
    assert not (tmp_path / "run").exists()


def test_restore_to_the_meta_device_is_refused_before_anything_loads(ckpt):
    ckpt.save(1)
    ckpt.wait()
    with pytest.raises(ConfigurationError, match="meta"):
        ckpt.restore(map_location="meta")
