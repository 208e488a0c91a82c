"""Falcon specifics (the shared trained-drafter tests are in tests/test_trained_drafters.py):
one forward drafts k tokens, the relaxed causal mask, and drafting matches training."""

from __future__ import annotations

import pytest
import torch

import drafters
from drafters.falcon import FalconModule, block_mask
from tests.test_eagle import state_for
from tests.test_trained_drafters import VOCAB, tiny_target


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def falcon_module(target, block: int = 2) -> FalconModule:
    torch.manual_seed(5)
    module = FalconModule.for_training(target, torch.randperm(VOCAB)[:64], block=block)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module.eval()


def test_relaxed_mask_sees_the_whole_block_and_nothing_after():
    mask = block_mask(6, 3, 0)
    assert mask[0].tolist() == [True, True, True, False, False, False]  # its block, not beyond
    assert mask[4].tolist() == [True] * 6
    shifted = block_mask(5, 2, 1)  # blocks {0}, {1, 2}, {3, 4}
    assert shifted[1].tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("block", [2, 3])
def test_one_forward_drafts_k_tokens_and_matches_training(target, block):
    module = falcon_module(target, block)
    calls = []
    step = module.step_cached
    module.step_cached = lambda *a, **k: calls.append(a[0].shape[1]) or step(*a, **k)
    context = [5, 17, 3, 40, 22, 9, 61, 8]
    n = len(context) - 1
    drafter = drafters.get("falcon", weights=module, widths=[1] * block, passes=2, beam=1,
                           max_nodes=64)
    state = state_for(target, context)
    drafter.begin(state)
    tree = drafter.propose(state)
    del module.step_cached
    # a chain of 2 passes x k tokens, from 3 layer calls: the context rows, then one block per pass
    assert len(tree) == 2 * block and tree.max_depth == 2 * block
    assert calls == [n, block, block]

    # the first pass equals the training forward's block of rows n-k..n-1 (aligned to end there);
    # both in inference (drafters' products then take bf16 panels on the CPU kernel)
    with torch.no_grad():
        logits, _ = module.block_logits(
            state.hidden_states[-1][-block:], torch.tensor(context[-block:]), n - block,
            drafter._cache.keys[:, :, : n - block].transpose(1, 2),
            drafter._cache.values[:, :, : n - block].transpose(1, 2))
    assert logits.shape == (block, 64)
    hidden = state.hidden_states[-1][None]
    offset = (-n) % block  # so that a block ends at row n - 1
    with torch.no_grad():
        a, _, _ = module.step(hidden, torch.tensor([context[1:]]), torch.arange(n),
                              block_mask(n, block, offset))
    torch.testing.assert_close(module.logits(a[0, -block:]), logits, atol=1e-5, rtol=1e-4)
    first = module.draft_to_target[logits.argmax(-1)].tolist()
    assert tree.tokens[:block] == first  # widths 1: the chain starts with the block's argmaxes


def test_bad_settings_are_refused(target):
    with pytest.raises(ValueError, match="block must be an integer >= 2"):
        FalconModule.for_training(target, torch.arange(32), block=1)
    module = falcon_module(target)
    with pytest.raises(ValueError, match="one width per token"):
        drafter = drafters.get("falcon", weights=module, widths=[2, 2, 2])
        drafter.begin(state_for(target, [1, 2, 3, 4]))
