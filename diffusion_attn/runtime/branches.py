"""Per-branch variant state of one hooked transformer.

Owns the variant state dicts ({(variant index, layer): dict}) of every cache-context branch seen in a
generation ("cond", "uncond", ...; `None` for calls without a context) and which one is current. The
step hook selects a branch per forward (`begin`); a new generation empties every dict in place (the same
dict objects stay, so compiled forwards meet no new guard).
"""

from __future__ import annotations

__all__ = ["BranchStates"]


class BranchStates:
    """The variant state of the current branch (`current`) and of every branch of this generation."""

    def __init__(self) -> None:
        self.default: dict = {}  # branch of calls without a cache context
        self.named: dict = {}  # {branch name: states} seen this generation
        self.current: dict = self.default

    def begin(self, branch: str | None, states: dict | None) -> None:
        """Select the state of this forward: `states` (the cache context's dict), or the default branch."""
        if states is None:
            self.current = self.default
        else:
            self.current = states
            if self.named.get(branch) is not states:
                self.named[branch] = states

    def live(self) -> dict:
        """Non-empty variant state per branch name (None = calls without a cache context)."""
        live = {None: self.default, **self.named}
        # state dicts are emptied, not dropped, at a new generation (stable for compiled forwards): skip empty ones
        return {b: {k: v for k, v in st.items() if v} for b, st in live.items() if any(st.values())}

    def clear(self) -> None:
        """New generation: every branch's state emptied; keys stay so compiled forwards find the same dicts."""
        for st in (self.default, *self.named.values()):
            for inner in st.values():
                inner.clear()
