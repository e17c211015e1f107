"""Which samples each process trains on, so that N processes compute the same optimizer step as one.

The step's samples are a function of ``(seed, step)`` only (``loop.ExampleStream``: a seeded shuffle per epoch,
step ``s`` reads positions ``[s·B, (s+1)·B)`` of the endless concatenation of epochs).  Under DDP every process
draws the same global batch and rank ``r`` of ``W`` keeps the fixed contiguous slice ``[r·B/W, (r+1)·B/W)``.

Normalisation: every loss term is a sum over the step's valid answer tokens divided by their count over the
WHOLE step (all ranks); every rank knows the whole step's samples, so it counts them without communication.
DDP averages gradients over ranks, so each rank's loss is multiplied by ``W`` (``loss_scale``): the average of
the ranks' ``W · Σ_r / N`` is ``Σ / N``, the single-process loss.
"""
from __future__ import annotations


def rank_slice(items: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s share of one step's global batch: the ``rank``-th of ``world_size`` equal contiguous
    slices (order kept, so micro-batches on each rank are also a function of (seed, step))."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: must lie in [0, world_size={world_size}), got {rank}")
    if len(items) % world_size:
        raise ValueError(f"batch_size: {len(items)} samples per step do not split evenly over {world_size} "
                         "processes; choose a batch_size divisible by the number of processes")
    share = len(items) // world_size
    return items[rank * share:(rank + 1) * share]


def loss_scale(world_size: int) -> float:
    """Factor on each rank's loss so that DDP's gradient average equals the single-process gradient."""
    return float(world_size)
