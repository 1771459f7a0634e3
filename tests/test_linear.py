"""The precision-specific linear layers."""

import pytest
import torch

from specbranch.models.linear import Int8Linear, make_linear


def test_int8_linear_is_exactly_batch_invariant():
    torch.manual_seed(0)
    w, b = torch.randn(300, 200) * 0.05, torch.randn(300)
    lin = Int8Linear.from_float(w, b)
    x = torch.randn(7, 200) * torch.logspace(-2, 2, 7)[:, None]  # rows of very different scale
    together = lin(x)
    alone = torch.cat([lin(x[i : i + 1]) for i in range(7)])
    assert torch.equal(together, alone)  # bit-identical, not just close
    assert torch.equal(lin(x[2:5]), together[2:5])


def test_int8_linear_is_accurate_and_keeps_shape():
    torch.manual_seed(1)
    w, b = torch.randn(64, 128) * 0.05, torch.randn(64)
    x = torch.randn(2, 3, 128)
    got, want = Int8Linear.from_float(w, b)(x), torch.nn.functional.linear(x, w, b)
    assert got.shape == (2, 3, 64)
    assert (got - want).abs().max() / want.abs().max() < 0.03


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("fp64", torch.float64), ("bf16", torch.float32)])
def test_dense_linear_returns_the_input_dtype(precision, dtype):
    lin = make_linear(torch.randn(8, 4), None, precision)
    assert lin(torch.randn(3, 4, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_vocab_subset_head_keeps_rows_and_masks_the_rest(precision):
    from specbranch.models.linear import make_linear, subset_head

    torch.manual_seed(0)
    weight = torch.randn(50, 16)
    head = make_linear(weight, None, precision)
    ids = torch.tensor([7, 0, 3, 49, 3])  # unsorted, with a repeat
    sub = subset_head(head, ids, 50)
    x = torch.randn(2, 3, 16)
    full, got = head(x), sub(x)  # [2, 3, 50] each
    keep = torch.tensor([0, 3, 7, 49])
    assert got.shape == full.shape
    assert torch.allclose(got[..., keep], full[..., keep], atol=1e-5)
    rest = torch.ones(50, dtype=torch.bool)
    rest[keep] = False
    assert torch.isinf(got[..., rest]).all() and (got[..., rest] < 0).all()
