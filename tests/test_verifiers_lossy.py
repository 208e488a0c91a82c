"""Lossy rules: typical acceptance, BiLD, LANTERN and judge decoding, with their thresholds pinned."""

from __future__ import annotations

import math

import pytest
import torch

import verifiers
from verifiers.bild import BiLDRule, rollback_distance, should_fall_back
from verifiers.judge import JudgeHead, JudgeRule, train_head
from verifiers.lantern import LanternRule
from verifiers.rejection import ExactRule
from verifiers.typical import TypicalRule, typical_threshold
from verifier_enumeration import distributions, output_marginal


def entropy(probs):
    return float(-(probs * probs.clamp_min(1e-300).log()).sum())


# ------------------------------------------------------------------------------------ typical
def test_typical_threshold_formula():
    target = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    expected = min(0.09, 0.3 * math.exp(-entropy(target)))
    assert typical_threshold(target, 0.09, 0.3) == pytest.approx(expected)
    # a flat target has high entropy: the entropy term, not epsilon, binds
    flat = torch.full((1000,), 1e-3, dtype=torch.float64)
    assert typical_threshold(flat, 0.09, 0.3) == pytest.approx(0.3 / 1000)


def test_typical_accepts_exactly_above_the_threshold():
    target = torch.tensor([0.5, 0.3, 0.17, 0.03], dtype=torch.float64)
    threshold = typical_threshold(target, 0.2, 0.5)  # = min(0.2, 0.5 * exp(-H)) ~ 0.164
    rule = TypicalRule(epsilon=0.2, alpha=0.5)
    generator = torch.Generator().manual_seed(0)
    assert target[2] > threshold > target[3]
    assert rule.select(target, [3], None, sampling="deterministic", generator=generator) == (-1, 0)
    assert rule.select(target, [2], None, sampling="deterministic", generator=generator) == (0, 2)
    # among passing children the target's favourite wins, whatever the drafting order
    assert rule.select(target, [3, 2, 1], None, sampling="iid", generator=generator) == (2, 1)


