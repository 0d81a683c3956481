"""ffcv_dr.Loader takes FFCV's arguments with FFCV's meaning, and ffcv-dr's
fields replay new reinforcements every epoch in a plain ffcv.Loader too."""
import inspect
import subprocess
import sys

import ffcv
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import OrderOption
from ffcv.pipeline.operation import Operation
from ffcv.transforms import Squeeze, ToTensor

from ffcv_dr import CUSTOM_FIELDS, Loader, train_pipelines
from ffcv_dr.beton import BetonFile
from ffcv_dr.fields import ReinforcedImageDecoder
from ffcv_dr.replay_clock import choose
from test_loader import expected_target

N = 8


def test_ffcvs_arguments_come_first_in_ffcvs_order():
    ours = list(inspect.signature(Loader.__init__).parameters.values())[1:]
    theirs = list(inspect.signature(ffcv.Loader.__init__).parameters)[1:]
    assert [p.name for p in ours[:len(theirs)]] == theirs
    assert all(p.kind == p.KEYWORD_ONLY for p in ours[len(theirs):])


def test_positional_arguments_mean_what_they_mean_to_ffcv(randaug_beton):
    """fname, batch_size, num_workers, os_cache, order, distributed, seed, indices."""
    loader = Loader(randaug_beton, 4, 1, False, OrderOption.SEQUENTIAL, False, 3, np.arange(N),
                    reinforcement_index=True)
    assert isinstance(loader.memory_manager, ffcv.memory_managers.ProcessCacheManager)
    f = BetonFile(randaug_beton)
    js = torch.cat([b[2].clone() for b in loader])
    assert js.tolist() == [choose(np.uint64(3), 0, i, f.recipe.num_samples, 1.0) for i in range(N)]


class Negate(Operation):
    """A user's own op at the end of a pipeline: 255 - pixels, in numba."""

    def generate_code(self):
        def negate(images, dst):
            dst[:] = 255 - images
            return dst
        return negate

    def declare_state_and_memory(self, previous_state):
        from ffcv.pipeline.allocation_query import AllocationQuery
        return previous_state, AllocationQuery(previous_state.shape, previous_state.dtype)


def test_pipelines_replace_a_field_or_extend_ours(randaug_beton):
    """A list replaces the field's pipeline (FFCV's IntDecoder for the label, a
    user's op after ffcv-dr's decoder, whose clock becomes the Loader's); None
    leaves a field out."""
    f = BetonFile(randaug_beton)
    pipelines = {'image': [ReinforcedImageDecoder((64, 64)), Negate(), ToTensor()],
                 'label': [IntDecoder(), ToTensor(), Squeeze()],
                 'target': None}
    loader = Loader(randaug_beton, 4, 1, order=OrderOption.SEQUENTIAL, seed=7,
                    indices=np.arange(N), pipelines=pipelines, reinforcement_index=True)
    images, labels, js = [torch.cat(t) for t in zip(*[[x.clone() for x in b] for b in loader])]
    assert images.shape == (N, 64, 64, 3)
    for i in range(N):
        assert labels[i] == f.label(i)
        assert js[i] == choose(np.uint64(7), 0, i, f.recipe.num_samples, 1.0)
        np.testing.assert_array_equal(images[i].numpy(), 255 - f.render(i, int(js[i]), 7, 0, size=64))
    loader.set_output_size((32, 32))  # set_output_size works on the user's decoder
    assert next(iter(loader))[0].shape == (4, 32, 32, 3)


def test_a_plain_ffcv_loader_replays_new_reinforcements_every_epoch(randaug_beton):
    """No bind, no set_epoch: the clock is bound when the Loader is built and
    follows its epochs; an explicit set_epoch still chooses the next one."""
    f = BetonFile(randaug_beton)
    loader = ffcv.Loader(randaug_beton, batch_size=N, num_workers=1, order=OrderOption.SEQUENTIAL,
                         indices=np.arange(N), custom_fields=CUSTOM_FIELDS,
                         pipelines=train_pipelines(reinforcement_index=True))
    seen = []
    for epoch in range(2):
        images, targets, js = [t.clone() for t in next(iter(loader))]
        want = [choose(np.uint64(0), epoch, i, f.recipe.num_samples, 1.0) for i in range(N)]
        assert js.tolist() == want
        for i in range(N):
            np.testing.assert_array_equal(images[i].numpy(), f.render(i, want[i], 0, epoch))
            np.testing.assert_allclose(targets[i].numpy(), expected_target(f, i, want[i]), atol=1e-6)
        seen.append(want)
    assert seen[0] != seen[1]
    loader.pipeline_specs['image'].decoder.clock.set_epoch(9)
    js = next(iter(loader))[2].clone()
    assert js.tolist() == [choose(np.uint64(0), 9, i, f.recipe.num_samples, 1.0) for i in range(N)]


PATCHED = """
import sys
import ffcv_dr
assert 'ffcv' not in sys.modules and 'torch' not in sys.modules, 'ffcv_dr imported ffcv or torch'
import ffcv
from ffcv.loader.epoch_iterator import EpochIterator
assert ffcv.Loader.__iter__.__module__ == 'ffcv_dr.ffcv_patches', ffcv.Loader.__iter__
assert EpochIterator.run.__module__ == 'ffcv_dr.ffcv_patches'
print('patched')
"""


def test_importing_ffcv_dr_is_cheap_and_ffcv_is_patched_when_it_loads():
    done = subprocess.run([sys.executable, '-c', PATCHED], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and 'patched' in done.stdout, done.stderr[-2000:]
