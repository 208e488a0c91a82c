"""GenerationStats counts what the loop did."""

from specdec.state import GenerationStats, StepResult
from specdec.tree import DraftTree


def test_acceptance_per_depth_counts_depths_never_accepted():
    stats = GenerationStats()
    chain = DraftTree.chain([5, 6, 7])
    stats.record(StepResult(chain, [0], [5, 9]))  # reached depth 3, accepted 1
    stats.record(StepResult(chain, [], [4]))  # accepted none
    stats.record(StepResult(DraftTree.empty(), [], [8]))
    assert stats.acceptance_per_depth == [0.5, 0.0, 0.0]
    assert stats.steps == 3 and stats.accepted_lengths == [2, 1, 1]
    assert stats.tau == 4 / 3