def test_typical_is_greedy_on_a_one_hot_target_and_rejects_as_configured():
    one_hot = torch.tensor([0.0, 1.0, 0.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    rule = TypicalRule()
    assert rule.select(one_hot, [1], None, sampling="iid", generator=generator) == (0, 1)
    assert rule.select(one_hot, [2, 3], None, sampling="iid", generator=generator) == (-1, 1)
    target = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    _, recovered = TypicalRule(epsilon=0.5, alpha=1.0, on_reject="sample").output_distribution(
        target, [3], None, sampling="deterministic")
    assert torch.allclose(recovered, target)
    _, recovered = TypicalRule(epsilon=0.5, alpha=1.0).output_distribution(
        target, [3], None, sampling="deterministic")
    assert recovered.tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="on_reject"):
        TypicalRule(on_reject="nucleus")


# ------------------------------------------------------------------------------------ BiLD
def test_bild_fallback_threshold():
    confident = torch.tensor([0.8, 0.1, 0.1])
    unsure = torch.tensor([0.4, 0.35, 0.25])
    assert not should_fall_back(confident, 0.5)
    assert should_fall_back(unsure, 0.5)
    assert not should_fall_back(unsure, 0.4)  # max prob equal to the threshold keeps drafting


def test_bild_rollback_threshold():
    target = torch.tensor([0.6, 0.3, 0.1, 0.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    rule = BiLDRule(rollback_threshold=-math.log(0.3))  # accepts target(x) >= 0.3
    assert rollback_distance(target, 1) == pytest.approx(-math.log(0.3))
    assert rollback_distance(target, 3) == math.inf
    assert rule.select(target, [1], None, sampling="deterministic", generator=generator) == (0, 1)
    assert rule.chosen_child(target, [2]) == -1
    assert rule.chosen_child(target, [2, 1, 0]) == 2  # the closest child within the threshold
    accept, recovered = rule.output_distribution(target, [2, 3], None, sampling="iid")
    assert accept.sum() == 0 and torch.allclose(recovered, target)  # rollback: the target's token
    one_hot = torch.tensor([0.0, 0.0, 1.0])
    assert BiLDRule(10.0).chosen_child(one_hot, [0, 1]) == -1  # greedy is exact at temperature 0


# ------------------------------------------------------------------------------------ LANTERN
def embeddings_with_pairs(vocab, dim=8, seed=0):
    """Random embeddings where token 2i+1 is a near-copy of token 2i (latent neighbours)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(vocab, dim, generator=generator)
    base[1::2] = base[0::2][: base[1::2].shape[0]] + 0.01 * torch.randn(base[1::2].shape,
                                                                         generator=generator)
    return base


def tv(a, b):
    return 0.5 * float((a - b).abs().sum())


@pytest.mark.parametrize("sampling", ["iid", "without_replacement", "deterministic"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("delta", [0.0, 0.05, 0.3])
def test_lantern_output_is_within_delta_in_total_variation(sampling, k, delta):
    rule = LanternRule(embeddings_with_pairs(6), k=2, delta=delta)
    for target, draft in distributions(seed=k, vocab=6):
        marginal, _ = output_marginal(rule, target, draft, k, sampling)
        assert tv(marginal, target) <= delta + 1e-12
        if delta == 0.0:
            assert torch.allclose(marginal, target, atol=1e-12, rtol=0)


def test_lantern_gains_exactly_the_moved_mass_and_moves_it_between_neighbours():
    vocab = 8
    rule = LanternRule(embeddings_with_pairs(vocab), k=1, delta=0.1)
    target = torch.tensor([0.02, 0.3, 0.3, 0.02, 0.1, 0.1, 0.08, 0.08], dtype=torch.float64)
    draft = torch.tensor([0.3, 0.02, 0.02, 0.3, 0.1, 0.1, 0.08, 0.08], dtype=torch.float64)
    relaxed = rule.relaxed_target(target, [0], draft, "iid")
    moved = tv(relaxed, target)
    assert moved == pytest.approx(0.1)  # the whole budget is usable here
    changed = set(torch.nonzero((relaxed - target).abs() > 1e-12).flatten().tolist())
    assert changed <= {0, 1, 2, 3}  # receivers 0, 3 and their latent twins 1, 2 only
    _, relaxed_acceptance = output_marginal(rule, target, draft, 1, "iid")
    _, exact_acceptance = output_marginal(ExactRule(), target, draft, 1, "iid")
    assert relaxed_acceptance == pytest.approx(exact_acceptance + moved, abs=1e-12)


def test_lantern_plus_plus_bounds_the_relaxation_multiplicatively():
    vocab = 8
    target = torch.tensor([0.02, 0.3, 0.3, 0.0, 0.1, 0.1, 0.1, 0.08], dtype=torch.float64)
    draft = torch.tensor([0.3, 0.02, 0.02, 0.32, 0.1, 0.1, 0.06, 0.08], dtype=torch.float64)
    rule = LanternRule(embeddings_with_pairs(vocab), k=1, delta=0.5, multiplier=2.0)
    relaxed = rule.relaxed_target(target, [0], draft, "iid")
    assert relaxed[0] == pytest.approx(2 * target[0])  # capped at lam * target
    assert relaxed[3] == 0.0  # a token the target forbids is never boosted
    assert float(relaxed.sum()) == pytest.approx(1.0)
    for target, draft in distributions(seed=5, vocab=8):
        relaxed = rule.relaxed_target(target, [0], draft, "iid")
        gained = relaxed > target + 1e-15
        assert (relaxed[gained] <= 2.0 * target[gained] + 1e-12).all()


def test_lantern_is_built_by_name_with_an_embedding_matrix():
    rule = verifiers.get("lantern", embeddings=torch.randn(10, 4), k=3, delta=0.2)
    assert isinstance(rule, LanternRule) and not rule.lossless
    assert len(rule.neighbours(0)) == 3
    with pytest.raises(ValueError, match="delta"):
        LanternRule(torch.randn(10, 4), delta=1.5)


# ------------------------------------------------------------------------------------ judge
class FixedScores(torch.nn.Module):
    """A stand-in head: the 'hidden state' of child i is its score logit, in column 0."""

    def forward(self, hidden_states):
        return hidden_states[..., 0]


def judge_with_scores(threshold):
    rule = JudgeRule(JudgeHead(4), threshold=threshold)
    rule.head = FixedScores()
    return rule


def test_judge_rescues_only_above_the_threshold():
    target = torch.tensor([0.7, 0.2, 0.05, 0.05], dtype=torch.float64)
    draft = torch.tensor([0.05, 0.05, 0.45, 0.45], dtype=torch.float64)
    logit = math.log(0.8 / 0.2)  # judge probability 0.8
    hidden = torch.tensor([[logit, 0, 0, 0], [-5.0, 0, 0, 0]])
    exact_accept, exact_recovered = ExactRule().output_distribution(target, [2, 3], draft,
                                                                    sampling="iid")
    accept, recovered = judge_with_scores(0.75).output_distribution(
        target, [2, 3], draft, sampling="iid", context={"children_hidden": hidden})
    assert accept[0] == pytest.approx(exact_accept[0] + exact_recovered.sum())
    assert accept[1] == pytest.approx(exact_accept[1]) and recovered.sum() == 0
    accept, recovered = judge_with_scores(0.85).output_distribution(
        target, [2, 3], draft, sampling="iid", context=hidden)
    assert torch.allclose(accept, exact_accept) and torch.allclose(recovered, exact_recovered)


def test_judge_select_samples_follow_its_distribution_and_need_context():
    target = torch.tensor([0.7, 0.2, 0.05, 0.05])
    draft = torch.tensor([0.05, 0.05, 0.45, 0.45])
    rule = judge_with_scores(0.5)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.tensor([[3.0, 0, 0, 0]])
    results = [rule.select(target, [2], draft, sampling="iid", generator=generator,
                           context={"children_hidden": hidden}) for _ in range(200)]
    assert all(result == (0, 2) for result in results)  # exact rejects ~89%, the judge rescues
    with pytest.raises(ValueError, match="hidden states"):
        rule.select(target, [2], draft, sampling="iid", generator=generator)
    sized = JudgeRule(JudgeHead(4))
    with pytest.raises(ValueError, match="size 4"):
        sized.select(target, [2], draft, sampling="iid", generator=generator,
                     context=torch.zeros(1, 7))


def test_judge_head_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    for width in (0, 16):
        head = JudgeHead(12, mlp_hidden=width)
        head.save_pretrained(tmp_path / f"head{width}")
        assert (tmp_path / f"head{width}" / "config.json").exists()
        assert (tmp_path / f"head{width}" / "model.safetensors").exists()
        loaded = JudgeHead.from_pretrained(tmp_path / f"head{width}")
        hidden = torch.randn(5, 12)
        assert torch.equal(head(hidden), loaded(hidden))
    rule = verifiers.get("judge", head=str(tmp_path / "head0"), threshold=0.9)
    assert isinstance(rule, JudgeRule) and rule.threshold == 0.9
    with pytest.raises(FileNotFoundError, match="shipped name"):
        JudgeHead.from_pretrained(tmp_path / "missing")


def test_judge_head_for_another_target_is_refused(tmp_path):
    from conftest import tiny_model
    from specdec.target import target_fingerprint
    from specdec.loop import speculative_generate

    trained_on, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    head = JudgeHead(trained_on.config.hidden_size)
    head.target = target_fingerprint(trained_on)
    head.save_pretrained(tmp_path / "head")
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    for model, fails in ((trained_on, False), (other, True)):
        run = lambda: speculative_generate(  # noqa: E731
            model, prompt, drafter="pld", verifier=verifiers.get("judge", head=tmp_path / "head"),
            max_new_tokens=4, temperature=0.0)
        if fails:
            with pytest.raises(ValueError, match="different target"):
                run()
        else:
            assert run().stats.new_tokens == 4


def test_train_head_separates_a_linear_concept():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(400, 8, generator=generator)
    labels = (hidden[:, 0] + 0.5 * hidden[:, 1] > 1.0).float()  # rare positives
    torch.manual_seed(0)
    head = JudgeHead(8)
    losses = train_head(head, hidden, labels, epochs=300, lr=0.05)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        predicted = (head(hidden) > 0).float()
    assert float((predicted == labels).float().mean()) > 0.95
