"""A Loader resumed from ``state_dict()`` in the middle of an epoch yields
exactly the batches an uninterrupted run yields from there on: images, soft
targets, labels and reinforcement indices, for every order, with the OS cache
or FFCV's process cache, distributed or not, after ``set_output_size``."""
import io
import pickle

import numpy as np
import pytest
import torch
from ffcv.loader import OrderOption

from ffcv_dr import Loader
from test_loader import gloo_world  # noqa: F401 -- a fixture

ARGS = dict(batch_size=8, num_workers=2, seed=3, p=0.8, labels=True, reinforcement_index=True,
            output_size=(40, 40), indices=np.arange(0, 200, 3))


def _batches(iterator, count=None):
    """Copies of the next ``count`` batches (all, when None): FFCV reuses its buffers."""
    out = []
    for batch in iterator:
        out.append([t.clone() for t in batch])
        if count is not None and len(out) == count:
            break
    return out


def _run(loader, stop_epoch=None, stop_batch=None):
    """Epochs 0-2 (the size changed to 32 px from epoch 1 on), stopping,
    state taken, at ``stop_batch`` of ``stop_epoch``; (batches, state)."""
    out = []
    for epoch in range(3):
        if epoch == 1:
            loader.set_output_size((32, 32))
        if epoch == stop_epoch:
            out += _batches(loader, stop_batch)
            return out, loader.state_dict()
        out += _batches(loader)
    return out, loader.state_dict()


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


@pytest.mark.parametrize('order, os_cache, recipe', [
    (OrderOption.SEQUENTIAL, True, 'randaug'),
    (OrderOption.RANDOM, True, 'randaug'),
    (OrderOption.RANDOM, False, 'randaug'),
    (OrderOption.QUASI_RANDOM, True, 'randaug'),
    (OrderOption.QUASI_RANDOM, False, 'randaug'),
    (OrderOption.QUASI_RANDOM, False, 'mixing'),
])
def test_a_resumed_loader_yields_the_rest_of_the_run(request, order, os_cache, recipe):
    path = request.getfixturevalue(f'{recipe}_beton')
    args = {**ARGS, 'order': order, 'os_cache': os_cache}
    if recipe == 'mixing':
        args['indices'] = np.arange(64)
    whole, end_state = _run(Loader(path, **args))
    first = Loader(path, **args)
    before, state = _run(first, stop_epoch=1, stop_batch=3)
    del first
    state = pickle.loads(pickle.dumps(state))
    buf = io.BytesIO()
    torch.save(state, buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)   # plain data only
    assert (state['epoch'], state['batches'], tuple(state['output_size'])) == (1, 3, (32, 32))

    resumed = Loader(path, **args)   # built at 40 px: the state says 32
    resumed.load_state_dict(state)
    assert resumed.state_dict()['batches'] == 3
    rest = _batches(resumed)
    assert len(rest) == len(resumed) - 3
    rest += _batches(resumed)        # epoch 2
    _same(before + rest, whole)
    assert resumed.state_dict() == end_state
    assert (end_state['epoch'], end_state['batches']) == (3, 0)


def test_a_distributed_loader_resumes(randaug_beton, gloo_world):  # noqa: F811
    args = {**ARGS, 'order': OrderOption.RANDOM, 'distributed': True}
    whole, _ = _run(Loader(randaug_beton, **args))
    before, state = _run(Loader(randaug_beton, **args), stop_epoch=2, stop_batch=1)
    assert (state['rank'], state['world_size']) == (0, 1)
    resumed = Loader(randaug_beton, **args)
    resumed.load_state_dict(state)
    _same(before + _batches(resumed), whole)


def test_a_state_from_another_file_or_other_arguments_is_refused(randaug_beton, mixing_beton):
    state = Loader(randaug_beton, **ARGS).state_dict()
    assert (state['epoch'], state['batches']) == (0, 0)
    with pytest.raises(ValueError, match=r'randaug.beton: .*seed: state 3, this loader 4'):
        Loader(randaug_beton, **{**ARGS, 'seed': 4}).load_state_dict(state)
    with pytest.raises(ValueError, match=r'batch_size: state 8, this loader 16'):
        Loader(randaug_beton, **{**ARGS, 'batch_size': 16}).load_state_dict(state)
    with pytest.raises(ValueError, match=r'indices: state'):
        Loader(randaug_beton, **{**ARGS, 'indices': np.arange(0, 200, 4)}).load_state_dict(state)
    with pytest.raises(ValueError, match=r'mixing.beton: .*file_bytes.*file_crc.*samples'):
        Loader(mixing_beton, **{**ARGS, 'indices': np.arange(0, 64, 3)}).load_state_dict(state)
    for bad in ({'epoch': 1}, {**state, 'batches': -1}, {**state, 'epoch': 1.5}, [1, 2],
                {**state, 'batches': 10 ** 6}):
        with pytest.raises(ValueError, match=r'randaug.beton: '):
            Loader(randaug_beton, **ARGS).load_state_dict(bad)
