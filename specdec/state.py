"""What a drafter may read each step, and what the loop tells it afterwards.

Everything a drafter can use is a field here, so adding a drafter never changes the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdec.sampling import SamplingConfig
from specdec.tree import DraftTree


@dataclass
class DecodingState:
    tokens: list[int]  # committed tokens, prompt included; the last one is the tree's root
    prompt_length: int
    vocab_size: int  # the target's
    sampling: SamplingConfig  # the warping the target uses; drafters warp their q the same way
    generator: torch.Generator | None
    max_new_tokens: int
    device: torch.device
    target: object = None  # the target model (read-only for drafters, e.g. its embeddings)
    # target hidden states at the tokens committed by the last step (root and accepted nodes;
    # before the first step: the prompt but its last token), per layer [m, H]; the last row of
    # the last layer predicted the new root. Only filled for drafters with ``needs_hidden_states``.
    hidden_states: tuple[torch.Tensor, ...] | None = None
    step: int = 0
    # a hint from the cost-aware tree budget (specdec/engine/cost.py): the last step's drafted tree was
    # cut to this many nodes, so drafting more was wasted; None when nothing was cut (or there is
    # no budget). Drafters MAY read it to draft at most node_budget + 1 nodes; when the budget
    # keeps a tree drafted under a hint whole, the next hint is twice its size, so a drafter that
    # obeys it grows its trees back geometrically (specdec/loop.py ``next_node_budget``).
    node_budget: int | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.tokens) - self.prompt_length

    @property
    def remaining(self) -> int:
        """Tokens still allowed; a tree deeper than ``remaining - 1`` is pruned by the loop."""
        return self.max_new_tokens - self.new_tokens

    def input_ids(self) -> torch.Tensor:
        return torch.tensor([self.tokens], dtype=torch.long, device=self.device)


@dataclass
class StepResult:
    tree: DraftTree
    accepted_nodes: list[int]  # tree node indices on the accepted path, root side first
    emitted: list[int]  # tokens committed this step: accepted drafts, then the recovered/bonus one
    draft_time: float = 0.0
    target_time: float = 0.0

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)


@dataclass
class GenerationStats:
    """Per-generation counters; ``tau`` counts accepted drafts + 1 per step, as Spec-Bench does."""

    steps: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # per step: accepted drafts + 1
    tree_sizes: list[int] = field(default_factory=list)
    depth_attempts: list[int] = field(default_factory=list)  # [d-1]: steps whose tree reached depth d
    depth_accepts: list[int] = field(default_factory=list)  # [d-1]: steps that accepted >= d drafts
    prefill_time: float = 0.0
    draft_time: float = 0.0
    target_time: float = 0.0
    total_time: float = 0.0
    extra: dict = field(default_factory=dict)  # drafter/verifier specific (e.g. chosen budget)

    def record(self, result: StepResult) -> None:
        self.steps += 1
        # equals accepted + 1 except when EOS or max_new_tokens cut the step short
        self.accepted_lengths.append(len(result.emitted))
        self.tree_sizes.append(len(result.tree))
        depth = result.tree.max_depth
        for store, upto in ((self.depth_attempts, depth), (self.depth_accepts, result.num_accepted)):
            if len(store) < upto:
                store.extend([0] * (upto - len(store)))
            for d in range(upto):
                store[d] += 1
        self.draft_time += result.draft_time
        self.target_time += result.target_time

    @property
    def tau(self) -> float:
        """Mean accepted length: accepted draft tokens + 1 per step."""
        return sum(self.accepted_lengths) / self.steps if self.steps else 0.0

    @property
    def acceptance_per_depth(self) -> list[float]:
        """P(the d-th draft token is accepted | the tree reached depth d), d = 1, 2, ..."""
        accepts = self.depth_accepts + [0] * (len(self.depth_attempts) - len(self.depth_accepts))
        return [a / n if n else 0.0 for a, n in zip(accepts, self.depth_attempts)]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_time if self.total_time > 0 else 0.0

    @property
    def overhead_time(self) -> float:
        """Time in the loop itself: walking the tree, warping, committing the cache."""
        return max(0.0, self.total_time - self.prefill_time - self.draft_time - self.target_time)

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "tau": self.tau,
            "acceptance_per_depth": self.acceptance_per_depth,
            "accepted_lengths": list(self.accepted_lengths),
            "mean_tree_size": sum(self.tree_sizes) / self.steps if self.steps else 0.0,
            "prefill_time": self.prefill_time,
            "draft_time": self.draft_time,
            "target_time": self.target_time,
            "overhead_time": self.overhead_time,
            "total_time": self.total_time,
            "tokens_per_s": self.tokens_per_s,
            **self.extra,
        }

    def summary(self) -> str:
        acc = " ".join(f"{a:.2f}" for a in self.acceptance_per_depth[:8])
        budget = self.extra.get("tree_budget")
        chosen = (f"tree budget: {budget['mean_nodes']:.1f} of {budget['mean_drafted_nodes']:.1f} "
                  f"drafted nodes, expected tau {budget['expected_tau']:.2f} | " if budget else "")
        return (f"new tokens {self.new_tokens} in {self.steps} steps | tau {self.tau:.2f} | {chosen}"
                f"acceptance per depth [{acc}] | {self.tokens_per_s:.1f} tokens/s "
                f"(draft {self.draft_time:.2f}s, target {self.target_time:.2f}s, "
                f"overhead {self.overhead_time:.2f}s, prefill {self.prefill_time:.2f}s)")
