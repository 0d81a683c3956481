"""Reruns the hostile cases of issue 27 and counts how each ended.

Every Loader argument given the values a careless or hostile user gives, alone
and in combinations of orders, caching and files; a file renamed over a
running Loader; storage metadata and teacher names that lie (the fuzz suite's
mutations); malformed ``train`` settings and YAML; every number option of every
command given 0, -1, nan, inf and text; paths that are not files; images that
do not decode and folders that loop; reruns that must write the same bytes.

Each case runs in its own process (forked from this one, which has imported
everything and runs no thread) with a time limit, and ends as one of:
refused (one line naming the argument, setting, option or file), ran (its
batches, or its output, checked), or a failure: signal, hang, traceback,
unclear (an error naming nothing), wrong (batches or output not what was
asked), accepted (a value that must be refused ran), refused-valid.

    .venv/bin/python benchmarks/hostile_inputs.py [--only loader,cli,train,files,images] [--jobs 2]
"""
import argparse
import collections
import dataclasses
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
from ffcv.loader import OrderOption

import ffcv_dr.train  # noqa: F401  (imported once here, before any fork)
from ffcv_dr import Loader
from ffcv_dr.beton import BetonFile
from ffcv_dr.cli import build_parser, main as cli_main

HERE = os.path.dirname(os.path.abspath(__file__))
N = 8  # images in the harness's files (ffcv_dr.demo's photos)
FAILURES = ('signal', 'hang', 'traceback', 'unclear', 'wrong', 'accepted', 'refused-valid')


@dataclasses.dataclass
class Case:
    group: str
    name: str
    run: str          # the function below that runs it, in the child
    spec: dict
    expect: str       # refuse | run | either
    names: str = ''   # what a refusal must name


# ---- Loader -----------------------------------------------------------------

