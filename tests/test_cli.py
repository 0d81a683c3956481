"""The command line as a new user meets it: it answers at once, its help
shows defaults and settings, and common mistakes get a hint."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from ffcv_dr.cli import main
from ffcv_dr.train_settings import DEFAULTS, show_settings

HEAVY = ('ffcv', 'torch', 'numba')
IMPORTS_AFTER = """
import sys
from ffcv_dr.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in {heavy} if m in sys.modules))
"""


@pytest.mark.parametrize('argv', [['--help'], ['train', '--help'], ['convert', '--help'],
                                  ['train', '--show-settings'], ['convert', 'images'],
                                  ['reinforce', 'images', 'out.beton', '--samples', 'many'], ['nonsense']],
                         ids=' '.join)
def test_help_and_refusals_import_neither_ffcv_torch_nor_numba(argv):
    """What makes every command wait 5-12 s is loaded only by commands that work."""
    done = subprocess.run([sys.executable, '-c', IMPORTS_AFTER.format(heavy=HEAVY), *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == '[]', done.stdout


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(['reinforce', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert '--samples SAMPLES reinforcements per image' in text and '(default: 8)' in text
    assert '(default: bundled:efficientnet_lite0)' in text and '(default: None)' not in text


def test_show_settings_is_every_default_as_yaml_with_meanings(capsys):
    assert main(['train', '--show-settings']) == 0
    text = capsys.readouterr().out
    assert text.strip() == show_settings()
    assert yaml.safe_load(text) == DEFAULTS
    assert all('  # ' in line for line in text.splitlines() if line.startswith('  '))


def test_the_configs_are_valid_settings():
    from ffcv_dr.train_settings import load_config
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
    names = sorted(os.listdir(root))
    assert 'cpu_sample.yaml' in names and len(names) >= 4
    for name in names:
        cfg = load_config(os.path.join(root, name))
        assert cfg['data']['train'] and cfg['train']['epochs'] >= 1


@pytest.mark.parametrize('command', ['convert', 'reinforce'])
def test_swapped_images_and_output_get_the_right_order(command, tmp_path, capsys):
    images = tmp_path / 'images'
    images.mkdir()
    argv = [command, str(tmp_path / 'out.beton'), str(images)] + (['--mldr', 'm'] if command == 'convert' else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f'out.beton: not a directory, and {images} is one: the order is ffcv-dr {command} IMAGES_DIR OUT.beton' in err
    assert os.listdir(tmp_path) == ['images']


def test_info_on_a_file_that_is_not_a_beton_says_so_first(tmp_path, capsys):
    jpeg = tmp_path / 'photo.jpg'
    from PIL import Image
    Image.new('RGB', (64, 64)).save(jpeg)
    assert main(['info', str(jpeg)]) == 1
    assert capsys.readouterr().err.startswith(f'ffcv-dr info: error: {jpeg}: not an FFCV .beton:')


def test_replay_names_the_box_fields_and_rounds(randaug_beton, tmp_path, capsys):
    assert main(['replay', randaug_beton, '--index', '3', '--sample', '1', '--out', str(tmp_path / 'r.png')]) == 0
    line = capsys.readouterr().out
    params = json.loads(line)['params']
    assert set(params['crop']) == {'top', 'left', 'height', 'width'}
    assert params['erase'] is None or set(params['erase']) == {'top', 'left', 'height', 'width'}
    for _, magnitude in params['rand_augment'] or []:
        assert len(repr(magnitude)) <= 10   # 0.09, not 0.09000000357627869


def test_a_teacher_of_other_classes_is_warned_of_and_labels_outside_it_refused(tmp_path):
    from ffcv_dr.convert import ConvertError
    from ffcv_dr.demo import write_photos
    from ffcv_dr.intake import list_images
    from ffcv_dr.reinforce import check_class_space
    images = list_images(write_photos(str(tmp_path / 'photos')))   # 8 folders, not ImageNet synsets
    with pytest.warns(UserWarning, match=r'its 8 class folders are not ImageNet-1k synsets, and the '
                                         r'teacher t predicts 1000 classes'):
        check_class_space(images, 1000, 'photos', 't')
    with pytest.raises(ConvertError, match=r'photos: 8 class folders, but the teacher t predicts 5 classes'):
        check_class_space(images, 5, 'photos', 't')
    check_class_space(images, 8, 'photos', 't')   # a teacher fine-tuned on these classes: silent


def test_quickstart_says_what_drop_last_left_out(small_images, tmp_path, capsys):
    from conftest import RANDAUG, first_reinforcements
    mldr = first_reinforcements(tmp_path / 'mldr', RANDAUG, 12)
    assert main(['quickstart', small_images, mldr, str(tmp_path / 'q.beton'), '--batch-size', '5',
                 '--workers', '2']) == 0
    out = capsys.readouterr().out
    assert 'loaded one epoch: 10 of 12 images' in out
    assert "drop_last=True left out 2: the epoch's last, partial batch of --batch-size 5" in out
