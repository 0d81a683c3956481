"""Mutations of a valid ffcv-dr file, and a child process that opens and loads
them: what tests/test_fuzz.py runs in CI, and a longer random sweep:

    .venv/bin/python tests/fuzz.py FILE.beton --random 2000 [--seed 0]

Each job runs in a child process, so a crash (a signal) or a hang is seen by
the parent, which names the mutation. A job passes when the file is refused
with a ValueError naming it, or when it opens and loads with finite,
normalised soft targets.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _layout(path):
    """Byte offsets of what a mutation can touch, from FFCV's own types."""
    from ffcv.types import FieldDescType, HeaderType
    from ffcv_dr.beton import BetonFile
    f = BetonFile(path)
    names = f.reader.field_names
    meta_start = HeaderType.itemsize + f.reader.field_descriptors.nbytes
    return f, names, meta_start, FieldDescType, HeaderType


def arguments_offset(path, field) -> int:
    """Byte offset of a field's 1024-byte FFCV argument block in ``path``."""
    from ffcv.types import FieldDescType, HeaderType
    from ffcv_dr.beton import BetonFile
    k = BetonFile(path).reader.field_names.index(field)
    return HeaderType.itemsize + k * FieldDescType.itemsize + FieldDescType.fields['arguments'][1]


def _values(dtype, rng, short=False):
    """Boundary values for a field of ``dtype``, as raw bytes: 0, max, the top
    bit set (a negative number to a signed reader), NaN, inf and -1 for floats,
    random bytes; unless ``short``, also 1, max - 1, 1e38 and 1e-30."""
    dt = np.dtype(dtype)
    out = {}
    if dt.kind == 'f':
        values = [('0', 0.0), ('-1', -1.0), ('nan', np.nan), ('inf', np.inf)]
        values += [] if short else [('huge', 1e38), ('tiny', 1e-30)]
        for name, v in values:
            out[name] = np.array(v, dt).tobytes()
    else:
        info = np.iinfo(dt)
        values = [('0', 0), ('max', info.max), ('top bit', info.max // 2 + 1)]
        values += [] if short else [('1', 1), ('max-1', info.max - 1)]
        for name, v in values:
            out[name] = np.array(v).astype(dt).tobytes()
    out['random'] = rng.integers(0, 256, dt.itemsize, dtype=np.uint8).tobytes()
    return out


def structure_mutations(path, rng) -> list:
    """(name, offset, bytes, crc_span) for every header field, every recipe
    field of both field descriptors and the target field's record of
    teachers (with their CRC recomputed over ``crc_span`` and not), the
    descriptors' type ids, and every metadata column of a sample, at
    boundary values."""
    from ffcv_dr.format import RECIPE_DTYPE, TEACHER_DTYPE, TEACHERS_AT, TEACHERS_DTYPE
    f, names, meta_start, desc, header = _layout(path)
    out = []
    for field in header.names:
        for v, raw in _values(header.fields[field][0], rng).items():
            out.append((f'header.{field}={v}', header.fields[field][1], raw, None))
    for k, name in enumerate(names):
        base = header.itemsize + k * desc.itemsize
        for v, raw in _values('u1', rng).items():
            out.append((f'{name}.type_id={v}', base, raw, None))
        if name not in ('image', 'target'):
            continue
        args = base + desc.fields['arguments'][1]
        for field in RECIPE_DTYPE.names:
            dt, at = RECIPE_DTYPE.fields[field][:2]
            for v, raw in _values(dt.base, rng).items():
                for fix in (False, True):
                    if field == 'crc32' and fix:
                        continue
                    out.append((f'{name}.recipe.{field}={v}{" (CRC fixed)" if fix else ""}',
                                args + at, raw, crc_span_of(args, RECIPE_DTYPE) if fix else None))
        if name == 'target':
            record = args + TEACHERS_AT
            entry = TEACHERS_DTYPE.fields['entries'][1]
            fields = [('count', '<u2', TEACHERS_DTYPE.fields['count'][1]),
                      ('crc32', '<u4', TEACHERS_DTYPE.fields['crc32'][1])]
            fields += [(f'entries[0].{f}', dt, entry + TEACHER_DTYPE.fields[f][1])
                       for f, dt in (('name', 'u1'), ('sha256', 'u1'), ('weight', '<f4'))]
            for field, dt, at in fields:
                for v, raw in _values(dt, rng).items():
                    for fix in (False, True) if field != 'crc32' else (False,):
                        out.append((f'target.teachers.{field}={v}{" (CRC fixed)" if fix else ""}',
                                    record + at, raw, crc_span_of(record, TEACHERS_DTYPE) if fix else None))
    row = f.reader.metadata.dtype.itemsize
    sample = len(f) // 2
    for k, name in enumerate(names):
        sub = f.reader.metadata.dtype.fields[f'f{k}']
        columns = [(c, *sub[0].fields[c][:2]) for c in sub[0].names] if sub[0].names else [('value', sub[0], 0)]
        for column, dt, at in columns:
            for v, raw in _values(dt, rng).items():
                out.append((f'{name}.metadata.{column}={v}', meta_start + sample * row + sub[1] + at,
                            raw, None))
    return out


def record_mutations(path, rng) -> list:
    """(name, sample, field, raw bytes, in the image or target block) for every
    field of a reinforcement record and of a top-k record, at boundary values:
    each is written into every reinforcement of one sample."""
    from ffcv_dr.beton import BetonFile
    f = BetonFile(path)
    out = []
    for dtype, where in ((f.record_dtype, 'image'), (f.topk_dtype, 'target')):
        for field in dtype.names:
            dt, at = dtype.fields[field][:2]
            count = int(np.prod(dt.shape)) if dt.shape else 1
            for element in range(count):
                for v, raw in _values(dt.base, rng, short=True).items():
                    out.append((f'{where} record.{field}[{element}]={v}', where,
                                at + element * dt.base.itemsize, raw))
    return out


def jpeg_mutations(data: bytes, rng) -> list:
    """(name, bytes) mutations of a JPEG with restart markers, aimed at what
    the decoder splices: the restart interval (DRI), the frame's size and
    sampling (SOF), the markers themselves (renumbered, dropped, doubled,
    stray, an early EOI), truncations and flipped entropy-coded bytes."""
    segments, p = {}, 2
    while data[p] == 0xFF and data[p + 1] != 0xDA:
        segments.setdefault(data[p + 1], p)
        p += 2 + (data[p + 2] << 8 | data[p + 3])
    entropy = p + 2 + (data[p + 2] << 8 | data[p + 3])
    rst = [k for k in range(entropy, len(data) - 1) if data[k] == 0xFF and 0xD0 <= data[k + 1] <= 0xD7]
    dri, sof = segments[0xDD], segments.get(0xC0, segments.get(0xC1))
    assert rst and dri and sof, 'a JPEG with restart markers'

    def put(at, raw, base=data):
        return base[:at] + bytes(raw) + base[at + len(raw):]
    out = [(f'DRI={v}', put(dri + 4, v.to_bytes(2, 'big'))) for v in (0, 1, 2, 3, 5, 7, 64, 0xFFFF)]
    height, width = data[sof + 5] << 8 | data[sof + 6], data[sof + 7] << 8 | data[sof + 8]
    for name, h, w in (('0x0', 0, 0), ('height 1', 1, width), ('width 1', height, 1),
                       ('+16', height + 16, width + 16), ('-16', max(1, height - 16), max(1, width - 16)),
                       ('65535', 0xFFFF, 0xFFFF), ('wide', height, 0xFFFF)):
        out.append((f'SOF size {name}', put(sof + 5, h.to_bytes(2, 'big') + w.to_bytes(2, 'big'))))
    for v in (0x11, 0x22, 0x44, 0x41, 0x14, 0x00):
        out.append((f'SOF luma sampling {v:#x}', put(sof + 11, [v])))
    middle = rst[len(rst) // 2]
    out += [('RST renumbered', put(middle + 1, [0xD0 + (data[middle + 1] - 0xD0 + 3) % 8])),
            ('RST dropped', data[:middle] + data[middle + 2:]),
            ('RST doubled', data[:middle] + data[middle:middle + 2] * 2 + data[middle + 2:]),
            ('first RST dropped', data[:rst[0]] + data[rst[0] + 2:]),
            ('last RST dropped', data[:rst[-1]] + data[rst[-1] + 2:]),
            ('EOI in place of an RST', put(middle + 1, [0xD9])),
            ('every RST 0xD0', bytes(b if k - 1 not in set(rst) else 0xD0 for k, b in enumerate(data))),
            ('no EOI', data[:-2]),
            ('entropy data gone', data[:entropy]),
            ('only the first interval', data[:rst[0]])]
    for k in rng.integers(entropy, len(data) - 2, 4):
        out.append((f'stray RST at {k}', data[:k] + bytes([0xFF, 0xD0 + int(k) % 8]) + data[k:]))
    for frac in (0.1, 0.5, 0.9):
        out.append((f'truncated at {frac:.0%}', data[:entropy + int(frac * (len(data) - entropy))]))
    flipped = bytearray(data)
    for k in rng.integers(entropy, len(data) - 2, 12):
        flipped[k] ^= 1 << int(rng.integers(8))
    out.append(('12 flipped bits', bytes(flipped)))
    out.append(('random entropy data', data[:entropy] + rng.integers(0, 256, len(data) - entropy,
                                                                     dtype=np.uint8).tobytes()))
    # what the writer's splicer reads: Huffman tables, the scan header, precision
    dht, sos = segments[0xC4], p
    out += [('DHT overfull', put(dht + 5, [3, 0])), ('DHT 256 codes of 16 bits', put(dht + 20, [255])),
            ('DHT no codes', put(dht + 5, bytes(16))), ('DHT value 0xFF', put(dht + 21, [0xFF])),
            ('DHT class 2', put(dht + 4, [0x20])), ('SOS table 3', put(sos + 6, [0x33])),
            ('SOS Se 31', put(sos + 2 + (data[sos + 2] << 8 | data[sos + 3]) - 2, [31])),
            ('SOS component id 9', put(sos + 5, [9])), ('SOF 12-bit', put(sof + 4, [12]))]
    return out


def _remark(data):
    """The writer's re-marking of a (mutated) source JPEG: whether the
    splicer took it and, if so, whether libjpeg read the source without a
    warning and the result decodes to the source's pixels."""
    from ffcv_dr.jpeg import _splice_restarts, check_jpeg, decode_region, jpeg_header
    out = np.empty(2 * data.size + 65536, np.uint8)
    n = _splice_restarts(data.tobytes(), data.size, 4, out.ctypes.data, out.size)
    if n <= 0:
        return {'spliced': False}
    w, h = jpeg_header(data.tobytes())[:2]
    return {'spliced': True, 'source_clean': check_jpeg(data)[0] is None,
            'same_pixels': bool(np.array_equal(decode_region(out[:n], 1, 0, h, 0, w),
                                               decode_region(data, 1, 0, h, 0, w)))}


def _decode_crops(path):
    """The replay kernel on crops of a (mutated) JPEG whose header said
    ``height`` x ``width``: the whole image, corners, the middle, one-pixel
    strips, at outputs that use every DCT scale; how many decoded. Then
    the writer's re-marking of it (:func:`_remark`)."""
    from ffcv_dr.jpeg import decode_crop_resize, decode_region, seekable
    job = json.load(open(path + '.json'))
    data = np.fromfile(path, np.uint8)
    h, w = job['height'], job['width']
    crops = [(0, 0, h, w), (0, 0, h // 2, w // 2), (h // 2, w // 2, h - h // 2, w - w // 2),
             (h // 4, w // 4, h // 2, w // 2), (0, w - 1, h, 1), (h - 1, 0, 1, w), (h // 3, w // 3, 1, 1)]
    decoded = 0
    for top, left, ch, cw in crops:
        for side in (64, 16, 4):
            out = np.full((side, side, 3), 7, np.uint8)
            decoded += bool(decode_crop_resize(data, h, w, top, left, ch, cw, out))
    seekable(data)
    try:
        decode_region(data, 1, 0, 1, 0, 1)
    except (ValueError, TypeError):
        pass   # no header left to size the region by
    return {'decoded': decoded, **_remark(data)}


def crc_span_of(start, dtype) -> list:
    """[first byte, CRC's byte] of a record whose CRC32 covers what precedes it."""
    return [start, start + dtype.fields['crc32'][1]]


def write_structure(good, out, offset, raw, crc_span):
    """A copy of ``good`` with ``raw`` at ``offset`` (or, with ``offset`` a list
    of (offset, raw) and ``raw`` None, each of them), the CRC over
    ``crc_span`` made to match."""
    if os.path.abspath(good) != os.path.abspath(out):
        shutil.copy(good, out)
    for at, data in (offset if raw is None else [(offset, raw)]):
        _apply(out, at, data.hex(), crc_span)


def write_records(good, out, mutations) -> dict:
    """One file in which mutation k hits every reinforcement of sample k (the
    block CRCs recomputed, so ``verify`` looks past them); {sample: name}."""
    from ffcv_dr.beton import BetonFile
    from ffcv_dr.format import block_crc
    f = BetonFile(good)
    shutil.copy(good, out)
    hit = {}
    with open(out, 'r+b') as fh:
        for sample, (name, where, at, raw) in enumerate(mutations):
            meta = (f.image_meta if where == 'image' else f.target_meta)[sample].copy()
            block = np.array(f.block(meta['data_ptr']))
            size = (f.record_dtype if where == 'image' else f.topk_dtype).itemsize
            for j in range(f.recipe.num_samples):
                block[j * size + at:j * size + at + len(raw)] = np.frombuffer(raw, np.uint8)
            fh.seek(int(meta['data_ptr']))
            fh.write(block.tobytes())
            meta['crc32'] = block_crc(meta, block)
            _, names, meta_start, _, _ = _layout(good)
            column = f'f{names.index(where)}'
            row = f.reader.metadata.dtype
            fh.seek(meta_start + sample * row.itemsize + row.fields[column][1])
            fh.write(meta.tobytes())
            hit[sample] = name
    return hit


def child():
    """Run jobs from stdin (JSON lines), one result line each. An 'open' job
    writes its mutation of ``good`` to ``scratch`` first."""
    import warnings
    warnings.simplefilter('ignore')
    copied = None
    for line in sys.stdin:
        job = json.loads(line)
        print('START', job['name'], flush=True)
        path, undo = job['path'], None
        if job.get('mutation'):  # applied to one copy of good, and undone after the job
            if copied != (job['good'], path):
                shutil.copy(job['good'], path)
                copied = (job['good'], path)
            undo = _apply(path, *job['mutation'])
        try:
            result = {'status': 'ok', **(_decode_crops(path) if job.get('jpeg') else
                                         _load(path, job['p']) if job.get('p') is not None else _open(path))}
        except ValueError as e:
            result = {'status': 'refused', 'named': path in str(e), 'message': str(e)[:300]}
        if undo:
            _restore(path, undo)
        print('RESULT', json.dumps(result), flush=True)


def _apply(path, at, raw, crc_span) -> list:
    """Write ``raw`` (hex) at ``at`` in ``path`` and, if ``crc_span`` is given,
    make the record there match its CRC again; returns [(offset, old bytes)]."""
    raw = bytes.fromhex(raw)
    with open(path, 'r+b') as fh:
        fh.seek(at)
        undo = [(at, fh.read(len(raw)))]
        fh.seek(at)
        fh.write(raw)
        if crc_span is not None:  # as a crafted file would: the CRC made to match
            start, crc_at = crc_span
            fh.seek(crc_at)
            undo.append((crc_at, fh.read(4)))
            fh.seek(start)
            head = fh.read(crc_at - start)
            fh.write(np.uint32(zlib.crc32(head)).astype('<u4').tobytes())
    return undo


def _restore(path, undo):
    with open(path, 'r+b') as fh:
        for at, data in reversed(undo):
            fh.seek(at)
            fh.write(data)


def _open(path):
    from ffcv_dr.beton import BetonFile
    BetonFile(path)
    return {}


def _load(path, p):
    """Two epochs at ``p``; each damaged sample must get its one-hot label in
    image and target alike (j = -1); then replay, describe and info on every
    sample."""
    import torch
    from ffcv.loader import OrderOption
    from ffcv_dr import Loader
    from ffcv_dr.beton import BetonFile
    from ffcv_dr.cli import main
    f = BetonFile(path)
    bad_targets, fallbacks = 0, set()
    loader = Loader(path, batch_size=8, num_workers=2, order=OrderOption.SEQUENTIAL, p=p,
                    drop_last=False, labels=True, reinforcement_index=True)
    for _ in range(2):
        start = 0
        for images, targets, labels, js in loader:
            ok = torch.isfinite(targets).all(1) & ((targets.sum(1) - 1).abs() < 2e-3) & (targets >= 0).all(1)
            bad_targets += int((~ok).sum())
            for k in torch.nonzero(js < 0).flatten().tolist():
                fallbacks.add(start + k)
                hot = torch.zeros_like(targets[k])
                hot[labels[k]] = 1
                bad_targets += int(not torch.equal(targets[k], hot))
            start += len(images)
    replay_refused = set()
    for i in range(len(f)):
        for j in range(f.recipe.num_samples):
            f.describe(i, j)
            try:
                f.render(i, j)
            except ValueError:
                replay_refused.add(i)
    with open(os.devnull, 'w') as null:
        stdout, sys.stdout = sys.stdout, null
        try:
            main(['info', path])
        finally:
            sys.stdout = stdout
    return {'bad_targets': bad_targets, 'fallbacks': sorted(fallbacks),
            'damaged': sorted(loader.clock.damaged().tolist()), 'replay_refused': sorted(replay_refused)}


def run_jobs(jobs, timeout) -> dict:
    """{name: result} for jobs (dicts with a name, see :func:`child`), each in
    a child process that is restarted after a crash; a crash or a hang is a
    result too."""
    results, todo = {}, list(jobs)
    while todo:
        proc = subprocess.Popen([sys.executable, __file__, '--child'], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(HERE))
        feed = ''.join(json.dumps(job) + '\n' for job in todo)
        try:
            out, err = proc.communicate(feed, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        current = None
        for line in out.splitlines():
            if line.startswith('START '):
                current = line[6:]
            elif line.startswith('RESULT ') and current is not None:
                results[current] = json.loads(line[7:])
                current = None
        if current is not None:  # died or hung inside this job
            what = 'hang' if proc.returncode in (None, -9) else f'crash (exit {proc.returncode})'
            results[current] = {'status': what, 'stderr': err[-2000:]}
        elif proc.returncode:
            raise RuntimeError(f'fuzz child failed outside any job: {err[-2000:]}')
        todo = [job for job in todo if job['name'] not in results]
    return results


def sweep(good, folder, rng, count=None, loads=4) -> tuple:
    """Every structure mutation (or ``count`` random ones) opened; the
    metadata mutations that open merged into one file and ``loads`` of the
    others that open loaded at p=0.5; every record mutation, merged into files
    of one mutated sample each, loaded at p=1. Returns ({name: result},
    {name of a record load: (its file, {sample: record mutation})})."""
    os.makedirs(folder, exist_ok=True)
    structure = structure_mutations(good, rng)
    if count:
        structure = [structure[k] for k in rng.integers(0, len(structure), count)]
    scratch = os.path.join(folder, 'mutated.beton')
    jobs = [{'name': name, 'path': scratch, 'good': good, 'mutation': [at, raw.hex(), crc_span]}
            for name, at, raw, crc_span in structure]
    size = os.path.getsize(good)
    for cut in sorted({0, 1, 23, 24, 1000, size // 7, size // 3, size // 2, size - 4096, size - 1}):
        path = os.path.join(folder, f'cut{cut}.beton')
        with open(good, 'rb') as src, open(path, 'wb') as dst:
            dst.write(src.read(cut))
        jobs.append({'name': f'truncated at byte {cut}', 'path': path})
    results = run_jobs(jobs, timeout=600)
    opened = [m for m in structure if results[m[0]]['status'] == 'ok']
    load_jobs = []
    for k, (name, at, raw, crc_span) in enumerate(m for m in opened if '.metadata.' not in m[0]):
        if k < loads:
            path = os.path.join(folder, f'opened{k}.beton')
            write_structure(good, path, at, raw, crc_span)
            load_jobs.append({'name': f'load {name}', 'path': path, 'p': 0.5})
    path = os.path.join(folder, 'metadata.beton')
    shutil.copy(good, path)
    f, names, meta_start, _, _ = _layout(good)
    row, per_file = f.reader.metadata.dtype.itemsize, len(f)
    with open(path, 'r+b') as fh:  # each on its own sample
        for sample, (name, at, raw, _) in enumerate(m for m in opened if '.metadata.' in m[0]):
            fh.seek(at + (sample % per_file - per_file // 2) * row)
            fh.write(raw)
    load_jobs.append({'name': 'load metadata changes that open', 'path': path, 'p': 0.5})
    records = record_mutations(good, rng)
    merged = {}
    for k in range(0, len(records), per_file):
        path = os.path.join(folder, f'records{k}.beton')
        hits = write_records(good, path, records[k:k + per_file])
        name = f'load records {k}..{k + len(hits) - 1}'
        merged[name] = (path, hits)
        load_jobs.append({'name': name, 'path': path, 'p': 1.0})
    results.update(run_jobs(load_jobs, timeout=900))
    return results, merged


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('beton', nargs='?')
    parser.add_argument('--random', type=int, default=None, help='random structure mutations')
    parser.add_argument('--loads', type=int, default=20, help='opened structure mutations to load')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child()
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        results, _ = sweep(args.beton, tmp, np.random.default_rng(args.seed), args.random, args.loads)
    counts = {}
    for name, r in results.items():
        counts[r['status']] = counts.get(r['status'], 0) + 1
        if r['status'] not in ('ok', 'refused') or r.get('bad_targets'):
            print(f'{r["status"]}: {name}\n{r.get("stderr", "")}{r.get("bad_targets", "")}')
    print(json.dumps(counts))


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(HERE))
    main()
