"""A file bigger than memory: os_cache=False gives the batches os_cache=True
gives, for every recipe and order (mixing partners are read from the file);
QUASI_RANDOM reads page by page, honours indices and, under torchrun, gives
each rank whole pages of its own."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from ffcv.loader import OrderOption

from fuzz import write_records
from ffcv_dr import Loader
from ffcv_dr.beton import BetonFile
from ffcv_dr.page_order import rank_order, shares

ORDERS = (OrderOption.SEQUENTIAL, OrderOption.RANDOM, OrderOption.QUASI_RANDOM)


def epochs(path, epochs=2, **kwargs):
    """Every batch of ``epochs`` epochs as numpy copies (FFCV reuses its buffers)."""
    args = dict(batch_size=8, num_workers=2, seed=5, labels=True, reinforcement_index=True, p=0.9)
    loader = Loader(path, **{**args, **kwargs})
    return [[tuple(t.numpy().copy() for t in batch) for batch in loader] for _ in range(epochs)], loader


def assert_same_batches(a, b):
    assert [len(e) for e in a] == [len(e) for e in b]
    for epoch_a, epoch_b in zip(a, b):
        for batch_a, batch_b in zip(epoch_a, epoch_b):
            for x, y in zip(batch_a, batch_b):
                np.testing.assert_array_equal(x, y)


def pages_of(path) -> np.ndarray:
    f = BetonFile(path)
    return (f.image_meta['data_ptr'] >> np.uint64(int(np.log2(f.reader.page_size)))).astype(np.int64)


@pytest.mark.parametrize('beton', ['randaug_beton', 'mixing_beton'])
@pytest.mark.parametrize('order', ORDERS, ids=lambda o: o.name)
def test_without_the_os_cache_the_batches_are_those_of_the_os_cache(request, beton, order):
    """Mixing partners, outside the pages FFCV's process cache loads, are read from the file."""
    path = request.getfixturevalue(beton)
    f = BetonFile(path)
    indices = np.arange(0, len(f), max(len(f) // 64, 1))
    on_disk, _ = epochs(path, order=order, os_cache=False, indices=indices)
    in_memory, _ = epochs(path, order=order, os_cache=True, indices=indices)
    assert_same_batches(on_disk, in_memory)
    seen = np.concatenate([b[2] for b in on_disk[0]])
    assert len(seen) == len(indices) // 8 * 8 and len(set(seen.tolist())) == len(seen)
    if f.recipe.mixing:
        labels = {f.label(i): i for i in range(len(f))}
        mixed = [j for e in on_disk for _, _, lab, js in e for j, l in zip(js, lab)
                 if j >= 0 and f.describe(labels[int(l)], int(j))['params']['pair'] is not None]
        assert len(mixed) > 20  # many samples really read their partner from the file


def test_quasi_random_honours_indices_and_reads_page_by_page(randaug_beton):
    f = BetonFile(randaug_beton)
    pages = pages_of(randaug_beton)  # 5 or more on ImageNet's photos; whatever this data fills
    indices = np.concatenate([np.arange(0, 500, 2), [7, 7, 9]])  # duplicates are kept, as FFCV keeps them
    args = dict(batch_size=2, num_workers=2, order=OrderOption.QUASI_RANDOM, seed=9, indices=indices)
    loader = Loader(randaug_beton, os_cache=False, labels=True, **args)
    order = [loader.traversal_order.sample_order(e) for e in range(3)]
    for o in order:
        assert sorted(o.tolist()) == sorted(indices.tolist())
    assert not np.array_equal(order[0], order[1]) and not np.array_equal(order[1], order[2])
    again = Loader(randaug_beton, os_cache=True, **args)  # the same for a given seed, either cache
    np.testing.assert_array_equal(again.traversal_order.sample_order(1), order[1])
    # Page by page: at any point at most 2 * batch_size pages are in use
    # (between their first and last sample), where a random order uses them all.
    used = pages[order[0]]
    spans = [(np.flatnonzero(used == p)[0], np.flatnonzero(used == p)[-1]) for p in np.unique(used)]
    assert max(sum(lo <= k <= hi for lo, hi in spans) for k in range(len(used))) <= 4
    # The loader yields this order.
    got = np.concatenate([batch[2].numpy().copy() for batch in loader])
    np.testing.assert_array_equal(got, [f.label(i) for i in order[0][:len(indices) // 2 * 2]])


def finer_pages(path, at_least: int = 8) -> np.ndarray:
    """The file's samples on pages of the largest power-of-two size that makes
    ``at_least`` pages of them (a layout as the writer lays out a file with
    that page size), so that whole-page shares exist whatever the photos."""
    ptr = BetonFile(path).image_meta['data_ptr'].astype(np.int64)
    shift = int(np.log2(BetonFile(path).reader.page_size))
    while shift > 10 and len(np.unique(ptr >> shift)) < at_least:
        shift -= 1
    return ptr >> shift


def test_shares_are_disjoint_whole_pages_covering_the_epoch(randaug_beton):
    pages = finer_pages(randaug_beton)
    indices = np.arange(500)
    for world in (2, 3):
        for epoch in range(3):
            parts = shares(pages, indices, world, 1, epoch)
            taken = [m[np.concatenate([np.arange(s, s + c) for s, c in zip(st, ct)])] for m, st, ct in parts]
            assert sorted(np.concatenate(taken).tolist()) == indices.tolist()
            owned = [set(pages[t].tolist()) for t in taken]
            assert all(not (owned[a] & owned[b]) for a in range(world) for b in range(a + 1, world))
            sizes = [len(t) for t in taken]
            biggest_page = np.bincount(pages).max()
            assert max(sizes) - min(sizes) <= 2 * biggest_page  # each within a page of N / world


def test_every_rank_gets_samples_when_pages_are_few_or_lopsided():
    pages = np.array([0] * 98 + [1, 2])  # a rank given whole pages could get none
    for world in (2, 3, 5, 120):
        for epoch in range(4):
            orders = [rank_order(pages, np.arange(100), r, world, 16, 3, epoch) for r in range(world)]
            assert all(len(o) == -(-100 // world) for o in orders)
            assert all(((o >= 0) & (o < 100)).all() for o in orders)
            assert all(counts.sum() > 0 for _, _, counts in shares(pages, np.arange(100), world, 3, epoch))
            if world > 3:  # more ranks than pages: samples are split, as DistributedSampler splits them
                assert set(np.concatenate(orders).tolist()) == set(range(100))


TORCHRUN_RANK = """
import sys, numpy as np, torch.distributed as dist
from ffcv.loader import OrderOption
from ffcv_dr import Loader
path, out, os_cache = sys.argv[1], sys.argv[2], sys.argv[3] == '1'
dist.init_process_group('gloo')
loader = Loader(path, batch_size=8, num_workers=1, order=OrderOption.QUASI_RANDOM, distributed=True,
                seed=4, labels=True, reinforcement_index=True, os_cache=os_cache)
epochs = {}
for epoch in range(2):
    batches = [tuple(t.numpy().copy() for t in b) for b in loader]
    for k, name in enumerate(['images', 'targets', 'labels', 'js']):
        epochs[f'{name}{epoch}'] = np.concatenate([b[k] for b in batches])
    epochs[f'order{epoch}'] = loader.traversal_order.sample_order(epoch)
np.savez(f'{out}/rank{dist.get_rank()}.npz', **epochs)
dist.destroy_process_group()
"""


@pytest.mark.parametrize('beton, os_cache', [('randaug_beton', False), ('mixing_beton', True)])
def test_distributed_quasi_random_under_torchrun(request, beton, os_cache, tmp_path):
    path = request.getfixturevalue(beton)
    script = tmp_path / 'rank.py'
    script.write_text(TORCHRUN_RANK)
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', '29533', str(script), path, str(tmp_path), str(int(os_cache))],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    f = BetonFile(path)
    pages = pages_of(path)
    ranks = [np.load(tmp_path / f'rank{r}.npz') for r in range(2)]
    for epoch in range(2):
        orders = [r[f'order{epoch}'] for r in ranks]
        assert len(orders[0]) == len(orders[1]) == -(-len(f) // 2)  # as DistributedSampler
        # The shares cover the epoch, but for what a longer share drops (less than a page).
        covered = set(orders[0].tolist()) | set(orders[1].tolist())
        assert len(covered) > len(f) - np.bincount(pages).max()
        if len(np.unique(pages)) >= 2:  # each rank reads only its own pages
            assert not set(pages[orders[0]].tolist()) & set(pages[orders[1]].tolist())
        for r, rank in enumerate(ranks):
            used = orders[r][:len(orders[r]) // 8 * 8]
            np.testing.assert_array_equal(rank[f'labels{epoch}'], [f.label(i) for i in used])
            for k in range(0, len(used), 7):  # the images are the replays of these samples
                np.testing.assert_array_equal(rank[f'images{epoch}'][k],
                                              f.render(used[k], int(rank[f'js{epoch}'][k]), 4, epoch))
    assert not np.array_equal(ranks[0]['order0'], ranks[0]['order1'])
    for r in range(2):  # a rerun gives the same orders: a pure function of seed, epoch and rank
        np.testing.assert_array_equal(ranks[r]['order1'], rank_order(pages, np.arange(len(f)), r, 2, 16, 4, 1))


def test_damaged_records_are_replaced_alike_without_the_os_cache(mixing_beton, tmp_path):
    f = BetonFile(mixing_beton)
    rec = f.record_dtype
    bad = str(tmp_path / 'damaged.beton')
    hits = write_records(mixing_beton, bad, [
        ('pair far outside', 'image', rec.fields['pair'][1], (10 ** 6).to_bytes(4, 'little')),
        ('RandAugment op 99', 'image', rec.fields['ra_op'][1], bytes([99])),
        ('MixUp lambda NaN', 'image', rec.fields['mixup_lam'][1], np.float32('nan').tobytes())])
    results = {}
    for os_cache in (False, True):
        with pytest.warns(RuntimeWarning, match=re.escape(bad) + r': \d+ samples .* hold damaged records'):
            batches, loader = epochs(bad, order=OrderOption.QUASI_RANDOM, os_cache=os_cache, p=1.0)
        results[os_cache] = batches, sorted(loader.clock.damaged().tolist())
    assert_same_batches(results[False][0], results[True][0])
    assert results[False][1] == results[True][1] == sorted(hits)
    truncated = str(tmp_path / 'truncated.beton')
    shutil.copy(mixing_beton, truncated)
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    messages = []
    for os_cache in (False, True):
        with pytest.raises(ValueError) as e:
            Loader(truncated, batch_size=8, os_cache=os_cache)
        messages.append(str(e.value))
    assert messages[0] == messages[1] and messages[0].startswith(truncated)
