"""Saved state of each kind of open file handled by a module in
linuxcr/resources/fdkinds/: part of the image schema (schema.py builds the
tagged union FileDesc.state from KIND_STATES).  Declarations only, no logic.

Adding a kind: declare its Struct here (tag=True, bounded fields) and append
it to KIND_STATES; write its module (see resources/fdkinds/eventfd.py)."""
from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

U64 = Annotated[int, Meta(ge=0)]
U32 = Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]


class EventfdState(Struct, tag="eventfd", forbid_unknown_fields=True):
    count: U64
    semaphore: bool = False


KIND_STATES: list[type[Struct]] = [EventfdState]

# Each kind's module adds its states below, one line per module (keep this
# list at the end of the file).
