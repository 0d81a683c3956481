"""What the checks made where a file is opened cost, per million samples.

Writes a synthetic ffcv-dr file of N samples in FFCV's layout (header, field
descriptors, metadata table, data blocks, allocation table; 1x1 raw images
and no reinforcements, so it is small), then times opening it with FFCV's
Reader alone, with :class:`ffcv_dr.beton.BetonFile` (the Reader plus
:func:`ffcv_dr.rules.header_problem` and :func:`ffcv_dr.rules.file_problems`),
and the rules alone.

    .venv/bin/python benchmarks/open_check.py [--samples 1281167]
"""
import argparse
import os
import tempfile
import time

import numpy as np
from ffcv.fields import IntField
from ffcv.reader import Reader
from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType, get_metadata_type

from ffcv_dr.beton import BetonFile
from ffcv_dr.fields import CUSTOM_FIELDS, ReinforcedImageField, SoftTargetField
from ffcv_dr.format import STORED_RAW, Recipe, block_crc
from ffcv_dr.rules import file_problems, header_problem


def write_synthetic(path: str, n: int):
    recipe = Recipe(num_samples=0, topk=10, num_classes=1000, ra_ops=2, erase=True)
    fields = {'image': ReinforcedImageField(recipe), 'target': SoftTargetField(recipe), 'label': IntField()}
    header = np.zeros(1, HeaderType)
    header['version'], header['num_fields'], header['num_samples'] = CURRENT_VERSION, 3, n
    header['page_size'] = 1 << 22
    descriptors = np.zeros(3, FieldDescType)
    for k, (name, field) in enumerate(fields.items()):
        descriptors[k]['type_id'] = 1 if name == 'label' else 255
        descriptors[k]['name'][:len(name)] = np.frombuffer(name.encode(), np.uint8)
        descriptors[k]['arguments'][:] = field.to_binary()[0]
    meta = np.zeros(n, get_metadata_type(list(fields.values())))
    data_start = HeaderType.itemsize + descriptors.nbytes + meta.nbytes
    image_ptr = data_start + 4 * np.arange(n, dtype=np.uint64)  # 3 bytes of pixels, 1 of top-k
    labels = np.arange(n) % 1000
    meta['f0']['data_ptr'], meta['f1']['data_ptr'] = image_ptr, image_ptr + 3
    for column in ('orig_width', 'orig_height', 'width', 'height'):
        meta['f0'][column] = 1
    meta['f0']['mode'] = STORED_RAW
    meta['f1']['label'], meta['f2'] = labels, labels
    block = np.zeros(3, np.uint8)
    meta['f0']['crc32'] = block_crc(meta['f0'][0], block)
    table = np.zeros(2 * n, ALLOC_TABLE_TYPE)
    table['sample_id'] = np.repeat(np.arange(n), 2)
    table['ptr'][0::2], table['ptr'][1::2] = image_ptr, image_ptr + 3
    table['size'][0::2], table['size'][1::2] = 3, 1
    header['alloc_table_ptr'] = data_start + 4 * n
    with open(path, 'wb') as f:
        for part in (header, descriptors, meta, np.zeros(4 * n, np.uint8), table):
            f.write(part.tobytes())


def best(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--samples', type=int, default=1_281_167, help='ImageNet-1k train by default')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'synthetic.beton')
        write_synthetic(path, args.samples)
        f = BetonFile(path)  # also proves the synthetic file sound
        reader = best(lambda: Reader(path, CUSTOM_FIELDS))
        opened = best(lambda: BetonFile(path))
        rules = best(lambda: (header_problem(path), file_problems(f)))
    per_million = 1e6 / args.samples
    print(f'{args.samples} samples ({os.cpu_count()} cores): FFCV Reader {reader:.2f} s, BetonFile '
          f'{opened:.2f} s, of which the rules {rules:.2f} s = {rules * per_million:.2f} s per million '
          'samples')


if __name__ == '__main__':
    main()
