"""Optimal multi-draft verification: the optimal-transport coupling and its acceptance bound.

Given k drafts drawn from q (``"iid"`` or ``"without_replacement"``), a lossless verifier is a
coupling between the draft tuple and an output token distributed as the target; its acceptance
probability is P(output is one of the drafts). The best coupling is an optimal-transport problem
(SpecTr, Sun et al. 2023) whose value is the bound every multi-draft rule is judged against.

**The bound** (`optimal_acceptance`). The coupling LP is a bipartite max-flow: draft tuples
(capacity Q(tuple)) send mass to the tokens they contain (capacity target(token)). By max-flow /
min-cut, for the set A of tokens on the source side of the cut,

    alpha* = 1 - max_A [ Q(every draft lies in A) - target(A) ]

(Hu et al. 2025 reach the same subset-selection form through LP duality). The maximising A can be
taken as a prefix of the draft-support tokens sorted by target(x) / q(x) ascending, the structure
Hu et al. 2025 exploit (tests/test_verifiers_multidraft.py checks it, for both sampling kinds,
against the LP and against brute force over every subset), so alpha* is a sort plus a scan over
V prefixes:

- ``"iid"``: Q(all k drafts in A) = q(A)^k.
- ``"without_replacement"``: drafts are the first k of an exponential race, token x arriving at
  E_x / q(x) with E_x ~ Exp(1) (the Gumbel-top-k view). All k drafts lie in A iff k tokens of A
  arrive before the first token outside A, whose arrival is Exp(b) with b = q(outside A). Writing
  r_x(t) = exp(q(x) t) - 1 and e_j for the elementary symmetric polynomials,

      Q(all k drafts in A) = 1 - b * integral_0^inf exp(-t) sum_{j<k} e_j(r over A)(t) dt,

  where the j = 0, 1 terms integrate in closed form (1 and sum_A q/(1-q)) and j = 2, 3, ... are
  integrated numerically for all prefixes at once (their e_j are prefix recurrences over the
  sorted tokens, kept in log space so large t neither overflows nor cancels).

**The rule** (`OptimalRule`). When the number of distinct draft multisets (iid) or sets (without
replacement) is at most ``max_keys`` (default 5000), it solves the coupling LP exactly with
scipy's HiGHS: variables accept[key, y] >= 0 for each token y in the key, sum_y accept <= Q(key),
sum_key accept <= target(y), maximise the total. The LP only depends on the drafts through their
multiset, which keeps it small. Mass a key does not accept is coupled with the common residual
norm(target - accepted), so the output marginal is exactly ``target_probs`` whatever the LP
solver's tolerance (the plan is clipped to be feasible first). Given the observed drafts the rule
samples from the plan's conditional for their key. For larger i.i.d. supports the LP keeps the
drafter's likeliest tokens distinct (as many as ``max_keys`` allows) and merges the rest into one
tail symbol. The tail drafts of a key are i.i.d. from the drafter restricted to the tail, so the
LP may route up to target(tail) of mass into a *tail channel*: recursive rejection of those
drafts against the target restricted to the tail, which emits exactly that distribution and
accepts with a closed-form probability (the LP's weight for that mass). Mass the plan leaves
unrouted goes to the residual, against which the tail drafts are verified once more. Every stage
is exact, so the rule stays lossless; the LP picks the best mix of these channels. Larger
without-replacement supports fall back to recursive rejection (`verifiers.rejection.ExactRule`),
whose key probabilities would not aggregate exactly.
``"deterministic"`` children are handled exactly as well: sample y from the target and accept it
if it is a child, which attains the bound target(children).

References:
    Sun, Suresh, Ro, Beirami, Jain, Yu. "SpecTr: Fast Speculative Decoding via Optimal
        Transport". NeurIPS 2023. arXiv:2310.15141.
    Hu, Zheng, Viswanathan, Chen, Rossi, Wu, Manocha, Huang. "Towards Optimal Multi-draft
        Speculative Decoding". ICLR 2025. arXiv:2502.18779.
    Khisti, Ebrahimi, Dbouk, Behboodi, Memisevic, Louizos. "Multi-Draft Speculative Sampling:
        Canonical Decomposition and Theoretical Limits". ICLR 2025. arXiv:2410.18234.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy import integrate, optimize, sparse

from specdec.sampling import residual, sample, uniform
from verifiers.base import check_sampling
from verifiers.rejection import ExactRule

BOUND_SAMPLING = ("iid", "without_replacement")


def _as_numpy(probs) -> np.ndarray:
    if torch.is_tensor(probs):
        return probs.detach().double().cpu().numpy()
    return np.asarray(probs, dtype=np.float64)


def _without_replacement_all_in_prefix(sorted_draft: np.ndarray, k: int,
                                       last: int | None = None) -> np.ndarray:
    """[last+1] P(all k draws without replacement from q lie in the first n sorted tokens).

    ``sorted_draft  # [m]`` are the positive q values in prefix order (they sum to one); prefixes
    n = 0..last (default m) are evaluated.
    """
    m = sorted_draft.size
    last = m if last is None else last
    k = min(k, m)
    outside = np.concatenate([np.cumsum(sorted_draft[::-1])[::-1], [0.0]])[: last + 1]  # b_n
    if k == m:  # the drafts are the whole support
        return (np.arange(last + 1) == m).astype(np.float64)
    prefix_draft = sorted_draft[:last]  # [last] the tokens any evaluated prefix can contain
    # j = 0 and j = 1 terms in closed form: 1 + sum_{x in prefix} q / (1 - q)
    closed = np.ones(last + 1)
    if k >= 2:
        closed += np.concatenate([[0.0], np.cumsum(prefix_draft / (1.0 - prefix_draft))])
    if k <= 2 or last == 0:
        return np.clip(1.0 - outside * closed, 0.0, 1.0)
    likeliest = np.argsort(prefix_draft)[::-1][: k - 1]
    largest_rate = prefix_draft[likeliest].sum()  # e_j(t) <= exp(largest_rate * t), j < k

    with np.errstate(divide="ignore"):
        log_outside = np.log(outside[1:])  # -inf for the whole support, whose b_n is 0

    def integrand(t: float) -> np.ndarray:  # [last+1]: b_n exp(-t) sum_{2<=j<k} e_j(prefix n)
        # weighted by b_n so every entry is a probability-sized number: the quadrature's
        # tolerance then means the same for every prefix
        rate = prefix_draft * t
        total = np.zeros(last + 1)
        if largest_rate * t < 600:  # no overflow: plain prefix recurrences, all terms >= 0
            r = np.expm1(rate)
            e = np.cumsum(r)  # e_1 of each prefix
            for _ in range(2, k):
                e = np.cumsum(r * np.concatenate([[0.0], e[:-1]]))
                total[1:] += e * np.exp(-t) * outside[1:]
            return total
        log_r = rate + np.log(-np.expm1(-rate))  # log(exp(rate) - 1) without overflow
        log_e = np.logaddexp.accumulate(log_r)
        for _ in range(2, k):
            shifted = np.concatenate([[-np.inf], log_e[:-1]])  # e_{j-1} of the prefix before x
            log_e = np.logaddexp.accumulate(log_r + shifted)
            total[1:] += np.exp(log_e - t + log_outside)
        return total

    # The integrand is a sum of exp(-c t) with c >= the q-mass outside the k - 1 likeliest
    # tokens, which can be tiny; in log-time s = log t every such term is a bump of the same
    # width, so adaptive quadrature stays cheap however slowly the slowest term decays. At
    # t ~ 1e10 the log-space exponents carry ~1e-6 relative rounding noise; capping the
    # subdivisions stops the quadrature from chasing it (tests hold the result to 1e-9 of exact
    # enumeration and 1e-6 of the LP).
    slowest_rate = np.delete(sorted_draft, likeliest).sum()
    numeric, _ = integrate.quad_vec(lambda s: np.exp(s) * integrand(np.exp(s)),
                                    np.log(1e-12), np.log(60.0 / slowest_rate),
                                    epsabs=1e-11, epsrel=1e-9, norm="max", limit=200,
                                    quadrature="gk21")
    return np.clip(1.0 - outside * closed - numeric, 0.0, 1.0)


def optimal_acceptance(target_probs, draft_probs, k: int, sampling: str = "iid") -> float:
    """The optimal acceptance probability of k drafts from ``draft_probs`` (see module docstring).

    ``target_probs``, ``draft_probs``: [V] distributions (tensors or arrays). ``sampling``:
    ``"iid"`` or ``"without_replacement"``. O(V log V) for iid; without replacement adds a
    numerical integral over the V prefixes.
    """
    if sampling not in BOUND_SAMPLING:
        raise ValueError(f"optimal_acceptance supports sampling in {BOUND_SAMPLING}, got {sampling!r}")
    if k < 1:
        raise ValueError(f"k must be a positive number of drafts, got {k}")
    target = _as_numpy(target_probs)  # [V]
    draft = _as_numpy(draft_probs)  # [V]
    if target.shape != draft.shape:
        raise ValueError(f"target_probs {target.shape} and draft_probs {draft.shape} differ in shape")
    target = target / target.sum()
    draft = draft / draft.sum()
    # tokens q never drafts would only add target mass to A: they stay outside
    support = np.flatnonzero(draft > 0)
    order = support[np.argsort(target[support] / draft[support], kind="stable")]
    prefix_target = np.concatenate([[0.0], np.cumsum(target[order])])  # [m+1]
    all_in = np.concatenate([[0.0], np.cumsum(draft[order])]) ** k  # [m+1] iid
    if sampling == "without_replacement":
        # Q_wor(all in A) <= q(A)^k, so prefixes where the iid gap is <= 0 (the empty prefix's
        # value) cannot win: evaluate only up to the last one that can
        last = int(np.flatnonzero(all_in - prefix_target > 0).max(initial=0))
        all_in = _without_replacement_all_in_prefix(draft[order], k, last)
        prefix_target = prefix_target[: last + 1]
    gap = float(np.max(all_in - prefix_target))  # n = 0 gives 0
    return float(min(1.0, max(0.0, 1.0 - gap)))


# ---------------------------------------------------------------------------------- the LP
TAIL = -1  # key symbol for "some token outside the head" (not accepted by the LP)


@dataclass
class CouplingPlan:
    """An optimal coupling of draft keys (sorted multisets/sets) with output tokens."""

    keys: list[tuple[int, ...]]
    key_probs: np.ndarray  # [K] probability of drawing each key
    accept: list[dict[int, float]]  # per key: token -> joint mass accepted
    residual_probs: np.ndarray  # [V] where rejected mass goes
    acceptance: float  # acceptance before the rejected-mass stage (the LP optimum)
    head: list[int] | None = None  # distinct tokens; others are the TAIL symbol (None: all)
    tail_probs: np.ndarray | None = None  # [V] the drafter restricted to the tail, normalised
    rejected_by_tail_count: dict[int, float] | None = None  # tail drafts -> mass rejected
    target_tail_probs: np.ndarray | None = None  # [V] the target restricted to the tail

    def key_index(self, draft_tokens) -> int:
        if self.head is not None:
            draft_tokens = [x if x in self._head else TAIL for x in draft_tokens]
        return self._index[tuple(sorted(draft_tokens))]

    def __post_init__(self):
        self._index = {key: i for i, key in enumerate(self.keys)}
        self._head = set(self.head or ())



def _draft_keys(draft: np.ndarray, k: int, sampling: str, head: list[int] | None = None):
    """(keys, probabilities): sorted multisets (iid) or sets (without replacement) of k drafts.

    With ``head`` (iid only), tokens outside it are merged into the symbol `TAIL`.
    """
    support = np.flatnonzero(draft > 0).tolist()
    keys, probs = [], []
    if sampling == "iid":
        symbols = support if head is None else sorted(head)
        symbol_probs = {x: draft[x] for x in symbols}
        if head is not None:
            tail_mass = float(np.delete(draft, symbols).sum())  # summed, not 1 - head mass
            if tail_mass > 0:
                symbols = [TAIL] + symbols
                symbol_probs[TAIL] = tail_mass
        for key in itertools.combinations_with_replacement(symbols, k):
            counts = Counter(key)
            ways = math.factorial(k) / math.prod(math.factorial(c) for c in counts.values())
            keys.append(key)
            probs.append(ways * math.prod(symbol_probs[x] ** c for x, c in counts.items()))
    else:
        k = min(k, len(support))
        for key in itertools.combinations(support, k):
            total = 0.0
            for order in itertools.permutations(key):
                prob, drawn = 1.0, set()
                for x in order:
                    # the undrawn mass summed afresh: 1 - drawn would cancel catastrophically
                    prob *= draft[x] / sum(draft[y] for y in support if y not in drawn)
                    drawn.add(x)
                total += prob
            keys.append(key)
            probs.append(total)
    return keys, np.asarray(probs)


def number_of_keys(symbols: int, k: int, sampling: str) -> int:
    if sampling == "iid":
        return math.comb(symbols + k - 1, k)
    return math.comb(symbols, min(k, symbols))


def head_size(max_keys: int, k: int) -> int:
    """The most head tokens whose iid keys (with the tail symbol) number at most ``max_keys``."""
    size = 0
    while number_of_keys(size + 2, k, "iid") <= max_keys:
        size += 1
    return size


def solve_coupling(target_probs, draft_probs, k: int, sampling: str,
                   head: list[int] | None = None) -> CouplingPlan:
    """The optimal coupling LP of k drafts (exponential in k: use for small draft supports).

    With ``head`` (iid only) the keys are multisets over the head tokens plus one `TAIL` symbol.
    A key's tail drafts are i.i.d. from the drafter restricted to the tail, so the LP may send
    up to target(tail) of mass into a *tail channel*: recursive rejection of the key's t tail
    drafts against the target restricted to the tail, which emits exactly that distribution and
    accepts with a known probability a_t (the LP's weight for that mass).
    """
    if sampling not in BOUND_SAMPLING:
        raise ValueError(f"the coupling LP supports sampling in {BOUND_SAMPLING}, got {sampling!r}")
    target = _as_numpy(target_probs)
    target = target / target.sum()
    draft = _as_numpy(draft_probs)
    draft = draft / draft.sum()
    keys, key_probs = _draft_keys(draft, k, sampling, head)
    tail_probs = target_tail_probs = None
    tail_acceptance: dict[int, float] = {}  # t tail drafts -> a_t
    if head is not None:
        tail_probs = draft.copy()
        tail_probs[head] = 0.0
        tail_probs /= tail_probs.sum()
        target_tail_mass = float(np.delete(target, head).sum())
        if target_tail_mass > 0:
            target_tail_probs = target.copy()
            target_tail_probs[head] = 0.0
            target_tail_probs /= target_tail_probs.sum()
            tail_acceptance = {t: iid_rejection_acceptance(target_tail_probs, tail_probs, t)
                               for t in range(1, k + 1)}
    pairs, weights = [], []  # LP variables: (key, token or TAIL), value of a unit of mass
    for key_index, key in enumerate(keys):
        for token in sorted(set(key) - {TAIL}):
            pairs.append((key_index, token))
            weights.append(1.0)
        if TAIL in key and tail_acceptance:
            pairs.append((key_index, TAIL))
            weights.append(tail_acceptance[key.count(TAIL)])
    columns = sorted({token for _, token in pairs})  # head tokens (and TAIL)
    column_capacity = np.array([target_tail_mass if token == TAIL else target[token]
                                for token in columns])
    column_row = {token: len(keys) + i for i, token in enumerate(columns)}
    rows, cols = [], []
    for var, (key_index, token) in enumerate(pairs):
        rows += [key_index, column_row[token]]
        cols += [var, var]
    constraints = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)),
                                    shape=(len(keys) + len(columns), len(pairs)))
    solution = optimize.linprog(-np.asarray(weights), A_ub=constraints,
                                b_ub=np.concatenate([key_probs, column_capacity]),
                                bounds=(0, None), method="highs",
                                options={"primal_feasibility_tolerance": 1e-10,
                                         "dual_feasibility_tolerance": 1e-10})
    if solution.status != 0:
        raise RuntimeError(f"coupling LP failed: {solution.message}")
    # make the plan exactly feasible, so losslessness does not rest on the solver's tolerance
    mass = np.clip(solution.x, 0.0, None)
    key_of = np.array([key_index for key_index, _ in pairs], dtype=np.int64)
    column_of = np.array([column_row[token] - len(keys) for _, token in pairs], dtype=np.int64)
    row_sum = np.bincount(key_of, weights=mass, minlength=len(keys))
    mass *= np.minimum(1.0, key_probs / np.maximum(row_sum, 1e-300))[key_of]
    col_sum = np.bincount(column_of, weights=mass, minlength=len(columns))
    mass *= np.minimum(1.0, column_capacity / np.maximum(col_sum, 1e-300))[column_of]
    accepted_probs = np.zeros_like(target)  # [V] output mass the plan routes before rejection
    accept: list[dict[int, float]] = [dict() for _ in keys]
    for (key_index, token), value in zip(pairs, mass):
        accept[key_index][token] = float(value)
        if token == TAIL:
            accepted_probs += value * target_tail_probs
        else:
            accepted_probs[token] += value
    leftover = np.clip(target - accepted_probs, 0.0, None)  # [V]
    residual_probs = leftover / leftover.sum() if leftover.sum() > 0 else target
    rejected_by_tail_count = None
    if head is not None:
        rejected_by_tail_count = Counter()
        routed_by_key = np.bincount(key_of, weights=mass, minlength=len(keys))
        for key, key_prob, routed in zip(keys, key_probs, routed_by_key):
            rejected_by_tail_count[key.count(TAIL)] += float(key_prob - routed)
        rejected_by_tail_count = dict(rejected_by_tail_count)
    return CouplingPlan(keys, key_probs, accept, residual_probs, float(np.dot(mass, weights)),
                        head, tail_probs, rejected_by_tail_count, target_tail_probs)


def _tensor(probs: np.ndarray | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if probs is None else torch.as_tensor(probs, device=like.device)


def iid_rejection_acceptance(target_probs, draft_probs, k: int) -> float:
    """Acceptance of recursive rejection (`ExactRule`) with k i.i.d. drafts, in closed form.

    Each draft is independent of the earlier rejections, so round i accepts with
    sum_x min(residual_i(x), q(x)) and the rounds multiply.
    """
    residual_probs = torch.as_tensor(target_probs, dtype=torch.float64)  # [V]
    draft = torch.as_tensor(draft_probs, dtype=torch.float64)  # [V]
    rejected = 1.0
    for _ in range(k):
        rejected *= 1.0 - float(torch.minimum(residual_probs, draft).sum())
        residual_probs = residual(residual_probs, draft)
    return 1.0 - rejected


class OptimalRule:
    """Lossless optimal-transport verifier; see the module docstring."""

    lossless: ClassVar[bool] = True
    supported: ClassVar[tuple[str, ...]] = ("iid", "without_replacement", "deterministic")

    def __init__(self, max_keys: int = 5000):
        self.max_keys = max_keys
        self._fallback = ExactRule()
        # calls with the same distributions (select, then output_distribution) reuse the last LP
        self._last: tuple[tuple, CouplingPlan] | None = None

    def plan(self, target_probs, draft_probs, k: int, sampling: str) -> CouplingPlan | None:
        """The coupling this rule uses for k drafts, or None where it falls back to `ExactRule`.

        ``plan.acceptance`` is then the rule's exact acceptance probability.
        """
        if draft_probs is None:
            raise ValueError(f"sampling={sampling!r} children need draft_probs (the q they came from)")
        support = int((draft_probs > 0).sum())
        head = None
        if number_of_keys(support, k, sampling) > self.max_keys:
            size = head_size(self.max_keys, k)
            if sampling != "iid" or size == 0:
                return None
            head = sorted(torch.topk(draft_probs, size).indices.tolist())
        signature = (_as_numpy(target_probs).tobytes(), _as_numpy(draft_probs).tobytes(), k,
                     sampling)
        if self._last is None or self._last[0] != signature:
            self._last = (signature, solve_coupling(target_probs, draft_probs, k, sampling, head))
        return self._last[1]

    def select(self, target_probs, draft_tokens, draft_probs, *, sampling, generator, context=None):
        check_sampling(self, sampling, self.supported)
        if sampling == "deterministic":
            token = sample(target_probs, generator)
            return (draft_tokens.index(token), token) if token in draft_tokens else (-1, token)
        plan = self.plan(target_probs, draft_probs, len(draft_tokens), sampling)
        if plan is None:
            return self._fallback.select(target_probs, draft_tokens, draft_probs,
                                         sampling=sampling, generator=generator)
        key_index = plan.key_index(draft_tokens)
        tail = self._tail_positions(plan, draft_tokens)
        tail_probs = _tensor(plan.tail_probs, target_probs)  # [V] or None

        def emit(token):  # a recovered token that is also a draft is that draft, accepted
            return (draft_tokens.index(token), token) if token in draft_tokens else (-1, token)

        def verify_tail(stage_target):  # the tail drafts against ``stage_target`` [V], exactly
            index, token = self._fallback.select(stage_target, [draft_tokens[i] for i in tail],
                                                 tail_probs, sampling="iid", generator=generator)
            return (tail[index], token) if index >= 0 else emit(token)

        threshold = uniform(generator, target_probs.device) * plan.key_probs[key_index]
        for token, mass in plan.accept[key_index].items():
            threshold -= mass
            if threshold < 0:
                if token == TAIL:
                    return verify_tail(_tensor(plan.target_tail_probs, target_probs))
                return draft_tokens.index(token), token
        residual_probs = _tensor(plan.residual_probs, target_probs)  # [V]
        if tail:
            return verify_tail(residual_probs)
        return emit(sample(residual_probs, generator))

    @staticmethod
    def _tail_positions(plan: CouplingPlan, draft_tokens) -> list[int]:
        if plan.head is None:
            return []
        head = set(plan.head)
        return [i for i, token in enumerate(draft_tokens) if token not in head]

    def acceptance(self, target_probs, draft_probs, k: int, sampling: str) -> float | None:
        """This rule's exact acceptance probability, or None where it falls back to `ExactRule`.

        The LP optimum plus, with a tail, what recursive rejection of the tail drafts recovers
        from the rejected mass (up to residual tokens that coincide with a draft, which an
        optimal plan leaves none of).
        """
        plan = self.plan(target_probs, draft_probs, k, sampling)
        if plan is None:
            return None
        total = plan.acceptance
        for tail_count, rejected in (plan.rejected_by_tail_count or {}).items():
            if tail_count:
                total += rejected * iid_rejection_acceptance(plan.residual_probs, plan.tail_probs,
                                                             tail_count)
        return total

    def output_distribution(self, target_probs, draft_tokens, draft_probs, *, sampling):
        """(accept_probs [k], recovered_probs [V]) of `select` given these drafts, exactly."""
        check_sampling(self, sampling, self.supported)
        target = target_probs.double()
        accept_probs = torch.zeros(len(draft_tokens), dtype=torch.float64)
        if sampling == "deterministic":
            recovered_probs = target.clone()
            for index, token in enumerate(draft_tokens):
                if draft_tokens.index(token) == index:
                    accept_probs[index] = target[token]
                    recovered_probs[token] = 0.0
            return accept_probs, recovered_probs
        plan = self.plan(target_probs, draft_probs, len(draft_tokens), sampling)
        if plan is None:
            return self._fallback.output_distribution(target_probs, draft_tokens, draft_probs,
                                                      sampling=sampling)
        key_index = plan.key_index(draft_tokens)
        key_prob = plan.key_probs[key_index]
        tail = self._tail_positions(plan, draft_tokens)
        recovered_probs = torch.zeros(target.numel(), dtype=torch.float64)

        def stage(weight, stage_target):  # recovered mass of verifying the tail drafts, or a draw
            if not tail:
                return weight * stage_target
            tail_accept, tail_recovered = self._fallback.output_distribution(
                stage_target, [draft_tokens[i] for i in tail],
                torch.as_tensor(plan.tail_probs, dtype=torch.float64), sampling="iid")
            for position, prob in zip(tail, tail_accept.tolist()):
                accept_probs[position] += weight * prob
            return weight * tail_recovered

        for token, mass in plan.accept[key_index].items():
            if token == TAIL:
                recovered_probs += stage(mass / key_prob, torch.as_tensor(plan.target_tail_probs))
            else:
                accept_probs[draft_tokens.index(token)] += mass / key_prob
        rejected = 1.0 - sum(plan.accept[key_index].values()) / key_prob
        recovered_probs += stage(rejected, torch.as_tensor(plan.residual_probs, dtype=torch.float64))
        # a residual token that is also a draft is accepted (same token, the walk goes on)
        for index, token in enumerate(draft_tokens):
            if draft_tokens.index(token) == index:
                accept_probs[index] += recovered_probs[token]
                recovered_probs[token] = 0.0
        return accept_probs, recovered_probs
