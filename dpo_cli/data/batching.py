"""Which pairs each process trains on at each optimizer step.

The order is a pure function of (seed, step): step s belongs to epoch s // steps_per_epoch,
whose permutation is drawn from `seed + epoch`. Resuming at step s therefore needs no saved
sampler state and sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import torch


def steps_per_epoch(n_pairs: int, batch_size: int) -> int:
    """Full global batches per pass over the data (the incomplete last batch is dropped)."""
    return n_pairs // batch_size


def position(step: int, n_pairs: int, batch_size: int) -> tuple[int, int]:
    """(epoch, batch index within the epoch) of optimizer step `step` (0-based)."""
    per_epoch = steps_per_epoch(n_pairs, batch_size)
    return step // per_epoch, step % per_epoch


def step_indices(step: int, n_pairs: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the global batch of optimizer step `step`."""
    epoch, batch = position(step, n_pairs, batch_size)
    generator = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n_pairs, generator=generator)
    return perm[batch * batch_size : (batch + 1) * batch_size].tolist()


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def micro_batches(
    indices: list[int], rank: int, world_size: int, micro_batch_size: int, lengths: list[int] | None = None
) -> list[list[int]]:
    """This process's share of a global batch, split into micro batches.

    Without `lengths`, process r takes the r-th contiguous slice. With `lengths` (tokens per
    example, `train.sort_by_length`), the batch is sorted longest first and dealt round-robin,
    so that every process gets a like amount of work and each micro batch holds examples of
    similar length (packed rows fill, padded rows waste little). Either way the step's pairs
    are the same, micro x accumulation x processes = batch, and the assignment is a function of
    the step alone (resume sees the same micro batches).
    """
    if lengths is not None:
        ordered = sorted(indices, key=lambda i: -lengths[i])  # stable: ties keep the step's order
        return _chunks(ordered[rank::world_size], micro_batch_size)
    share = len(indices) // world_size
    return _chunks(indices[rank * share : (rank + 1) * share], micro_batch_size)


def eval_batches(n_pairs: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """Every eval pair exactly once across processes (strided), in micro batches."""
    return _chunks(list(range(rank, n_pairs, world_size)), micro_batch_size)