LOADER_VALUES = {  # argument -> [(value as source text, expected)]
    'indices': [('[100000]', 'refuse'), ('[N]', 'refuse'), ('[N - 1] * 4', 'run'), ('[3, -1]', 'refuse'),
                ('[0.5, 1.5]', 'refuse'), ('[[1, 2], [3, 4]]', 'refuse'), ('[]', 'refuse'),
                ("'abc'", 'refuse'), ('[2**40]', 'refuse'), ('[2**64]', 'refuse'), ('[1e10]', 'refuse'),
                ('[True, False, True, False]', 'refuse'), ('np.arange(N, dtype=np.uint8)', 'run'),
                ('np.array([1, 1, 2, 2], np.uint32)', 'run'), ('range(N)', 'run'), ('None', 'run'),
                ('np.array([np.nan] * 4)', 'refuse'), ('{1, 2, 3, 4}', 'either')],
    'output_size': [('(0, 0)', 'refuse'), ('(2.7, 2.7)', 'refuse'), ('(20000, 20000)', 'refuse'),
                    ('(-5, 5)', 'refuse'), ('(64,)', 'refuse'), ("'64'", 'refuse'), ('(1, 1)', 'run'),
                    ('(np.int64(40), 48)', 'run'), ('(True, 3)', 'refuse'), ('64', 'refuse'),
                    ('(48, 64)', 'run'), ('(2**31, 2**31)', 'refuse'), ('(2**64, 8)', 'refuse'),
                    ('(None, None)', 'refuse')],
    'batch_size': [('0', 'refuse'), ('-1', 'refuse'), ('1', 'run'), ('N', 'run'), ('N + 1', 'refuse'),
                   ('2.5', 'refuse'), ("'4'", 'refuse'), ('True', 'refuse'), ('2**40', 'refuse'),
                   ('np.int64(4)', 'run')],
    'num_workers': [('0', 'refuse'), ('-1', 'run'), ('-2', 'refuse'), ('1', 'run'), ('2', 'run'),
                    ('2.5', 'refuse'), ("'2'", 'refuse'), ('10**6', 'refuse'), ('None', 'refuse')],
    'batches_ahead': [('0', 'refuse'), ('-1', 'refuse'), ('1', 'run'), ('3', 'run'), ('2.5', 'refuse'),
                      ('10**6', 'refuse'), ("'3'", 'refuse')],
    'p': [('1.5', 'refuse'), ('-0.1', 'refuse'), ("float('nan')", 'refuse'), ("float('inf')", 'refuse'),
          ('0', 'run'), ('1', 'run'), ('0.5', 'run'), ("'0.5'", 'refuse'), ('None', 'refuse')],
    'seed': [('-3', 'refuse'), ('0.5', 'refuse'), ('2**64', 'refuse'), ("'x'", 'refuse'), ('0', 'run'),
             ('2**63 - 1', 'either'), ('np.int64(5)', 'run'), ('None', 'refuse')],
    'order': [("'random'", 'refuse'), ('3', 'refuse'), ('None', 'refuse'), ('OrderOption.SEQUENTIAL', 'run'),
              ('OrderOption.RANDOM', 'run'), ('OrderOption.QUASI_RANDOM', 'run')],
    'dtype': [('np.int8', 'refuse'), ("'float32'", 'either'), ('np.float16', 'run'), ('np.float32', 'run'),
              ('np.float64', 'refuse'), ('torch.float16', 'either'), ('None', 'refuse')],
    'device': [("'cuda:7'", 'refuse'), ("'tpu'", 'refuse'), ("'cpu'", 'run'), ('5', 'refuse'),
               ("'cuda'", 'either'), ("torch.device('cpu')", 'run')],
    'densify': [("'sharpen'", 'refuse'), ('None', 'refuse'), ("'smooth'", 'run'), ("'zeros'", 'run')],
    'mean': [('[1, 2]', 'refuse'), ("[float('nan'), 1, 1]", 'refuse'), ("'abc'", 'refuse'),
             ('[0, 0, 0]', 'run'), ('[[1, 2, 3]]', 'either'), ('None', 'refuse')],
    'std': [('[1, 0, 1]', 'refuse'), ('[1, -1, 1]', 'refuse'), ("[1, float('inf'), 1]", 'refuse'),
            ('[1, 1, 1]', 'run'), ('[1e-30, 1, 1]', 'either')],
    'distributed': [('True', 'refuse'), ("'yes'", 'refuse'), ('False', 'run')],
    'drop_last': [("'yes'", 'refuse'), ('True', 'run'), ('False', 'run'), ('0', 'refuse')],
    'os_cache': [("'no'", 'refuse'), ('True', 'run'), ('False', 'run')],
    'labels': [("'yes'", 'refuse'), ('True', 'run')],
    'reinforcement_index': [("'yes'", 'refuse'), ('True', 'run')],
}
RESIZES = [('(2.7, 2.7)', 'refuse'), ('(0, 5)', 'refuse'), ('(True, 3)', 'refuse'), ("'abc'", 'refuse'),
           ('(64,)', 'refuse'), ('(20000, 20000)', 'refuse'), ('(-1, 5)', 'refuse'), ('(48.0, 48)', 'refuse'),
           ('(40, 48)', 'run'), ('(np.int64(40), 48)', 'run'), ('(1, 1)', 'run')]
LOADER_BASE = dict(batch_size=4, num_workers=1, labels=True, reinforcement_index=True)


def loader_cases():
    cases = [Case('loader', f'{arg}={src}', 'loader', {'kwargs': f'{{{arg!r}: {src}}}'}, expect, arg)
             for arg, values in LOADER_VALUES.items() for src, expect in values]
    cases += [Case('loader', f'set_output_size({src})', 'loader', {'kwargs': '{}', 'resize': src}, expect,
                   'output_size') for src, expect in RESIZES]
    for file in ('plain', 'mixing'):
        for order in ('SEQUENTIAL', 'RANDOM', 'QUASI_RANDOM'):
            for os_cache in (True, False):
                for indices in ('None', '[N - 1, N - 1, 0, 3, 5]'):
                    kwargs = (f'{{"order": OrderOption.{order}, "os_cache": {os_cache}, "indices": {indices},'
                              f' "batch_size": 2}}')
                    cases.append(Case('loader', f'{file} {order} os_cache={os_cache} indices={indices}',
                                      'loader', {'kwargs': kwargs, 'file': file, 'resize': '(40, 56)'}, 'run'))
    return cases


