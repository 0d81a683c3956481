/* Restart markers added at the level of Huffman symbols, for the writer.
 *
 * libjpeg's lossless route (jpeg_read_coefficients, then
 * jpeg_write_coefficients with optimize_coding) costs about three full
 * decodes: half of it is the encoder's pass that counts symbols, in plain C
 * over every coefficient. Restart markers change only each interval's first
 * DC difference per component; every other symbol of a sequential JPEG stays
 * as it is. So this reads the symbols once (one Huffman decode, counting
 * them on the way, without dequantizing or storing coefficients), builds
 * optimal tables from the counts with libjpeg's own jpeg_gen_optimal_table,
 * and writes the same symbols back with markers every k MCUs. The result
 * has the same coefficients, so it decodes to the same pixels.
 *
 * Writing symbol by symbol is a quarter of the time. Where the source's AC
 * table already codes its symbols in as few bits as the optimal one (most
 * photos: their encoder optimized the tables), that table is kept and each
 * block's AC bits are copied as they are, 32 at a time; only the DC symbols
 * are written anew (the entropy data libjpeg's route writes, byte for byte,
 * where the source's tables are libjpeg's). Where it does not (a standard
 * table, as OpenCV writes), the optimal table is worth its cost: the file is
 * smaller, and again it is what libjpeg's route writes.
 *
 * Only the plain case is taken: sequential Huffman, 8-bit, 1 or 3
 * components in one interleaved scan. Anything else or anything unusual
 * (progressive, several scans, a misnumbered marker, a bad code, data after
 * the scan, a symbol beyond 8-bit ranges) returns NOT_SPLICED, and the
 * caller takes libjpeg's route, which decides what the file is worth.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

#include "_jpeg_errors.h"

#define NOT_SPLICED (-3)
#define TOO_SMALL (-2)
#define LOOKUP_BITS 9

/* libjpeg's, exported by libjpeg(-turbo) 6.2 since 1998 (jchuff.h). */
extern void jpeg_gen_optimal_table(j_compress_ptr cinfo, JHUFF_TBL *htbl, long freq[]);

struct huff {                       /* a decoding table */
    int defined, ac;
    uint8_t bits[17], vals[256];
    uint16_t lookup[1 << LOOKUP_BITS];   /* length << 8 | symbol; 0: longer code */
    uint32_t fast[1 << LOOKUP_BITS];     /* bits taken << 24 | extra bits << 8 | symbol, where
                                            code and extra bits fit in the lookup; else 0 */
    int32_t maxcode[18], offset[17];     /* codes of length l: value - offset[l] indexes vals */
};

struct code { uint16_t code[256]; uint8_t size[256]; };   /* an encoding table */

/* The number of extra bits after symbol s: its category (DC), its low nibble (AC). */
static inline int extra(const struct huff *h, int s) {
    return h->ac ? s & 15 : s;
}

/* Build h's decoding tables from bits/vals; -1 if they do not form a prefix code. */
static int build_decoder(struct huff *h) {
    int32_t code = 0, k = 0;
    memset(h->lookup, 0, sizeof h->lookup);
    memset(h->fast, 0, sizeof h->fast);
    for (int l = 1; l <= 16; l++) {
        h->offset[l] = k - code;
        for (int i = 0; i < h->bits[l]; i++, k++, code++) {
            if (l <= LOOKUP_BITS) {
                int shift = LOOKUP_BITS - l;
                int x = extra(h, h->vals[k]);
                for (int j = 0; j < 1 << shift; j++) {
                    h->lookup[(code << shift) | j] = (uint16_t)(l << 8 | h->vals[k]);
                    if (l + x <= LOOKUP_BITS)
                        h->fast[(code << shift) | j] = (uint32_t)(l + x) << 24 |
                            (uint32_t)(j >> (shift - x)) << 8 | h->vals[k];
                }
            }
        }
        h->maxcode[l] = h->bits[l] ? code - 1 : -1;
        if (code > (1 << l) - 1 + (l == 16))   /* more codes than this length has */
            return -1;
        code <<= 1;
    }
    h->maxcode[17] = INT32_MAX;
    return 0;
}

