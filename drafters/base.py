"""The drafter protocol.

A drafter proposes a `specdec.tree.DraftTree` of new tokens from a `specdec.state.DecodingState`
and may learn from each step's `specdec.state.StepResult`. Capability flags are class attributes
the loop reads (``needs_hidden_states``: fill ``state.hidden_states`` with the target's hidden
states of the tokens committed by the last step).
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

from specdec.state import DecodingState, StepResult
from specdec.tree import DraftTree


@runtime_checkable
class Drafter(Protocol):
    needs_hidden_states: ClassVar[bool]

    def propose(self, state: DecodingState) -> DraftTree: ...


class DrafterBase:
    """Optional base class: no-op hooks and the default flags."""

    needs_hidden_states: ClassVar[bool] = False

    def begin(self, state: DecodingState) -> None:
        """Called once per generation, after the prompt is known; reset per-sequence state and
        check compatibility with the target (``state.vocab_size``, ``state.target``)."""

    def propose(self, state: DecodingState) -> DraftTree:
        raise NotImplementedError

    def observe(self, result: StepResult) -> None:
        """Called after every step with what was accepted."""
