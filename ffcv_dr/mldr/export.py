"""Writing a ``.beton``'s reinforcements in ml-dr's own format: one
``torch.save`` pickle per image and the ``config.pth.tar``, laid out as ml-dr's
``reinforce.py`` writes them (numpy integers in CutMix boxes included). For the
benchmarks (ml-dr's loader design reads them) and for tests that need ml-dr
files without ``../shared``."""
from __future__ import annotations

import os

import numpy as np

from ..format import RA_OPS


def _view(p: dict) -> list:
    ra = [(RA_OPS.index(op), m) for op, m in p['rand_augment']] if p.get('rand_augment') else None
    return [tuple(p['crop']), p['flip'], ra, tuple(p['erase']) if p.get('erase') else None]


def mldr_sample(f, index: int) -> tuple:
    """Image ``index``'s reinforcements as ml-dr pickles them: ``(index, [{"params":
    [...], "prob": (values, class ids)}, ...])``; with a paired image, params
    start with its index and pair each view part (own, paired), then MixUp's
    lam and CutMix's ``[lam, r1, c1, r2, c2]``."""
    samples = []
    for k in range(f.recipe.num_samples):
        d = f.describe(index, k)
        p = d['params']
        params = _view(p)
        if f.recipe.mixing:
            if p['pair'] is not None:
                params = [list(pair) for pair in zip(params, _view(p['pair_params']))]
            cut = p['cutmix']
            params = [p['pair'], *params, p['mixup'],
                      [cut['lam'], *(np.int64(v) for v in cut['box'])] if cut else None]
        samples.append({'params': params,
                        'prob': ([v for _, v in d['topk']], [c for c, _ in d['topk']])})
    return index, samples


def write_mldr_files(f, mldr: str, copies: int = 1) -> str:
    """Every image's pickle and the config into the folder ``mldr``; with
    ``copies``, image i's as those of images i * copies to i * copies +
    copies - 1 (a pickle names its image's index)."""
    import torch
    os.makedirs(mldr, exist_ok=True)
    for i in range(len(f)):
        samples = mldr_sample(f, i)[1]
        for j in range(i * copies, (i + 1) * copies):
            torch.save((j, samples), os.path.join(mldr, f'{j}.pth.tar'))
    write_mldr_config(f.recipe, mldr)
    return mldr


def write_mldr_config(r, mldr: str) -> str:
    """ml-dr's ``config.pth.tar`` of the recipe ``r`` in the folder ``mldr``."""
    import torch
    path = os.path.join(mldr, 'config.pth.tar')
    torch.save({'reinforce': {'num_samples': r.num_samples, 'topk': r.topk, 'image_augmentation': {
        'random_resized_crop': {'enable': True, 'size': r.size, 'scale': r.scale, 'ratio': r.ratio},
        'random_horizontal_flip': {'enable': True, 'p': 0.5},
        'rand_augment': {'enable': bool(r.ra_ops), 'num_ops': r.ra_ops, 'magnitude': r.ra_magnitude},
        'random_erase': {'enable': r.erase, 'p': r.erase_p},
        'mixup': {'enable': r.mixing}, 'cutmix': {'enable': r.mixing}}}}, path)
    return path
