"""The training script: its modes run, its metrics are right, a resumed run
continues exactly where the interrupted one stopped."""
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ffcv_dr.train import (calibration, expected_calibration_error, load_config, lr_factor,
                           resolution, train, val_beton)

TINY = ['model.arch=test_efficientnet', 'data.image_size=64', 'data.batch_size=16',
        'data.workers=2', 'train.epochs=2', 'train.warmup_epochs=0', 'train.lr=0.2',
        'data.val_crop_ratio=1.0', 'device=cpu']


def config(beton, val, folder, *more):
    return load_config(None, [f'data.train={beton}', f'data.val={val}', f'output.folder={folder}',
                              *TINY, *more])


def read_log(folder):
    with open(os.path.join(folder, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_ece_is_the_mean_gap_between_confidence_and_accuracy():
    rng = np.random.default_rng(0)
    probs = torch.tensor(rng.dirichlet(np.ones(10) * 0.3, 2000))
    labels = torch.tensor(rng.integers(0, 10, 2000))
    conf, pred = probs.max(1)
    ece = 0.0
    for lo in np.linspace(0, 1, 16)[:-1]:
        inside = (conf > lo) & (conf <= lo + 1 / 15) if lo else (conf <= 1 / 15)
        if inside.any():
            ece += inside.double().mean() * abs((pred[inside] == labels[inside]).double().mean()
                                                - conf[inside].mean())
    assert expected_calibration_error(calibration(probs, labels)) == pytest.approx(float(ece), abs=2e-3)
    perfect = torch.eye(10, dtype=torch.float64)[labels]
    assert expected_calibration_error(calibration(perfect, labels)) == 0.0


def test_schedule_warms_up_then_decays():
    t = load_config(None, ['data.train=x', 'train.epochs=10', 'train.warmup_epochs=2'])['train']
    f = [lr_factor(s, 100, t) for s in range(1000)]
    assert f[0] == pytest.approx(1 / 200) and f[199] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[200:], f[201:])) and f[-1] < 1e-3
    t.update(schedule='step', step_epochs=[5, 8], warmup_epochs=0)
    assert [lr_factor(s * 100, 100, t) for s in (4, 5, 8)] == pytest.approx([1, 0.1, 0.01])


def test_resolution_ramps_as_ffcv_imagenet():
    """ffcv-imagenet's rn50 88-epoch setting: 160 px to epoch 65, 192 px from 76."""
    sides = [resolution(e, 160, 192, 65, 76) for e in range(88)]
    assert sides[:66] == [160] * 66 and sides[76:] == [192] * 12
    assert sides == sorted(sides) and all(s % 32 == 0 for s in sides)
    assert sides[70] == 160 + 32 * round(32 * 5 / 11 / 32)
    with pytest.raises(ValueError, match='min_res'):
        resolution(0, 192, 160, 0, 1)


def test_training_follows_the_resolution_ramp(mixing_beton, small_images, tmp_path):
    """Each epoch's batches come at the ramp's side, and the network takes them
    as they come; here read as a file bigger than memory is (mixing partners too),
    and evaluated in batches that end in one image."""
    train(config(mixing_beton, small_images, str(tmp_path), 'train.epochs=3', 'resolution.min_res=32',
                 'resolution.max_res=96', 'resolution.start_ramp=0', 'resolution.end_ramp=2',
                 'resolution.val_res=64', 'data.os_cache=false', 'data.order=quasi_random',
                 'data.batch_size=11'))  # the 12 validation images end in a batch of one
    assert [r['resolution'] for r in read_log(str(tmp_path))] == [32, 64, 96]


