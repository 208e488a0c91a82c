"""Cost-aware tree budget: verify only as many draft nodes as pay for themselves.

A target forward over ``n`` tokens costs ``cost(n)``, and on a CPU (or a GPU at large batch)
``cost(64)`` is several times ``cost(1)``; a node is worth verifying only if the tokens it is
expected to add outweigh what it adds to that forward. Three pieces:

- `LatencyProfile`: the target's verify latency against the number of verified tokens, measured
  once per (model, device, dtype, threads) and cached as JSON under
  ``$SPECDEC_CACHE/latency/``; ``cost(n)`` interpolates it (monotone, linear past the last point).
- `AcceptanceEstimator`: the probability that a node ends up on the accepted path, learned online
  from the steps so far. For trees with ``node_scores`` (EAGLE-2's path probabilities) it
  calibrates the scores per score bin; for other trees it multiplies measured per-(depth,
  sibling rank) acceptance rates along the node's path. Priors keep early steps sane, and old
  evidence fades (acceptance depends on the text, and a budget that stopped drafting must be able
  to start again).
- `TreeBudget`: orders the drafted nodes by estimated probability (a node only after its
  parent), and keeps the ``n`` first ones that maximise the expected tokens per second of this
  step, ``(1 + sum of their probabilities) / (draft time + cost(n + 1))``; ``n = 0`` is a plain
  decoding step. So it never keeps a tree whose expected gain is below its measured cost: the
  expected extra tokens of the chosen nodes cover the extra verify time relative to a plain step.

Glossary: ``p`` of a node is the estimated probability that the verifier accepts it (it is on the
accepted path); the *expected tokens* of a tree is ``1 + sum of p`` over its nodes (the accepted
drafts plus the token the target always adds), the expected ``tau`` of the step.

Expected accepted tokens as the sum of path probabilities follows EAGLE-2 (Li et al. 2024); a tree
size chosen against the hardware's measured verify cost follows Sequoia (Chen et al. 2024), which
picks its tree shape offline per hardware; here the size is chosen online, per step.

References:
    Li, Wei, Zhang, Zhang. "EAGLE-2: Faster Inference of Language Models with Dynamic Draft
    Trees". EMNLP 2024. arXiv:2406.16858.
    Chen, May, Svirschevski, Huang, Ryabinin, Jia, Chen. "Sequoia: Scalable, Robust, and
    Hardware-aware Speculative Decoding". arXiv:2402.12374.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec.state import StepResult
from specdec.target import target_fingerprint
from specdec.timing import clock
from specdec.tree import ROOT, DraftTree

DEFAULT_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class LatencyProfile:
    """Median seconds of one verify forward over ``sizes[i]`` tokens (root included)."""

    sizes: list[int]
    seconds: list[float]
    key: dict = field(default_factory=dict)  # what it was measured on (see `profile_key`)

    def __post_init__(self):
        if not self.sizes or len(self.sizes) != len(self.seconds):
            raise ValueError("a latency profile needs one time per size, and at least one size")
        if len(set(self.sizes)) != len(self.sizes) or min(self.sizes) < 1:
            raise ValueError(f"profile sizes must be distinct token counts >= 1, got {self.sizes}")
        if not all(math.isfinite(s) and s > 0 for s in self.seconds):
            raise ValueError(f"profile times must be finite and positive, got {self.seconds}")
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

    def milliseconds(self) -> dict[int, float]:
        """``{n: ms}``, for stats and printing."""
        return {n: round(s * 1000, 2) for n, s in zip(self.sizes, self.seconds)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")  # a reader never sees half a file
        tmp.write_text(json.dumps(self.as_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyProfile":
        data = json.loads(Path(path).read_text())
        return cls(data["sizes"], data["seconds"], data.get("key", {}))

    @classmethod
    @torch.no_grad()
    def measure(cls, model, sizes=DEFAULT_SIZES, context: int = 256, repeats: int = 5,
                warmup: int = 2) -> "LatencyProfile":
        """Time `TreeForward.verify` of chains of ``n - 1`` draft tokens (``n`` verified tokens
        with the root) after a prefill of ``context`` tokens; medians over ``repeats`` rounds.

        The attention cost depends on the mask's shape, not on the tree's, so a chain of ``n - 1``
        nodes costs what any ``n - 1``-node tree costs.
        """
        from specdec.target import TreeForward, context_length

        sizes = [int(n) for n in sizes]
        if context < 1 or repeats < 1 or warmup < 0 or not sizes or min(sizes) < 1:
            raise ValueError("need context >= 1, repeats >= 1, warmup >= 0 and sizes >= 1")
        limit = context_length(model.config)
        if limit is not None:  # short-context models: a shorter prefix, not an error
            context = min(context, limit - max(sizes))
            if context < 1:
                raise ValueError(f"sizes up to {max(sizes)} do not fit the model's context of "
                                 f"{limit}: measure smaller sizes")
        device = next(model.parameters()).device
        vocab = int(model.get_input_embeddings().weight.shape[0])
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (context,), generator=generator)
        target = TreeForward(model)
        target.prefill(prompt[:-1].to(device))
        times: dict[int, list[float]] = {n: [] for n in sizes}
        for round_ in range(warmup + repeats):
            for n in sizes:  # interleaved, so drift in machine load hits every size alike
                tree = DraftTree.chain(torch.randint(0, vocab, (n - 1,), generator=generator))
                start = clock(device)
                target.verify(int(prompt[-1]), tree)
                elapsed = clock(device) - start
                target.rollback()
                if round_ >= warmup:
                    times[n].append(elapsed)
        return cls(sizes, [statistics.median(times[n]) for n in sizes], profile_key(model, context))

    @staticmethod
    def cache_path(model, sizes=DEFAULT_SIZES, context: int = 256,
                   cache_dir: str | Path | None = None) -> tuple[Path, dict]:
        """(where `for_model` keeps this model's profile, the key it is filed under)."""
        key = profile_key(model, context)
        key["sizes"] = [int(n) for n in sizes]
        if cache_dir is None:
            from specdec.embedded import cache_root
            cache_dir = cache_root() / "latency"
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return Path(cache_dir) / f"{key['model']}-{digest}.json", key

    @classmethod
    def for_model(cls, model, sizes=DEFAULT_SIZES, context: int = 256, repeats: int = 5,
                  warmup: int = 2, cache_dir: str | Path | None = None) -> "LatencyProfile":
        """The cached profile of this model on this device, dtype and thread count; measured
        (``(warmup + repeats) * len(sizes)`` forwards) and saved on the first call. Delete the
        file (`cache_path`) to measure again, e.g. after measuring on a busy machine."""
        path, key = cls.cache_path(model, sizes, context, cache_dir)
        if path.is_file():
            try:
                return cls.load(path)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                pass  # a damaged cache file is measured again
        profile = cls.measure(model, sizes, context, repeats, warmup)
        profile.key = key
        profile.save(path)
        return profile


def profile_key(model, context: int) -> dict:
    """What a latency profile depends on: the model, where and how it runs."""
    from specdec.engine import forward_kind, kernels
    from specdec.engine.fastpath import kernel_wanted

    kind = forward_kind(model)
    parameter = next(model.parameters())
    config = model.config.get_text_config()
    name = Path(str(getattr(model.config, "_name_or_path", "") or type(model).__name__)).name
    return {"model": "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model",
            "layers": int(getattr(config, "num_hidden_layers", 0) or 0),
            **target_fingerprint(model), "device": str(parameter.device),
            "dtype": str(parameter.dtype), "threads": torch.get_num_threads(), "context": context,
            # the verify forward (specdec/engine/fastpath.py) or its matrix layout
            # (specdec/engine/gemm.py) and its weight products (specdec/engine/kernels.py)
            **({"forward": "fast", **({"kernel": f"skinny-{kernels.build_id()}"}
                                     if kernel_wanted(model) else {})}
               if kind == "fast" else {"gemm": "transposed"} if kind == "transposed" else {})}


class AcceptanceEstimator:
    """P(node on the accepted path), learned from the steps verified so far.

    ``prior_strength``: pseudo-observations behind each prior; ``default_rate``: the prior
    acceptance rate of an unscored node given its parent; ``memory``: evidence fades by a factor
    ``1 - 1/memory`` per step, so estimates follow the text and return towards the priors when a
    budget has stopped drafting (and so stopped observing).
    """

    # score bin edges for calibrating node_scores
    EDGES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9)

    def __init__(self, prior_strength: float = 2.0, default_rate: float = 0.5,
                 memory: float = 256.0):
        if prior_strength <= 0 or not 0 < default_rate < 1 or memory < 1:
            raise ValueError("need prior_strength > 0, 0 < default_rate < 1 and memory >= 1")
        self.prior_strength = prior_strength
        self.default_rate = default_rate
        self.decay = 1.0 - 1.0 / memory
        self.rank_counts: dict[tuple[int, int], list[float]] = {}  # (depth, rank) -> [acc, tries]
        # per score bin: [accepted nodes, sum of their scores over all nodes seen]
        self.bin_counts = [[0.0, 0.0] for _ in range(len(self.EDGES) + 1)]

    def _bin(self, score: float) -> int:
        return bisect.bisect_right(self.EDGES, score)

    def probabilities(self, tree: DraftTree, ranks: list[int] | None = None) -> list[float]:
        """[N] estimated probability that each node is on the accepted path; ``ranks``: each
        node's rank among its siblings as drafted (default: as in ``tree``)."""
        n = len(tree)
        parents = tree.parent_list
        if tree.node_scores is not None:
            out = []
            for score in tree.node_scores.tolist():
                accepted, predicted = self.bin_counts[self._bin(score)]
                # the bin's ratio of observed to predicted acceptances, with a prior ratio of 1
                # worth prior_strength accepted nodes; keeps the drafter's order inside a bin
                ratio = (accepted + self.prior_strength) / (predicted + self.prior_strength)
                out.append(min(1.0, score * ratio))
            for node in range(n):  # calibration must not make a child likelier than its parent
                if parents[node] != ROOT:
                    out[node] = min(out[node], out[parents[node]])
            return out
        ranks = ranks if ranks is not None else sibling_ranks(tree)
        depths, out = tree.depth_list, [0.0] * n
        prior = self.prior_strength * self.default_rate
        for node, parent in enumerate(parents):
            acc, tries = self.rank_counts.get((depths[node], ranks[node]), (0.0, 0.0))
            rate = (acc + prior) / (tries + self.prior_strength)
            out[node] = rate * (1.0 if parent == ROOT else out[parent])
        return out

    def observe(self, result: StepResult, ranks: list[int] | None = None) -> None:
        """Learn from a verified step; ``ranks`` as in `probabilities`."""
        for counts in self.bin_counts:
            counts[0] *= self.decay
            counts[1] *= self.decay
        for counts in self.rank_counts.values():
            counts[0] *= self.decay
            counts[1] *= self.decay
        tree = result.tree
        if not len(tree):
            return
        on_path = set(result.accepted_nodes)
        if tree.node_scores is not None:
            # scores predict the unconditional path probability, so every node counts
            for node, score in enumerate(tree.node_scores.tolist()):
                counts = self.bin_counts[self._bin(score)]
                counts[0] += node in on_path
                counts[1] += score
            return
        ranks = ranks if ranks is not None else sibling_ranks(tree)
        reached = {ROOT} | on_path
        depths = tree.depth_list
        for node, parent in enumerate(tree.parent_list):
            # a rate is conditional on the parent: only count nodes whose parent was accepted
            if parent in reached:
                counts = self.rank_counts.setdefault((depths[node], ranks[node]), [0.0, 0.0])
                counts[0] += node in on_path
                counts[1] += 1


