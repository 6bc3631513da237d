"""Training data whose numbers do not depend on how it is loaded.

A DataLoader's random augmentation normally draws from the RNG of whichever process loads the
sample: the main process with ``num_workers=0``, else each worker's, seeded from the loader. The
number of workers then decides which random numbers each image gets, and so the run's numbers.
Here every sample is drawn under torch's RNG seeded from ``(stream, epoch, index)`` alone:
``stream`` says which loader (the run's seed, the task, and which of the task's loaders: its
stage or pass), ``epoch`` how many passes that loader has made, ``index`` the sample in the
dataset. Any ``num_workers`` (and any batch size) gives the same images, so the worker count is
an execution setting, like the device, not part of a run's identity.

The shuffled order comes from a generator of the loader's own, which nothing else draws from
(DataLoader draws its workers' base seed from the generator it is given, and draws it once per
epoch without persistent workers, once per loader with them).
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from clbench import stopping


def sample_seed(stream: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample, hashed from its loader's stream, the pass and its index."""
    key = b"".join(int(v).to_bytes(8, "little", signed=True) for v in (stream, epoch, index))
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class EpochIndices(Sampler):
    """Yields ``(epoch, index)``: the dataset indices of ``order``, each with the number of
    passes this sampler made before the current one (counted when a pass starts)."""

    def __init__(self, order: Sampler):
        self.order = order
        self.passes = 0

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, self.passes = self.passes, self.passes + 1  # a generator: runs when the pass starts
        for index in self.order:
            yield epoch, index


class SeededSamples(Dataset):
    """``dataset[index]`` for a key ``(epoch, index)``, drawn with torch's RNG seeded by
    ``sample_seed(stream, epoch, index)``; the loading process's own RNG is left as it was.
    torchvision's transforms (and the synthetic benchmark's) draw from torch's RNG."""

    def __init__(self, dataset: Dataset, stream: int):
        self.dataset = dataset
        self.stream = stream

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        rng = torch.default_generator  # what augmentations draw from; saved and restored around them
        state = rng.get_state()
        rng.manual_seed(sample_seed(self.stream, epoch, index))
        try:
            return self.dataset[index]
        finally:
            rng.set_state(state)


def seeded_loader(dataset: Dataset, stream: int, batch_size: int, shuffle: bool, drop_last: bool,
                  num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset`` whose batches are the same for any ``num_workers``: a
    shuffled (or sequential) order from its own generator seeded by ``stream``, every sample
    drawn under its own seed (``SeededSamples``)."""
    order = RandomSampler(dataset, generator=torch.Generator().manual_seed(stream)) if shuffle \
        else SequentialSampler(dataset)
    return DataLoader(SeededSamples(dataset, stream), batch_size=batch_size, sampler=EpochIndices(order),
                      drop_last=drop_last, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(stream),  # the workers' base seed only
                      persistent_workers=num_workers > 0,  # no worker start-up at every epoch
                      pin_memory=pin_memory, worker_init_fn=stopping.leave_to_the_main_process)
