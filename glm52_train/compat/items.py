"""What a compatibility item is: a record naming the upstream behaviour it works around, and the
function that installs it through a `Patch`, which remembers what each assignment replaced."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PINNED = "0.16.1"  # the Megatron-Core version every item was written and tested against

ALWAYS = "always"
NO_CUDA = "no CUDA"
NO_TE = "no TE"

PLATFORM = "platform shim"
UPSTREAM = "upstream fix"


@dataclass(frozen=True)
class Item:
    number: int
    name: str
    kind: str  # PLATFORM: stands in for what the machine lacks; UPSTREAM: fixes Megatron-Core
    condition: str  # ALWAYS, NO_CUDA or NO_TE
    works_around: str  # the upstream behaviour, in one line
    install: Callable[[Patch], None]
    versions: tuple[str, ...] = (PINNED,)

    def __str__(self) -> str:
        return f"{self.number} {self.name}"


_ABSENT = object()


class Patch:
    """`patch(owner, name, value)` sets an attribute and records what it replaced, so that an
    item can be taken out again (`compat.removed`, for the tests that show it is needed)."""

    def __init__(self) -> None:
        self.changes: list[tuple[object, str, object, object]] = []

    def __call__(self, owner, name: str, value) -> None:
        self.changes.append((owner, name, vars(owner).get(name, _ABSENT), value))
        setattr(owner, name, value)

    def undo(self) -> None:
        for owner, name, old, _ in reversed(self.changes):
            if old is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, old)

    def redo(self) -> None:
        for owner, name, _, new in self.changes:
            setattr(owner, name, new)