BAD_SETTINGS = [
    (['data.batch_size=abc'], "data.batch_size='abc': must be an integer of at least 1"),
    (['data=5'], 'data: must be a mapping of settings'),
    (['resolution.min_res=0', 'resolution.max_res=64'], 'resolution.min_res=0: must be an integer of at least 32'),
    (['resolution.max_res=64'], 'resolution.min_res and resolution.max_res: give both'),
    (['train.epochs=-1'], 'train.epochs=-1: must be an integer of at least 1'),
    (['train.lr=.nan'], 'train.lr=nan: must be a number above 0'),
    (['train.label_smoothing=5'], 'train.label_smoothing=5: must be a number at least 0 and below 1'),
    (['train.ema_decay=2'], 'train.ema_decay=2: must be a number at least 0 and below 1'),
    (['train.eval_every=0'], 'train.eval_every=0: must be an integer of at least 1'),
    (['train.schedule=linear'], "train.schedule='linear': must be one of cosine, step"),
    (['train.optimizer=lamb'], "train.optimizer='lamb': must be one of sgd, adamw"),
    (['data.os_cache=maybe'], "data.os_cache='maybe': must be true or false"),
    (['data.val=[1'], 'not valid YAML (line 1, column 3)'),
    (['data.val=!!python/object:os.system x'], 'could not determine a constructor'),
    (['=5'], "--set '=5': expected section.key=value"),
    (['model.arch=resnet5O'], "model.arch='resnet5O': not a timm architecture"),
    (['train.mode=kd', 'train.teacher=resnet18,bundled:lite'], "'bundled:lite' is not a timm architecture"),
]


@pytest.mark.parametrize('overrides, message', BAD_SETTINGS, ids=[o[0] for o, _ in BAD_SETTINGS])
def test_bad_settings_are_one_line_naming_the_setting(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, ['data.train=x', *overrides])


@pytest.mark.parametrize('text, message', [
    ('- a\n- b\n', 'must be a mapping of sections'),
    ('data:\n\ttrain: x\n', "not valid YAML (line 2, column 1): found character '\\t'"),
    ('data:\n  train: !!python/object/apply:os.system ["true"]\n', 'could not determine a constructor'),
    ('train:\n  epochs: 1\n  lr: 0.1\n  epochs: 2\n', "not valid YAML (line 4, column 3): found duplicate key 'epochs'"),
])
def test_a_bad_yaml_file_is_one_line(tmp_path, text, message):
    path = tmp_path / 'bad.yaml'
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f'{path}: ') + '.*' + re.escape(message)):
        load_config(str(path))


def test_the_validation_file_follows_data_val(small_images, tmp_path):
    """A second run into the same folder with another data.val writes its own
    validation file instead of reusing the first run's."""
    from ffcv.reader import Reader
    folder = str(tmp_path / 'out')
    os.makedirs(folder)
    first = val_beton(small_images, folder, 2, 0)
    other = tmp_path / 'other'
    for path in sorted(glob.glob(os.path.join(small_images, '*', '*')))[:5]:
        os.makedirs(other / os.path.basename(os.path.dirname(path)), exist_ok=True)
        os.symlink(path, other / os.path.basename(os.path.dirname(path)) / os.path.basename(path))
    second = val_beton(str(other), folder, 2, 0)
    assert second != first and not os.path.exists(first)
    assert Reader(second).num_samples == 5
    assert val_beton(small_images, folder, 2, 0) == first and Reader(first).num_samples == 12


def test_a_batch_larger_than_the_file_is_refused_naming_the_setting(mixing_beton, tmp_path):
    """Before: 0 steps each epoch, a checkpoint written, exit 0."""
    from ffcv_dr.beton import BetonFile
    n = len(BetonFile(mixing_beton))
    cfg = load_config(None, [f'data.train={mixing_beton}', f'data.batch_size={n + 1}', 'data.workers=1',
                             'model.arch=resnet18', f'output.folder={tmp_path / "out"}'])
    with pytest.raises(ValueError, match=rf'data.batch_size={n + 1} with drop_last=True: the {n} samples '
                                         rf'\({mixing_beton}, per process\) make no full batch'):
        train(cfg)
    assert not os.path.exists(tmp_path / 'out')   # a failed run leaves nothing behind


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match='unknown setting train.epoch'):
        load_config(None, ['data.train=x', 'train.epoch=3'])
    with pytest.raises(ValueError, match="train.mode='distill': must be one of erm, dr, kd"):
        load_config(None, ['data.train=x', 'train.mode=distill'])
    with pytest.raises(ValueError, match="data.order='sequential': must be one of random, quasi_random"):
        load_config(None, ['data.train=x', 'data.order=sequential'])


