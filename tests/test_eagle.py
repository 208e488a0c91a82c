"""EAGLE / EAGLE-2 / EAGLE-3 specifics (the shared trained-drafter tests are in
tests/test_trained_drafters.py): the training-time test sees exactly what drafting sees, the
dynamic tree keeps its budget and its parents, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch

import drafters
from drafters.eagle import Eagle3Module, EagleModule
from drafters.train import default_aux_layers
from tests.test_trained_drafters import VOCAB, state_for, tiny_target


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def module_for(kind: str, target):
    torch.manual_seed(3)
    draft_to_target = torch.randperm(VOCAB)[:64]
    cls = Eagle3Module if kind == "eagle3" else EagleModule
    module = cls.for_training(target, draft_to_target, aux_layers=default_aux_layers(target))
    for p in module.parameters():  # a random, non-trivial drafter
        torch.nn.init.normal_(p, std=0.3)
    return module.eval()


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_training_time_test_matches_drafting(target, kind):
    """Unrolled training step j at row n-1+j computes the same output as the drafter at depth
    j + 1 of a chain, when fed the tokens the drafter drafted."""
    module = module_for(kind, target)
    context = [5, 17, 3, 40, 22, 9, 61]
    n = len(context) - 1
    outputs: list[torch.Tensor] = []
    step = module.step_cached

    def recording_step(*args, **kwargs):
        result = step(*args, **kwargs)
        outputs.append(result[0, -1].clone())
        return result

    module.step_cached = recording_step
    depth = 4
    drafter = drafters.get(kind, weights=module, tree=[[0] * d for d in range(1, depth + 1)])
    state = state_for(target, context)
    drafter.begin(state)
    chain = drafter.propose(state).tokens
    assert len(chain) == depth
    del module.step_cached

    sequence = context + chain
    with torch.no_grad():
        hidden = target(torch.tensor([sequence]), output_hidden_states=True).hidden_states
    length = len(sequence)
    real = torch.arange(length) < n  # target features exist for committed rows 0..n-1 only
    last = hidden[-1].float() * real[None, :, None]
    aux = torch.stack([hidden[i] for i in default_aux_layers(target)], 2).float()
    u0 = module.root_features(last, aux * real[None, :, None, None])
    next_tokens = torch.tensor([sequence[1:] + [0]])
    with torch.no_grad():
        unrolled = module.unroll(u0, next_tokens, depth)
    for j in range(depth):
        torch.testing.assert_close(unrolled[j][0, n - 1 + j], outputs[j], atol=1e-5, rtol=1e-4)


def test_dynamic_tree_keeps_budget_parents_and_values(target):
    module = module_for("eagle", target)
    drafter = drafters.get("eagle2", weights=module, depth=5, top_k=4, beam=3, max_nodes=10,
                           min_value=0.0)
    state = state_for(target, [5, 17, 3, 40, 22])
    drafter.begin(state)
    tree = drafter.propose(state)
    assert len(tree) == 10 and tree.max_depth <= 5
    scores = tree.node_scores  # the product of draft probabilities never grows down a path
    for node, parent in enumerate(tree.parent_list):
        assert 0 < scores[node] <= (1.0 if parent < 0 else scores[parent]) + 1e-7
    # a bigger budget drafts a superset of the same nodes (same values, same ranking)
    bigger = drafters.get("eagle2", weights=module, depth=5, top_k=4, beam=3, max_nodes=16,
                          min_value=0.0)
    bigger.begin(state)
    large = bigger.propose(state)
    paths = {tuple(tree.tokens[i] for i in tree.path_to(n)) for n in range(len(tree))}
    large_paths = {tuple(large.tokens[i] for i in large.path_to(n)) for n in range(len(large))}
    assert paths < large_paths


def test_min_value_skips_levels_of_unlikely_nodes(target):
    """Only nodes whose path probability reaches min_value are expanded; a level with none is
    not run at all."""
    module = module_for("eagle", target)
    state = state_for(target, [5, 17, 3, 40, 22])
    trees, calls = {}, {}
    for floor in (0.0, 0.999):
        drafter = drafters.get("eagle2", weights=module, depth=5, top_k=4, beam=3, max_nodes=40,
                               min_value=floor)
        step = module.step_cached
        seen = []
        module.step_cached = lambda *a, seen=seen, **k: seen.append(1) or step(*a, **k)
        drafter.begin(state)
        trees[floor] = drafter.propose(state)
        del module.step_cached
        calls[floor] = len(seen)
    assert calls[0.0] == 5 and trees[0.0].max_depth == 5  # the context rows + 4 levels
    assert calls[0.999] == 1 and trees[0.999].max_depth == 1  # no node is that likely
    # a middle floor: every expanded node (one with children) reaches it
    floor = float(trees[0.0].node_scores.median())
    drafter = drafters.get("eagle2", weights=module, depth=5, top_k=4, beam=3, max_nodes=40,
                           min_value=floor)
    drafter.begin(state)
    tree = drafter.propose(state)
    parents = {p for p in tree.parent_list if p >= 0}
    assert parents and all(float(tree.node_scores[p]) >= floor for p in parents)


def test_head_vocab_drafts_only_the_most_frequent_tokens(target):
    module = module_for("eagle", target)
    state = state_for(target, [5, 17, 3, 40, 22])
    drafter = drafters.get("eagle2", weights=module, head_vocab=8, top_k=4, min_value=0.0)
    drafter.begin(state)
    tree = drafter.propose(state)
    allowed = set(module.draft_to_target[:8].tolist())
    assert len(tree) > 4 and set(tree.tokens) <= allowed
    with pytest.raises(ValueError, match="only 64 tokens"):
        drafters.get("eagle2", weights=module, head_vocab=100).begin(state)
    with pytest.raises(ValueError, match="at least top_k"):
        drafters.get("eagle2", head_vocab=2, top_k=4)


def test_bad_settings_are_refused(target):
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        drafters.get("eagle2", depth=0)
    with pytest.raises(ValueError, match="path probability"):
        drafters.get("eagle2", min_value=1.5)
    with pytest.raises(ValueError, match="aux_layers"):
        Eagle3Module.for_training(target, torch.arange(32), aux_layers=())


@pytest.mark.parametrize("hint", [0, 3])
def test_budget_hint_drafts_less_and_fewer_levels(target, hint):
    """With ``state.node_budget`` set, the dynamic tree drafts at most hint + 1 nodes and runs no
    layer call for levels deeper than that."""
    module = module_for("eagle", target)
    drafter = drafters.get("eagle2", weights=module, depth=6, top_k=4, beam=3, max_nodes=16,
                           min_value=0.0)
    calls = []
    step = module.step_cached
    module.step_cached = lambda *a, **k: calls.append(a[0].shape[1]) or step(*a, **k)
    state = state_for(target, [5, 17, 3, 40, 22])
    state.node_budget = hint
    drafter.begin(state)
    tree = drafter.propose(state)
    del module.step_cached
    assert 1 <= len(tree) <= hint + 1 and tree.max_depth <= hint + 1
    assert len(calls) == 1 + min(hint, 5)  # the context rows, then one call per extra level


def test_greedy_lossless_under_a_budget_that_cuts(target):
    from specdec import speculative_generate
    from specdec.engine.cost import LatencyProfile, TreeBudget

    module = module_for("eagle", target)
    prompt = torch.tensor([[5, 17, 3, 40, 22, 9]])
    expected = target.generate(prompt, do_sample=False, max_new_tokens=24,
                               eos_token_id=None, pad_token_id=0)
    for name in ("eagle2", "falcon"):
        drafter = (drafters.get("eagle2", weights=module, max_nodes=16) if name == "eagle2" else
                   drafters.get("falcon", weights=_falcon(target)))
        budget = TreeBudget(LatencyProfile([1, 2, 4, 8, 16], [0.010, 0.012, 0.016, 0.030, 0.060]))
        out = speculative_generate(target, prompt, drafter=drafter, verifier="greedy",
                                   max_new_tokens=24, temperature=0.0, tree_budget=budget)
        assert out.sequences.tolist() == expected.tolist(), name
        choices = budget.history
        assert any(c.nodes < c.drafted for c in choices)  # the budget cut, the hint was used
        cut_then = [b for a, b in zip(choices, choices[1:]) if a.nodes < a.drafted]
        assert all(b.drafted <= a.nodes + 1 for a, b in zip(choices, choices[1:])
                   if a.nodes < a.drafted), cut_then


def _falcon(target):
    from tests.test_falcon import falcon_module
    return falcon_module(target)


@pytest.mark.parametrize("native", [True, False])
def test_cached_layer_step_equals_the_concatenating_forward(native, monkeypatch):
    """DraftDecoderLayer.step_cached (in-place key/value rows; one native call on CPU) computes
    what forward computes over concatenated caches, and a later write at an earlier start
    overwrites the rows after it (a drafted tree's rows replaced by committed ones)."""
    from drafters import draft_layer
    from drafters.draft_layer import DraftDecoderLayer, LayerCache

    torch.manual_seed(0)
    layer = DraftDecoderLayer(64, 4, 96).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    monkeypatch.setattr(draft_layer, "DRAFT_PANELS", torch.float32)
    if not native:
        monkeypatch.setattr(layer, "_native_usable", lambda x: False)
    cache = LayerCache()
    context = torch.randn(1, 6, 64)
    tree = torch.randn(1, 3, 64)
    committed = torch.randn(1, 2, 64)
    causal = torch.ones(6, 6, dtype=torch.bool).tril_()
    tree_mask = torch.tensor([[1] * 6 + [1, 0, 0], [1] * 6 + [1, 1, 0], [1] * 6 + [1, 0, 1]],
                             dtype=torch.bool)
    with torch.no_grad():
        ref_ctx, k0, v0 = layer(context, torch.arange(6), causal)
        ref_tree, _, _ = layer(tree, torch.tensor([6, 7, 7]), tree_mask, k0, v0)
        got_ctx = layer.step_cached(context, torch.arange(6), causal, cache, 0)
        got_tree = layer.step_cached(tree, torch.tensor([6, 7, 7]), tree_mask, cache, 6)
        torch.testing.assert_close(got_ctx, ref_ctx, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_tree, ref_tree, atol=1e-5, rtol=1e-4)
        # the tree's rows are dropped: two committed rows go to rows 6-7
        mask = torch.ones(2, 8, dtype=torch.bool)
        mask[0, 7] = False
        ref, _, _ = layer(committed, torch.tensor([6, 7]), mask, k0, v0)
        got = layer.step_cached(committed, torch.tensor([6, 7]), mask, cache, 6)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="allowed must be"):
            layer.step_cached(committed, torch.tensor([8, 9]), mask, cache, 8)
