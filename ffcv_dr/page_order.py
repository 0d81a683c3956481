"""``OrderOption.QUASI_RANDOM`` for the ffcv-dr Loader: FFCV's page-wise
random order, also under ``distributed=True``, honouring ``indices``.

A file that does not fit in memory is read with ``os_cache=False``: FFCV's
process cache then reads each page of the file that a batch needs, and an
order that draws a batch's samples from a few pages at a time reads each page
once per epoch. FFCV 1.0.2's QuasiRandom refuses ``distributed=True``, so each
rank here takes whole pages:

1. Each epoch the pages holding the selected samples are shuffled with a
   generator seeded by (seed, epoch), the same on every rank, and cut into
   ``world_size`` runs of about equal sample counts (a page goes to the run
   holding its middle sample). Rank r takes run r: the ranks' shares are
   disjoint, cover the epoch, and no page is read by two ranks.
2. Within its share a rank orders samples as FFCV's QuasiRandom does: pages
   in the shuffled order enter a window of ``2 * batch_size`` pages, and each
   next sample is drawn from a random page of the window.
3. Every rank yields ceil(N / world_size) samples each epoch, as PyTorch's
   ``DistributedSampler`` (``drop_last=False``) makes it, so that ranks run
   the same number of steps and ``len(loader)`` stays fixed. Whole pages put
   each share within about a page's samples of that: a shorter share is padded
   by repeating its last samples (whose pages are still in memory then), and
   a longer one drops its last samples for that epoch. At ImageNet's scale
   (about 70 samples a page, 160,000 a rank on 8 GPUs) that is a few dozen
   samples a rank per epoch, different ones each epoch; without
   ``distributed`` nothing is padded or dropped.

A sample's blocks (its image and its top-k) lie on one page: FFCV's writer
moves a sample that does not fit to the next page whole. The order is a pure
function of (seed, epoch, rank, world size, indices): no state carries over
from one epoch to the next. Each index in ``indices`` appears as many times
as it is listed (FFCV's own orders keep duplicates too).
"""
from __future__ import annotations

import numba as nb
import numpy as np
from ffcv.traversal_order.base import TraversalOrder


@nb.njit(nogil=True, cache=True)
def _window_order(members, starts, counts, window, seed, out):
    """FFCV's quasi-random draw over groups of samples: ``members[starts[g]:
    starts[g] + counts[g]]`` is group g, groups enter a window of ``window``
    in order, each sample comes from a random group of the window."""
    np.random.seed(seed)
    members = members.copy()
    for g in range(len(starts)):  # shuffle within each page (Fisher-Yates)
        for k in range(counts[g] - 1, 0, -1):
            m = np.random.randint(0, k + 1)
            a, b = starts[g] + k, starts[g] + m
            members[a], members[b] = members[b], members[a]
    active = np.empty(max(window, 1), np.int64)
    consumed = np.zeros(len(starts), np.int64)
    n_active, next_group = 0, 0
    for s in range(len(out)):
        while n_active < window and next_group < len(starts):
            active[n_active] = next_group
            n_active += 1
            next_group += 1
        k = np.random.randint(0, n_active)
        g = active[k]
        out[s] = members[starts[g] + consumed[g]]
        consumed[g] += 1
        if consumed[g] == counts[g]:
            n_active -= 1
            active[k] = active[n_active]


def shares(pages: np.ndarray, indices: np.ndarray, world_size: int, seed: int, epoch: int):
    """Each rank's (group members, group starts, group counts), its groups
    being the pages of its share in shuffled order. ``pages[i]``: sample i's page."""
    sample_pages = pages[indices]
    page_ids, inverse = np.unique(sample_pages, return_inverse=True)
    by_page = np.argsort(inverse, kind='stable')
    counts = np.bincount(inverse, minlength=len(page_ids))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.Generator(np.random.PCG64([seed & 0xFFFFFFFF, seed >> 32, epoch, 0xD15C]))
    shuffled = rng.permutation(len(page_ids))
    middle = np.cumsum(counts[shuffled]) - counts[shuffled] / 2
    members = indices[by_page].astype(np.int64)
    rank_of = np.minimum((middle * world_size / len(indices)).astype(np.int64), world_size - 1)
    if len(np.unique(rank_of)) < world_size:
        # Fewer pages than ranks, or a page so large that a rank would get none:
        # ranks share pages, splitting a shuffled list of the samples as
        # DistributedSampler does (padded by repeating its start).
        members = np.resize(rng.permutation(members), -(-len(members) // world_size) * world_size)
        return [(members[r::world_size], np.zeros(1, np.int64),
                 np.full(1, len(members) // world_size, np.int64)) for r in range(world_size)]
    return [(members, starts[shuffled[rank_of == r]], counts[shuffled[rank_of == r]])
            for r in range(world_size)]


def rank_order(pages: np.ndarray, indices: np.ndarray, rank: int, world_size: int, window: int,
               seed: int, epoch: int) -> np.ndarray:
    """Rank ``rank``'s samples for ``epoch``: ceil(len(indices) / world_size) of them."""
    length = -(-len(indices) // world_size)
    members, starts, counts = shares(pages, indices, world_size, seed, epoch)[rank]
    order = np.empty(int(counts.sum()), np.int64)
    draws = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, epoch, rank]).generate_state(1)[0]
    _window_order(members, starts, counts, window, np.uint32(draws & 0x7FFFFFFF), order)
    if len(order) < length:  # pad as DistributedSampler does, with the share's last samples
        order = np.concatenate([order, np.resize(order[::-1], length - len(order))[::-1]])
    return order[:length]


class QuasiRandomPages(TraversalOrder):
    """The order described in this module's docstring. ``pages[i]``: the page
    (byte offset >> log2(page size), as FFCV's memory managers count) that
    holds sample i's blocks."""

    def __init__(self, loader, pages: np.ndarray):
        super().__init__(loader)
        self.indices = np.asarray(self.indices, np.int64)
        self.pages = np.asarray(pages, np.int64)
        self.window = 2 * loader.batch_size
        if self.distributed:
            import torch.distributed as dist
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1

    def sample_order(self, epoch: int) -> np.ndarray:
        return rank_order(self.pages, self.indices, self.rank, self.world_size, self.window,
                          int(self.seed) & 0xFFFFFFFFFFFFFFFF, epoch)
