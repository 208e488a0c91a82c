"""Trained drafters (Medusa, Hydra, Hydra++, distilled small LM, EAGLE, EAGLE-3, Falcon) and their
training pipeline.

Everything runs on a tiny random Llama target built here (hidden 32, vocabulary 96): feature
extraction (and its resumption), a short training run per kind, save/load round trips, greedy
losslessness against ``model.generate`` with the greedy and exact verifiers, and the errors for
weights trained on another target.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import drafters
from drafters.train import (FeatureSet, build_trainable, continue_training, extract_features,
                            self_distilled, train_drafter)
from specdec.loop import speculative_generate

VOCAB = 96
KINDS = ["medusa", "hydra", "hydra++", "distilled", "eagle", "eagle3", "falcon"]
SMALL_TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def tiny_target(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def synthetic_sequences(count: int, seed: int = 0):
    """Token lists with learnable structure: a few repeated motifs with random fillers."""
    gen = torch.Generator().manual_seed(seed)
    motifs = [torch.randint(0, VOCAB, (6,), generator=gen).tolist() for _ in range(4)]
    for _ in range(count):
        seq = []
        while len(seq) < 40:
            seq += motifs[int(torch.randint(0, 4, (1,), generator=gen))]
            seq.append(int(torch.randint(0, VOCAB, (1,), generator=gen)))
        yield seq[:40]


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def features(target, tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    extract_features(target, synthetic_sequences(48), folder, 10_000, source="synthetic",
                     seq_len=40, top_k=8, batch_size=4, shard_sequences=8, progress=False)
    return FeatureSet.load(folder)


@pytest.fixture(scope="module")
def trained(target, features, tmp_path_factory):
    """kind -> (module before training's first loss, losses, output folder)."""
    draft_to_target = features.draft_vocab(64)
    out = {}
    for kind in KINDS:
        torch.manual_seed(0)
        module = build_trainable(kind, target, draft_to_target, heads=3, layers=1, ttt_steps=2,
                                 aux_layers=features.aux_layers)
        folder = tmp_path_factory.mktemp(kind.replace("+", "p"))
        losses = train_drafter(module, features, folder, batch_size=8, lr=3e-2, max_steps=40,
                               checkpoint_every=20, progress=False)
        out[kind] = (module, losses, folder)
    return out


def drafter_for(kind: str, weights, tree=SMALL_TREE):
    if kind == "distilled":
        return drafters.get("distilled", weights=weights, depth=3, branching=[2, 1, 1])
    if kind == "eagle3":  # EAGLE-2 dynamic tree
        return drafters.get("eagle3", weights=weights, depth=4, top_k=3, beam=3, max_nodes=8)
    if kind == "falcon":
        return drafters.get("falcon", weights=weights, widths=[2, 2], passes=2, beam=2, max_nodes=10)
    return drafters.get(kind, weights=weights, tree=tree)


def test_extraction_resumes_where_it_stopped(target, tmp_path):
    sequences = list(synthetic_sequences(24, seed=1))
    partial = extract_features(target, iter(sequences), tmp_path, 200, source="s", seq_len=40,
                               top_k=8, batch_size=4, shard_sequences=4, progress=False)
    assert 0 < partial["tokens"] < 24 * 40
    full = extract_features(target, iter(sequences), tmp_path, 10_000, source="s", seq_len=40,
                            top_k=8, batch_size=4, shard_sequences=4, progress=False)
    assert full["tokens"] == 24 * 40
    fresh = tmp_path / "fresh"
    extract_features(target, iter(sequences), fresh, 10_000, source="s", seq_len=40, top_k=8,
                     batch_size=4, shard_sequences=4, progress=False)
    resumed, direct = FeatureSet.load(tmp_path), FeatureSet.load(fresh)
    assert torch.equal(resumed.tokens, direct.tokens)
    torch.testing.assert_close(resumed.hidden, direct.hidden)
    with pytest.raises(ValueError, match="other settings"):
        extract_features(target, iter(sequences), tmp_path, 10_000, source="other", seq_len=40,
                         top_k=8, progress=False)


def test_self_distilled_answers_are_the_targets_and_resume(target, tmp_path, monkeypatch):
    prompts = [[5, 17, 3], list(range(1, 30)), [7, 8], [9], [11, 12, 13]]  # the second is too long
    cache = tmp_path / "answers.jsonl"
    first = list(self_distilled(target, iter(prompts[:3]), cache, seq_len=12, max_prompt=8,
                                batch_size=2, progress=False))
    assert first[1] is None and len(first) == 3
    for prompt, sequence in zip(prompts, first):
        if sequence is not None:  # the prompt, then the target's own greedy continuation
            expected = target.generate(torch.tensor([prompt]), do_sample=False,
                                       max_new_tokens=len(sequence) - len(prompt))
            assert sequence == expected[0].tolist() and len(sequence) <= 12
    calls = []
    generate = target.generate
    monkeypatch.setattr(target, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    again = list(self_distilled(target, iter(prompts), cache, seq_len=12, max_prompt=8,
                                batch_size=2, progress=False))
    assert again[:3] == first
    assert len(calls) == 1 and all(s is not None for s in again[2:])  # only the new ones ran


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss(trained, kind):
    _, losses, _ = trained[kind]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.97 * sum(losses[:5]) / 5


class Interrupted(Exception):
    pass


class InterruptedFeatures(FeatureSet):
    """Raises after ``budget`` batches, as if the process were killed mid-training."""

    budget = 0

    def batch(self, rows, target_to_draft):
        if self.budget == 0:
            raise Interrupted
        self.budget -= 1
        return super().batch(rows, target_to_draft)


def test_training_resumes_from_checkpoint(target, features, tmp_path):
    draft_to_target = features.draft_vocab(64)
    torch.manual_seed(0)
    straight = build_trainable("medusa", target, draft_to_target, heads=2)
    train_drafter(straight, features, tmp_path / "a", max_steps=12, checkpoint_every=4,
                  progress=False)
    torch.manual_seed(0)
    first = build_trainable("medusa", target, draft_to_target, heads=2)
    flaky = InterruptedFeatures(**vars(features))
    flaky.budget = 10  # dies after step 10, two steps past the checkpoint at step 8
    with pytest.raises(Interrupted):
        train_drafter(first, flaky, tmp_path / "b", max_steps=12, checkpoint_every=4,
                      progress=False)
    # a new process rebuilds the module from scratch and finds the checkpoint
    torch.manual_seed(1)
    second = build_trainable("medusa", target, draft_to_target, heads=2)
    losses = train_drafter(second, features, tmp_path / "b", max_steps=12, checkpoint_every=4,
                           progress=False)
    assert len(losses) == 4
    for (name, a), b in zip(straight.trained_state().items(), second.trained_state().values()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(trained, target, kind):
    module, _, folder = trained[kind]
    loaded = type(module).from_pretrained(folder, target)
    saved = {k: v.half().float() for k, v in module.trained_state().items()}
    assert set(saved) == set(loaded.trained_state())
    for name, value in loaded.trained_state().items():
        assert torch.equal(value, saved[name]), name
    assert torch.equal(loaded.draft_to_target, module.draft_to_target)


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
def test_training_continues_from_trained_weights(trained, target, features, kind):
    module, _, folder = trained[kind]
    resumed = continue_training(kind, folder, target)
    assert torch.equal(resumed.draft_to_target, module.draft_to_target)
    for name, value in resumed.trained_state().items():
        assert torch.equal(value, module.trained_state()[name].half().float()), name
        assert value.requires_grad is False and resumed.get_parameter(name).requires_grad
    losses = train_drafter(resumed, features, folder / "more", batch_size=8, lr=1e-2, max_steps=3,
                           checkpoint_every=10, progress=False)
    assert len(losses) == 3
    with pytest.raises(ValueError, match="not 'hydra'"):
        continue_training("hydra", folder, target)


@pytest.mark.parametrize("verifier", ["greedy", "exact"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_lossless(trained, target, kind, verifier):
    _, _, folder = trained[kind]
    for prompt in ([5, 17, 3], list(next(synthetic_sequences(1, seed=7))[:12])):
        input_ids = torch.tensor([prompt])
        expected = target.generate(input_ids, do_sample=False, max_new_tokens=24)
        out = speculative_generate(target, input_ids, drafter=drafter_for(kind, folder),
                                   verifier=verifier, max_new_tokens=24, temperature=0.0,
                                   generator=torch.Generator().manual_seed(0))
        assert out.sequences.tolist() == expected.tolist()
        assert out.stats.tree_sizes[0] > 0  # it drafts from the first step on


@pytest.mark.parametrize("kind", KINDS)
def test_mismatched_target_is_refused(trained, kind):
    _, _, folder = trained[kind]
    other = tiny_target(seed=1)
    with pytest.raises(ValueError, match="different target"):
        speculative_generate(other, torch.tensor([[1, 2, 3]]), drafter=drafter_for(kind, folder),
                             verifier="greedy", max_new_tokens=4, temperature=0.0)
    config = json.loads((folder / "config.json").read_text())
    config["target"]["hidden_size"] = 64
    (folder / "bad").mkdir()
    (folder / "bad" / "config.json").write_text(json.dumps(config))
    (folder / "bad" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="hidden size 64"):
        speculative_generate(tiny_target(), torch.tensor([[1, 2, 3]]),
                             drafter=drafter_for(kind, folder / "bad"),
                             verifier="greedy", max_new_tokens=4, temperature=0.0)


def test_unknown_weights_name_lists_the_shipped_ones(target):
    with pytest.raises(FileNotFoundError, match="shipped names"):
        speculative_generate(target, torch.tensor([[1, 2, 3]]),
                             drafter=drafters.get("medusa", weights="no-such-weights"),
                             verifier="greedy", max_new_tokens=4, temperature=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_shipped_weights_on_the_embedded_model(embedded, kind):
    model, tokenizer = embedded
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                         tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    expected = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                              do_sample=False, max_new_tokens=8, pad_token_id=0)
    out = speculative_generate(model, input_ids, drafter=drafters.get(kind), verifier="greedy",
                               max_new_tokens=8, temperature=0.0,
                               eos_token_id=tokenizer.eos_token_id)
    assert out.sequences.tolist() == expected.tolist()


HEAD_KINDS = ["medusa", "hydra", "hydra++"]


def state_for(target, tokens: list[int]):
    """The state after a prefill of ``tokens``: hidden states of all but the last token."""
    from specdec.sampling import SamplingConfig
    from specdec.state import DecodingState
    with torch.no_grad():
        out = target(torch.tensor([tokens[:-1]]), output_hidden_states=True)
    return DecodingState(tokens=list(tokens), prompt_length=len(tokens), vocab_size=VOCAB,
                         sampling=SamplingConfig(0.0), generator=None, max_new_tokens=16,
                         device=torch.device("cpu"), target=target,
                         hidden_states=tuple(h[0] for h in out.hidden_states))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_trees_carry_path_scores(trained, target, kind):
    """Each node's score is its parent's times the head's probability of its token, so the
    budget calibrates them like EAGLE-2's (they are checked by DraftTree too)."""
    _, _, folder = trained[kind]
    drafter = drafter_for(kind, folder)
    state = state_for(target, [5, 17, 3, 40, 22])
    drafter.begin(state)
    tree = drafter.propose(state)
    assert len(tree) == len(SMALL_TREE) and tree.node_scores is not None
    scores, parents = tree.node_scores.tolist(), tree.parent_list
    assert all(0 < s <= 1 for s in scores)
    assert scores[0] >= scores[1]  # rank 0 before rank 1 below the root
    assert any(p >= 0 and scores[i] < scores[p] for i, p in enumerate(parents))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_drafters_give_draft_distributions_only_when_sampling(trained, target, kind):
    """Greedy verification never reads them (each is a full-vocabulary tensor per parent)."""
    import dataclasses

    from specdec.sampling import SamplingConfig
    _, _, folder = trained[kind]
    drafter = drafter_for(kind, folder)
    greedy = state_for(target, [5, 17, 3, 40, 22])
    drafter.begin(greedy)
    assert drafter.propose(greedy).draft_probs == {}
    sampled = dataclasses.replace(greedy, sampling=SamplingConfig(1.0))
    tree = drafter.propose(sampled)
    assert -1 in tree.draft_probs and all(
        torch.isclose(q.sum(), torch.tensor(1.0)) for q in tree.draft_probs.values())


@pytest.mark.parametrize("hint", [0, 2])
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_drafters_read_the_budget_hint(trained, target, kind, hint):
    """With ``state.node_budget`` set, Medusa / Hydra draft the hint + 1 likeliest nodes and run
    no head deeper than that many nodes reach."""
    _, _, folder = trained[kind]
    drafter = drafter_for(kind, folder)
    state = state_for(target, [5, 17, 3, 40, 22])
    drafter.begin(state)
    full = drafter.propose(state)
    heads_run = []
    module = drafter.heads
    if kind == "medusa":
        for k, blocks in enumerate(module.blocks, start=1):
            blocks.register_forward_hook(lambda *a, k=k: heads_run.append(k))
    else:
        original = module.head_logits
        module.head_logits = lambda k, *a: heads_run.append(k) or original(k, *a)
    state.node_budget = hint
    tree = drafter.propose(state)
    assert len(tree) == hint + 1 and tree.max_depth <= hint + 1
    assert max(heads_run) == min(hint + 1, full.max_depth)
    # the kept nodes are the full tree's likeliest ones, same tokens and scores
    best = sorted(range(len(full)), key=lambda i: (-float(full.node_scores[i]), i))[: hint + 1]
    assert sorted(tree.tokens) == sorted(full.tokens[i] for i in best)
    torch.testing.assert_close(tree.node_scores.sort().values,
                               full.node_scores[best].sort().values)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_drafters_greedy_lossless_under_a_budget_that_cuts(trained, target, kind):
    from specdec.engine.cost import LatencyProfile, TreeBudget

    _, _, folder = trained[kind]
    prompt = torch.tensor([[5, 17, 3, 40, 22, 9]])
    expected = target.generate(prompt, do_sample=False, max_new_tokens=24)
    budget = TreeBudget(LatencyProfile([1, 2, 4, 8, 16], [0.010, 0.012, 0.016, 0.030, 0.060]))
    out = speculative_generate(target, prompt, drafter=drafter_for(kind, folder),
                               verifier="greedy", max_new_tokens=24, temperature=0.0,
                               tree_budget=budget)
    assert out.sequences.tolist() == expected.tolist()
    choices = budget.history
    assert any(c.nodes < c.drafted for c in choices)  # the budget cut, so the hint was used
    assert all(b.drafted <= a.nodes + 1 for a, b in zip(choices, choices[1:])
               if a.nodes < a.drafted)
