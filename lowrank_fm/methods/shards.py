"""Rows of one layer spread over several processes: how a solver combines what each holds.

A solver whose cost grows with the sample rows (sums over rows: means, scatter and cross-products, objectives,
gradients) computes its partial sums on its own rows and adds them over the shards with :attr:`RowShards.sum`;
only small results (d x d matrices, vectors, scalars) travel. :attr:`RowShards.cat` brings every shard's rows
to every shard in shard order: only for steps that need all rows at once and hold few of them (fewer rows than
dimensions). The callables are given by the caller (torch.distributed collectives in
:func:`lowrank_fm.distributed.distributed_shards`); this module knows nothing of processes. ``None`` (or
:data:`LOCAL`) means these rows are all the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["RowShards", "LOCAL", "shards_or_local", "row_offset", "total"]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class RowShards:
    """sum : Tensor -> Tensor, the element-wise sum of a tensor (same shape on every shard) over the shards;
    cat : Tensor (n_s, ...) -> Tensor (sum_s n_s, ...), every shard's rows concatenated in shard order;
    index : this shard's place in that order; count : how many shards (1: these rows are all the rows)."""

    sum: Callable[[torch.Tensor], torch.Tensor] = _same
    cat: Callable[[torch.Tensor], torch.Tensor] = _same
    index: int = 0
    count: int = 1

    @property
    def local(self) -> bool:
        """True when these rows are all the rows (the collectives are identities)."""
        return self.count == 1


LOCAL = RowShards()


def shards_or_local(shards: RowShards | None) -> RowShards:
    """``shards``, or :data:`LOCAL` for None."""
    return LOCAL if shards is None else shards


def row_offset(shards: RowShards, n_local: int) -> tuple[int, int]:
    """(index of this shard's first row among all rows in shard order, total rows) from every shard's count."""
    if shards.local:
        return 0, int(n_local)
    counts = [int(c) for c in shards.cat(torch.tensor([int(n_local)], dtype=torch.int64))]
    return sum(counts[:shards.index]), sum(counts)


def total(shards: RowShards, *values: float) -> list[float]:
    """The sums over the shards of a few float64 scalars (one collective)."""
    if shards.local:
        return [float(v) for v in values]
    return [float(v) for v in shards.sum(torch.tensor([float(v) for v in values], dtype=torch.float64))]
