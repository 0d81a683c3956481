"""A compiled reader for the pickles ml-dr writes.

Unpickling an ImageNet+ file (400 reinforcements) builds some 20,000 Python
objects only for :func:`ffcv_dr.mldr.records.parse_sample` to turn them back into
arrays, and was most of ``ffcv-dr convert``'s time (the stages are timed in
``benchmarks/results.md``). Here numba runs the pickle's opcodes into a flat
arena of nodes and reads ml-dr's layout (no mixing) from it straight into
arrays. It knows only the opcodes of plain lists, tuples, dicts, strings,
numbers, booleans and None, so it never calls anything; whatever it does not
know (numpy scalars, a MixUp/CutMix layout, a malformed or hostile file) makes
:func:`read_views` return None, and the caller unpickles with the restricted
unpickler, whose errors name the file and the problem.
"""
from __future__ import annotations

import threading

import numba as nb
import numpy as np

# Node kinds of the arena.
NONE, FALSE, TRUE, INT, FLOAT, STR, LIST, TUPLE, DICT = range(9)

# Work arrays, reused: fresh ones cost more in page faults than the parse itself.
_scratch = threading.local()
_PARAMS = np.frombuffer(b'params', np.uint8)
_PROB = np.frombuffer(b'prob', np.uint8)


@nb.njit(cache=True, nogil=True, inline='always')
def unsigned_le(data, p, size):
    """The little-endian unsigned integer of ``size`` (1, 2, 4 or 8) bytes at ``p``."""
    if size == 1:
        return np.int64(data[p])
    if size == 2:
        return np.int64(data[p]) | np.int64(data[p + 1]) << 8
    v = 0
    for k in range(size):
        v |= np.int64(data[p + k]) << (8 * k)
    return v