def run_loader(data, spec):
    ns = dict(np=np, torch=torch, OrderOption=OrderOption, N=N)
    path = os.path.join(data, spec.get('file', 'plain') + '.beton')
    kwargs = {**LOADER_BASE, **eval(spec['kwargs'], ns)}
    try:
        loader = Loader(path, **kwargs)
        if 'resize' in spec:
            loader.set_output_size(eval(spec['resize'], ns))
    except Exception as e:  # noqa: BLE001  (the outcome is what is counted)
        return 'refused', f'{type(e).__name__}: {e}'
    f = BetonFile(path)
    indices = kwargs.get('indices')
    want = list(range(N)) if indices is None else [int(i) for i in indices]
    labels = [f.label(i) for i in want]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            problems = [p for _ in range(2) for p in _epoch_problems(loader, kwargs, labels, f.recipe.num_samples)]
        except Exception as e:  # noqa: BLE001
            return 'wrong', f'raised while iterating: {type(e).__name__}: {e}'
    problems += [f'warned: {w.message}' for w in caught if 'damaged' in str(w.message)]
    if len(loader.clock.damaged()):
        problems.append(f'samples {loader.clock.damaged().tolist()} reported damaged')
    return ('wrong', '; '.join(problems[:3])) if problems else ('ran', '')


def _epoch_problems(loader, kwargs, labels, samples):
    got, shapes, problems = [], set(), []
    for images, targets, batch_labels, js in loader:
        images = images.float().numpy().copy()
        spatial = images.shape[1:3] if images.shape[-1] == 3 else images.shape[2:4]
        shapes.add(tuple(spatial))
        flat = int((images.reshape(len(images), -1).std(axis=1) == 0).sum()) if np.prod(spatial) > 16 else 0
        targets = targets.float().numpy()
        if flat:
            problems.append(f'{flat} flat (black) images')
        if not np.isfinite(images).all() or not np.isfinite(targets).all():
            problems.append('non-finite values')
        if (targets < 0).any() or np.abs(targets.sum(axis=1) - 1).max() > 2e-2:
            problems.append('targets not a distribution')
        if ((js.numpy() < -1) | (js.numpy() >= samples)).any():
            problems.append(f'reinforcement index outside -1..{samples - 1}')
        got += batch_labels.numpy().ravel().tolist()
    count = len(labels) // kwargs['batch_size'] * kwargs['batch_size'] if kwargs.get('drop_last', True) is not False \
        else len(labels)
    if kwargs.get('order') == OrderOption.SEQUENTIAL and got != labels[:count]:
        problems.append(f'labels {got} in sequential order, asked for {labels[:count]}')
    elif len(got) != count or collections.Counter(got) - collections.Counter(labels):
        problems.append(f'labels {sorted(got)}: not {count} of {sorted(labels)}')
    if len(shapes) > 1:
        problems.append(f'image sizes {sorted(shapes)} within one epoch')
    return problems


# ---- files that changed or lie ---------------------------------------------

def file_cases():
    cases = [Case('files', f'renamed over, os_cache={c}', 'renamed_over', {'os_cache': c}, 'run')
             for c in (True, False)]
    cases += [Case('files', f'teacher name {name!r}', 'teacher_name', {'name': name}, expect, 'teachers')
              for name, expect in (('lite0@224', 'run'), ('lite0\x1b[31m@224', 'refuse'), ('lite0\n@224', 'refuse'),
                                   ('\rlite0', 'refuse'), ('\x00lite0', 'refuse'), ('lite0\x7f', 'refuse'))]
    for command in ('info', 'verify'):
        for what, path in (('a directory', '{data}'), ('a device', '/dev/null'), ('a FIFO', '{data}/fifo'),
                           ('no such file', '{data}/missing.beton')):
            cases.append(Case('files', f'{command} on {what}', 'cli', {'argv': [command, path]}, 'refuse', what))
    return cases


