"""Random streams that are a function of (run seed, rank, position), not of history.

mmengine seeds the global generators once, at start. Whatever consumes them
afterwards (the data pipeline's ``RandomFlip`` when ``num_workers=0``, the
detector's RPN/RoI samplers, a validation dataloader creating its workers)
then shifts every later draw, and a resumed run, which replays or skips some
of those consumers, draws differently from an uninterrupted one. Reseeding
the generators at fixed points of the training loop from ``(seed, rank,
position)`` makes every draw after that point independent of what ran
before it.
"""
import random
from typing import Iterator, Sequence

import numpy as np
import torch
from mmengine.dist import get_rank


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (``numpy.random.SeedSequence``)."""
    low, high = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2)
    return (int(high) << 32 | int(low)) & (2**63 - 1)


def seed_global_generators(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch: CPU and
    every CUDA device) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds the CUDA generators too


class SeededIterator:
    """Wraps a batch iterator; reseeds the global generators before each batch.

    Before batch ``i`` (counted from 0 from where the wrapper was created) the
    global generators are seeded with ``derived_seed(seed, rank, salt, i)``, so
    the random draws of the pipeline (in the main process) and of the training
    step that consumes the batch are a function of ``(seed, rank, i)`` alone.

    Args:
        iterator (Iterator): the batches, e.g. ``IterBasedTrainLoop``'s
            ``dataloader_iterator``.
        seed (int): the run's seed.
        salt (int): separates this stream from others derived from ``seed``.
    """

    def __init__(self, iterator: Iterator, seed: int, salt: int = 0) -> None:
        self.iterator = iterator
        self.seed = int(seed)
        self.salt = int(salt)
        self.rank = get_rank()
        self.count = 0

    def __iter__(self) -> 'SeededIterator':
        return self

    def __next__(self) -> Sequence[dict]:
        seed_global_generators(derived_seed(self.seed, self.rank, self.salt, self.count))
        self.count += 1
        return next(self.iterator)
