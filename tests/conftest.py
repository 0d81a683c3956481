import os
import tarfile

import pytest

import local_data

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', 'shared'))
# ../shared's real ImageNet sample and ml-dr's own reinforcements of it; where it
# is absent (or FFCV_DR_TESTS_WITHOUT_SHARED=1, to run as a clone alone does),
# the same shapes of data made here (tests/local_data.py).
HAVE_SHARED = (os.path.isdir(os.path.join(SHARED, 'data', 'imagenet-sample', 'train'))
               and not os.environ.get('FFCV_DR_TESTS_WITHOUT_SHARED'))
if HAVE_SHARED:
    IMAGES = os.path.join(SHARED, 'data', 'imagenet-sample', 'train')
    RANDAUG = os.path.join(SHARED, 'fixtures', 'mldr-randaug', 'reinforced_data')
    MIXING = os.path.join(SHARED, 'fixtures', 'mldr-mixing', 'reinforced_data')
else:
    IMAGES, RANDAUG, MIXING = local_data.IMAGES, local_data.RANDAUG, local_data.MIXING

# Only comparisons with ml-dr's own outputs (its golden replays and pickles) and
# facts of the real ImageNet photos need ../shared.
needs_shared = pytest.mark.skipif(not HAVE_SHARED, reason="compares with ml-dr's own outputs or real "
                                  f'ImageNet photos, which only {SHARED} (../shared) holds')


@pytest.fixture(scope='session', autouse=True)
def test_data():
    """Data made here where ../shared is absent (once per machine)."""
    if not HAVE_SHARED:
        local_data.build()


@pytest.fixture(scope='session')
def randaug_beton(tmp_path_factory):
    """imagenet-sample + the ImageNet+ recipe fixture, converted once per session."""
    from ffcv_dr.convert import convert
    out = str(tmp_path_factory.mktemp('beton') / 'randaug.beton')
    convert(IMAGES, out, RANDAUG, num_workers=2)
    return out


@pytest.fixture(scope='session')
def randaug_targz(tmp_path_factory):
    """The randaug fixture packed the way ml-dr's archives are downloaded."""
    path = tmp_path_factory.mktemp('tar') / 'reinforced_data.tar.gz'
    with tarfile.open(path, 'w:gz') as tar:
        tar.add(RANDAUG, arcname='reinforced_data')
    return str(path)


def first_images(root, n: int) -> str:
    """An ImageFolder at ``root`` of symlinks to the first ``n`` imagenet-sample images."""
    from ffcv_dr.intake import list_images
    for path in list_images(IMAGES).paths[:n]:
        cls = os.path.basename(os.path.dirname(path))
        os.makedirs(root / cls, exist_ok=True)
        os.symlink(path, root / cls / os.path.basename(path))
    return str(root)


@pytest.fixture(scope='session')
def mixing_beton(tmp_path_factory):
    """Images 0..63 (all the mixing fixture covers) + the MixUp/CutMix recipe."""
    from ffcv_dr.convert import convert
    root = tmp_path_factory.mktemp('mixing')
    out = str(root / 'mixing.beton')
    convert(first_images(root / 'images', 64), out, MIXING, num_workers=2)
    return out


@pytest.fixture(scope='session')
def small_images(tmp_path_factory):
    """An ImageFolder of the first 12 imagenet-sample images (symlinks)."""
    return first_images(tmp_path_factory.mktemp('small') / 'images', 12)


def first_reinforcements(root, src: str, n: int) -> str:
    """A reinforced_data folder of symlinks to the config and the first ``n`` files of ``src``."""
    os.makedirs(root)
    for name in ['config.pth.tar'] + [f'{i}.pth.tar' for i in range(n)]:
        os.symlink(os.path.join(src, name), os.path.join(root, name))
    return str(root)


@pytest.fixture(scope='session', params=['raw', 'imagenet'])
def stored_beton(request, tmp_path_factory):
    """Images 0..63 (those ml-dr's goldens cover) + the ImageNet+ recipe, stored
    as raw pixels, or as ffcv-imagenet stores ImageNet (proportion, 500 px,
    half JPEG q90): (write mode, path)."""
    from ffcv_dr.convert import convert
    from ffcv_dr.storage import Storage
    storage = {'raw': Storage('raw'), 'imagenet': Storage('proportion', 500, 0.5, 90)}[request.param]
    root = tmp_path_factory.mktemp(request.param)
    out = str(root / f'{request.param}.beton')
    convert(first_images(root / 'images', 64), out, first_reinforcements(root / 'mldr', RANDAUG, 64),
            num_workers=2, storage=storage)
    return request.param, out
