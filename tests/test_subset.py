"""``ffcv-dr subset``: reinforcement k of the cut file replays the parameters
and pixels of the input's reinforcement k, its top-K are the input's K most
probable classes, it verifies and says what it was cut from; what it cannot
cut is refused and leaves nothing behind."""
import os
import shutil

import numpy as np
import pytest

from ffcv_dr.beton import BetonFile
from ffcv_dr.cli import main
from ffcv_dr.jobs import JobError
from ffcv_dr.subset import subset
from ffcv_dr.verify import verify


def test_a_cut_file_replays_what_its_input_does(randaug_beton, tmp_path, capsys):
    src = BetonFile(randaug_beton)
    n, k = src.recipe.num_samples // 2, src.recipe.topk // 2
    keep = np.arange(1, len(src), 3)
    listed = tmp_path / 'keep.txt'
    listed.write_text(', '.join(map(str, keep[::-1])))   # any order: kept in the input's
    out = str(tmp_path / 'small.beton')
    assert main(['subset', randaug_beton, out, '--samples', str(n), '--topk', str(k),
                 '--images', str(listed)]) == 0
    cut = BetonFile(out)
    assert (len(cut), cut.recipe.num_samples, cut.recipe.topk) == (len(keep), n, k)
    assert cut.cut_from.describe().startswith(f'{os.path.basename(randaug_beton)} '
                                              f'({src.recipe.num_samples} reinforcements per image, '
                                              f'top-{src.recipe.topk}, {len(src)} images')
    assert verify(out).ok
    rng = np.random.default_rng(0)
    for m, i in enumerate(keep):
        assert cut.label(m) == src.label(i)
        assert np.array_equal(cut.payload(m), src.payload(i))
        assert cut.records(m).tobytes() == src.records(i)[:n].tobytes()
        stored, kept = src.topk(i)[:n], cut.topk(m)
        want = -np.sort(-stored['prob'].astype(np.float32), axis=1)[:, :k]
        assert np.array_equal(kept['prob'].astype(np.float32), want)
        for row in range(n):   # each kept class carries its stored probability
            lookup = dict(zip(stored['cls'][row].tolist(), stored['prob'][row].tolist()))
            assert [lookup[c] for c in kept['cls'][row].tolist()] == kept['prob'][row].tolist()
        for j in rng.choice(n, 2, replace=False):
            assert np.array_equal(cut.render(m, int(j)), src.render(int(i), int(j)))
    main(['info', out])
    assert 'cut_from' in capsys.readouterr().out


def test_what_cannot_be_cut_is_refused_and_leaves_nothing(randaug_beton, mixing_beton, tmp_path):
    src = BetonFile(randaug_beton)
    out = str(tmp_path / 'small.beton')
    for kwargs, message in (
            (dict(samples=src.recipe.num_samples + 1, topk=1), r'--samples .*holds'),
            (dict(samples=1, topk=src.recipe.topk + 1), r'--topk .*stores the top-'),
            (dict(samples=1, topk=1, images=str(tmp_path / 'none.txt')), 'cannot read'),
    ):
        with pytest.raises(JobError, match=message):
            subset(randaug_beton, out, **kwargs)
    for text, message in (('3 3', 'listed 2 times'), (f'{len(src)}', 'outside'), ('a', 'integers'),
                          ('', 'lists no images')):
        (tmp_path / 'keep.txt').write_text(text)
        with pytest.raises(JobError, match=message):
            subset(randaug_beton, out, 1, 1, str(tmp_path / 'keep.txt'))
    with pytest.raises(JobError, match='over the input'):
        subset(randaug_beton, randaug_beton, 1, 1)
    mixing = BetonFile(mixing_beton)
    pairs = mixing.records(0)['pair'][(mixing.records(0)['mix_flags'] & 1) != 0]
    (tmp_path / 'keep.txt').write_text(' '.join(str(i) for i in range(len(mixing)) if i != pairs[0]))
    with pytest.raises(JobError, match=f'is mixed with sample {pairs[0]}'):
        subset(mixing_beton, out, mixing.recipe.num_samples, 1, str(tmp_path / 'keep.txt'))

    damaged = str(tmp_path / 'damaged.beton')   # a block's bytes changed: its CRC fails mid-write
    shutil.copy(randaug_beton, damaged)
    at = int(src.image_meta[len(src) // 2]['data_ptr']) + src.params_size + 100
    with open(damaged, 'r+b') as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(Exception, match=f'sample {len(src) // 2} fails its CRC32'):
        subset(damaged, out, 1, 1)
    assert sorted(os.listdir(tmp_path)) == ['damaged.beton', 'keep.txt']