def test_dr_training_logs_evaluates_and_resumes_exactly(mixing_beton, small_images, tmp_path):
    whole = str(tmp_path / 'whole')
    last = train(config(mixing_beton, small_images, whole))
    log = read_log(whole)
    assert [r['epoch'] for r in log] == [0, 1] and last == log[-1]
    for r in log:
        assert 0 <= r['top1'] <= r['top5'] <= 1 and 0 <= r['ece'] <= 1 and r['train_loss'] > 0
        assert 0 < r['confidence'] <= 1
    assert os.path.exists(os.path.join(whole, 'reliability.png'))
    assert len(glob.glob(os.path.join(whole, 'val-*.beton'))) == 1

    parts = str(tmp_path / 'parts')  # the same run, killed after its first epoch
    args = [sys.executable, '-m', 'ffcv_dr.cli', 'train']
    for item in [f'data.train={mixing_beton}', f'data.val={small_images}', f'output.folder={parts}', *TINY]:
        args += ['--set', item]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.exists(os.path.join(parts, 'checkpoint.pt')):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert [r['epoch'] for r in read_log(parts)] == [0]
    done = subprocess.run(args + ['--resume'], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'resuming after epoch 0' in done.stdout
    assert [r['epoch'] for r in read_log(parts)] == [0, 1]
    a = torch.load(os.path.join(whole, 'checkpoint.pt'), weights_only=True)['model']
    b = torch.load(os.path.join(parts, 'checkpoint.pt'), weights_only=True)['model']
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_a_run_killed_inside_an_epoch_resumes_to_the_same_weights(mixing_beton, tmp_path):
    """``train.checkpoint_every``: SIGKILL after a checkpoint inside an epoch,
    ``--resume`` continues from that step, and the final weights (and EMA)
    equal an uninterrupted run's bit for bit on the CPU."""
    more = ['data.batch_size=4', 'train.checkpoint_every=5', 'train.ema_decay=0.9', 'data.p=0.8',
            'data.order=quasi_random']
    whole = str(tmp_path / 'whole')
    train(load_config(None, [f'data.train={mixing_beton}', f'output.folder={whole}', *TINY, *more]))
    parts = str(tmp_path / 'parts')
    args = [sys.executable, '-m', 'ffcv_dr.cli', 'train']
    for item in [f'data.train={mixing_beton}', f'output.folder={parts}', *TINY, *more]:
        args += ['--set', item]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    checkpoint, deadline, state = os.path.join(parts, 'checkpoint.pt'), time.time() + 300, None
    while time.time() < deadline and not (state and state['epoch'] == 1 and state['in_epoch']):
        time.sleep(0.01)
        if os.path.exists(checkpoint):
            state = torch.load(checkpoint, weights_only=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert state and state['in_epoch'], 'no checkpoint inside epoch 1 before the deadline'
    done = subprocess.run(args + ['--resume'], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    step = re.search(r'resuming epoch 1 at step (\d+) from', done.stdout)
    assert step and int(step[1]) % 5 == 0, done.stdout[-2000:]
    assert f'epoch 1 (resumed at step {step[1]})' in done.stderr
    assert read_log(parts)[-1]['resumed_at_step'] == int(step[1])
    a = torch.load(os.path.join(whole, 'checkpoint.pt'), weights_only=True)
    b = torch.load(checkpoint, weights_only=True)
    for part in ('model', 'ema'):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_erm_learns_a_learnable_toy(tmp_path):
    """scikit-image's 8 photos, 8 copies each as 8 classes: six epochs of ERM
    from scratch lower the loss and raise top-1 well above chance (1/8)."""
    import shutil
    from ffcv_dr.demo import write_photos
    from ffcv_dr.reinforce import reinforce
    images = write_photos(str(tmp_path / 'images'))
    for cls in os.listdir(images):
        for k in range(7):
            shutil.copy(os.path.join(images, cls, f'{cls}.jpg'), os.path.join(images, cls, f'{cls}_{k}.jpg'))
    beton = str(tmp_path / 'toy.beton')
    reinforce(images, beton, samples=0, topk=1, recipe='rrc', size=64, num_workers=2, scale=(0.35, 1.0))
    train(config(beton, images, str(tmp_path / 'run'), 'train.mode=erm', 'train.epochs=6',
                 'train.optimizer=adamw', 'train.lr=0.003', 'train.label_smoothing=0'))
    log = read_log(str(tmp_path / 'run'))
    assert log[-1]['train_loss'] < 0.8 * log[0]['train_loss'], [r['train_loss'] for r in log]
    assert log[-1]['top1'] >= 0.375 > log[0]['top1'], [r['top1'] for r in log]


@pytest.mark.parametrize('mode, extra', [
    ('erm', ['train.optimizer=adamw', 'train.lr=0.002', 'train.ema_decay=0.9']),
    ('kd', ['train.teacher=test_efficientnet', 'train.teacher_pretrained=false',
            'train.schedule=step', 'train.step_epochs=[1]']),
])
def test_erm_and_kd_modes_run_and_log(mixing_beton, small_images, tmp_path, mode, extra):
    last = train(config(mixing_beton, small_images, str(tmp_path), f'train.mode={mode}',
                        'train.epochs=1', *extra))
    assert last['mode'] == mode and np.isfinite(last['train_loss']) and 0 <= last['top1'] <= 1
    if mode == 'erm':
        assert 0 <= last['ema_top1'] <= 1


def test_a_teacher_fine_tuned_here_labels_with_its_checkpoint(small_images, tmp_path):
    """The CIFAR-10 experiment's chain: a file without reinforcements, the
    bundled EfficientNet-Lite0 fine-tuned on it, then loaded as a teacher from
    its checkpoint: it says what the trained model said at evaluation."""
    from ffcv_dr import Loader
    from ffcv_dr.beton import BetonFile
    from ffcv_dr.reinforce import reinforce
    from ffcv_dr.teachers import load_teacher
    from ffcv_dr.train import val_loader
    from ffcv_dr.verify import verify
    plain = str(tmp_path / 'plain.beton')
    reinforce(small_images, plain, samples=0, recipe='rrc', size=48, scale=(0.5, 1), num_workers=2)
    f = BetonFile(plain)
    assert f.recipe.num_samples == 0 and f.recipe.scale == (0.5, 1.0) and len(f) == 12
    assert verify(plain, 2).ok
    with pytest.raises(ValueError, match='holds no reinforcements, so only fresh augmentations'):
        Loader(plain, 4, 2, p=0.5)
    folder = str(tmp_path / 'teacher')
    last = train(load_config(None, [
        f'data.train={plain}', f'data.val={small_images}', f'output.folder={folder}',
        'model.arch=bundled:efficientnet_lite0', 'model.pretrained=true', 'model.input_size=64',
        'data.image_size=48', 'data.batch_size=4', 'data.workers=2', 'data.val_crop_ratio=1.0',
        'train.mode=erm', 'train.epochs=1', 'train.warmup_epochs=0', 'train.lr=0.05',
        'train.amp=false', 'device=cpu']))
    teacher = load_teacher('bundled:efficientnet_lite0', [os.path.join(folder, 'checkpoint.pt')],
                           input_size=64)
    images, labels = next(iter(val_loader(val_beton(small_images, folder, 2, 0), 12, 2, 48, 1.0, False)))
    probs = teacher(images)
    assert probs.shape == (12, 1000)  # ImageNet synset folders: the bundled head is kept
    assert float((probs.argmax(1) == labels.long()).double().mean()) == pytest.approx(last['top1'])
    ece = expected_calibration_error(calibration(probs.double(), labels.long()))
    assert ece == pytest.approx(last['ece'], abs=1e-5)


def test_the_loader_renders_at_the_side_the_network_sees_and_the_log_says_which(mixing_beton, tmp_path,
                                                                               capsys):
    """model.input_size alone: rendered at that side (no resize on the device);
    with data.image_size too, resized to it, and the log records what the
    network saw. The bar ends on the epoch's mean loss, as the log."""
    from ffcv_dr.train import Trainer
    settings = [f'data.train={mixing_beton}', 'model.arch=test_efficientnet', 'data.batch_size=16',
                'data.workers=2', 'device=cpu', 'model.input_size=48']
    assert Trainer(load_config(None, [*settings, f'output.folder={tmp_path / "a"}'])).size == 48
    folder = str(tmp_path / 'b')
    train(load_config(None, [*settings, 'data.image_size=64', 'train.epochs=1', f'output.folder={folder}']))
    assert read_log(folder)[0]['resolution'] == 48
    bar = re.findall(r'loss=([0-9.]+)', capsys.readouterr().err)
    assert bar and bar[-1] == f"{read_log(folder)[0]['train_loss']:.3f}"


def test_ctrl_c_names_the_checkpoint_and_the_command_that_resumes(mixing_beton, tmp_path):
    folder = str(tmp_path / 'out')
    args = []
    for item in [f'data.train={mixing_beton}', f'output.folder={folder}', *TINY, 'train.epochs=30']:
        args += ['--set', item]
    proc = subprocess.Popen([sys.executable, '-m', 'ffcv_dr.cli', 'train', *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint, deadline = os.path.join(folder, 'checkpoint.pt'), time.time() + 300
    while time.time() < deadline and not os.path.exists(checkpoint):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert 'Traceback' not in err
    assert last.startswith(f'ffcv-dr train: interrupted; the last checkpoint is {checkpoint}; continue with: '
                           'ffcv-dr train --set ')
    again = shlex.split(last.split('continue with: ')[1])
    assert again[2:] == [*args, '--resume']
    done = subprocess.run([sys.executable, '-m', 'ffcv_dr.cli', *again[1:-3], '--set', 'train.epochs=2',
                           '--resume'], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and 'resuming after epoch' in done.stdout, done.stderr[-2000:]


@pytest.fixture(scope='module')
def one_epoch(mixing_beton, tmp_path_factory):
    """A finished one-epoch run's folder (its checkpoint and log), and its settings."""
    folder = str(tmp_path_factory.mktemp('one_epoch') / 'out')
    settings = [f'data.train={mixing_beton}', f'output.folder={folder}', *TINY, 'train.epochs=1']
    train(load_config(None, settings))
    return folder, settings


def _resume_refuses(folder, settings, tmp_path, damage, message, *more):
    import shutil as sh
    copy = str(tmp_path / 'copy')
    sh.copytree(folder, copy)
    damage(os.path.join(copy, 'checkpoint.pt'))
    cfg = load_config(None, [*settings, f'output.folder={copy}', 'train.epochs=2', *more])
    with pytest.raises(ValueError, match=message):
        train(cfg, resume=True)
    assert len(read_log(copy)) == 1   # nothing trained


def _flip_middle_byte(path):
    data = bytearray(open(path, 'rb').read())
    data[len(data) // 2] ^= 0xFF
    open(path, 'wb').write(bytes(data))


def _change_a_weight_keeping_the_checksum(path):
    state = torch.load(path, weights_only=True)
    next(v for v in state['model'].values() if v.is_floating_point()).add_(1)
    torch.save(state, path)


DAMAGE = [
    (_flip_middle_byte, r'checkpoint\.pt: (damaged: its content does not match|not a readable checkpoint)'),
    (_change_a_weight_keeping_the_checksum, r'checkpoint\.pt: damaged: its content does not match the checksum'),
    (lambda p: os.truncate(p, os.path.getsize(p) // 3), r'checkpoint\.pt: not a readable checkpoint'),
    (lambda p: os.truncate(p, 0), r'checkpoint\.pt: empty, not a checkpoint'),
    (lambda p: open(p, 'wb').write(os.urandom(4096)), r'checkpoint\.pt: not a readable checkpoint'),
    (lambda p: (os.remove(p), os.mkfifo(p)), r'checkpoint\.pt: a FIFO, not a checkpoint file'),
    (lambda p: torch.save({'model': {}}, p), r'checkpoint\.pt: not a checkpoint of ffcv-dr train'),
]


@pytest.mark.parametrize('damage, message', DAMAGE, ids=['flipped byte', 'changed weight', 'truncated',
                                                         'empty', 'random bytes', 'fifo', 'foreign'])
def test_a_damaged_checkpoint_is_refused_in_one_line(one_epoch, tmp_path, damage, message):
    folder, settings = one_epoch
    _resume_refuses(folder, settings, tmp_path, damage, message)


def test_a_checkpoint_of_other_settings_is_refused_naming_them(one_epoch, tmp_path):
    folder, settings = one_epoch
    _resume_refuses(folder, settings, tmp_path, lambda p: None,
                    r"other settings, which it cannot resume: model.arch='test_efficientnet' there, "
                    r"'resnet10t' here; train.ema=False there, True here",
                    'model.arch=resnet10t', 'train.ema_decay=0.9')


def test_resume_without_a_checkpoint_says_it_starts_afresh(mixing_beton, tmp_path, capsys):
    folder = str(tmp_path / 'out')
    train(load_config(None, [f'data.train={mixing_beton}', f'output.folder={folder}', *TINY,
                             'train.epochs=1']), resume=True)
    assert f'--resume: no checkpoint at {folder}/checkpoint.pt; starting afresh' in capsys.readouterr().out
    assert [r['epoch'] for r in read_log(folder)] == [0]


def test_a_kill_as_the_checkpoint_appears_loses_no_log_line(mixing_beton, tmp_path):
    """The epoch's line is written before its checkpoint; a resumed run drops
    lines of epochs it trains again, so each finished epoch has one line."""
    folder = str(tmp_path / 'out')
    args = [sys.executable, '-m', 'ffcv_dr.cli', 'train']
    for item in [f'data.train={mixing_beton}', f'output.folder={folder}', *TINY, 'train.epochs=3']:
        args += ['--set', item]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint, deadline = os.path.join(folder, 'checkpoint.pt'), time.time() + 300
    while time.time() < deadline and not os.path.exists(checkpoint):
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert os.path.exists(checkpoint)
    done = subprocess.run(args + ['--resume'], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r['epoch'] for r in read_log(folder)] == [0, 1, 2]


def test_a_second_run_into_one_folder_is_refused_naming_the_first(mixing_beton, tmp_path):
    """Before: two runs raced on checkpoint.pt.tmp and one died of a FileNotFoundError."""
    from ffcv_dr.jobs import JobError, OutputLock
    folder = str(tmp_path / 'out')
    with OutputLock(folder):   # a run training into it
        with pytest.raises(JobError, match=rf'out: another job is writing it \(pid {os.getpid()} on '):
            train(load_config(None, [f'data.train={mixing_beton}', f'output.folder={folder}', *TINY]))
        assert os.listdir(tmp_path) == ['.ffcv-dr-lock-out']   # the refused run left nothing
    assert os.listdir(tmp_path) == []
