"""DraftTree: structure helpers and validation errors."""

import pytest
import torch

from specdec.tree import DraftTree, TreeError


def sample_tree():
    #        root
    #       /    \
    #     0(5)   1(6)
    #    /   \      \
    #  2(7)  3(8)   4(9)
    #   |
    #  5(3)
    return DraftTree([5, 6, 7, 8, 9, 3], [-1, -1, 0, 0, 1, 2])


def test_structure_helpers():
    tree = sample_tree()
    assert tree.children(-1) == [0, 1] and tree.children(0) == [2, 3] and tree.children(5) == []
    assert tree.depth_list == [1, 1, 2, 2, 2, 3]
    assert tree.max_depth == 3
    assert tree.paths() == [[0, 3], [1, 4], [0, 2, 5]]  # leaves in index order
    mask = tree.ancestor_mask()
    assert mask.shape == (7, 7)
    # node 5 (row 6) sees root, 0, 2 and itself only
    assert mask[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    assert mask[0].tolist() == [True] + [False] * 6


def test_truncate_depth_keeps_parents_first():
    tree = sample_tree().truncate_depth(2)
    assert tree.tokens == [5, 6, 7, 8, 9] and tree.parent_list == [-1, -1, 0, 0, 1]
    assert len(sample_tree().truncate_depth(0)) == 0


def test_chain_and_empty():
    chain = DraftTree.chain([4, 2, 9], draft_probs=[torch.ones(10) / 10] * 3, sampling="iid")
    assert chain.parent_list == [-1, 0, 1]
    assert chain.sampling_of(1) == "iid" and chain.draft_probs_of(-1) is not None
    assert chain.draft_probs_of(1) is not None and chain.draft_probs_of(2) is None
    assert len(DraftTree.empty()) == 0 and DraftTree.empty().max_depth == 0


def test_parent_after_child_is_rejected():
    with pytest.raises(TreeError, match="parents must come before their children"):
        DraftTree([1, 2, 3], [-1, 2, 0])
    with pytest.raises(TreeError, match="parents must come before"):
        DraftTree([1], [0])


def test_out_of_vocabulary_and_budget_and_shapes():
    with pytest.raises(TreeError, match="outside the target vocabulary"):
        DraftTree([1, 200], [-1, 0]).validate(vocab_size=100)
    with pytest.raises(TreeError, match="over the budget of 4"):
        sample_tree().validate(vocab_size=100, max_nodes=4)
    with pytest.raises(TreeError, match="one parent per token"):
        DraftTree([1, 2], [-1])
    with pytest.raises(TreeError, match="cover 5 tokens but the target has 100"):
        DraftTree.chain([1], [torch.ones(5) / 5], "iid").validate(vocab_size=100)
    with pytest.raises(TreeError, match="no draft_probs"):
        DraftTree([1, 2], [-1, -1], sampling={-1: "iid"}).validate(vocab_size=100)
    with pytest.raises(TreeError, match="not one of"):
        DraftTree([1], [-1], default_sampling="beam")
    assert sample_tree().validate(vocab_size=10) is not None