def run_renamed_over(data, spec):
    work = tempfile.mkdtemp(dir=data)
    path, pristine = os.path.join(work, 'data.beton'), os.path.join(work, 'pristine.beton')
    for p in (path, pristine):
        shutil.copy(os.path.join(data, 'plain.beton'), p)
    args = dict(batch_size=2, num_workers=1, labels=True, os_cache=spec['os_cache'], seed=3)
    loader, reference = Loader(path, **args), Loader(pristine, **args)
    shutil.copy(os.path.join(data, 'mixing.beton'), path + '.new')
    os.replace(path + '.new', path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(2):
            for got, want in zip(loader, reference):
                if any(not torch.equal(a, b) for a, b in zip(got, want)):
                    return 'wrong', 'batches differ from the file it opened'
    if caught or len(loader.clock.damaged()):
        return 'wrong', f'{len(loader.clock.damaged())} samples damaged; {[str(w.message) for w in caught]}'
    return 'ran', ''


def run_teacher_name(data, spec):
    from ffcv_dr.format import TEACHERS_AT, TEACHERS_DTYPE, _teachers_crc
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'tests'))
    from fuzz import arguments_offset
    path = os.path.join(tempfile.mkdtemp(dir=data), 'named.beton')
    shutil.copy(os.path.join(data, 'plain.beton'), path)
    record = np.zeros((), TEACHERS_DTYPE)
    record['count'] = 1
    record['entries'][0]['name'] = spec['name'].encode()
    record['entries'][0]['weight'] = 1
    record['crc32'] = _teachers_crc(record)
    with open(path, 'r+b') as f:
        f.seek(arguments_offset(path, 'target') + TEACHERS_AT)
        f.write(record.tobytes())
    try:
        names = [t.name for t in BetonFile(path).teachers]
    except ValueError as e:
        return 'refused', str(e)
    return ('ran', '') if names == [spec['name']] else ('wrong', f'teachers read as {names}')


