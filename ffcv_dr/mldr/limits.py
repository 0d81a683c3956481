"""Limits on an untrusted pickle, checked before it is unpickled.

The restricted unpickler runs no code, but a pickle of plain lists can still
be a bomb: shared references (memo gets) make a 16 KB file expand into
billions of items, a declared length or memo key makes CPython allocate
gigabytes, and deep nesting defeats anything that walks the result. So the
opcodes are first run here, in numba, over a model of the unpickler's stack
in which each value carries its size as a tree (each shared reference counted
in full) and its depth; the pickle is refused, naming the limit, as soon as
one exceeds what an ml-dr file of the recipe can hold. The scan costs about
as much as reading the bytes.
"""
from __future__ import annotations

import pickletools
from dataclasses import dataclass

import numba as nb
import numpy as np

from .reader import unsigned_le


@dataclass(frozen=True)
class Limits:
    bytes: int   # of the pickle (and of the file or archive member holding it)
    items: int   # values in the unpickled object, each shared reference counted in full
    depth: int   # nesting of containers and calls


def sample_limits(num_samples: int, topk: int) -> Limits:
    """What a ``{index}.pth.tar`` of ``num_samples`` reinforcements with ``topk``
    probabilities can hold, with room to spare: ml-dr's own files take about
    160-370 bytes and 40-80 values per reinforcement (MixUp/CutMix pairs and
    numpy scalars included) at top-10."""
    return Limits(bytes=4096 + num_samples * (1024 + 32 * topk),
                  items=64 + num_samples * (256 + 4 * topk), depth=24)


# A torch.save zip around a pickle: a few small members, headers, padding.
ZIP_OVERHEAD = 64 << 10


def file_limit(limits: Limits) -> int:
    """The most bytes a file (or archive member) holding such a pickle may have."""
    return limits.bytes + ZIP_OVERHEAD


# config.pth.tar: ml-dr's generation settings, a few KB of nested dicts.
CONFIG_LIMITS = Limits(bytes=1 << 20, items=100_000, depth=32)

# What the scan reports (problem code -> message; {value} and {limit} filled in).
PROBLEMS = {  # each completes "the pickle ..."
    1: 'has byte 0x{value:02x} where an opcode should be',
    2: 'ends inside an opcode (truncated)',
    3: 'declares {value} bytes for one value, more than it holds',
    4: 'takes values from an empty stack or past a mark',
    5: 'uses memo key {value}, out of range (the limit: one key per opcode)',
    6: 'refers to memo key {value}, which was never set',
    7: 'expands to more than {limit} values through shared references (the limit for this recipe)',
    8: 'nests deeper than {limit} levels (the limit)',
    9: 'changes a container after placing it in another (a recursive structure)',
    10: 'has no STOP opcode (truncated)',
}

# How each opcode reads its argument and moves the stack, from pickletools'
# description of the protocol. Columns of _TABLE:
ARG, LINES, MARK_AT, POPS, PUSHES, ROLE = range(6)
# ARG: n >= 0 fixed bytes; -1 text up to a newline (LINES lines); -2, -3, -4,
# -5 a length in 1, 4 (signed), 4 or 8 bytes, then that many bytes.
# ROLE: how the stack moves, beyond "pop POPS (or back to the mark), push one".
GENERIC, MARK, POP, POP_MARK, DUP, PUT, GET, STOP, MUTATE, NOTHING = range(10)
_ROLES = {'MARK': MARK, 'POP': POP, 'POP_MARK': POP_MARK, 'DUP': DUP, 'PUT': PUT, 'BINPUT': PUT,
          'LONG_BINPUT': PUT, 'MEMOIZE': PUT, 'GET': GET, 'BINGET': GET, 'LONG_BINGET': GET,
          'STOP': STOP, 'APPEND': MUTATE, 'APPENDS': MUTATE, 'SETITEM': MUTATE, 'SETITEMS': MUTATE,
          'ADDITEMS': MUTATE, 'BUILD': MUTATE, 'PROTO': NOTHING, 'FRAME': NOTHING}


def _table() -> np.ndarray:
    table = np.full((256, 6), -9, np.int64)  # ARG -9: not an opcode
    for op in pickletools.opcodes:
        before = [s.name for s in op.stack_before]
        table[ord(op.code)] = (op.arg.n if op.arg else 0,
                               2 if op.arg and op.arg.name == 'stringnl_noescape_pair' else 1,
                               before.index('mark') if 'mark' in before else -1,
                               len(before), len(op.stack_after), _ROLES.get(op.name, GENERIC))
    return table


_TABLE = _table()