@nb.njit(cache=True, nogil=True)
def _arena(data, work, num):
    """Run the opcodes. Nodes: kind, number, and (offset, length) of a string's
    bytes or (first, count) of a container's children, which lie side by side
    in ``kids``. Returns the root node, or -1 where the stream holds anything
    else or is malformed. Every opcode pushes at most one stack item, so
    len(data) bounds the nodes, the stack and the marks; a list grown by a
    second APPENDS (over 1000 items) moves its children to the end of ``kids``,
    which has room for twice len(data)."""
    n = len(data)
    # rows one by one: numba types them contiguous, unlike those of a slice (20% faster)
    kind, first, count, stack, marks, memo = work[0], work[1], work[2], work[3], work[4], work[5]
    kids = work[6:].reshape(-1)
    memo[:n] = -1
    f8 = np.empty(1, np.uint64)
    f8_as_float = f8.view(np.float64)
    nodes = nkids = sp = mp = memos = 0
    p = 0
    frame_end = -1   # where the open frame ends; opcodes may not straddle it
    while p < n:
        if p == frame_end:
            frame_end = -1
        op = data[p]
        p += 1
        new = -1       # kind of a scalar node to push
        arg = 0        # bytes of argument
        if op == 0x80:                  # PROTO
            arg = 1
            if p >= n or data[p] > 5:
                return -1
        elif op == 0x95:                # FRAME: only right after the previous one
            arg = 8
            if frame_end >= 0 or p + 8 > n or not 0 <= unsigned_le(data, p, 8) <= n - p - 8:
                return -1
            frame_end = p + 8 + unsigned_le(data, p, 8)
        elif op == 0x2e:                # STOP
            if sp != 1 or mp != 0:
                return -1
            return stack[0]
        elif op == 0x28:                # MARK
            marks[mp] = sp
            mp += 1
        elif op == 0x5d or op == 0x7d or op == 0x29:   # EMPTY_LIST, EMPTY_DICT, EMPTY_TUPLE
            new = LIST if op == 0x5d else DICT if op == 0x7d else TUPLE
        elif op == 0x4e:
            new = NONE
        elif op == 0x88:
            new = TRUE
        elif op == 0x89:
            new = FALSE
        elif op == 0x4b or op == 0x4d or op == 0x4a:    # BININT1, BININT2, BININT
            arg = 1 if op == 0x4b else 2 if op == 0x4d else 4
            if p + arg > n:
                return -1
            v = unsigned_le(data, p, arg)
            if arg == 4 and v >= 1 << 31:
                v -= 1 << 32
            new = INT
            num[nodes] = v
        elif op == 0x47:                # BINFLOAT: big-endian double
            arg = 8
            if p + 8 > n:
                return -1
            bits = np.uint64(0)
            for k in range(8):
                bits = (bits << np.uint64(8)) | np.uint64(data[p + k])
            f8[0] = bits
            new = FLOAT
            num[nodes] = f8_as_float[0]
        elif op == 0x58 or op == 0x8c:  # BINUNICODE, SHORT_BINUNICODE
            size = 4 if op == 0x58 else 1
            if p + size > n:
                return -1
            length = unsigned_le(data, p, size)
            p += size
            if p + length > n:
                return -1
            new = STR
            first[nodes], count[nodes] = p, length
            arg = length
        elif op == 0x71 or op == 0x72 or op == 0x94:    # BINPUT, LONG_BINPUT, MEMOIZE
            if op == 0x94:
                key = memos
            else:
                arg = 1 if op == 0x71 else 4
                if p + arg > n:
                    return -1
                key = unsigned_le(data, p, arg)
            if sp <= (marks[mp - 1] if mp else 0) or key >= n:   # nothing above the mark
                return -1
            if memo[key] < 0:
                memos += 1
            memo[key] = stack[sp - 1]
        elif op == 0x68 or op == 0x6a:  # BINGET, LONG_BINGET
            arg = 1 if op == 0x68 else 4
            if p + arg > n:
                return -1
            key = unsigned_le(data, p, arg)
            if key >= n or memo[key] < 0:
                return -1
            stack[sp] = memo[key]
            sp += 1
        elif op == 0x74 or op == 0x85 or op == 0x86 or op == 0x87 or op == 0x61 or \
                op == 0x65 or op == 0x73 or op == 0x75:
            # TUPLE, TUPLE1-3: a new tuple; APPEND(S), SETITEM(S): into the
            # container below. Like CPython, nothing is taken from below a mark.
            if op == 0x74 or op == 0x65 or op == 0x75:
                if mp == 0:
                    return -1
                mp -= 1
                start = marks[mp]
            else:
                start = sp - (op - 0x84 if op >= 0x85 else 1 if op == 0x61 else 2)
            fence = marks[mp - 1] if mp else 0
            if start < fence or start > sp:
                return -1
            if op == 0x74 or op >= 0x85:
                target = nodes
                kind[nodes], first[nodes], count[nodes] = TUPLE, nkids, 0
                nodes += 1
            else:
                if start <= fence:
                    return -1
                target = stack[start - 1]
                want = LIST if op == 0x61 or op == 0x65 else DICT
                if kind[target] != want or (want == DICT and (sp - start) % 2):
                    return -1
            if count[target] and first[target] + count[target] != nkids:   # move to the end
                if nkids + count[target] > len(kids):
                    return -1
                kids[nkids:nkids + count[target]] = kids[first[target]:first[target] + count[target]]
                first[target] = nkids
                nkids += count[target]
            elif not count[target]:
                first[target] = nkids
            if nkids + sp - start > len(kids):
                return -1
            kids[nkids:nkids + sp - start] = stack[start:sp]
            nkids += sp - start
            count[target] += sp - start
            sp = start
            if op == 0x74 or op >= 0x85:
                stack[sp] = target
                sp += 1
        else:
            return -1
        if new >= 0:
            kind[nodes] = new
            if new != STR:
                count[nodes] = 0
            stack[sp] = nodes
            sp += 1
            nodes += 1
        p += arg
        if frame_end >= 0 and p > frame_end:
            return -1
    return -1


@nb.njit(cache=True, nogil=True, inline='always')
def _seq(kind, count, node, size):
    """Whether ``node`` is a list or tuple of ``size`` items."""
    return (kind[node] == LIST or kind[node] == TUPLE) and count[node] == size


@nb.njit(cache=True, nogil=True, inline='always')
def _numbers_into(out, kind, num, first, count, kids, node, ints_only):
    """A list or tuple of len(out) ints (or ints and floats) into ``out``."""
    if not _seq(kind, count, node, len(out)):
        return False
    for k in range(len(out)):
        c = kids[first[node] + k]
        if not (kind[c] == INT or (kind[c] == FLOAT and not ints_only)):
            return False
        out[k] = num[c]
    return True


@nb.njit(cache=True, nogil=True, inline='always')
def _is(data, kind, first, count, node, text):
    """Whether ``node`` is the string ``text`` (ASCII bytes)."""
    if kind[node] != STR or count[node] != len(text):
        return False
    for k in range(len(text)):
        if data[first[node] + k] != text[k]:
            return False
    return True


