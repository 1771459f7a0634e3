"""KV cache bookkeeping invariants: O(1) rollback, copy-free fork, select."""

import pytest
import torch

from specbranch.kvcache import KVCache


def cache():
    return KVCache(num_layers=2, num_kv_heads=1, head_dim=2, max_len=16, max_branches=3, max_branch_len=4)


def fill(c, layer_vals):
    """Advance by len(layer_vals) tokens and write value v at each new position of every row."""
    t = len(layer_vals)
    c.advance(t)
    rows = c.rows()
    kv = torch.tensor(layer_vals, dtype=torch.float32).view(1, 1, t, 1).expand(rows, 1, t, 2)
    views = [c.write(layer, kv, kv) for layer in range(2)]
    return views[-1]


def test_rollback_moves_only_a_length():
    c = cache()
    fill(c, [1, 2, 3, 4])
    before = c.k.clone()
    c.rollback(2)
    assert c.length == 2 and torch.equal(c.k, before)  # nothing touched
    view = fill(c, [9])
    assert view.trunk_k[0, 0, :, 0].tolist() == [1, 2, 9]


def test_fork_shares_the_trunk_without_copying():
    c = cache()
    fill(c, [1, 2, 3])
    c.fork(3)
    assert c.rows() == 3 and c.total_length == 3
    c.advance(1)
    kv = torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1, 1).expand(3, 1, 1, 2)
    view = c.write(0, kv, kv)
    assert view.trunk_k.data_ptr() == c.k.data_ptr()  # a view of the trunk buffer, not a copy
    assert view.trunk_k.shape == (1, 1, 3, 2) and view.branch_k.shape == (3, 1, 1, 2)
    assert view.branch_k[:, 0, 0, 0].tolist() == [10, 20, 30]


def test_select_appends_the_chosen_branch_to_the_trunk():
    c = cache()
    fill(c, [1, 2])
    c.fork(2)
    c.advance(2)
    for layer in range(2):
        kv = torch.tensor([[5.0, 6.0], [7.0, 8.0]]).view(2, 1, 2, 1).expand(2, 1, 2, 2)
        c.write(layer, kv, kv)
    c.select(1)
    assert not c.forked and c.length == 4
    assert c.k[1, 0, 0, :4, 0].tolist() == [1, 2, 7, 8]


def test_truncate_inside_branch_keeps_fork_and_into_trunk_drops_it():
    c = cache()
    fill(c, [1, 2, 3])
    c.fork(2)
    c.advance(3)
    c.truncate(5)
    assert c.forked and c.branch_length == 2
    c.truncate(2)
    assert not c.forked and c.length == 2


def test_errors_name_the_problem():
    c = cache()
    with pytest.raises(ValueError, match="full"):
        c.advance(17)
    with pytest.raises(ValueError, match="1..3 branches"):
        c.fork(4)
    c.fork(2)
    with pytest.raises(RuntimeError, match="already forked"):
        c.fork(2)
    with pytest.raises(ValueError, match="select"):
        c.select(2)
    with pytest.raises(ValueError, match="truncate"):
        c.truncate(1)  # the cache holds 0 positions
