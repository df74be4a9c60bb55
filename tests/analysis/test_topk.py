import numpy as np
import pytest
import torch

from cwa_dist.analysis.topk import BLOCK, Candidates, NonFiniteScoreError, RunningTopK, merge, shard_topk


def reference_order(names: list[str], flat: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Brute force: sort by score desc, then name asc, then flat index asc."""
    name_rank = np.unique(names, return_inverse=True)[1]
    return np.lexsort((flat, name_rank, -score))


@pytest.mark.parametrize(
    "n,k", [(10, 3), (1000, 1000), (BLOCK * 50 + 17, 7), (BLOCK * 9, 2), (5, 10), (50_000, 300), (20_011, 40)]
)
def test_shard_topk_matches_full_sort_with_ties(n, k):
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randint(0, 20, (n,), generator=g).float()  # many ties
    index, top = shard_topk(scores, k)
    order = np.lexsort((np.arange(n), -scores.numpy()))[: min(k, n)]
    assert index.tolist() == order.tolist()
    assert torch.equal(top, scores[order])


def test_shard_topk_prefilter_keeps_ties_spread_over_blocks():
    scores = torch.zeros(BLOCK * 40)
    scores[[5, BLOCK * 3 + 1, BLOCK * 20, BLOCK * 39 + 9]] = 1.0  # four equal maxima in four blocks
    index, _ = shard_topk(scores, 3)
    assert index.tolist() == [5, BLOCK * 3 + 1, BLOCK * 20]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("n", [100, BLOCK * 20])
def test_shard_topk_refuses_non_finite(bad, n):
    scores = torch.rand(n)
    scores[n // 2] = bad
    with pytest.raises(NonFiniteScoreError):
        shard_topk(scores, 3)


def test_running_topk_over_split_shards_equals_global_reference():
    g = torch.Generator().manual_seed(1)
    params = {"b.weight": torch.randint(0, 50, (300,), generator=g).float(),
              "a.weight": torch.randint(0, 50, (BLOCK * 8 + 3,), generator=g).float()}
    k = 25
    running = RunningTopK(k)
    for name, s in params.items():
        # Each parameter arrives as uneven shards with offsets, as ranks would send them.
        for lo, hi in [(0, 7), (7, 100), (100, s.numel())]:
            running.add_shard(name, lo, s[lo:hi], s[lo:hi] * 2, s[lo:hi] * 3)
    names = [n for n, s in params.items() for _ in range(s.numel())]
    flat = np.concatenate([np.arange(s.numel()) for s in params.values()])
    score = np.concatenate([s.numpy() for s in params.values()])
    order = reference_order(names, flat, score)[:k]
    best = running.best
    assert best.names() == [names[i] for i in order]
    assert best.flat_index.tolist() == flat[order].tolist()
    assert best.score.tolist() == score[order].tolist()
    assert torch.equal(best.weight, best.score * 2) and torch.equal(best.grad, best.score * 3)


def test_merge_is_exact_for_any_partition_of_candidates():
    g = torch.Generator().manual_seed(2)
    whole = torch.randint(0, 10, (400,), generator=g).float()
    parts = []
    for lo, hi in [(0, 130), (130, 131), (131, 400)]:
        idx, top = shard_topk(whole[lo:hi], 40)
        parts.append(Candidates(["p"], torch.zeros_like(idx), idx + lo, top, top, top))
    merged = merge(parts[::-1], 40)  # order of arrival must not matter
    expected, _ = shard_topk(whole, 40)
    assert merged.flat_index.tolist() == expected.tolist()


def test_head_of_topk_is_topk_of_smaller_k():
    s = torch.rand(5000, generator=torch.Generator().manual_seed(3))
    r = RunningTopK(100)
    r.add_shard("p", 0, s, s, s)
    idx10, _ = shard_topk(s, 10)
    assert r.best.head(10).flat_index.tolist() == idx10.tolist()


@pytest.mark.parametrize("k", [1, 40, 700])
def test_running_topk_with_its_floor_equals_the_reference_over_many_shards(k):
    """Once full, the running top-K passes its K-th score as a floor and most shards are skipped:
    still the exact global order, ties at the floor included (scores from few values)."""
    g = torch.Generator().manual_seed(k)
    sizes = [BLOCK * 30 + 5, 17, 300, BLOCK * 9, 5000, 3, BLOCK * 64, 129, 20_011]
    params = {f"p{i:02d}.weight": torch.randint(0, 12, (n,), generator=g).float() for i, n in enumerate(sizes)}
    running = RunningTopK(k)
    for name, s in params.items():
        running.add_shard(name, 0, s, s, s)
    names = [n for n, s in params.items() for _ in range(s.numel())]
    flat = np.concatenate([np.arange(s.numel()) for s in params.values()])
    score = np.concatenate([s.numpy() for s in params.values()])
    order = reference_order(names, flat, score)[:k]
    assert running.best.names() == [names[i] for i in order]
    assert running.best.flat_index.tolist() == flat[order].tolist()


@pytest.mark.parametrize("n", [100, BLOCK * 20])
def test_a_non_finite_score_below_the_floor_is_still_refused(n):
    running = RunningTopK(5)
    running.add_shard("a", 0, torch.full((100,), 10.0), torch.ones(100), None)  # full: floor 10
    scores = torch.rand(n)
    scores[n // 3] = float("nan")
    with pytest.raises(NonFiniteScoreError):
        running.add_shard("b", 0, scores, scores, None)