@nb.njit(cache=True, nogil=True)
def _scan(data, table, max_items, max_depth):
    """(problem, byte offset, value) of the first limit ``data`` exceeds; problem 0 if none.
    Each opcode makes at most one new value (a cell: size, depth, placed in a
    container yet); the stack, the marks and the memo hold cells, so a memo
    get shares its cell, with its full size, as the unpickler shares the object."""
    n = len(data)
    size = np.zeros(n + 1, np.int64)
    depth = np.zeros(n + 1, np.int64)
    placed = np.zeros(n + 1, np.bool_)
    stack = np.zeros(n + 1, np.int64)
    marks = np.zeros(n + 1, np.int64)
    memo = np.full(n + 1, -1, np.int64)
    cells = sp = mp = memos = 0
    p = 0
    while p < n:
        at, op = p, data[p]
        p += 1
        arg = table[op, ARG]
        if arg == -9:
            return 1, at, np.int64(op)
        key = -1
        if arg >= 0:
            if p + arg > n:
                return 2, at, 0
            if arg > 0 and (table[op, ROLE] == PUT or table[op, ROLE] == GET):
                key = unsigned_le(data, p, arg)
            p += arg
        elif arg == -1:
            digits, value = 0, np.int64(0)
            for _ in range(table[op, LINES]):
                while p < n and data[p] != 10:
                    if 48 <= data[p] <= 57 and digits < 18:
                        value = value * 10 + (data[p] - 48)
                        digits += 1
                    else:
                        digits = 99   # not a small decimal: fine for numbers, not for memo keys
                    p += 1
                if p >= n:
                    return 2, at, 0
                p += 1
            if table[op, ROLE] == PUT or table[op, ROLE] == GET:
                key = value if 0 < digits < 99 else n
        else:
            width = 1 if arg == -2 else 8 if arg == -5 else 4
            if p + width > n:
                return 2, at, 0
            length = unsigned_le(data, p, width)
            if arg == -3 and length >= 1 << 31:
                length -= 1 << 32    # signed: CPython refuses a negative length
            p += width
            if length < 0 or length > n - p:
                return 3, at, length
            p += length
        role = table[op, ROLE]
        fence = marks[mp - 1] if mp else 0
        if role == NOTHING:
            continue
        if role == STOP:
            return (0, at, 0) if sp > fence else (4, at, 0)
        if role == MARK:
            marks[mp] = sp
            mp += 1
            continue
        if role == POP or role == DUP:
            if sp <= fence:
                return 4, at, 0
            if role == POP:
                sp -= 1
            else:
                stack[sp] = stack[sp - 1]
                sp += 1
            continue
        if role == POP_MARK:
            if mp == 0:
                return 4, at, 0
            mp -= 1
            sp = marks[mp]
            continue
        if role == PUT or role == GET:
            if key < 0:          # MEMOIZE: the next free key
                key = memos
            if key >= n:
                return 5, at, key
            if role == PUT:
                if sp <= fence:
                    return 4, at, 0
                if memo[key] < 0:
                    memos += 1
                memo[key] = stack[sp - 1]
            else:
                if memo[key] < 0:
                    return 6, at, key
                stack[sp] = memo[key]
                sp += 1
            continue
        # GENERIC and MUTATE: take values (those above the mark, and POPS or
        # MARK_AT below it) into a new value, or into the container below them.
        below = table[op, POPS] if table[op, MARK_AT] < 0 else table[op, MARK_AT]
        start = sp
        if table[op, MARK_AT] >= 0:
            if mp == 0:
                return 4, at, 0
            mp -= 1
            start = marks[mp]
            fence = marks[mp - 1] if mp else 0
        start -= below
        if start < fence:
            return 4, at, 0
        total, deepest = np.int64(1), np.int64(0)
        first = start + 1 if role == MUTATE else start
        for k in range(first, sp):
            c = stack[k]
            total += size[c]
            deepest = max(deepest, depth[c])
            placed[c] = True
        if role == MUTATE:
            target = stack[start]
            if placed[target]:
                return 9, at, 0
            size[target] += total - 1
            depth[target] = max(depth[target], deepest + 1)
            sp = start + 1
        else:
            target = cells
            cells += 1
            size[target], depth[target] = total, deepest + 1
            sp = start
            if table[op, PUSHES]:
                stack[sp] = target
                sp += 1
        if size[target] > max_items:
            return 7, at, size[target]
        if depth[target] > max_depth:
            return 8, at, depth[target]
    return 10, n, 0


def check_pickle(data: bytes, limits: Limits):
    """The first limit the pickle ``data`` exceeds, as words that complete
    "the pickle ..."; None if none."""
    if len(data) > limits.bytes:
        return f'is {len(data)} bytes, more than the {limits.bytes} this recipe allows (the limit)'
    problem, at, value = _scan(np.frombuffer(data, np.uint8), _TABLE, limits.items, limits.depth)
    if not problem:
        return None
    limit = limits.items if problem == 7 else limits.depth
    return f'{PROBLEMS[problem].format(value=value, limit=limit)}, at byte {at}'