struct reader {
    const uint8_t *p, *end;
    uint64_t buf;         /* the next bits, first in the top bit */
    int n;                /* bits in buf */
    int padded;           /* of those, zeros added past a marker or the end */
    uint8_t *d;           /* the data bytes taken so far, unstuffed (room for 8 more than
                             the source's bytes) */
    uint64_t dn;
};

/* How many bits of the unstuffed data have been taken. */
static inline uint64_t bit_position(const struct reader *r) {
    return 8 * r->dn - (uint64_t)(r->n - r->padded);
}

/* Whether any byte of w is 0xFF (a stuffed byte or a marker ahead). */
static inline int has_ff(uint64_t w) {
    uint64_t x = ~w;
    return ((x - 0x0101010101010101ull) & ~x & 0x8080808080808080ull) != 0;
}

static inline int has_ff32(uint32_t w) {
    uint32_t x = ~w;
    return ((x - 0x01010101u) & ~x & 0x80808080u) != 0;
}

static inline uint64_t load_be64(const uint8_t *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return __builtin_bswap64(w);
}

static inline void refill(struct reader *r) {
    if (r->n > 56)
        return;
    if (r->padded == 0 && r->end - r->p >= 8) {   /* whole bytes at once, where none is 0xFF */
        uint64_t w = load_be64(r->p);
        if (!has_ff(w)) {
            int bytes = (64 - r->n) >> 3;
            memcpy(r->d + r->dn, r->p, 8);
            r->dn += (uint64_t)bytes;
            r->buf |= (w >> (64 - 8 * bytes)) << (64 - r->n - 8 * bytes);
            r->p += bytes;
            r->n += 8 * bytes;
            return;
        }
    }
    while (r->n <= 56) {
        uint64_t b = 0;
        if (r->p < r->end && r->padded == 0) {
            b = *r->p;
            if (b == 0xFF) {
                if (r->p + 1 < r->end && r->p[1] == 0x00)
                    r->p += 2;
                else {                 /* a marker: the data ends here */
                    b = 0;
                    r->padded += 8;
                }
            } else
                r->p++;
            if (r->padded == 0)
                r->d[r->dn++] = (uint8_t)b;
        } else
            r->padded += 8;
        r->buf |= b << (56 - r->n);
        r->n += 8;
    }
}

static inline uint32_t take(struct reader *r, int s) {
    uint32_t v = s ? (uint32_t)(r->buf >> (64 - s)) : 0;
    r->buf <<= s;
    r->n -= s;
    return v;
}

/* The next symbol, or -1 for a code that is not in the table. */
static inline int decode(struct reader *r, const struct huff *h) {
    refill(r);
    uint16_t e = h->lookup[r->buf >> (64 - LOOKUP_BITS)];
    if (e) {
        take(r, e >> 8);
        return e & 0xFF;
    }
    for (int l = LOOKUP_BITS + 1; l <= 16; l++) {
        int32_t code = (int32_t)(r->buf >> (64 - l));
        if (code <= h->maxcode[l]) {
            take(r, l);
            return h->vals[code + h->offset[l]];
        }
    }
    return -1;
}

/* The next symbol and its extra bits, as symbol | bits << 8; -1 for a code
 * not in the table or more extra bits than any symbol has. */
static inline int32_t next(struct reader *r, const struct huff *h) {
    refill(r);
    uint32_t e = h->fast[r->buf >> (64 - LOOKUP_BITS)];
    if (e) {
        take(r, (int)(e >> 24));
        return (int32_t)(e & 0xFFFFFF);
    }
    int s = decode(r, h);
    if (s < 0 || extra(h, s) > 16)
        return -1;
    return (int32_t)((uint32_t)s | take(r, extra(h, s)) << 8);
}

/* The bits after the last symbol are padding to a byte boundary; then a
 * marker must follow. Returns the marker (after any 0xFF fill), or -1. */
static int marker_after(struct reader *r) {
    refill(r);
    if (r->padded == 0 || r->n - r->padded >= 8)
        return -1;                     /* whole bytes of data before the marker */
    while (r->p + 1 < r->end && r->p[1] == 0xFF)
        r->p++;
    if (r->p + 1 >= r->end)
        return -1;
    int m = r->p[1];
    r->p += 2;
    r->buf = 0;
    r->n = r->padded = 0;
    return m;
}

