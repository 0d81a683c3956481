"""The Loader refuses, when built, every argument that used to end in a signal,
a hang or wrong batches, naming the argument; an error in FFCV's pipeline
thread reaches the training loop instead of leaving it waiting."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ffcv.loader import OrderOption

from ffcv_dr import Loader
from ffcv_dr.beton import BetonFile

BAD = [
    (dict(indices=[100000]), r'indices\[0\]=100000: outside the file, whose samples are 0 to 499'),
    (dict(indices=[500]), r'indices\[0\]=500: outside the file'),
    (dict(indices=[3, -1]), r'indices\[1\]=-1: outside the file'),
    (dict(indices=[0.5, 1.5]), r'indices: must be integers, got float64'),
    (dict(indices=[[1, 2], [3, 4]]), r'indices: must be a 1-D sequence .* shape \(2, 2\)'),
    (dict(indices=[]), r'indices: empty'),
    (dict(output_size=(0, 0)), r'output_size=\(0, 0\): must be \(height, width\), two integers'),
    (dict(output_size=(2.7, 2.7)), r'output_size=\(2.7, 2.7\): must be'),
    (dict(output_size=(20000, 20000)), r'output_size=\(20000, 20000\): the batch buffers would take'),
    (dict(batch_size=0), r'batch_size=0: must be an integer of at least 1'),
    (dict(batch_size=1000), r'batch_size=1000 with drop_last=True: the 500 samples .* make no full batch'),
    (dict(num_workers=0), r'num_workers=0: must be -1 \(every core\)'),
    (dict(num_workers=10**6), r'num_workers=1000000: must be -1 \(every core\) or 1 to \d+ \(the threads numba'),
    (dict(batches_ahead=0), r'batches_ahead=0: must be an integer of at least 1'),
    (dict(batches_ahead=10**6), r'batch_size=8, batches_ahead=1000000: the batch buffers would take'),
    (dict(batches_ahead=-1), r'batches_ahead=-1'),
    (dict(p=1.5), r'p=1.5: must be a probability'),
    (dict(p=float('nan')), r'p=nan'),
    (dict(seed=-3), r'seed=-3: must be an integer from 0'),
    (dict(seed=0.5), r'seed=0.5'),
    (dict(order='random'), r"order='random': must be an ffcv.loader.OrderOption"),
    (dict(dtype=np.int8), r'dtype=.*int8.*: must be np.float16 or np.float32'),
    (dict(dtype=torch.float16), r'dtype=torch.float16: must be np.float16 or np.float32'),
    (dict(device='cuda:7'), r"device='cuda:7': this machine has \d+ CUDA devices"),
    (dict(device='tpu'), r"device='tpu'"),
    (dict(densify='sharpen'), r"densify='sharpen': must be one of smooth, zeros"),
    (dict(mean=[1, 2]), r'mean=\[1, 2\]: must be three finite numbers'),
    (dict(std=[1, 0, 1]), r'std=\[1, 0, 1\]: .* each above 0'),
    (dict(distributed=True), r'distributed=True: torch.distributed is not initialised'),
    (dict(drop_last='yes'), r"drop_last='yes': must be True or False"),
]


@pytest.mark.parametrize('kwargs, message', BAD, ids=[str(k) for k, _ in BAD])
def test_bad_arguments_are_refused_by_name(randaug_beton, kwargs, message):
    args = {**dict(batch_size=8, num_workers=1), **kwargs}
    with pytest.raises(ValueError, match=message):
        Loader(randaug_beton, **args)


def test_set_output_size_takes_integers_only(randaug_beton):
    loader = Loader(randaug_beton, batch_size=8, num_workers=1, indices=np.arange(16))
    for size in [(2.7, 2.7), (0, 5), (True, 3), 'abc', (64,)]:
        with pytest.raises(ValueError, match='output_size=.*must be'):
            loader.set_output_size(size)
    loader.set_output_size((np.int64(40), 48))
    images = next(iter(loader))[0]
    assert images.shape[1:3] == (40, 48)


def test_repeated_and_numpy_indices_are_kept(randaug_beton):
    f = BetonFile(randaug_beton)
    loader = Loader(randaug_beton, batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                    indices=np.array([3, 3, 7, 9], np.uint32), labels=True)
    labels = next(iter(loader))[2].numpy()
    assert labels.tolist() == [f.label(i) for i in (3, 3, 7, 9)]


FAILING_PIPELINE = """
import sys, numpy as np
from dataclasses import replace
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader
from ffcv.pipeline.operation import Operation
import ffcv_dr
from ffcv_dr.beton import BetonFile

