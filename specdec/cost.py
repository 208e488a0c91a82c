"""Cost-aware tree budget: verify only as many draft nodes as pay for themselves.

A target forward over ``n`` tokens costs ``cost(n)``, and on a CPU (or a GPU at large batch)
``cost(64)`` is several times ``cost(1)``; a node is worth verifying only if the tokens it is
expected to add outweigh what it adds to that forward. Three pieces:

- `LatencyProfile`: the target's verify latency against the number of verified tokens, measured
  once per (model, device, dtype, threads) and cached as JSON under
  ``$SPECDEC_CACHE/latency/``; ``cost(n)`` interpolates it (monotone, linear past the last point).
- `AcceptanceEstimator`: the probability that a node ends up on the accepted path, learned online
  from the steps so far. For trees with ``node_scores`` (EAGLE-2's path probabilities) it
  calibrates the scores, per score bin; for other trees it multiplies measured per-(depth,
  sibling rank) acceptance rates along the node's path. Beta priors keep early steps sane.
- `TreeBudget`: orders the drafted nodes by estimated probability (a node only after its
  parent), and keeps the ``n`` first ones that maximise the expected tokens per second of this
  step, ``(1 + sum of their probabilities) / (draft time + cost(n + 1))``; ``n = 0`` is a plain
  decoding step. So it never keeps a tree whose expected gain is below its measured cost: the
  expected extra tokens of the chosen nodes cover the extra verify time relative to a plain step.

Expected accepted tokens as the sum of path probabilities and a tree size chosen against the
hardware's measured cost follow EAGLE-2 (Li et al. 2024) and Sequoia (Chen et al. 2024).

References:
    Li, Wei, Zhang, Zhang. "EAGLE-2: Faster Inference of Language Models with Dynamic Draft
    Trees". EMNLP 2024. arXiv:2406.16858.
    Chen, May, Svirschevski, Huang, Ryabinin, Jia, Chen. "Sequoia: Scalable, Robust, and
    Hardware-aware Speculative Decoding". arXiv:2402.12374.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec.state import StepResult
from specdec.tree import ROOT, DraftTree

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class LatencyProfile:
    """Median seconds of one verify forward over ``sizes[i]`` tokens (root included)."""

    sizes: list[int]
    seconds: list[float]
    key: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.sizes or len(self.sizes) != len(self.seconds):
            raise ValueError("a latency profile needs one time per size, and at least one size")
        order = sorted(range(len(self.sizes)), key=lambda i: self.sizes[i])
        self.sizes = [int(self.sizes[i]) for i in order]
        # a bigger forward never costs less: timing noise must not make trees look free
        running, seconds = 0.0, []
        for i in order:
            running = max(running, float(self.seconds[i]))
            seconds.append(running)
        self.seconds = seconds

    def cost(self, n_tokens: int) -> float:
        """Seconds for a forward over ``n_tokens`` (root + tree nodes)."""
        sizes, seconds = self.sizes, self.seconds
        if n_tokens <= sizes[0]:
            return seconds[0]
        i = bisect.bisect_left(sizes, n_tokens)
        if i == len(sizes):  # extrapolate with the last segment's slope
            if len(sizes) == 1:
                return seconds[0] * n_tokens / sizes[0]
            slope = (seconds[-1] - seconds[-2]) / (sizes[-1] - sizes[-2])
            return seconds[-1] + slope * (n_tokens - sizes[-1])
        if sizes[i] == n_tokens:
            return seconds[i]
        w = (n_tokens - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
        return seconds[i - 1] + w * (seconds[i] - seconds[i - 1])

    def as_dict(self) -> dict:
        return {"sizes": self.sizes, "seconds": self.seconds, "key": self.key}

    @classmethod
    @torch.no_grad()
    def measure(cls, model, sizes=DEFAULT_SIZES, context: int = 256, repeats: int = 5,
                warmup: int = 2) -> "LatencyProfile":
        """Time verify forwards of chains of ``n - 1`` draft tokens after ``context`` tokens."""
        from specdec.target import TreeForward

        if context < 1 or repeats < 1:
            raise ValueError("context and repeats must be at least 1")
        device = next(model.parameters()).device
        vocab = int(model.get_input_embeddings().weight.shape[0])
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (context,), generator=generator)
        target = TreeForward(model)
        target.prefill(prompt)
        times: dict[int, list[float]] = {n: [] for n in sizes}
        for round_ in range(warmup + repeats):
            for n in sizes:  # interleaved, so drift in machine load hits every size alike
                tree = DraftTree.chain(torch.randint(0, vocab, (n - 1,), generator=generator).tolist())
                _sync(device)
                start = time.perf_counter()
                target.verify(int(prompt[-1]), tree)
                _sync(device)
                elapsed = time.perf_counter() - start
                target.rollback()
                if round_ >= warmup:
                    times[n].append(elapsed)
        return cls(list(sizes), [statistics.median(times[n]) for n in sizes],
                   profile_key(model, context))

    @classmethod
    def for_model(cls, model, sizes=DEFAULT_SIZES, context: int = 256, repeats: int = 5,
                  cache_dir: str | Path | None = None) -> "LatencyProfile":
        """The cached profile of this model on this device, dtype and thread count; measured
        (about ``(2 + repeats) * len(sizes)`` forwards) and saved on the first call."""
        key = profile_key(model, context)
        key["sizes"] = list(sizes)
        if cache_dir is None:
            from specdec.embedded import cache_root
            cache_dir = cache_root() / "latency"
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"{key['model']}-{digest}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                return cls(data["sizes"], data["seconds"], data.get("key", key))
            except (json.JSONDecodeError, KeyError, ValueError):
                pass  # a damaged cache file is measured again
        profile = cls.measure(model, sizes, context, repeats)
        profile.key = key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(profile.as_dict(), indent=1))
        tmp.replace(path)
        return profile


def profile_key(model, context: int) -> dict:
    """What a latency profile depends on."""
    from drafters.trained import target_fingerprint

    parameter = next(model.parameters())
    config = model.config.get_text_config()
    name = Path(str(getattr(model.config, "_name_or_path", "") or type(model).__name__)).name
    return {"model": "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model",
            "layers": int(getattr(config, "num_hidden_layers", 0) or 0),
            **target_fingerprint(model), "device": str(parameter.device),
            "dtype": str(parameter.dtype), "threads": torch.get_num_threads(), "context": context}


class AcceptanceEstimator:
    """P(node on the accepted path), learned from the steps verified so far."""

    # score bin edges for calibrating node_scores
    EDGES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9)

    def __init__(self, prior_strength: float = 2.0, default_rate: float = 0.5):
        self.prior_strength = prior_strength
        self.default_rate = default_rate
        self.rank_counts: dict[tuple[int, int], list[float]] = {}  # (depth, rank) -> [acc, tries]
        self.bin_counts = [[0.0, 0.0, 0.0] for _ in range(len(self.EDGES) + 1)]  # acc, n, sum score

    def _bin(self, score: float) -> int:
        return bisect.bisect_right(self.EDGES, score)

    def probabilities(self, tree: DraftTree) -> list[float]:
        """[N] estimated probability that each node is on the accepted path."""
        n = len(tree)
        if tree.node_scores is not None:
            out = []
            for score in tree.node_scores.tolist():
                acc, tries, total = self.bin_counts[self._bin(score)]
                # Beta prior centred on the drafter's own score
                out.append((acc + self.prior_strength * score) / (tries + self.prior_strength))
            parents = tree.parent_list
            for node in range(n):  # keep the path property after calibration
                if parents[node] != ROOT:
                    out[node] = min(out[node], out[parents[node]])
            return out
        out = [0.0] * n
        ranks = self._ranks(tree)
        for node, parent in enumerate(tree.parent_list):
            acc, tries = self.rank_counts.get((tree.depth_list[node], ranks[node]), (0.0, 0.0))
            rate = (acc + self.prior_strength * self.default_rate) / (tries + self.prior_strength)
            out[node] = rate * (1.0 if parent == ROOT else out[parent])
        return out

    @staticmethod
    def _ranks(tree: DraftTree) -> list[int]:
        ranks = [0] * len(tree)
        for parent in [ROOT, *range(len(tree))]:
            for rank, child in enumerate(tree.children(parent)):
                ranks[child] = rank
        return ranks

    def observe(self, result: StepResult) -> None:
        tree = result.tree
        if not len(tree):
            return
        on_path = set(result.accepted_nodes)
        if tree.node_scores is not None:
            for node, score in enumerate(tree.node_scores.tolist()):
                counts = self.bin_counts[self._bin(score)]
                counts[0] += node in on_path
                counts[1] += 1
                counts[2] += score
            return
        ranks = self._ranks(tree)
        reached = {ROOT} | on_path
        for node, parent in enumerate(tree.parent_list):
            if parent in reached:  # the verifier looked at this node's siblings
                counts = self.rank_counts.setdefault((tree.depth_list[node], ranks[node]), [0.0, 0.0])
                counts[0] += node in on_path
                counts[1] += 1


class TreeBudget:
    """Prunes each drafted tree to the size that maximises expected tokens per second.

    ``TreeBudget(LatencyProfile.for_model(model))``, or ``tree_budget="auto"`` in
    `speculative_generate`. ``choose`` returns the pruned tree; ``observe`` learns from the
    verified step; ``summary()`` is what the loop puts in ``stats.extra["tree_budget"]``.
    """

    def __init__(self, profile: LatencyProfile, estimator: AcceptanceEstimator | None = None):
        if not isinstance(profile, LatencyProfile):
            raise TypeError(f"TreeBudget needs a LatencyProfile, got {type(profile).__name__}")
        self.profile = profile
        self.estimator = estimator or AcceptanceEstimator()
        self.last_expected_tokens = 1.0  # of the last choice

    def plan(self, tree: DraftTree, draft_time: float) -> tuple[list[int], list[float]]:
        """(nodes in the order they would be added, expected tokens/s after each prefix; entry 0:
        no node)."""
        probs = self.estimator.probabilities(tree)
        parents = tree.parent_list
        # a node's probability never exceeds its parent's, so sorting by (-p, depth) lists
        # parents first; the check below guards ties and rounding
        order = sorted(range(len(tree)), key=lambda i: (-probs[i], tree.depth_list[i], i))
        chosen, added, pending = [], set(), list(order)
        while pending:
            for i, node in enumerate(pending):
                if parents[node] == ROOT or parents[node] in added:
                    chosen.append(node)
                    added.add(node)
                    del pending[i]
                    break
        rates, expected = [1.0 / (draft_time + self.profile.cost(1))], 1.0
        for k, node in enumerate(chosen, start=1):
            expected += probs[node]
            rates.append(expected / (draft_time + self.profile.cost(k + 1)))
        return chosen, rates

    def choose(self, tree: DraftTree, draft_time: float = 0.0) -> DraftTree:
        """The pruned tree; ``draft_time``: seconds this step already spent drafting."""
        self.last_expected_tokens = 1.0
        if not len(tree):
            return tree
        chosen, rates = self.plan(tree, draft_time)
        best = max(range(len(rates)), key=lambda k: (rates[k], -k))  # ties: the smaller tree
        self.last_expected_tokens = rates[best] * (draft_time + self.profile.cost(best + 1))
        return tree.prune(chosen[:best])

    def observe(self, result: StepResult) -> None:
        self.estimator.observe(result)

    def profile_ms(self) -> dict[int, float]:
        return {n: round(s * 1000, 2) for n, s in zip(self.profile.sizes, self.profile.seconds)}


def make_budget(tree_budget, model) -> TreeBudget | None:
    """``None``, ``"auto"`` (the model's cached latency profile) or a `TreeBudget`."""
    if tree_budget is None or isinstance(tree_budget, TreeBudget):
        return tree_budget
    if tree_budget == "auto":
        return TreeBudget(LatencyProfile.for_model(model))
    if isinstance(tree_budget, LatencyProfile):
        return TreeBudget(tree_budget)
    raise ValueError(f"tree_budget must be None, 'auto', a LatencyProfile or a TreeBudget, got "
                     f"{tree_budget!r}")