static inline int category(int32_t v) {
    uint32_t a = (uint32_t)(v < 0 ? -v : v);
    int s = 0;
    while (a) {
        s++;
        a >>= 1;
    }
    return s;
}

static inline uint32_t low_bits(int32_t v, int s) {   /* JPEG's coding of v in s bits */
    return (uint32_t)(v < 0 ? v - 1 : v) & ((1u << s) - 1);
}

struct writer {
    uint8_t *p, *end;
    uint64_t buf;
    int n;
};

/* Append the s low bits of v (s <= 32), stuffing a zero after each 0xFF. */
static inline void put(struct writer *w, uint32_t v, int s) {
    w->buf = (w->buf << s) | v;
    w->n += s;
    if (w->n < 32)
        return;
    uint32_t word = (uint32_t)(w->buf >> (w->n - 32));
    w->n -= 32;
    if (!has_ff32(word)) {
        word = __builtin_bswap32(word);
        memcpy(w->p, &word, 4);
        w->p += 4;
        return;
    }
    for (int i = 3; i >= 0; i--) {
        uint8_t b = (uint8_t)(word >> (8 * i));
        *w->p++ = b;
        if (b == 0xFF)
            *w->p++ = 0x00;
    }
}

static void pad(struct writer *w) {
    if (w->n % 8)
        put(w, (1u << (8 - w->n % 8)) - 1, 8 - w->n % 8);
    while (w->n >= 8) {   /* the whole bytes left */
        uint8_t b = (uint8_t)(w->buf >> (w->n - 8));
        *w->p++ = b;
        if (b == 0xFF)
            *w->p++ = 0x00;
        w->n -= 8;
    }
}

static void put_table(uint8_t **p, int cls, int slot, const JHUFF_TBL *t) {
    int count = 0;
    for (int l = 1; l <= 16; l++)
        count += t->bits[l];
    uint8_t *q = *p;
    q[0] = 0xFF; q[1] = 0xC4;
    q[2] = (uint8_t)((19 + count) >> 8); q[3] = (uint8_t)(19 + count);
    q[4] = (uint8_t)(cls << 4 | slot);
    memcpy(q + 5, t->bits + 1, 16);
    memcpy(q + 21, t->huffval, (size_t)count);
    *p = q + 21 + count;
}

/* t <- libjpeg's optimal table for the counts freq (which it clobbers), and
 * c <- its codes. 0, or -1 for counts that no code of 16 bits can take. */
static int optimal_table(long freq[257], JHUFF_TBL *t, struct code *c) {
    struct jpeg_compress_struct cinfo;   /* only its error manager is used */
    struct error_manager err;
    cinfo.err = quiet_errors(&err);
    if (setjmp(err.jump))
        return -1;
    jpeg_gen_optimal_table(&cinfo, t, freq);
    uint32_t code = 0;
    int k = 0;
    memset(c->size, 0, sizeof c->size);
    for (int l = 1; l <= 16; l++, code <<= 1)
        for (int i = 0; i < t->bits[l]; i++, k++, code++) {
            c->code[t->huffval[k]] = (uint16_t)code;
            c->size[t->huffval[k]] = (uint8_t)l;
        }
    return 0;
}

/* The bits the counts freq take in the codes of table h; UINT64_MAX when it lacks one. */
static uint64_t code_bits(const long freq[257], const struct huff *h) {
    uint64_t bits = 0;
    uint8_t size[256] = {0};
    for (int l = 1, k = 0; l <= 16; l++)
        for (int i = 0; i < h->bits[l]; i++, k++)
            size[h->vals[k]] = (uint8_t)l;
    for (int s = 0; s < 256; s++) {
        if (freq[s] && size[s] == 0)
            return UINT64_MAX;
        bits += (uint64_t)freq[s] * size[s];
    }
    return bits;
}

