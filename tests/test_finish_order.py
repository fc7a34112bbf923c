"""The one finish order (resources/finish.py): every piece of per-task state
is given back by a step (or before the finish, by a named owner), and every
step says what a rollback does with it -- a way, or an explicit skip."""
from __future__ import annotations

import pytest

from linuxcr.image.schema import Task
from linuxcr.resources import finish


def test_every_task_field_has_an_owner():
    covered = [f for s in finish.STEPS for f in s.fields] + list(finish.BEFORE)
    assert len(covered) == len(set(covered)), "a field given back twice"
    missing = set(Task.__struct_fields__) - set(covered)
    assert not missing, f"Task fields no finish step gives back: {sorted(missing)}"
    assert not set(covered) - set(Task.__struct_fields__), "a step names a field Task lacks"


def test_every_step_has_both_ways():
    names = [s.name for s in finish.STEPS]
    assert len(names) == len(set(names))
    for s in finish.STEPS:
        assert callable(s.restart), s.name
        assert callable(s.rollback) or (isinstance(s.rollback, finish.Skip) and s.rollback.why), \
            s.name


def test_registers_come_back_last_after_the_trampoline_goes():
    assert [s.name for s in finish.STEPS][-2:] == ["trampoline", "registers"]


def test_skips_must_name_real_steps():
    assert finish.MEMORY_ONLY <= finish.NAMES
    f = finish.Finish(t=None, arena=None, task=None, tramp=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no finish step named"):
        finish.run(f, skip=frozenset({"signal state"}))
