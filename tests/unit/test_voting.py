"""The O(E·T) instant-runoff equals a round-by-round recount written from the definition."""

import pytest
import torch

from megatron_prune.math.voting import instant_runoff_order


def _recount(ballots, e, k):
    """Every round: each ballot's k best standing experts get a vote; fewest votes (then
    lowest id) is eliminated."""
    alive = set(range(e))
    order = []
    rows = ballots.tolist()
    while alive:
        votes = {x: 0 for x in alive}
        for row in rows:
            for x in [x for x in row if x in alive][:k]:
                votes[x] += 1
        loser = min(alive, key=lambda x: (votes[x], x))
        order.append(loser)
        alive.remove(loser)
    return order


@pytest.mark.parametrize("e,k,t", [(4, 1, 30), (8, 2, 200), (16, 3, 100), (6, 6, 20), (8, 2, 0), (5, 2, 1)])
def test_matches_recount(e, k, t):
    g = torch.Generator().manual_seed(e * 100 + k + t)
    # skewed preferences so that some experts get no votes and ties happen
    scores = torch.rand(t, e, generator=g) + torch.linspace(0, 1.5, e)
    ballots = torch.argsort(scores, dim=1, descending=True).to(torch.uint8)
    assert instant_runoff_order(ballots, e, k).tolist() == _recount(ballots, e, k)


def test_identical_ballots_tie_break_by_id():
    ballots = torch.tensor([[3, 1, 0, 2]] * 5, dtype=torch.uint8)
    # top-1: only 3 gets votes; 0, 1, 2 have none and go first by id, then 3 wins
    assert instant_runoff_order(ballots, 4, 1).tolist() == [0, 1, 2, 3]
    # top-2: 3 and 1 get votes; zero-vote 0 then 2 go first; then 1 and 3 tie... 1 goes (lower id)
    assert instant_runoff_order(ballots, 4, 2).tolist() == _recount(ballots, 4, 2)


def test_validation():
    with pytest.raises(ValueError):
        instant_runoff_order(torch.zeros(3, 4, dtype=torch.uint8), 5, 2)
    with pytest.raises(ValueError):
        instant_runoff_order(torch.zeros(3, 4, dtype=torch.uint8), 4, 0)
