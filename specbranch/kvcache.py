"""A preallocated, position-indexed KV cache with O(1) rollback and copy-free branching.

Layout (gpt-fast style: the cache is a buffer plus a length, so rollback is moving a length):

* the **trunk** holds the committed prefix of the single sequence,
  keys/values ``[layers, 1, kv_heads, max_len, head_dim]``;
* the **branch** segment holds up to ``max_branches`` divergent continuations that all share
  the trunk prefix, ``[layers, max_branches, kv_heads, max_branch_len, head_dim]``.

``fork(k)`` therefore copies nothing: the k branch rows attend to the shared trunk plus their own
branch suffix (see :func:`specbranch.models.decoder.attend`). ``select(b)`` appends branch b's
suffix (a few tokens) to the trunk and drops the others. The cache holds only bookkeeping and
buffers; the decoder decides what to write where through :meth:`KVCache.write`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheView:
    """What one layer's attention sees for the current forward (all views, no copies).

    ``trunk_k``/``trunk_v``: ``[1, kv_heads, trunk_len, head_dim]`` shared by every row.
    ``branch_k``/``branch_v``: ``[rows, kv_heads, branch_len, head_dim]`` or None when not forked.
    The new tokens are always the last ``t`` positions of the last segment.
    """

    trunk_k: torch.Tensor
    trunk_v: torch.Tensor
    branch_k: torch.Tensor | None
    branch_v: torch.Tensor | None


class KVCache:
    """Key/value buffers for one model plus the lengths that say which entries are live."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        max_branches: int = 4,
        max_branch_len: int = 32,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_len = max_len
        self.max_branches = max_branches
        self.max_branch_len = max_branch_len
        trunk_shape = (num_layers, 1, num_kv_heads, max_len, head_dim)
        branch_shape = (num_layers, max_branches, num_kv_heads, max_branch_len, head_dim)
        self.k = torch.zeros(trunk_shape, dtype=dtype, device=device)
        self.v = torch.zeros(trunk_shape, dtype=dtype, device=device)
        self.bk = torch.zeros(branch_shape, dtype=dtype, device=device)
        self.bv = torch.zeros(branch_shape, dtype=dtype, device=device)
        # per-layer views, so a layer's write is one narrow and one copy (each indexing op costs
        # microseconds, and a decode step makes two writes per layer)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), self.bk.unbind(0), self.bv.unbind(0)))
        self.length = 0  # committed trunk tokens
        self.num_branches = 0  # 0 = not forked
        self.branch_length = 0  # tokens in every branch row (rows advance in lock-step)

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def forked(self) -> bool:
        return self.num_branches > 0

    @property
    def total_length(self) -> int:
        """Sequence length seen by the next token (trunk plus branch suffix)."""
        return self.length + self.branch_length

    def reset(self) -> None:
        self.length = self.num_branches = self.branch_length = 0

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (O(1)). Cutting into the trunk discards branches."""
        if not 0 <= length <= self.total_length:
            raise ValueError(f"cannot truncate to {length}: cache holds {self.total_length} positions")
        if length >= self.length and self.forked:
            self.branch_length = length - self.length
        else:
            self.num_branches = self.branch_length = 0
            self.length = length

    def rollback(self, n: int) -> None:
        """Drop the last ``n`` positions (O(1))."""
        self.truncate(self.total_length - n)

    def fork(self, k: int) -> None:
        """Start ``k`` branch rows that share the whole trunk; nothing is copied."""
        if self.forked:
            raise RuntimeError("cache is already forked; select() a branch first")
        if not 1 <= k <= self.max_branches:
            raise ValueError(f"fork({k}): this cache was built for 1..{self.max_branches} branches")
        self.num_branches, self.branch_length = k, 0

    def select(self, b: int) -> None:
        """Keep branch ``b``: its suffix joins the trunk, the other rows are dropped."""
        if not 0 <= b < self.num_branches:
            raise ValueError(f"select({b}): cache has {self.num_branches} branches")
        n = self.branch_length
        self._check_room(self.length + n, self.max_len, "trunk")
        self.k[:, :, :, self.length : self.length + n] = self.bk[:, b : b + 1, :, :n]
        self.v[:, :, :, self.length : self.length + n] = self.bv[:, b : b + 1, :, :n]
        self.length += n
        self.num_branches = self.branch_length = 0

    # -- used by the decoder -------------------------------------------------------------------
    def rows(self) -> int:
        """Batch rows the next forward must have."""
        return self.num_branches or 1

    def advance(self, t: int) -> None:
        """Claim ``t`` new positions (called once per forward, before the layers run)."""
        if self.forked:
            self._check_room(self.branch_length + t, self.max_branch_len, "branch")
            self.branch_length += t
        else:
            self._check_room(self.length + t, self.max_len, "trunk")
            self.length += t

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> CacheView:
        """Store this layer's new keys/values ``[rows, kv_heads, t, head_dim]`` (after advance)."""
        t = k_new.shape[2]
        k, v, bk, bv = self._layers[layer]
        if self.forked:
            end, n = self.branch_length, self.num_branches
            bk.narrow(0, 0, n).narrow(2, end - t, t).copy_(k_new)
            bv.narrow(0, 0, n).narrow(2, end - t, t).copy_(v_new)
            return CacheView(k.narrow(2, 0, self.length), v.narrow(2, 0, self.length),
                             bk.narrow(0, 0, n).narrow(2, 0, end), bv.narrow(0, 0, n).narrow(2, 0, end))
        end = self.length
        k.narrow(2, end - t, t).copy_(k_new)
        v.narrow(2, end - t, t).copy_(v_new)
        return CacheView(k.narrow(2, 0, end), v.narrow(2, 0, end), None, None)

    def layer_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s whole buffers: trunk keys, values ``[1, kv_heads, max_len, head_dim]`` and branch keys,
        values ``[max_branches, kv_heads, max_branch_len, head_dim]`` (for a kernel that writes and reads them itself,
        models/fused.py; the lengths say which entries are live)."""
        return self._layers[layer]

    @staticmethod
    def _check_room(needed: int, room: int, what: str) -> None:
        if needed > room:
            raise ValueError(
                f"KV cache {what} is full ({needed} > {room} positions): raise max_len / "
                "max_branch_len or shorten the prompt / max_new_tokens"
            )
