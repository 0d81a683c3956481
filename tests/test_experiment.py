"""The CIFAR-10 experiment's own step: the class-balanced subset it unpacks
from the real archive."""
import os
import sys

import pytest
from PIL import Image

from conftest import HAVE_SHARED, SHARED

ARCHIVE = os.path.join(SHARED, 'data', 'cifar10-jpeg.tar.gz')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'experiments'))


@pytest.mark.skipif(not (HAVE_SHARED and os.path.isfile(ARCHIVE)),
                    reason=f'unpacks the real CIFAR-10 archive, {ARCHIVE} (../shared)')
def test_unpack_keeps_the_first_images_of_each_class_and_the_whole_test_set(tmp_path):
    from cifar10 import unpack
    train, test = unpack(ARCHIVE, str(tmp_path), 3)
    classes = sorted(os.listdir(train))
    assert len(classes) == 10 and sorted(os.listdir(test)) == classes
    for c in classes:
        assert sorted(os.listdir(os.path.join(train, c))) == ['0000.jpg', '0001.jpg', '0002.jpg']
        assert len(os.listdir(os.path.join(test, c))) == 1000
    with Image.open(os.path.join(train, classes[0], '0000.jpg')) as im:
        assert im.size == (32, 32)
