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

**The rule** (`OptimalRule`): select one draft, then verify it. Tokens of the draft support are
grouped into *classes*; a *key* is the sorted multiset (iid) or set (without replacement) of the
drafts' classes, and the rule only looks at the drafts through their key. Given the key it picks a
class c with probability select[key][c] / Q(key) (or none), then a uniform draft among the key's
drafts of class c. Those drafts are i.i.d. from q restricted to c whatever the key, so the selected
token Y has the exact law

    s(y) = S_c q(y) / q(c),   S_c = sum_key select[key][c]   (y in class c).

Y is accepted with probability min(1, target(y) / s(y)); otherwise (or when nothing was selected)
the token is drawn from the residual norm(target - min(target, s)). The accepted mass is
min(target, s) and the rejected mass is exactly 1 - sum min(target, s), so the output is the target
for *any* plan: the standard select-then-rejection-sample argument (SpecInfer's recursive
rejection and SpecTr's K-SEQ are other selection rules with the same structure). The plan is
clipped to feasibility and s is computed from the clipped plan, so losslessness does not rest on
the LP solver's tolerance. The acceptance is sum_y min(target(y), s(y)) (`OptimalRule.acceptance`);
a residual draw that happens to equal a draft is accepted too, so the rule's true acceptance can
only be higher.

`solve_coupling` chooses the plan with scipy's HiGHS: maximise sum_c g_c(S_c) subject to
sum_c select[key][c] <= Q(key), where g_c(S) = sum_{x in c} min(S q(x) / q(c), target(x)) is the
acceptance class c earns when selected with total mass S (concave and piecewise linear; the LP
uses its interpolation on at most 34 points, a lower bound). With one token per class
g_c(S) = min(S, target(c)) and this *is* the optimal coupling LP of SpecTr / Hu et al. 2025, so
the acceptance equals `optimal_acceptance` (tested to 1e-6). One token per class is used whenever
the number of keys (multisets of k support tokens iid, k-sets without replacement) is at most
``max_keys`` (default 5000), e.g. a top-k-warped drafter. Larger i.i.d. supports use
`ratio_classes`: ``class_count(max_keys, k)`` classes (99 for k = 2, 30 for k = 3, 17 for k = 4
at the default) contiguous in target/q ratio order, one boundary at the bound's optimal prefix A
(so the LP can select A's tokens only when every draft lies in A, as the optimal coupling does)
and the rest placed greedily where proportional-to-q selection loses the most acceptance. On the
embedded model's full 49k-token vocabulary this stays within 0.1% of the bound (docs/verifiers.md).
Without replacement the probability of a set of classes does not aggregate, so larger supports
fall back to recursive rejection (`verifiers.rejection.ExactRule`); so does k = 1 with a large
support, where rejection sampling is already optimal.
``"deterministic"`` children are handled exactly as well: sample y from the target and accept it
if it is a child, which attains the bound target(children).

References:
    Miao et al. "SpecInfer: Accelerating Generative Large Language Model Serving with
        Tree-based Speculative Inference and Verification". ASPLOS 2024. arXiv:2305.09781.
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

from specdec.sampling import accept, residual, sample, uniform
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
@dataclass
class CouplingPlan:
    """Which draft to verify given the drafts, and the exact law that induces (module docstring).

    Tokens are grouped into classes (one token each for small supports); a *key* is the sorted
    multiset (iid) or set (without replacement) of the drafts' classes.
    """

    keys: list[tuple[int, ...]]
    key_probs: np.ndarray  # [K] probability of drawing each key
    select: list[dict[int, float]]  # per key: class -> joint mass of selecting a draft of it
    class_of: np.ndarray  # [V] class index of each token, -1 where the drafter never drafts it
    selection_probs: np.ndarray  # [V] s: P(the selected draft is this token)
    target_probs: np.ndarray  # [V]
    residual_probs: np.ndarray  # [V] norm(target - min(target, s)): where rejected mass goes
    acceptance: float  # sum min(target, s): P(the selected draft is accepted)

    def key_index(self, draft_tokens) -> int:
        return self._index[tuple(sorted(int(self.class_of[token]) for token in draft_tokens))]

    def __post_init__(self):
        self._index = {key: i for i, key in enumerate(self.keys)}


def number_of_keys(symbols: int, k: int, sampling: str) -> int:
    if sampling == "iid":
        return math.comb(symbols + k - 1, k)
    return math.comb(symbols, min(k, symbols))


def class_count(max_keys: int, k: int) -> int:
    """The most classes whose iid keys number at most ``max_keys``."""
    count = 0
    while number_of_keys(count + 1, k, "iid") <= max_keys:
        count += 1
    return count


def ratio_classes(target_probs, draft_probs, k: int, count: int) -> list[np.ndarray]:
    """At most ``count`` classes of the draft support, contiguous in target/draft ratio order.

    The optimal set A of the bound is one class boundary (A's tokens must be selected only when
    every draft lies in A, B's whenever present). The rest are placed greedily: each split is
    the one that most lowers sum_c sum_{x in c} max(0, target(x) - target(c) q(x) / q(c)), the
    acceptance a class loses when its drafts are selected in proportion to q rather than to the
    target.
    """
    target, draft = _as_numpy(target_probs), _as_numpy(draft_probs)
    target, draft = target / target.sum(), draft / draft.sum()  # the cut compares q(A)^k, p(A)
    support = np.flatnonzero(draft > 0)
    ratio = target[support] / draft[support]
    order = np.argsort(ratio, kind="stable")
    tokens, ratio = support[order], ratio[order]
    prefix_target = np.concatenate([[0.0], np.cumsum(target[tokens])])  # [m+1]
    prefix_draft = np.concatenate([[0.0], np.cumsum(draft[tokens])])  # [m+1]
    cut = int(np.argmax(prefix_draft ** k - prefix_target))

    def loss(first, stop):  # [n] the loss of classes tokens[first:stop], vectorised
        class_draft = prefix_draft[stop] - prefix_draft[first]
        # a class whose draft mass vanishes in the prefix sums' rounding counts as lossless
        scale = (prefix_target[stop] - prefix_target[first]) / np.where(class_draft > 0,
                                                                        class_draft, np.inf)
        over = np.clip(np.searchsorted(ratio, scale, side="right"), first, stop)  # ratio > scale
        return (prefix_target[stop] - prefix_target[over]) - scale * (
            prefix_draft[stop] - prefix_draft[over])

    def best_split(first, stop):  # (gain, split point) of segment [first, stop)
        if stop - first < 2:
            return -np.inf, None
        points = np.arange(first + 1, stop)
        after = loss(np.full_like(points, first), points) + loss(points, np.full_like(points, stop))
        best = int(np.argmin(after))
        return float(loss(np.array([first]), np.array([stop]))[0] - after[best]), int(points[best])

    if count < 1:
        raise ValueError(f"count must be a positive number of classes, got {count}")
    bounds = ((0, cut), (cut, len(tokens))) if count >= 2 else ((0, len(tokens)),)
    segments = {(first, stop): best_split(first, stop) for first, stop in bounds if stop > first}
    while len(segments) < count:
        (first, stop), (gain, point) = max(segments.items(), key=lambda item: item[1][0])
        if point is None:  # every class is a single token
            break
        del segments[(first, stop)]
        for part in ((first, point), (point, stop)):
            segments[part] = best_split(*part)
    return [tokens[first:stop] for first, stop in sorted(segments)]


def _draft_keys(draft: np.ndarray, k: int, sampling: str, classes: list[np.ndarray]):
    """(keys, probabilities): sorted multisets (iid) or sets (without replacement) of classes."""
    keys, probs = [], []
    if sampling == "iid":
        class_probs = [float(draft[tokens].sum()) for tokens in classes]
        for key in itertools.combinations_with_replacement(range(len(classes)), k):
            counts = Counter(key)
            ways = math.factorial(k) / math.prod(math.factorial(c) for c in counts.values())
            keys.append(key)
            probs.append(ways * math.prod(class_probs[c] ** n for c, n in counts.items()))
        return keys, np.asarray(probs)
    if any(len(tokens) != 1 for tokens in classes):
        raise ValueError("without replacement the coupling LP needs one token per class: the "
                         "probability of a set of classes does not aggregate")
    support = [int(tokens[0]) for tokens in classes]
    k = min(k, len(support))
    for key in itertools.combinations(range(len(support)), k):
        total = 0.0
        for order in itertools.permutations(key):
            prob, drawn = 1.0, set()
            for c in order:
                # the undrawn mass summed afresh: 1 - drawn would cancel catastrophically
                prob *= draft[support[c]] / sum(draft[y] for i, y in enumerate(support)
                                                if i not in drawn)
                drawn.add(c)
            total += prob
        keys.append(key)
        probs.append(total)
    return keys, np.asarray(probs)


def _class_objective(target: np.ndarray, draft: np.ndarray, tokens: np.ndarray,
                     points: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(grid [G], value [G]) of g(S) = sum_{x in class} min(S q(x) / q(class), target(x)).

    g is concave and piecewise linear with a kink where each token saturates; its interpolation
    on the grid (every kink for small classes, kinks at target-mass quantiles otherwise) is a
    lower bound, which is all the LP needs: the rule's acceptance is computed exactly afterwards.
    """
    share = draft[tokens] / draft[tokens].sum()  # [n] q(x) / q(class)
    saturation = target[tokens] / share  # [n] the S at which token x saturates
    order = np.argsort(saturation)
    saturation, share, mass = saturation[order], share[order], target[tokens][order]
    kinks = saturation[saturation < 1.0]
    if kinks.size > points:
        cumulative = np.cumsum(mass[: kinks.size])
        kinks = kinks[np.unique(np.searchsorted(
            cumulative, np.linspace(0, cumulative[-1], points), side="left").clip(0, kinks.size - 1))]
    grid = np.unique(np.concatenate([[0.0], kinks, [1.0]]))
    below = np.searchsorted(saturation, grid, side="right")  # tokens saturated at each S
    saturated_mass = np.concatenate([[0.0], np.cumsum(mass)])[below]
    open_share = np.concatenate([[0.0], np.cumsum(share)])
    return grid, saturated_mass + grid * (open_share[-1] - open_share[below])


def solve_coupling(target_probs, draft_probs, k: int, sampling: str,
                   classes: list[np.ndarray] | None = None) -> CouplingPlan:
    """The best selection plan for k drafts over ``classes`` (default: one per drafted token).

    LP: select[key, c] >= 0 for each class c in the key, sum_c select[key, c] <= Q(key);
    S_c = sum_key select[key, c]; maximise sum_c g_c(S_c) (see `_class_objective`). With one
    token per class g_c(S) = min(S, target(c)) and this is the optimal coupling LP, whose value
    is `optimal_acceptance`. Exponential in k: use for small supports or few classes.
    """
    if sampling not in BOUND_SAMPLING:
        raise ValueError(f"the coupling LP supports sampling in {BOUND_SAMPLING}, got {sampling!r}")
    target = _as_numpy(target_probs)
    target = target / target.sum()
    draft = _as_numpy(draft_probs)
    draft = draft / draft.sum()
    if classes is None:
        classes = [np.array([x]) for x in np.flatnonzero(draft > 0)]
    keys, key_probs = _draft_keys(draft, k, sampling, classes)
    pairs = [(key_index, c) for key_index, key in enumerate(keys) for c in sorted(set(key))]
    n_pairs, n_classes = len(pairs), len(classes)
    # variables: select[pairs] | S [classes] | t [classes] (t_c <= g_c(S_c))
    key_of = np.array([key_index for key_index, _ in pairs], dtype=np.int64)
    class_index = np.array([c for _, c in pairs], dtype=np.int64)
    upper = sparse.csr_matrix((np.ones(n_pairs), (key_of, np.arange(n_pairs))),
                              shape=(len(keys), n_pairs + 2 * n_classes))
    equal = sparse.csr_matrix(
        (np.concatenate([-np.ones(n_pairs), np.ones(n_classes)]),
         (np.concatenate([class_index, np.arange(n_classes)]),
          np.concatenate([np.arange(n_pairs), n_pairs + np.arange(n_classes)]))),
        shape=(n_classes, n_pairs + 2 * n_classes))
    rows, cols, values, bounds = [], [], [], []
    for c, tokens in enumerate(classes):
        grid, value = _class_objective(target, draft, tokens)
        slope = np.diff(value) / np.diff(grid)
        for piece in range(slope.size):  # t_c - slope S_c <= value - slope grid
            row = len(bounds)
            rows += [row, row]
            cols += [n_pairs + n_classes + c, n_pairs + c]
            values += [1.0, -slope[piece]]
            bounds.append(value[piece] - slope[piece] * grid[piece])
    pieces = sparse.csr_matrix((values, (rows, cols)), shape=(len(bounds), n_pairs + 2 * n_classes))
    objective = np.concatenate([np.zeros(n_pairs + n_classes), -np.ones(n_classes)])
    solution = optimize.linprog(objective, A_ub=sparse.vstack([upper, pieces]),
                                b_ub=np.concatenate([key_probs, bounds]), A_eq=equal,
                                b_eq=np.zeros(n_classes),
                                bounds=[(0, None)] * (n_pairs + n_classes) + [(None, None)] * n_classes,
                                method="highs",
                                options={"primal_feasibility_tolerance": 1e-10,
                                         "dual_feasibility_tolerance": 1e-10})
    if solution.status != 0:
        raise RuntimeError(f"coupling LP failed: {solution.message}")
    # make the plan exactly feasible; s is then computed from the plan actually used, so
    # losslessness does not rest on the solver's tolerance
    mass = np.clip(solution.x[:n_pairs], 0.0, None)
    row_sum = np.bincount(key_of, weights=mass, minlength=len(keys))
    mass *= np.minimum(1.0, key_probs / np.maximum(row_sum, 1e-300))[key_of]
    selected = np.bincount(class_index, weights=mass, minlength=n_classes)  # [classes] S_c
    class_of = np.full(target.size, -1, dtype=np.int64)
    selection_probs = np.zeros_like(target)  # [V] s
    for c, tokens in enumerate(classes):
        class_of[tokens] = c
        # within a class the selected draft is a uniform pick among the key's drafts of that
        # class: i.i.d. from q restricted to the class, so s is proportional to q there
        selection_probs[tokens] = selected[c] * draft[tokens] / draft[tokens].sum()
    accepted_probs = np.minimum(target, selection_probs)  # [V]
    leftover = target - accepted_probs
    residual_probs = leftover / leftover.sum() if leftover.sum() > 0 else target
    select = [dict() for _ in keys]
    for (key_index, c), value in zip(pairs, mass):
        if value > 0:
            select[key_index][c] = float(value)
    return CouplingPlan(keys, key_probs, select, class_of, selection_probs, target,
                        residual_probs, float(accepted_probs.sum()))


def _tensor(probs: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(probs, device=like.device)


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
        """The selection plan this rule uses for k drafts, or None where it falls back to
        `ExactRule` (large supports without replacement, and k = 1, where it is optimal)."""
        if draft_probs is None:
            raise ValueError(f"sampling={sampling!r} children need draft_probs (the q they came from)")
        support = int((draft_probs > 0).sum())
        classes = None
        if number_of_keys(support, k, sampling) > self.max_keys:
            count = class_count(self.max_keys, k)
            if sampling != "iid" or k == 1 or count < 2:
                return None
            classes = ratio_classes(target_probs, draft_probs, k, count)
        signature = (_as_numpy(target_probs).tobytes(), _as_numpy(draft_probs).tobytes(), k,
                     sampling)
        if self._last is None or self._last[0] != signature:
            self._last = (signature, solve_coupling(target_probs, draft_probs, k, sampling, classes))
        return self._last[1]

    @staticmethod
    def _positions(plan: CouplingPlan, draft_tokens, c: int) -> list[int]:
        return [i for i, token in enumerate(draft_tokens) if plan.class_of[token] == c]

    @staticmethod
    def _accept_probability(plan: CouplingPlan, token: int) -> float:
        selection = plan.selection_probs[token]  # > 0 for any token the plan can select
        return min(1.0, plan.target_probs[token] / selection) if selection > 0 else 0.0

    def select(self, target_probs, draft_tokens, draft_probs, *, sampling, generator, context=None):
        check_sampling(self, sampling, self.supported)

        def emit(token):  # a recovered token that is also a draft is that draft, accepted
            return (draft_tokens.index(token), token) if token in draft_tokens else (-1, token)

        if sampling == "deterministic":
            return emit(sample(target_probs, generator))
        plan = self.plan(target_probs, draft_probs, len(draft_tokens), sampling)
        if plan is None:
            return self._fallback.select(target_probs, draft_tokens, draft_probs,
                                         sampling=sampling, generator=generator)
        key_index = plan.key_index(draft_tokens)
        device = target_probs.device
        threshold = uniform(generator, device) * plan.key_probs[key_index]
        for c, mass in plan.select[key_index].items():
            threshold -= mass
            if threshold < 0:
                positions = self._positions(plan, draft_tokens, c)
                index = positions[min(int(uniform(generator, device) * len(positions)),
                                      len(positions) - 1)]
                token = draft_tokens[index]
                if accept(self._accept_probability(plan, token), generator, device):
                    return index, token
                break
        return emit(sample(_tensor(plan.residual_probs, target_probs), generator))

    def acceptance(self, target_probs, draft_probs, k: int, sampling: str) -> float | None:
        """P(the selected draft is accepted), or None where the rule falls back to `ExactRule`.

        The rule's exact acceptance on small supports (the LP optimum, `optimal_acceptance`);
        with classes a lower bound: a residual draw that equals an unselected draft also counts.
        """
        plan = self.plan(target_probs, draft_probs, k, sampling)
        return None if plan is None else plan.acceptance

    def output_distribution(self, target_probs, draft_tokens, draft_probs, *, sampling):
        """(accept_probs [k], recovered_probs [V]) of `select` given these drafts, exactly."""
        check_sampling(self, sampling, self.supported)
        target = target_probs.double()
        accept_probs = torch.zeros(len(draft_tokens), dtype=torch.float64)
        if sampling == "deterministic":
            recovered_probs = target.clone()
        else:
            plan = self.plan(target_probs, draft_probs, len(draft_tokens), sampling)
            if plan is None:
                return self._fallback.output_distribution(target_probs, draft_tokens, draft_probs,
                                                          sampling=sampling)
            key_index = plan.key_index(draft_tokens)
            for c, mass in plan.select[key_index].items():
                positions = self._positions(plan, draft_tokens, c)
                for index in positions:
                    accept_probs[index] += (mass / plan.key_probs[key_index] / len(positions)
                                            * self._accept_probability(plan, draft_tokens[index]))
            recovered_probs = (1.0 - accept_probs.sum()) * torch.as_tensor(plan.residual_probs,
                                                                           dtype=torch.float64)
        # a recovered token that is also a draft is accepted (same token, the walk goes on)
        for index, token in enumerate(draft_tokens):
            if draft_tokens.index(token) == index:
                accept_probs[index] += recovered_probs[token]
                recovered_probs[token] = 0.0
        return accept_probs, recovered_probs
