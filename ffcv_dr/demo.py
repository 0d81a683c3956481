"""``ffcv-dr demo``: the whole chain on photos that ship with scikit-image,
no data of the user's and no download: reinforce them with the bundled
EfficientNet-Lite0, load an epoch, draw the grid."""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

# skimage.data photos stored inside the package (others are downloaded on demand).
PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'camera', 'clock', 'coins', 'hubble_deep_field')


def write_photos(root: str) -> str:
    """An ImageFolder with one class folder per photo, as JPEG."""
    import skimage.data
    for name in PHOTOS:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).save(
            os.path.join(root, name, f'{name}.jpg'), quality=95)
    return root


def run_demo(out_dir: str = 'out/demo', samples: int = 8, workers: int = None) -> dict:
    from ffcv.loader import OrderOption
    from .inspect_grid import draw_grid
    from .pipelines import Loader, epoch_rates
    from .reinforce import reinforce
    os.makedirs(out_dir, exist_ok=True)
    images = write_photos(os.path.join(out_dir, 'images'))
    beton = os.path.join(out_dir, 'demo.beton')
    with warnings.catch_warnings():  # the photos' folders are not ImageNet's classes: known here
        warnings.filterwarnings('ignore', '.*not ImageNet-1k synsets')
        result = reinforce(images, beton, teacher='bundled:efficientnet_lite0', samples=samples,
                           topk=10, recipe='rrc+ra+re', batch_size=32, num_workers=workers, chunk=4)
    loader = Loader(beton, batch_size=4, num_workers=workers or -1, order=OrderOption.RANDOM)
    rate = float(np.median(epoch_rates(loader, 5)))
    grid = os.path.join(out_dir, 'grid.png')
    shown = min(4, samples)
    draw_grid(beton, grid, indices=list(range(len(PHOTOS))), samples=shown,
              row_names=sorted(PHOTOS))  # ImageFolder order: the folders sorted
    print(f'reinforced {len(PHOTOS)} photos x {samples} with EfficientNet-Lite0 in '
          f'{result["seconds"]:.0f} s (the first run includes compiling the kernels); '
          f'loader: {rate:.0f} images/s')
    print(f'wrote {beton} and {grid} ({shown} of the {samples} views of each photo, rows named by photo)')
    return {'beton': beton, 'grid': grid, 'loader_images_per_s': rate}
