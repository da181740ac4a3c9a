"""Multi-process runs under ``torch.distributed`` (launched with ``torchrun``): rank, shards, reductions.

Each rank calibrates a contiguous shard of the calibration images (:func:`calibration.distributed.shard_range`)
and fits the response statistics of its own images; :func:`reduce_covariance` merges the ranks' (count,
mean, scatter) in rank order, so every rank holds the statistics of all images, equal to a single-process
fit up to float64 summation order. The layer-wise pass is sharded the same way: each rank runs its own
images, :func:`gather_rows` brings every rank's fitting rows to rank 0 in image (= rank) order, rank 0 solves
and :func:`broadcast_object` hands the built layer to every rank; :func:`all_reduce_sums` adds per-rank sums
(held-out errors). Solvers that add their row sums over the ranks instead (``Method.solves_shards``, and the
whole-model correction) get :func:`distributed_shards`: every rank solves on its own rows in lockstep. Without an initialised process group everything here is the single-process case (rank 0
of 1) and returns its argument.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, SequentialSampler, Subset

from .stats import StreamingCovariance

__all__ = ["world", "computed_on_rank_zero", "solver_threads", "running_threads", "reduce_covariance", "shard_loader",
           "init_from_env", "split_range", "gather_rows", "broadcast_object", "all_reduce_sums", "all_reduce_tensor",
           "all_gather_rows", "distributed_shards"]


def world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str) -> tuple[int, int, str]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    Uses gloo for a CPU ``device`` and nccl for CUDA; a CUDA device without an index becomes this rank's
    ``cuda:LOCAL_RANK``. Returns (rank, world_size, device); without ``WORLD_SIZE`` > 1, (0, 1, device).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        rank, size = world()
        return rank, size, device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed: run one process")
    cuda = device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def reduce_covariance(estimator: StreamingCovariance) -> StreamingCovariance:
    """Merge every rank's :class:`StreamingCovariance` in rank order; the same result on every rank.

    Notes
    -----
    The pairwise update of :meth:`StreamingCovariance.merge` combines (n_r, mean_r, scatter_r) of the ranks
    exactly as it combines blocks of one process, so the result equals a single-process fit over the same
    samples up to float64 rounding.
    """
    rank, size = world()
    if size == 1:
        return estimator
    gathered: list = [None] * size
    dist.all_gather_object(gathered, estimator)
    merged = StreamingCovariance()
    for other in gathered:
        merged.merge(other)
    return merged


def shard_loader(data: Iterable, start: int, stop: int) -> DataLoader | None:
    """A loader over images ``[start, stop)`` of ``data`` when ``data`` is a sequential DataLoader, else None.

    The new loader keeps ``data``'s batch size, workers, pinned memory and collate function, so a rank loads
    only its own images (the caller falls back to reading ``data`` and skipping the others' images).
    """
    if not isinstance(data, DataLoader) or not isinstance(data.sampler, SequentialSampler) or data.batch_size is None:
        return None
    return DataLoader(Subset(data.dataset, range(start, stop)), batch_size=data.batch_size, shuffle=False,
                      num_workers=data.num_workers, collate_fn=data.collate_fn, pin_memory=data.pin_memory,
                      drop_last=False, persistent_workers=False)


def split_range(start: int, stop: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part of ``[start, stop)`` among ``size`` ranks, in rank order; sizes differ
    by at most one and a part may be empty (fewer items than ranks)."""
    base, extra = divmod(max(int(stop) - int(start), 0), int(size))
    first = int(start) + rank * base + min(rank, extra)
    return first, first + base + (1 if rank < extra else 0)


def _comm_device() -> torch.device:
    """Where collective tensors must live: the rank's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(tensor: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, on rank ``dst`` (None on the others).

    The ranks may hold different numbers of rows (other dimensions and dtype equal). The row counts are
    all-gathered first; ``dst`` then allocates the result once and receives each rank's rows straight into
    its slice (no padded copies): ``dst`` holds the result, every other rank only its own rows.
    """
    rank, size = world()
    if size == 1:
        return tensor
    device = _comm_device()
    wire = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor  # gloo has no bool
    count = torch.tensor([wire.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    if rank != dst:
        if counts[rank]:
            dist.send(wire.contiguous().to(device), dst=dst)
        return None
    result = torch.empty((sum(counts), *wire.shape[1:]), dtype=wire.dtype, device=device)
    offset = 0
    for other, n in enumerate(counts):
        if n:
            part = result[offset:offset + n]  # a dim-0 slice of a contiguous tensor: contiguous
            if other == rank:
                part.copy_(wire)
            else:
                dist.recv(part, src=other)
        offset += n
    result = result.to(tensor.device)
    return result.to(torch.bool) if tensor.dtype == torch.bool else result


def broadcast_object(value, src: int = 0):
    """``value`` of rank ``src`` on every rank (pickled: put tensors on the CPU first)."""
    rank, size = world()
    if size == 1:
        return value
    box = [value if rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def solver_threads(requested: int | None) -> int:
    """Threads for a computation rank 0 runs while the other processes wait for its broadcast: ``requested``,
    or (None) this process's torch threads times the processes on this machine (``LOCAL_WORLD_SIZE``, set by
    torchrun), at most the cores this process may run on. A waiting process sleeps in the collective, so its
    cores are free."""
    if requested is not None:
        return int(requested)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads() * max(local, 1), cores))


@contextmanager
def running_threads(count: int):
    """torch's intra-op threads and the BLAS libraries' (numpy's, through threadpoolctl) at ``count`` inside
    the block, restored after it."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def computed_on_rank_zero(compute: Callable[[], object], *, threads: int | None = None) -> object:
    """``compute()`` run on rank 0 only, its result (or the exception it raised) broadcast: every rank returns
    the same result or raises the same error, so none is left waiting. One process: ``compute()`` itself.
    ``threads``: rank 0 computes with that many threads (:func:`solver_threads`: the waiting processes' cores
    too); None: its own. The result is pickled: put tensors and modules on the CPU first."""
    rank, size = world()
    if size == 1:
        return compute()
    result, failure = None, None
    if rank == 0:
        try:
            if threads is None:
                result = compute()
            else:
                with running_threads(threads):
                    result = compute()
        except Exception as error:  # raised on every rank below
            failure = error
    result, failure = broadcast_object((result, failure))
    if failure is not None:
        raise failure
    return result


def computed_round_robin(keys: Sequence, compute: Callable[[object], object]) -> dict:
    """``{key: compute(key)}`` for every key, each computed on one rank only (key i on rank i mod size) and the
    results exchanged, so every rank returns the same dict; an exception raised on any rank is raised on every
    rank (none is left waiting). One process: every key computed here. The results are pickled: CPU values."""
    rank, size = world()
    if size == 1:
        return {key: compute(key) for key in keys}
    mine, failure = {}, None
    try:
        for key in list(keys)[rank::size]:
            mine[key] = compute(key)
    except Exception as error:  # raised on every rank below
        failure = error
    gathered: list = [None] * size
    dist.all_gather_object(gathered, (mine, failure))
    for _, error in gathered:
        if error is not None:
            raise error
    merged = {}
    for part, _ in gathered:
        merged.update(part)
    return {key: merged[key] for key in keys}


def all_reduce_sums(values: list[float]) -> list[float]:
    """The element-wise sums over all ranks of ``values`` (float64), the same on every rank."""
    rank, size = world()
    if size == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    return [float(v) for v in total.cpu()]


def all_reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over all ranks of ``tensor`` (same shape and dtype on every rank), a new tensor on
    ``tensor``'s device, the same on every rank."""
    rank, size = world()
    if size == 1:
        return tensor
    total = tensor.detach().to(_comm_device(), copy=True).contiguous()
    dist.all_reduce(total)
    return total.to(tensor.device)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, on every rank (row counts may differ;
    the other dimensions and the dtype agree). For few rows: each rank receives all of them."""
    rank, size = world()
    if size == 1:
        return tensor
    device = _comm_device()
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[:tensor.shape[0]] = tensor.detach().to(device)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(tensor.device)


def distributed_shards():
    """:class:`~lowrank_fm.methods.shards.RowShards` over the ranks of the process group (sum: all-reduce, cat:
    all-gather in rank order); the single-process :data:`~lowrank_fm.methods.shards.LOCAL` without one."""
    from .methods.shards import LOCAL, RowShards

    rank, size = world()
    if size == 1:
        return LOCAL
    return RowShards(sum=all_reduce_tensor, cat=all_gather_rows, index=rank, count=size)