@nb.njit(cache=True, nogil=True)
def _read(data, work, num, ra_ops, topk, params_key, prob_key):
    root = _arena(data, work, num)
    kind, first, count = work[0], work[1], work[2]
    kids = work[6:].reshape(-1)
    n = samples = 0
    if root >= 0 and _seq(kind, count, root, 2) and kind[kids[first[root]]] == INT \
            and kind[kids[first[root] + 1]] == LIST:
        samples = kids[first[root] + 1]
        n = count[samples]
    else:
        root = -1
    crops = np.zeros((n, 4), np.int64)
    flips = np.zeros(n, np.bool_)
    has_ra = np.zeros(n, np.bool_)
    ra = np.zeros((n, ra_ops, 2), np.float64)
    has_re = np.zeros(n, np.bool_)
    erase = np.zeros((n, 4), np.int64)
    values = np.zeros((n, topk), np.float64)
    ids = np.zeros((n, topk), np.int64)
    if root < 0:
        return False, 0, crops, flips, has_ra, ra, has_re, erase, values, ids
    for j in range(n):
        sample = kids[first[samples] + j]
        if kind[sample] != DICT or count[sample] != 4:   # exactly the keys "params" and "prob"
            return False, 0, crops, flips, has_ra, ra, has_re, erase, values, ids
        k0, k1 = kids[first[sample]], kids[first[sample] + 2]
        if _is(data, kind, first, count, k0, params_key) and _is(data, kind, first, count, k1, prob_key):
            params, prob = kids[first[sample] + 1], kids[first[sample] + 3]
        elif _is(data, kind, first, count, k0, prob_key) and _is(data, kind, first, count, k1, params_key):
            params, prob = kids[first[sample] + 3], kids[first[sample] + 1]
        else:
            return False, 0, crops, flips, has_ra, ra, has_re, erase, values, ids
        if not _seq(kind, count, params, 4) or not _seq(kind, count, prob, 2):
            return False, 0, crops, flips, has_ra, ra, has_re, erase, values, ids
        at = first[params]
        crop, flip, aug, box = kids[at], kids[at + 1], kids[at + 2], kids[at + 3]
        ok = _numbers_into(crops[j], kind, num, first, count, kids, crop, True)
        ok &= kind[flip] == TRUE or kind[flip] == FALSE
        flips[j] = kind[flip] == TRUE
        if kind[aug] != NONE:
            has_ra[j] = True
            ok &= ra_ops > 0 and _seq(kind, count, aug, ra_ops)
            for o in range(ra_ops if ok else 0):
                ok &= _numbers_into(ra[j, o], kind, num, first, count, kids, kids[first[aug] + o], False)
        if kind[box] != NONE:
            has_re[j] = True
            ok &= _numbers_into(erase[j], kind, num, first, count, kids, box, True)
        ok &= _numbers_into(values[j], kind, num, first, count, kids, kids[first[prob]], False)
        ok &= _numbers_into(ids[j], kind, num, first, count, kids, kids[first[prob] + 1], True)
        if not ok:
            return False, 0, crops, flips, has_ra, ra, has_re, erase, values, ids
    return True, np.int64(num[kids[first[root]]]), crops, flips, has_ra, ra, has_re, erase, values, ids


def compile_here():
    """Compile (or load from numba's cache) in this process, so that forked
    workers inherit the machine code instead of each compiling it (seconds)."""
    read_views(b'\x80\x02K\x00]\x86.', 0, 0)


def read_views(pickle_bytes: bytes, ra_ops: int, topk: int):
    """``(index, crops, flips, has_ra, ra, has_re, erase, values, ids)`` of a
    pickle of ``(index, [{"params": [crop, flip, ra, erase], "prob": (values,
    ids)}, ...])``, one row per reinforcement (``ra`` and ``erase`` rows are
    zero where ``has_ra``/``has_re`` are False); None for anything else."""
    if len(pickle_bytes) >= 1 << 31:
        return None
    work = getattr(_scratch, 'work', None)
    if work is None or work.shape[1] < len(pickle_bytes):
        size = max(len(pickle_bytes), 1 << 17)
        work = _scratch.work = np.empty((8, size), np.int32)  # files < 2 GiB; rows 6-7: kids
        _scratch.num = np.empty(size, np.float64)
    ok, index, *arrays = _read(np.frombuffer(pickle_bytes, np.uint8), work, _scratch.num,
                               ra_ops, topk, _PARAMS, _PROB)
    return (index, *arrays) if ok else None