LABEL_40 = BetonFile(sys.argv[1]).label(40)

class FailsOnSample40(Operation):
    def generate_code(self):
        def fail(labels, _):
            if (labels == LABEL_40).any():
                raise RuntimeError('a worker failed on sample 40')
            return labels
        return fail
    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=False), None

clock = ffcv_dr.ReplayClock()
clock.bind(BetonFile(sys.argv[1]))
pipelines = ffcv_dr.train_pipelines(clock, (32, 32))
pipelines['label'] = [IntDecoder(), FailsOnSample40()]
loader = Loader(sys.argv[1], batch_size=8, num_workers=1, pipelines=pipelines,
                custom_fields=ffcv_dr.CUSTOM_FIELDS, indices=np.arange(64))
seen = 0
try:
    for batch in loader:
        seen += 1
except RuntimeError as e:
    print(f'raised after {seen} batches: {e}')
"""


def test_an_error_in_the_pipeline_thread_reaches_the_loop(randaug_beton):
    done = subprocess.run([sys.executable, '-c', FAILING_PIPELINE, randaug_beton], capture_output=True,
                          text=True, timeout=300)  # before the fix: waits forever
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'raised after 5 batches: a worker failed on sample 40' in done.stdout


@pytest.mark.parametrize('os_cache', [True, False])
def test_a_file_renamed_over_the_opened_one_changes_nothing(randaug_beton, mixing_beton, tmp_path,
                                                             os_cache):
    """The Loader reads the file it opened for its whole life (FFCV reopens it by
    name): replacing it by rename, as ffcv-dr's own tools write files, changes
    nothing, and no sample is reported damaged."""
    import shutil
    import warnings
    path, pristine, other = tmp_path / 'data.beton', tmp_path / 'pristine.beton', tmp_path / 'other.beton'
    for p in (path, pristine):
        shutil.copy(randaug_beton, p)
    shutil.copy(mixing_beton, other)
    args = dict(batch_size=8, num_workers=1, seed=2, os_cache=os_cache, labels=True,
                indices=np.arange(0, 500, 5), order=OrderOption.QUASI_RANDOM)
    loader, reference = Loader(str(path), **args), Loader(str(pristine), **args)
    os.replace(other, path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a damage warning fails the test
        for _ in range(2):
            for got, want in zip(loader, reference):
                for a, b in zip(got, want):
                    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not len(loader.clock.damaged()) and loader.fname == str(path)


CLI = [
    (['relabel', 'in.beton', 'out.beton', '--chunk', '0'], 'argument --chunk: 0: must be at least 1'),
    (['relabel', 'in.beton', 'out.beton', '--batch-size', '0'], 'argument --batch-size: 0: must be at least 1'),
    (['relabel', 'in.beton', 'out.beton', '--topk', '0'], 'argument --topk: 0: must be at least 1'),
    (['relabel', 'in.beton', 'out.beton', '--teacher-size', '0'], 'argument --teacher-size: 0'),
    (['relabel', 'in.beton', 'out.beton', '--weight', '0'], 'argument --weight: 0: must be above 0.0'),
    (['replay', 'in.beton', '--index', '0', '--sample', '0', '--out', 'x.png', '--size', '0'],
     'argument --size: 0: must be at least 1'),
    (['replay', 'in.beton', '--index', '-1', '--sample', '0', '--out', 'x.png'], 'argument --index: -1'),
    (['reinforce', 'images', 'out.beton', '--erase-p', 'nan'], 'argument --erase-p: nan: must be 0.0 to 1.0'),
    (['reinforce', 'images', 'out.beton', '--ra-magnitude', '31'], 'argument --ra-magnitude: 31 is outside 0..30'),
    (['reinforce', 'images', 'out.beton', '--mixup-alpha', '-1'], 'argument --mixup-alpha: -1: must be above 0.0'),
    (['reinforce', 'images', 'out.beton', '--samples', 'many'], "argument --samples: 'many' is not an integer"),
    (['convert', 'images', 'out.beton', '--mldr', 'm', '--jpeg-quality', '101'], 'is outside 1..100'),
    (['convert', 'images', 'out.beton', '--mldr', 'm', '--workers', '0'], 'argument --workers: 0'),
    (['inspect', 'in.beton', '--out', 'g.png', '--samples', '0'], 'argument --samples: 0: must be at least 1'),
]


@pytest.mark.parametrize('argv, message', CLI, ids=[' '.join(a[:1] + a[-2:]) for a, _ in CLI])
def test_cli_numbers_are_range_checked(argv, message, capsys, tmp_path, monkeypatch):
    """0 or a value out of range is refused before any work; it never means the default."""
    from ffcv_dr.cli import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing written, no .parts folder


def test_info_names_what_a_path_is_when_not_a_file(tmp_path, capsys):
    from ffcv_dr.cli import main
    fifo = tmp_path / 'fifo.beton'
    os.mkfifo(fifo)
    for path, kind in ((tmp_path, 'a directory'), ('/dev/null', 'a device'), (fifo, 'a FIFO'),
                       (tmp_path / 'missing.beton', 'no such file')):
        assert main(['info', str(path)]) != 0
        assert f'{path}: {kind}' in capsys.readouterr().err


@pytest.mark.parametrize('name, refused', [(b'lite0@224', False), (b'lite0\x1b[31m@224', True),
                                           (b'lite0\n@224', True), (b'\rlite0', True)])
def test_teacher_names_with_control_characters_are_damage(randaug_beton, tmp_path, name, refused):
    """A record (CRC32 intact) naming a teacher with control characters, which
    would reach terminals through info and relabel, is a damaged record."""
    import shutil
    from fuzz import arguments_offset
    from ffcv_dr.format import TEACHERS_AT, TEACHERS_DTYPE, _teachers_crc
    path = str(tmp_path / 'named.beton')
    shutil.copy(randaug_beton, path)
    record = np.zeros((), TEACHERS_DTYPE)
    record['count'] = 1
    record['entries'][0]['name'] = name
    record['entries'][0]['weight'] = 1
    record['crc32'] = _teachers_crc(record)
    with open(path, 'r+b') as f:
        f.seek(arguments_offset(path, 'target') + TEACHERS_AT)
        f.write(record.tobytes())
    if refused:
        with pytest.raises(ValueError, match='record of teachers .* holds a bad entry'):
            BetonFile(path)
    else:
        assert [t.name for t in BetonFile(path).teachers] == [name.decode()]


def test_names_from_files_are_printed_with_control_characters_escaped(randaug_beton, tmp_path,
                                                                      capsys):
    """File and folder names reach the terminal in errors, skip reports and
    info: an escape sequence, a newline or a carriage return in one is shown
    escaped, never raw."""
    import shutil
    from ffcv_dr.cli import main
    from conftest import IMAGES, RANDAUG
    images = tmp_path / 'images' / 'n01440764'
    images.mkdir(parents=True)
    first = os.path.join(IMAGES, sorted(os.listdir(IMAGES))[0])
    shutil.copy(os.path.join(first, sorted(os.listdir(first))[0]), images / 'good.JPEG')
    (images / 'bad\x1b[31m\nname\r.JPEG').write_bytes(b'not an image')
    assert main(['convert', str(tmp_path / 'images'), str(tmp_path / 'out.beton'), '--mldr', RANDAUG]) == 1
    err = capsys.readouterr().err
    assert 'bad\\x1b[31m\\nname\\r.JPEG: unreadable image' in err and '\x1b' not in err
    odd = tmp_path / 'odd\x1b[2J\n.beton'
    shutil.copy(randaug_beton, odd)
    assert main(['info', str(odd)]) == 0
    out = capsys.readouterr().out
    assert 'odd\\x1b[2J\\n.beton' in out and '\x1b' not in out