static int by_count(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* The bits of a Huffman code built for the counts freq and one more symbol
 * of count 1 (libjpeg's reserved code), that symbol's code included: at
 * most one code (16 bits) more than the counts take in libjpeg's optimal
 * table. Huffman's merges, two queues over the sorted counts, instead of
 * building libjpeg's table, whose quadratic search takes 70 us an AC table. */
static uint64_t huffman_bits(const long freq[257]) {
    uint64_t leaf[257], node[256], bits = 0;
    int n = 0, li = 0, ni = 0, nn = 0;
    for (int s = 0; s < 256; s++)
        if (freq[s])
            leaf[n++] = (uint64_t)freq[s];
    leaf[n++] = 1;
    qsort(leaf, (size_t)n, sizeof *leaf, by_count);
    for (int merges = 0; merges < n - 1; merges++) {
        uint64_t pair = 0;
        for (int i = 0; i < 2; i++)
            pair += li < n && (ni == nn || leaf[li] <= node[ni]) ? leaf[li++] : node[ni++];
        node[nn++] = pair;
        bits += pair;   /* every merge adds a bit to each count below it */
    }
    return bits;
}

/* t <- the source's table h, as it is. */
static void source_table(const struct huff *h, JHUFF_TBL *t) {
    int count = 0;
    for (int l = 1; l <= 16; l++)
        count += t->bits[l] = h->bits[l];
    memcpy(t->huffval, h->vals, (size_t)count);
}

/* Append n bits of the unstuffed data d from bit start (d has 8 bytes of room past them). */
static inline void copy_bits(struct writer *w, const uint8_t *d, uint64_t start, uint32_t n) {
    while (n) {
        uint32_t s = n < 32 ? n : 32;
        uint64_t x = load_be64(d + (start >> 3)) << (start & 7);
        put(w, (uint32_t)(x >> (64 - s)), (int)s);
        start += s;
        n -= s;
    }
}

struct frame {
    uint32_t width, height;
    int ncomp, hmax, vmax;
    int id[3], h[3], v[3], dc[3], ac[3];   /* ac/dc: table slots, from the scan */
    uint32_t mcus, rows, interval;         /* MCUs per row, MCU rows, the source's restart interval */
    uint64_t sos, data;                     /* offsets of the SOS segment and of the data after it */
};

/* Read the segments before the scan into f and the tables; 0, or -1 when
 * this is not a JPEG the splicer takes. */
static int read_header(const uint8_t *jpeg, uint64_t size, struct frame *f, struct huff dc[4],
                       struct huff ac[4]) {
    uint64_t p = 2;
    int have_frame = 0;
    memset(f, 0, sizeof *f);
    if (size < 4 || jpeg[0] != 0xFF || jpeg[1] != 0xD8)
        return -1;
    while (p + 4 <= size) {
        if (jpeg[p] != 0xFF)
            return -1;
        int m = jpeg[p + 1];
        if (m == 0xFF) {
            p++;
            continue;
        }
        uint64_t len = (uint64_t)jpeg[p + 2] << 8 | jpeg[p + 3];
        const uint8_t *s = jpeg + p + 4;
        if (len < 2 || p + 2 + len > size)
            return -1;
        uint64_t body = len - 2;
        if (m == 0xC0 || m == 0xC1) {
            if (have_frame || body < 6 || s[0] != 8)
                return -1;
            f->height = (uint32_t)s[1] << 8 | s[2];
            f->width = (uint32_t)s[3] << 8 | s[4];
            f->ncomp = s[5];
            if (f->width == 0 || f->height == 0 || (f->ncomp != 1 && f->ncomp != 3) ||
                body != 6 + 3 * (uint64_t)f->ncomp)
                return -1;
            f->hmax = f->vmax = 1;
            int blocks = 0;
            for (int c = 0; c < f->ncomp; c++) {
                f->id[c] = s[6 + 3 * c];
                f->h[c] = s[7 + 3 * c] >> 4;
                f->v[c] = s[7 + 3 * c] & 15;
                if (f->h[c] < 1 || f->h[c] > 4 || f->v[c] < 1 || f->v[c] > 4)
                    return -1;
                if (f->ncomp == 1)
                    f->h[c] = f->v[c] = 1;   /* one component: an MCU is one block */
                f->hmax = f->h[c] > f->hmax ? f->h[c] : f->hmax;
                f->vmax = f->v[c] > f->vmax ? f->v[c] : f->vmax;
                blocks += f->h[c] * f->v[c];
            }
            if (blocks > 10)
                return -1;
            have_frame = 1;
        } else if (m == 0xC4) {
            uint64_t q = 0;
            while (q < body) {
                if (q + 17 > body || (s[q] >> 4) > 1 || (s[q] & 15) > 3)
                    return -1;
                struct huff *h = (s[q] >> 4 ? ac : dc) + (s[q] & 15);
                h->ac = s[q] >> 4;
                int count = 0;
                h->bits[0] = 0;
                for (int l = 1; l <= 16; l++)
                    count += h->bits[l] = s[q + l];
                if (count > 256 || q + 17 + count > body)
                    return -1;
                memcpy(h->vals, s + q + 17, (size_t)count);
                if (build_decoder(h) != 0)
                    return -1;
                h->defined = 1;
                q += 17 + (uint64_t)count;
            }
        } else if (m == 0xDD) {
            if (body != 2)
                return -1;
            f->interval = (uint32_t)s[0] << 8 | s[1];
        } else if (m == 0xDA) {
            if (!have_frame || body < 1 || s[0] != f->ncomp || body != 4 + 2 * (uint64_t)f->ncomp)
                return -1;
            for (int c = 0; c < f->ncomp; c++) {
                int td = s[2 + 2 * c] >> 4, ta = s[2 + 2 * c] & 15;
                if (s[1 + 2 * c] != f->id[c] || td > 3 || ta > 3 || !dc[td].defined ||
                    !ac[ta].defined)
                    return -1;
                f->dc[c] = td;
                f->ac[c] = ta;
            }
            const uint8_t *t = s + 1 + 2 * f->ncomp;
            if (t[0] != 0 || t[1] != 63 || t[2] != 0)
                return -1;   /* not a sequential scan of all coefficients */
            f->sos = p;
            f->data = p + 2 + len;
            f->mcus = (f->width + 8 * f->hmax - 1) / (8 * f->hmax);
            f->rows = (f->height + 8 * f->vmax - 1) / (8 * f->vmax);
            return 0;
        } else if (!(m >= 0xE0 && m <= 0xEF) && m != 0xFE && m != 0xDB) {
            return -1;   /* another frame type, arithmetic coding, or a marker out of place */
        }
        p += 2 + len;
    }
    return -1;
}

/* Symbols as read: the symbol in the low byte, its extra bits above it;
 * END closes a block that reached its 64th coefficient without an EOB. */
#define END 0x1000000u

/* Where a block's AC symbols are: in the symbols read, and in the unstuffed data. */
struct block {
    uint64_t symbol, bit;
    uint32_t bits;
};

struct symbols {
    uint32_t *v;
    uint64_t n, room;
    struct block *block;
    uint64_t blocks, block_room;
};

/* Room for one more block (and its symbols, at most 65). 0, or -1. */
static int reserve(struct symbols *s) {
    if (s->room - s->n < 65) {
        uint64_t room = s->room * 2 + 65;
        uint32_t *grown = realloc(s->v, room * sizeof *grown);
        if (grown == NULL)
            return -1;
        s->v = grown;
        s->room = room;
    }
    if (s->blocks == s->block_room) {
        uint64_t room = s->block_room * 2 + 64;
        struct block *grown = realloc(s->block, room * sizeof *grown);
        if (grown == NULL)
            return -1;
        s->block = grown;
        s->block_room = room;
    }
    return 0;
}

/* One block's AC symbols into v, counted in freq: how many were written,
 * or -1. */
static inline int read_ac(struct reader *r, const struct huff *h, uint32_t *v, long freq[257]) {
    int i = 1, n = 0;
    while (i < 64) {
        int32_t e = next(r, h);
        if (e < 0)
            return -1;
        int rs = e & 0xFF, run = rs >> 4, sz = rs & 15;
        if (sz == 0 && run != 15) {   /* EOB */
            freq[0]++;
            v[n++] = 0;
            return n;
        }
        i += sz ? run + 1 : 16;       /* a value, or ZRL: sixteen zeros */
        if (sz > 10 || i > 64)
            return -1;
        freq[rs]++;
        v[n++] = (uint32_t)e;
    }
    v[n++] = END;
    return n;
}

/* Read every block's symbols, with each block's DC difference recomputed
 * for restart intervals of k MCUs, and count them per table; the data goes
 * to unstuffed (size + 8 bytes) on the way. 0, or -1. */
static int read_symbols(const uint8_t *jpeg, uint64_t size, const struct frame *f,
                        const struct huff dc[4], const struct huff ac[4], uint32_t k,
                        struct symbols *out, uint8_t *unstuffed, long dc_freq[4][257],
                        long ac_freq[4][257]) {
    struct reader r = {jpeg + f->data, jpeg + size, 0, 0, 0, unstuffed, 0};
    int32_t pred[3] = {0, 0, 0}, new_pred[3] = {0, 0, 0};
    uint64_t total = (uint64_t)f->mcus * f->rows;
    uint32_t restarts = 0;
    for (uint64_t m = 0; m < total; m++) {
        if (f->interval && m > 0 && m % f->interval == 0) {
            if (marker_after(&r) != 0xD0 + (int)(restarts++ % 8))
                return -1;
            pred[0] = pred[1] = pred[2] = 0;
        }
        if (m % k == 0)
            new_pred[0] = new_pred[1] = new_pred[2] = 0;
        for (int c = 0; c < f->ncomp; c++) {
            const struct huff *hd = dc + f->dc[c], *ha = ac + f->ac[c];
            for (int b = 0; b < f->h[c] * f->v[c]; b++) {
                int32_t e = next(&r, hd);
                int s = e & 0xFF;
                uint32_t bits = (uint32_t)e >> 8;
                if (e < 0 || s > 11 || reserve(out) != 0)
                    return -1;
                int32_t diff = s && bits < (1u << (s - 1)) ? (int32_t)bits - (int32_t)(1u << s) + 1
                                                           : (int32_t)bits;
                pred[c] += diff;
                int32_t d = pred[c] - new_pred[c];
                new_pred[c] = pred[c];
                int t = category(d);
                if (t > 11)
                    return -1;
                dc_freq[f->dc[c]][t]++;
                out->v[out->n++] = (uint32_t)t | low_bits(d, t) << 8;
                struct block *bl = out->block + out->blocks++;
                bl->symbol = out->n;
                bl->bit = bit_position(&r);
                int n = read_ac(&r, ha, out->v + out->n, ac_freq[f->ac[c]]);
                if (n < 0)
                    return -1;
                out->n += (uint64_t)n;
                bl->bits = (uint32_t)(bit_position(&r) - bl->bit);
            }
        }
        if (r.n < r.padded)
            return -1;                 /* read past the end of the data */
    }
    return marker_after(&r) == 0xD9 ? 0 : -1;
}

/* The JPEG with a restart marker every k MCUs (k the largest divisor of the
 * MCUs per row up to max_interval) and optimal Huffman tables, its segments
 * that decoding reads (APP0, APP14, DQT, SOF, SOS) kept. Returns its size,
 * TOO_SMALL when out_size is not enough, NOT_SPLICED for libjpeg's route. */
int64_t ffcv_dr_splice_restarts(const uint8_t *jpeg, uint64_t size, uint32_t max_interval,
                                uint8_t *out, uint64_t out_size) {
    struct frame f;
    struct symbols sym = {NULL, 0, 0, NULL, 0, 0};
    uint8_t *unstuffed = NULL;
    long dc_freq[4][257], ac_freq[4][257];
    int64_t result = NOT_SPLICED;
    struct huff *tables = malloc(8 * sizeof *tables);   /* DC slots 0-3, AC slots 0-3 */
    struct code *codes = malloc(8 * sizeof *codes);
    if (tables == NULL || codes == NULL || max_interval == 0)
        goto done;
    memset(tables, 0, 8 * sizeof *tables);
    if (read_header(jpeg, size, &f, tables, tables + 4) != 0)
        goto done;
    uint32_t k = max_interval;
    while (k > 1 && f.mcus % k)
        k--;
    sym.room = size + 4096;   /* about one symbol a byte in photos */
    sym.v = malloc(sym.room * sizeof *sym.v);
    unstuffed = malloc(size + 8);
    memset(dc_freq, 0, sizeof dc_freq);
    memset(ac_freq, 0, sizeof ac_freq);
    if (sym.v == NULL || unstuffed == NULL ||
        read_symbols(jpeg, size, &f, tables, tables + 4, k, &sym, unstuffed, dc_freq, ac_freq) != 0)
        goto done;

    /* optimal tables for the slots the scan uses; an AC slot keeps the
     * source's table where that codes its symbols in as few bits */
    JHUFF_TBL dc_out[4], ac_out[4];
    int used[8] = {0}, keep[4] = {0};
    for (int c = 0; c < f.ncomp; c++)
        used[f.dc[c]] = used[4 + f.ac[c]] = 1;
    for (int t = 0; t < 4; t++) {
        keep[t] = used[4 + t] && code_bits(ac_freq[t], tables + 4 + t) <= huffman_bits(ac_freq[t]);
        if (keep[t])
            source_table(tables + 4 + t, ac_out + t);
        if ((used[t] && optimal_table(dc_freq[t], dc_out + t, codes + t) != 0) ||
            (used[4 + t] && !keep[t] && optimal_table(ac_freq[t], ac_out + t, codes + 4 + t) != 0))
            goto done;
    }

    /* header: SOI, the segments decoding reads, DRI, DHT, SOS */
    if (f.data + 6 + 8 * (21 + 256) + 2 > out_size) {   /* at most the source's segments, DRI, DHT */
        result = TOO_SMALL;
        goto done;
    }
    uint8_t *q = out;
    *q++ = 0xFF;
    *q++ = 0xD8;
    for (uint64_t p = 2; p < f.sos;) {
        int m = jpeg[p + 1];
        if (m == 0xFF) {
            p++;
            continue;
        }
        uint64_t len = 2 + ((uint64_t)jpeg[p + 2] << 8 | jpeg[p + 3]);
        if (m == 0xE0 || m == 0xEE || m == 0xDB || m == 0xC0 || m == 0xC1) {
            memcpy(q, jpeg + p, len);
            q += len;
        }
        p += len;
    }
    uint8_t dri[6] = {0xFF, 0xDD, 0x00, 0x04, (uint8_t)(k >> 8), (uint8_t)k};
    memcpy(q, dri, 6);
    q += 6;
    for (int t = 0; t < 4; t++) {
        if (used[t])
            put_table(&q, 0, t, dc_out + t);
        if (used[4 + t])
            put_table(&q, 1, t, ac_out + t);
    }
    memcpy(q, jpeg + f.sos, f.data - f.sos);
    q += f.data - f.sos;

    /* the symbols again, with markers: an MCU's blocks take at most
     * 10 * 64 codes of 16 + 11 bits, doubled by stuffing */
    struct writer w = {q, out + out_size, 0, 0};
    uint64_t total = (uint64_t)f.mcus * f.rows;
    const struct block *bl = sym.block;
    const uint64_t mcu_room = 10 * 64 * 27 / 8 * 2 + 16;
    for (uint64_t m = 0; m < total; m++) {
        if ((uint64_t)(w.end - w.p) < mcu_room) {
            result = TOO_SMALL;
            goto done;
        }
        if (m > 0 && m % k == 0) {
            pad(&w);
            *w.p++ = 0xFF;
            *w.p++ = (uint8_t)(0xD0 + (m / k - 1) % 8);
        }
        for (int c = 0; c < f.ncomp; c++) {
            const struct code *cd = codes + f.dc[c], *ca = codes + 4 + f.ac[c];
            for (int b = 0; b < f.h[c] * f.v[c]; b++, bl++) {
                uint64_t i = bl->symbol;
                uint32_t v = sym.v[i - 1];
                int s = v & 0xFF;
                put(&w, (uint32_t)cd->code[s] << s | v >> 8, cd->size[s] + s);
                if (keep[f.ac[c]]) {
                    copy_bits(&w, unstuffed, bl->bit, bl->bits);
                    continue;
                }
                for (;;) {
                    v = sym.v[i++];
                    if (v == END)
                        break;
                    int rs = v & 0xFF;
                    put(&w, (uint32_t)ca->code[rs] << (rs & 15) | v >> 8, ca->size[rs] + (rs & 15));
                    if (rs == 0)
                        break;
                }
            }
        }
    }
    pad(&w);
    *w.p++ = 0xFF;
    *w.p++ = 0xD9;
    result = (int64_t)(w.p - out);
done:
    free(sym.v);
    free(sym.block);
    free(unstuffed);
    free(codes);
    free(tables);
    return result;
}