def sibling_ranks(tree: DraftTree) -> list[int]:
    """[N] each node's position among its parent's children, in drafting order."""
    ranks = [0] * len(tree)
    for parent in [ROOT, *range(len(tree))]:
        for rank, child in enumerate(tree.children(parent)):
            ranks[child] = rank
    return ranks


@dataclass
class Choice:
    """One step's decision, for stats."""

    drafted: int  # nodes the drafter proposed
    nodes: int  # nodes kept
    expected_tokens: float  # 1 + sum of the kept nodes' p: the expected tau of the step
    expected_verify_s: float  # cost(nodes + 1) from the profile
    measured_verify_s: float | None = None  # the step's target forward, once observed


class TreeBudget:
    """Prunes each drafted tree to the size that maximises expected tokens per second.

    ``TreeBudget(LatencyProfile.for_model(model))``, or ``tree_budget="auto"`` in
    `speculative_generate`. ``choose`` returns the pruned tree; ``observe`` learns from the
    verified step; ``history`` holds one `Choice` per step and ``summary`` condenses it for
    ``stats.extra["tree_budget"]``. Reuse one budget across prompts to keep what it learned.
    """

    def __init__(self, profile: LatencyProfile, estimator: AcceptanceEstimator | None = None):
        if not isinstance(profile, LatencyProfile):
            raise TypeError(f"TreeBudget needs a LatencyProfile, got {type(profile).__name__}")
        self.profile = profile
        self.estimator = estimator or AcceptanceEstimator()
        self.history: list[Choice] = []
        self._last: tuple[DraftTree, list[int]] | None = None  # (pruned tree, drafted ranks)

    @property
    def last_expected_tokens(self) -> float:
        return self.history[-1].expected_tokens if self.history else 1.0

    def plan(self, tree: DraftTree, draft_time: float = 0.0,
             ranks: list[int] | None = None) -> tuple[list[int], list[float], list[float]]:
        """(nodes in the order they would be added, their p, expected tokens/s after each
        prefix of that order, entry 0: no node).

        Nodes are added most probable first among those whose parent is in (best-first over the
        tree). A node's p never exceeds its parent's, so each prefix of ``k`` nodes is the
        ancestor-closed set of ``k`` nodes with the largest expected tokens, and the best prefix
        is the best subtree of any size.
        """
        probs = self.estimator.probabilities(tree, ranks)
        depths = tree.depth_list
        frontier = [(-probs[c], depths[c], c) for c in tree.children(ROOT)]
        heapq.heapify(frontier)
        order = []
        while frontier:
            _, _, node = heapq.heappop(frontier)
            order.append(node)
            for child in tree.children(node):
                heapq.heappush(frontier, (-probs[child], depths[child], child))
        rates, expected = [1.0 / (draft_time + self.profile.cost(1))], 1.0
        for k, node in enumerate(order, start=1):
            expected += probs[node]
            rates.append(expected / (draft_time + self.profile.cost(k + 1)))
        return order, [probs[n] for n in order], rates

    def choose(self, tree: DraftTree, draft_time: float = 0.0) -> DraftTree:
        """The pruned tree (empty: a plain step); ``draft_time``: seconds a step spends drafting."""
        if draft_time < 0:
            raise ValueError(f"draft_time must be >= 0, got {draft_time}")
        ranks = sibling_ranks(tree)
        order, probs, rates = self.plan(tree, draft_time, ranks)
        best = max(range(len(rates)), key=lambda k: (rates[k], -k))  # ties: the smaller tree
        keep = order[:best]
        pruned = tree.prune(keep)
        self.history.append(Choice(len(tree), best, 1.0 + sum(probs[:best]),
                                   self.profile.cost(best + 1)))
        # prune renumbers the kept nodes in index order, and so do the ranks kept here
        self._last = (pruned, [ranks[n] for n in sorted(keep)])
        return pruned

    def observe(self, result: StepResult) -> None:
        """Learn from the verified step whose tree `choose` returned last."""
        ranks = None
        if self._last is not None and result.tree is self._last[0]:
            # rates are per rank as drafted: pruning a sibling must not shift the others' rank
            ranks = self._last[1]
            self.history[-1].measured_verify_s = result.target_time
        self._last = None
        self.estimator.observe(result, ranks)

    def summary(self, since: int = 0) -> dict:
        """The choices from ``history[since:]``, as the loop reports them."""
        steps = self.history[since:]
        n = max(len(steps), 1)
        measured = [c.measured_verify_s for c in steps if c.measured_verify_s is not None]
        return {
            "mean_nodes": sum(c.nodes for c in steps) / n,
            "mean_drafted_nodes": sum(c.drafted for c in steps) / n,
            "nodes_per_step": [c.nodes for c in steps],
            "expected_tau": sum(c.expected_tokens for c in steps) / n,
            "expected_verify_ms": 1000 * sum(c.expected_verify_s for c in steps) / n,
            # far from the expected figure: the profile is stale (machine load, other settings)
            "measured_verify_ms": 1000 * sum(measured) / len(measured) if measured else None,
            "profile": self.profile.milliseconds(),
        }


def make_budget(tree_budget, model) -> TreeBudget | None:
    """``None``, ``"auto"`` (the model's cached latency profile), a `LatencyProfile` or a
    `TreeBudget` (returned as is, so what it learned carries over)."""
    if tree_budget is None or isinstance(tree_budget, TreeBudget):
        return tree_budget
    if isinstance(tree_budget, str) and tree_budget == "auto":
        return TreeBudget(LatencyProfile.for_model(model))
    if isinstance(tree_budget, LatencyProfile):
        return TreeBudget(tree_budget)
    raise ValueError(f"tree_budget must be None, 'auto', a LatencyProfile or a TreeBudget, got "
                     f"{tree_budget!r}")