def metadata_counts(data, timeout):
    """The fuzz suite's mutations of the image field's metadata (mode, stored
    size, width, height, original size) of the mixing file: each opened and
    loaded in its own process (tests/fuzz.py), then verified."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'tests'))
    import fuzz
    from ffcv_dr.verify import verify
    good = os.path.join(data, 'mixing.beton')
    original = open(good, 'rb').read()
    mutations = [m for m in fuzz.structure_mutations(good, np.random.default_rng(0))  # that change a byte
                 if '.metadata.' in m[0] and 'image' in m[0] and original[m[1]:m[1] + len(m[2])] != m[2]]
    work = tempfile.mkdtemp(dir=data)
    jobs = [{'name': name, 'path': os.path.join(work, f'{k}.beton'), 'good': good, 'mutation': [at, raw.hex(), span]}
            for k, (name, at, raw, span) in enumerate(mutations)]
    results = fuzz.run_jobs(jobs, timeout=timeout)
    counts, failures = collections.Counter(), []
    for job in jobs:
        status = results[job['name']]['status']
        if status == 'ok':  # opened and loaded: verify must find what the loader found, or nothing changed
            at, raw, span = job['mutation']
            fuzz.write_structure(good, job['path'], at, bytes.fromhex(raw), span)
            status = 'ran, verify clean' if verify(job['path']).ok else 'ran, verify flags it'
        counts[status] += 1
        if status == 'ran, verify clean':
            print(f'  loads and verifies clean: {job["name"]}')
        elif status not in ('refused', 'ran, verify flags it'):
            failures.append((job['name'], results[job['name']]))
    return counts, failures


# ---- train ------------------------------------------------------------------

TRAIN_BASE = ['data.train={data}/plain.beton', 'data.batch_size=4', 'data.workers=1', 'model.arch=resnet18',
              'train.epochs=1', 'train.amp=false', 'train.channels_last=false', 'output.folder=out']
NONE_MEANS_DEFAULT = {'data.image_size', 'model.input_size', 'train.teacher_size', 'resolution.min_res',
                      'resolution.max_res', 'resolution.val_res'}
ZERO_REFUSED = {'data.batch_size', 'data.workers', 'train.epochs', 'train.lr', 'train.eval_every',
                'data.val_crop_ratio', 'train.step_gamma'} | NONE_MEANS_DEFAULT


def train_cases():
    from ffcv_dr.train_settings import DEFAULTS
    cases = []

    def add(name, overrides, expect, names='', config=None):
        cases.append(Case('train', name, 'train', {'set': overrides, 'config': config}, expect, names))

    for section, values in DEFAULTS.items():
        for key, default in (values.items() if isinstance(values, dict) else ()):
            setting = f'{section}.{key}'
            if setting in NONE_MEANS_DEFAULT or (isinstance(default, (int, float)) and not isinstance(default, bool)):
                for value in ('abc', '.nan', '.inf', '-1', '[1]', '{a: 1}', 'true'):
                    expect = 'either' if (setting, value) == ('data.workers', '-1') else 'refuse'
                    add(f'{setting}={value}', [f'{setting}={value}'], expect, setting)
                add(f'{setting}=0', [f'{setting}=0'], 'refuse' if setting in ZERO_REFUSED else 'either', setting)
            elif isinstance(default, bool):
                for value in ('maybe', '2', '[true]', 'null'):
                    add(f'{setting}={value}', [f'{setting}={value}'], 'refuse', setting)
            elif isinstance(default, str) and key not in ('teacher', 'folder'):
                for value in ('bogus', '5', 'null', '[a]'):
                    add(f'{setting}={value}', [f'{setting}={value}'], 'refuse', setting)
            elif isinstance(default, list):
                for value in ('5', '[abc]', '[-1]', '{a: 1}'):  # paths are text: [abc] is one (unused in dr)
                    expect = 'either' if (key, value) == ('teacher_checkpoints', '[abc]') else 'refuse'
                    add(f'{setting}={value}', [f'{setting}={value}'], expect, setting)
    for value in ('5', '[1]', 'abc'):
        add(f'data={value}', [f'data={value}'], 'refuse', 'data')
    for override, names in (('data.batch_size', 'data.batch_size'), ('=5', '=5'), ('nosection=5', 'nosection'),
                            ('data.nokey=5', 'data.nokey'), ('data.batch_size=[1', 'not valid YAML'),
                            ('data.val=!!python/object:os.system x', 'constructor')):
        add(f'--set {override}', [override], 'refuse', names)
    for name, text, names in (('a list at the top', '- a\n- b\n', 'mapping'), ('data: 5', 'data: 5\n', 'data'),
                              ('a tab indent', 'data:\n\ttrain: x\n', 'YAML'),
                              ('a python tag', 'data:\n  train: !!python/object/apply:os.system ["true"]\n',
                               'constructor'),
                              ('a scalar', 'hello\n', 'mapping'), ('binary bytes', '\x00\x01\xfe', 'config'),
                              ('an unknown section', 'nosection:\n  a: 1\n', 'nosection'),
                              ('a duplicate key', 'train:\n  epochs: 1\n  epochs: 2\n', 'epochs'),
                              ('an empty file', '', 'either')):
        add(f'config file: {name}', [], 'either' if names == 'either' else 'refuse', names, text)
    for name, overrides, expect, names in (
            ('a batch larger than the dataset', ['data.batch_size=100'], 'refuse', 'data.batch_size'),
            ('min_res above max_res', ['resolution.min_res=160', 'resolution.max_res=64', 'resolution.end_ramp=1'],
             'refuse', 'min_res'),
            ('start_ramp after end_ramp', ['resolution.min_res=32', 'resolution.max_res=64',
                                           'resolution.start_ramp=3', 'resolution.end_ramp=1'], 'refuse', 'ramp'),
            ('step_epochs beyond the run', ['train.schedule=step', 'train.step_epochs=[5]'], 'either', 'step_epochs'),
            ('a missing train file', ['data.train={data}/missing.beton'], 'refuse', 'missing.beton'),
            ('a validation set whose last batch holds one image', ['data.val={data}/images', 'data.batch_size=7'],
             'run', ''),
            ('a validation folder that does not exist', ['data.val={data}/nothing'], 'refuse', 'nothing'),
            ('one epoch, EMA, step schedule', ['train.ema_decay=0.9', 'train.schedule=step',
                                               'train.step_epochs=[1]'], 'run', '')):
        add(name, overrides, expect, names)
    return cases


def run_train(data, spec):
    argv = ['train']
    if spec['config'] is not None:
        with open('config.yaml', 'w') as f:
            f.write(spec['config'])
        argv += ['--config', 'config.yaml']
    for override in TRAIN_BASE + spec['set']:
        argv += ['--set', override.replace('{data}', data)]
    return run_cli(data, {'argv': argv, 'ran': lambda: os.path.exists('out/checkpoint.pt')})


# ---- CLI numbers, images, reruns --------------------------------------------

def cli_cases():
    """Every option of every command whose value is a number, given 0, -1,
    nan, inf and text; the inputs do not exist, so a value taken ends in a
    one-line 'no such file' (counted as ran)."""
    cases = []
    for command, sub in build_parser()._subparsers._group_actions[0].choices.items():
        positionals = [a for a in sub._actions if not a.option_strings]
        required = [a for a in sub._actions if a.option_strings and a.required]
        base = [command] + [f'missing_{a.dest}' for a in positionals]
        for a in required:
            base += [a.option_strings[0], '1' if a.type not in (None, str) else f'missing_{a.dest}']
        for action in sub._actions:
            if not action.option_strings or action.type in (None, str) or action.required:
                continue
            flag = action.option_strings[-1]
            for value in ('0', '-1', 'nan', 'inf', 'abc', '1e400'):
                expect = 'either' if value == '0' or (value == '-1' and 'workers' in flag) else 'refuse'
                cases.append(Case('cli', f'{command} {flag} {value}', 'cli',
                                  {'argv': base + [flag, value], 'taken': 'missing_'}, expect, f'argument {flag}'))
    return cases


def run_cli(data, spec):
    argv = [a.replace('{data}', data) for a in spec['argv']]
    try:
        code = cli_main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001
        return 'traceback', traceback.format_exc(limit=-3)
    sys.stderr.flush()
    lines = [line for line in open(os.environ['HOSTILE_LOG']).read().splitlines() if line.strip()]
    left = [p for p in os.listdir('.') if p not in ('config.yaml', 'images', 'out')]
    if code in (0, None):
        ok = spec.get('ran', lambda: True)()
        return ('ran', '') if ok else ('wrong', 'exit 0 without output')
    if left:
        return 'wrong', f'refused ({lines[-1:]}) but left {left}'
    if code == 1 and spec.get('taken') and lines and spec['taken'] in lines[-1]:
        return 'ran', lines[-1]  # the value was taken; the input, which does not exist, was not
    return 'refused', ' | '.join(lines[-4:]) if lines else f'exit {code} with no message'


def image_cases():
    cases = []
    for bad in ('header_only', 'truncated_with_eoi', 'not_an_image', 'empty'):
        cases.append(Case('images', f'reinforce with a {bad} JPEG', 'reinforce_bad', {'bad': bad}, 'refuse',
                          'x.jpg'))
        cases.append(Case('images', f'reinforce --skip-bad with a {bad} JPEG', 'reinforce_bad',
                          {'bad': bad, 'skip': True}, 'run'))
    for loop in ('..', '.', '{images}'):
        cases.append(Case('images', f'a folder link to {loop}', 'reinforce_bad', {'loop': loop}, 'refuse',
                          'symbolic link'))
    cases += [Case('images', f'{job} twice: the same bytes', 'rerun', {'job': job}, 'run')
              for job in ('relabel', 'reinforce', 'reinforce 1 vs 2 workers')]
    return cases


def _bad_jpeg(good, path, bad):
    data = open(good, 'rb').read()
    if bad == 'header_only':
        sof = max(data.find(b'\xff\xc0'), data.find(b'\xff\xc2'))
        sos = data.find(b'\xff\xda')
        data = data[:sof + 5] + (9000).to_bytes(2, 'big') * 2 + data[sof + 9:]
        data = data[:sos + 2 + (data[sos + 2] << 8 | data[sos + 3])] + b'\xff\xd9'
    elif bad == 'truncated_with_eoi':
        data = data[:len(data) * 2 // 3] + b'\xff\xd9'
    else:
        data = b'' if bad == 'empty' else b'not an image'
    with open(path, 'wb') as f:
        f.write(data)


def run_reinforce_bad(data, spec):
    images = os.path.abspath('images')
    shutil.copytree(os.path.join(data, 'images'), images)
    if 'bad' in spec:
        _bad_jpeg(os.path.join(images, 'chelsea', 'chelsea.jpg'), os.path.join(images, 'chelsea', 'x.jpg'),
                  spec['bad'])
    else:
        os.symlink(spec['loop'].format(images=images), os.path.join(images, 'chelsea', 'loop'))
    argv = ['reinforce', images, 'x.beton', '--samples', '1', '--size', '32', '--chunk', '16']
    return run_cli(data, {'argv': argv + (['--skip-bad'] if spec.get('skip') else []),
                          'ran': lambda: len(BetonFile('x.beton')) == N})


def run_rerun(data, spec):
    from ffcv_dr.reinforce import reinforce
    from ffcv_dr.relabel import relabel
    digests = []
    for k in range(2):
        out = f'out{k}.beton'
        if spec['job'] == 'relabel':
            relabel(os.path.join(data, 'plain.beton'), out, topk=5, chunk=4, num_workers=2 if k else 1)
        else:
            reinforce(os.path.join(data, 'images'), out, samples=2, topk=5, size=48, chunk=4,
                      num_workers=k + 1 if 'workers' in spec['job'] else 2)
        digests.append(hashlib.sha256(open(out, 'rb').read()).hexdigest())
    return ('ran', '') if digests[0] == digests[1] else ('wrong', f'{digests[0][:12]} != {digests[1][:12]}')


# ---- running ----------------------------------------------------------------

def _child(case, data, out, log):
    os.chdir(tempfile.mkdtemp(dir=data))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ['HOSTILE_LOG'] = log
    try:
        status, detail = globals()[f'run_{case.run}'](data, case.spec)
    except BaseException:  # noqa: BLE001
        status, detail = 'traceback', traceback.format_exc(limit=-3)
    with open(out, 'w') as f:
        json.dump({'status': status, 'detail': str(detail)[-600:]}, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def verdict(case, status, detail):
    if status == 'refused':
        if case.names and case.names.lower() not in detail.lower():
            return 'unclear'
        return 'refused' if case.expect in ('refuse', 'either') else 'refused-valid'
    if status == 'ran':
        return 'ran' if case.expect in ('run', 'either') else 'accepted'
    return status


def run_all(cases, data, jobs, timeout):
    """Forks one child per case from this (single-threaded) process, ``jobs`` at a time."""
    context = multiprocessing.get_context('fork')
    pending, running, results = list(enumerate(cases)), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            k, case = pending.pop(0)
            out, log = os.path.join(data, f'case{k}.json'), os.path.join(data, f'case{k}.log')
            process = context.Process(target=_child, args=(case, data, out, log))
            process.start()
            running[process.sentinel] = (process, k, case, out, log, time.monotonic())
        ready = multiprocessing.connection.wait(list(running), timeout=1)
        for sentinel in list(running):
            process, k, case, out, log, start = running[sentinel]
            if sentinel in ready:
                process.join()
                if process.exitcode < 0:
                    status, detail = 'signal', f'signal {-process.exitcode}: {open(log).read()[-400:]}'
                else:
                    status, detail = json.load(open(out)).values()
            elif time.monotonic() - start > timeout:
                process.kill()
                process.join()
                status, detail = 'hang', f'over {timeout} s'
            else:
                continue
            del running[sentinel]
            results[k] = (case, verdict(case, status, detail), detail)
    return [results[k] for k in sorted(results)]


def make_data(data):
    from ffcv_dr.demo import write_photos
    from ffcv_dr.reinforce import reinforce
    write_photos(os.path.join(data, 'images'))
    for recipe in ('rrc+ra+re', 'rrc+ra+re+mix'):
        out = os.path.join(data, 'mixing.beton' if 'mix' in recipe else 'plain.beton')
        reinforce(os.path.join(data, 'images'), out, samples=2, topk=5, size=64, recipe=recipe, batch_size=16, num_workers=1, chunk=16)
    os.mkfifo(os.path.join(data, 'fifo'))


GROUPS = {'loader': loader_cases, 'files': file_cases, 'train': train_cases, 'cli': cli_cases,
          'images': image_cases}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', default=','.join(GROUPS), help='groups to run: ' + ', '.join(GROUPS))
    parser.add_argument('--jobs', type=int, default=2)
    parser.add_argument('--timeout', type=float, default=180, help='seconds a case may take')
    args = parser.parse_args()
    groups = args.only.split(',')
    with tempfile.TemporaryDirectory() as data:
        make_data(data)
        cases = [c for g in groups for c in GROUPS[g]()]
        print(f'{len(cases)} cases, {args.jobs} at a time', flush=True)
        results = run_all(cases, data, args.jobs, args.timeout)
        meta = metadata_counts(data, args.timeout * 4) if 'files' in groups else None
    totals = collections.Counter()
    for group in groups:
        counts = collections.Counter(v for c, v, _ in results if c.group == group)
        totals.update(counts)
        print(f'{group}: {sum(counts.values())} cases: ' + ', '.join(f'{v} {n}' for v, n in counts.most_common()))
    for case, v, detail in results:
        if v in FAILURES:
            print(f'  {v}: [{case.group}] {case.name}: {detail}')
    if meta is not None:
        counts, failures = meta
        totals.update({'metadata ' + k: n for k, n in counts.items()})
        print(f'image metadata mutations: {sum(counts.values())}: ' + ', '.join(f'{n} {k}' for k, n in counts.items()))
        for name, result in failures:
            print(f'  failure: {name}: {result}')
    print(json.dumps(dict(totals)))
    return 1 if any(v in FAILURES for _, v, _ in results) or (meta and meta[1]) else 0


if __name__ == '__main__':
    sys.exit(main())
