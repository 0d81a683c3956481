"""A picture of what a ``.beton`` holds: replayed reinforcements, each titled
with the teacher's top-3 classes (ImageNet names when the file has 1000)."""
from __future__ import annotations

import numpy as np

from .beton import BetonFile


def class_names(num_classes: int):
    """ImageNet-1k names for a 1000-class teacher, else None (ids are shown)."""
    if num_classes != 1000:
        return None
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    return [info.index_to_description(i).split(',')[0] for i in range(1000)]


def draw_grid(beton: str, out: str, indices=None, samples: int = 4, rows: int = 6, seed: int = 0,
              row_names=None):
    """Rows of images (``indices``, or random ones), ``samples`` reinforcements
    each, randomly chosen; a row is named ``row_names[row]`` or by its index."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    f = BetonFile(beton)
    rng = np.random.default_rng(seed)
    if indices is None:
        indices = sorted(rng.choice(len(f), size=min(rows, len(f)), replace=False).tolist())
    for i in indices:
        if not 0 <= i < len(f):
            raise ValueError(f'{beton}: index {i} is outside 0..{len(f) - 1}')
    samples = min(samples, f.recipe.num_samples)
    names = class_names(f.recipe.num_classes)
    fig, axes = plt.subplots(len(indices), samples, figsize=(2.6 * samples, 3.1 * len(indices)),
                             squeeze=False)
    for row, i in enumerate(indices):
        for col, j in enumerate(sorted(rng.choice(f.recipe.num_samples, samples, replace=False))):
            ax = axes[row, col]
            ax.imshow(f.render(i, int(j)))
            ax.set_xticks([])
            ax.set_yticks([])
            top = f.describe(i, int(j))['topk'][:3]
            ax.set_title('\n'.join(f'{names[c] if names else c}: {p:.2f}' for c, p in top), fontsize=7)
            if col == 0:
                ax.set_ylabel(row_names[row] if row_names else f'image {i}', fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return indices
