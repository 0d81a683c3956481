/* Region decoding with libjpeg-turbo, for the replay decoder.
 *
 * A stored crop says in advance which rows and columns are needed. libjpeg
 * can skip the inverse DCT, upsampling and colour conversion outside them
 * (jpeg_crop_scanline, jpeg_skip_scanlines), stop after the last needed row
 * and scale by 1/2, 1/4 or 1/8 inside the IDCT. It must still Huffman-decode
 * every block above and beside the crop, because each block's DC value is
 * coded as a difference from the one before. Restart markers reset that
 * chain: in a baseline JPEG whose restart intervals divide its MCU rows, the
 * intervals covering a crop (plus one MCU of margin, which the chroma
 * upsampling reads) are copied into a small JPEG of their own (same tables,
 * smaller frame, renumbered markers) that libjpeg decodes to the same pixels.
 * The writer adds such markers losslessly: symbol by symbol where it can
 * (_restarts.c), else from the DCT coefficients (ffcv_dr_add_restarts).
 * FFCV's libffcv only offers a lossless transform before decoding, which
 * costs more than it saves. Called from numba kernels by symbol name (see
 * ffcv_dr/jpeg.py), and from Python through ctypes.
 */
#include <Python.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

#include "_jpeg_errors.h"

/* Today's path, on any JPEG: decode rows [top, top + height) and at least
 * columns [left, left + width) of the JPEG scaled by 1/denom, as RGB, into
 * out (row stride 3 * the decoded width). The columns are widened by an iMCU
 * and to iMCU boundaries: geometry[0]
 * receives the first decoded column and geometry[1] the decoded width.
 * Returns 0, or -1 when the JPEG is corrupt, is not image_width x
 * image_height (unless those are 0) or the region does not fit. */
static int decode_region(const uint8_t *jpeg, uint64_t size, uint32_t image_width,
                  uint32_t image_height, uint32_t denom,
                  uint32_t top, uint32_t height, uint32_t left, uint32_t width,
                  uint8_t *out, uint64_t out_size, uint32_t *geometry) {
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    JSAMPROW rows[16];
    cinfo.err = quiet_errors(&err);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, jpeg, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    if (image_width && (cinfo.image_width != image_width || cinfo.image_height != image_height)) {
        jpeg_destroy_decompress(&cinfo);   /* the file's metadata says otherwise: damage */
        return -1;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = denom;
    jpeg_start_decompress(&cinfo);
    if (height == 0 || width == 0 || top + height > cinfo.output_height ||
        left + width > cinfo.output_width) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    /* One iMCU more on each side: fancy upsampling reads a neighbour beyond
     * the decoded columns, which a tighter crop would replicate instead. */
    JDIMENSION margin = (JDIMENSION)(cinfo.max_h_samp_factor * cinfo.min_DCT_scaled_size);
    JDIMENSION x = left > margin ? left - margin : 0;
    JDIMENSION w = (left + width + margin < cinfo.output_width ? left + width + margin
                                                                : cinfo.output_width) - x;
    if (x > 0 || w < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &x, &w);
    if ((uint64_t)height * w * 3 > out_size) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if (top > 0)
        jpeg_skip_scanlines(&cinfo, top);
    while (cinfo.output_scanline < top + height) {
        JDIMENSION done = cinfo.output_scanline - top;
        JDIMENSION n = top + height - cinfo.output_scanline;
        if (n > 16) n = 16;
        for (JDIMENSION r = 0; r < n; r++)
            rows[r] = out + (uint64_t)(done + r) * w * 3;
        jpeg_read_scanlines(&cinfo, rows, n);
    }
    geometry[0] = x;
    geometry[1] = w;
    jpeg_destroy_decompress(&cinfo);  /* stops here: the rows below are never decoded */
    return 0;
}


/* The layout of a JPEG whose restart intervals can be cut out: baseline or
 * extended sequential Huffman, 8-bit, one scan holding every component, and
 * a restart interval that divides the MCUs of a row, so that every MCU row
 * starts a new interval. */
struct layout {
    uint32_t width, height;      /* the image's */
    uint32_t mcu_w, mcu_h;       /* an MCU's size in pixels */
    uint32_t mcus, rows;         /* MCUs per row, MCU rows */
    uint32_t interval;           /* MCUs per restart interval */
    uint64_t data;               /* offset of the entropy-coded data */
};

/* Fill l from the header; 0 when the JPEG is seekable, else -1. */
static int read_layout(const uint8_t *jpeg, uint64_t size, struct layout *l) {
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    int ok = 0;
    cinfo.err = quiet_errors(&err);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, jpeg, (unsigned long)size);
    if (jpeg_read_header(&cinfo, TRUE) == JPEG_HEADER_OK && !cinfo.progressive_mode &&
        !cinfo.arith_code && cinfo.data_precision == 8 && cinfo.restart_interval > 0 &&
        (cinfo.num_components == 1 || cinfo.num_components == 3) &&
        cinfo.comps_in_scan == cinfo.num_components) {
        int h = 1, v = 1;
        for (int c = 0; c < cinfo.num_components && cinfo.num_components > 1; c++) {
            if (cinfo.comp_info[c].h_samp_factor > h) h = cinfo.comp_info[c].h_samp_factor;
            if (cinfo.comp_info[c].v_samp_factor > v) v = cinfo.comp_info[c].v_samp_factor;
        }
        l->width = cinfo.image_width;
        l->height = cinfo.image_height;
        l->mcu_w = 8 * (uint32_t)h;   /* one component: an MCU is one block */
        l->mcu_h = 8 * (uint32_t)v;
        l->mcus = (cinfo.image_width + l->mcu_w - 1) / l->mcu_w;
        l->rows = (cinfo.image_height + l->mcu_h - 1) / l->mcu_h;
        l->interval = cinfo.restart_interval;
        l->data = (uint64_t)(cinfo.src->next_input_byte - jpeg);
        ok = l->mcus % l->interval == 0 && l->data < size;
    }
    jpeg_destroy_decompress(&cinfo);
    return ok ? 0 : -1;
}

/* Offsets of restart intervals 0..count-1 of the entropy-coded data:
 * start[g] and end[g] (exclusive; the marker after it begins there). Every
 * marker is checked against its expected number. 0, or -1 when the data
 * holds fewer intervals or misnumbered markers. */
static int find_intervals(const uint8_t *jpeg, uint64_t size, uint64_t data, uint64_t count,
                          uint64_t *start, uint64_t *end) {
    uint64_t g = 0, p = data;
    start[0] = data;
    while (p + 1 < size) {
        const uint8_t *hit = memchr(jpeg + p, 0xFF, size - 1 - p);
        if (hit == NULL)
            return -1;
        p = (uint64_t)(hit - jpeg);
        uint8_t next = jpeg[p + 1];
        if (next == 0x00 || next == 0xFF) {   /* a stuffed 0xFF, or fill before a marker */
            p += next == 0x00 ? 2 : 1;
            continue;
        }
        end[g] = p;
        if (g + 1 == count)
            return 0;                          /* the interval we need last ends here */
        if (next != 0xD0 + g % 8)
            return -1;                         /* the scan ends early or is misnumbered */
        start[++g] = p + 2;
        p += 2;
    }
    return -1;
}

static void put16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* A JPEG of MCU rows [r0, r1) and columns [c0, c1) of a seekable JPEG (c0
 * and c1 on interval boundaries): its header segments that decoding needs,
 * the frame's size changed, then those intervals with renumbered markers.
 * Returns a malloc'd buffer (its size in *out_size), or NULL. */
static uint8_t *cut(const uint8_t *jpeg, uint64_t size, const struct layout *l, uint32_t width,
                    uint32_t height, uint32_t r0, uint32_t r1, uint32_t c0, uint32_t c1,
                    uint64_t *out_size) {
    uint64_t per_row = l->mcus / l->interval, i0 = c0 / l->interval, i1 = c1 / l->interval;
    uint64_t count = (uint64_t)(r1 - 1) * per_row + i1;   /* intervals up to the last one we need */
    uint64_t *start = malloc(2 * count * sizeof(uint64_t)), *end = start + count;
    uint8_t *out = NULL;
    if (start == NULL || find_intervals(jpeg, size, l->data, count, start, end) != 0)
        goto done;
    uint64_t bytes = l->data + 2;
    for (uint32_t r = r0; r < r1; r++)
        bytes += end[r * per_row + i1 - 1] - start[r * per_row + i0] + 2 * (i1 - i0);
    out = malloc(bytes);
    if (out == NULL)
        goto done;
    uint64_t n = 0, p = 2, copied = 0;
    out[n++] = 0xFF;
    out[n++] = 0xD8;
    while (p + 4 <= l->data) {   /* the header, already read by libjpeg: copy what decoding uses */
        if (jpeg[p] != 0xFF) {
            free(out);
            out = NULL;
            goto done;
        }
        uint8_t m = jpeg[p + 1];
        if (m == 0xFF) {
            p++;
            continue;
        }
        uint64_t len = ((uint64_t)jpeg[p + 2] << 8 | jpeg[p + 3]) + 2;
        if (p + len > l->data)
            break;
        if (m == 0xDB || m == 0xC4 || m == 0xDD || m == 0xDA || m == 0xE0 || m == 0xEE ||
            m == 0xC0 || m == 0xC1) {
            memcpy(out + n, jpeg + p, len);
            if ((m == 0xC0 || m == 0xC1) && len >= 9) {
                put16(out + n + 5, height);
                put16(out + n + 7, width);
            }
            n += len;
        }
        p += len;
    }
    if (p != l->data) {   /* the segments must end where the entropy-coded data begins */
        free(out);
        out = NULL;
        goto done;
    }
    for (uint32_t r = r0; r < r1; r++)
        for (uint64_t i = i0; i < i1; i++) {
            uint64_t g = r * per_row + i;
            if (copied) {   /* not the first interval: a marker before it */
                out[n++] = 0xFF;
                out[n++] = (uint8_t)(0xD0 + (copied - 1) % 8);
            }
            copied++;
            memcpy(out + n, jpeg + start[g], end[g] - start[g]);
            n += end[g] - start[g];
        }
    out[n++] = 0xFF;
    out[n++] = 0xD9;
    *out_size = n;
done:
    free(start);
    return out;
}

/* The piece of a seekable JPEG (layout l) that rows [top, top + height)
 * and columns [left, left + width) of its 1/denom scale need: the intervals
 * covering them with one MCU of margin on each inner side, cut into a JPEG
 * of their own (malloc'd, *size bytes) whose pixel (0, 0) is the scaled
 * image's (*dy, *dx). NULL when the region is outside the image, needs
 * every interval, or the markers do not check out. */
static uint8_t *region_piece(const uint8_t *jpeg, uint64_t size, const struct layout *l,
                             uint32_t denom, uint32_t top, uint32_t height, uint32_t left,
                             uint32_t width, uint64_t *piece_size, uint32_t *dy, uint32_t *dx) {
    uint32_t sw = l->mcu_w / denom, sh = l->mcu_h / denom;
    uint32_t c_first = left / sw, c_last = (left + width - 1) / sw;
    uint32_t r_first = top / sh, r_last = (top + height - 1) / sh;
    if (c_last >= l->mcus || r_last >= l->rows)
        return NULL;
    uint32_t c0 = (c_first ? c_first - 1 : 0) / l->interval * l->interval;
    uint32_t c1 = c_last + 2 < l->mcus ? c_last + 2 : l->mcus;
    c1 = (c1 + l->interval - 1) / l->interval * l->interval;
    uint32_t r0 = r_first ? r_first - 1 : 0;
    uint32_t r1 = r_last + 2 < l->rows ? r_last + 2 : l->rows;
    if (c0 == 0 && c1 == l->mcus && r0 == 0 && r1 == l->rows)
        return NULL;
    /* the piece's size: whole MCUs, except where it reaches the image's edge */
    uint32_t w = c1 < l->mcus ? (c1 - c0) * l->mcu_w : l->width - c0 * l->mcu_w;
    uint32_t h = r1 < l->rows ? (r1 - r0) * l->mcu_h : l->height - r0 * l->mcu_h;
    *dx = c0 * sw;
    *dy = r0 * sh;
    return cut(jpeg, size, l, w, h, r0, r1, c0, c1, piece_size);
}

/* Decode rows [top, top + height) and at least columns [left, left + width)
 * of the JPEG scaled by 1/denom, as RGB, into out (row stride 3 * the
 * decoded width). The columns are widened to iMCU boundaries: geometry[0]
 * receives the first decoded column and geometry[1] the decoded width.
 * A seekable JPEG is cut to the intervals the region needs (region_piece:
 * the pixels returned are those of a full decode); any other JPEG, or one
 * whose markers do not check out, is decoded as it is. Returns 0, or -1
 * when the JPEG is corrupt, is not image_width x image_height as the file's
 * metadata says (unless those are 0), or the region does not fit. */
int ffcv_dr_decode_region(const uint8_t *jpeg, uint64_t size, uint32_t image_width,
                          uint32_t image_height, uint32_t denom,
                          uint32_t top, uint32_t height, uint32_t left, uint32_t width,
                          uint8_t *out, uint64_t out_size, uint32_t *geometry) {
    struct layout l;
    if (height > 0 && width > 0 && (denom == 1 || denom == 2 || denom == 4 || denom == 8) &&
        read_layout(jpeg, size, &l) == 0) {
        if (image_width && (l.width != image_width || l.height != image_height))
            return -1;
        uint64_t n = 0;
        uint32_t dy = 0, dx = 0;
        uint8_t *piece = region_piece(jpeg, size, &l, denom, top, height, left, width, &n, &dy, &dx);
        if (piece != NULL) {
            int status = decode_region(piece, n, 0, 0, denom, top - dy, height, left - dx, width,
                                       out, out_size, geometry);
            free(piece);
            if (status == 0) {
                geometry[0] += dx;
                return 0;
            }
        }
    }
    return decode_region(jpeg, size, image_width, image_height, denom, top, height, left, width, out,
                         out_size, geometry);
}

/* Rewrite a JPEG losslessly, from its DCT coefficients, as a baseline JPEG
 * with optimized Huffman tables and a restart marker every k MCUs, k the
 * largest divisor of the MCUs per row not above max_interval: decoding it
 * gives exactly the original's pixels. Progressive JPEGs become baseline.
 * The route for what the splicer (_restarts.c) does not take. Returns the new size (written to out, of out_size bytes), 0 when the JPEG
 * is not one this applies to (not 8-bit, not 1 or 3 components, corrupt
 * data that libjpeg would pad), -1 when libjpeg fails, -2 when out is too
 * small. */
int64_t ffcv_dr_add_restarts(const uint8_t *jpeg, uint64_t size, uint32_t max_interval,
                             uint8_t *out, uint64_t out_size) {
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    struct error_manager err;
    unsigned char *buf = NULL;
    unsigned long buf_size = 0;
    int64_t result = 0;
    memset(&src, 0, sizeof src);
    memset(&dst, 0, sizeof dst);
    src.err = dst.err = quiet_errors(&err);
    if (setjmp(err.jump)) {
        result = -1;
        goto done;
    }
    jpeg_create_decompress(&src);
    jpeg_create_compress(&dst);
    jpeg_mem_src(&src, jpeg, (unsigned long)size);
    jpeg_read_header(&src, TRUE);
    if (src.data_precision != 8 || (src.num_components != 1 && src.num_components != 3))
        goto done;
    jvirt_barray_ptr *coefficients = jpeg_read_coefficients(&src);
    if (err.pub.num_warnings)
        goto done;   /* damaged: keep the original, decoded as it always was */
    jpeg_copy_critical_parameters(&src, &dst);
    int h = 1;
    for (int c = 0; c < src.num_components && src.num_components > 1; c++)
        if (src.comp_info[c].h_samp_factor > h) h = src.comp_info[c].h_samp_factor;
    uint32_t mcus = (src.image_width + 8 * h - 1) / (8 * h), k = max_interval;
    while (k > 1 && mcus % k)
        k--;
    dst.restart_interval = k;
    dst.optimize_coding = TRUE;
    jpeg_mem_dest(&dst, &buf, &buf_size);
    jpeg_write_coefficients(&dst, coefficients);
    jpeg_finish_compress(&dst);
    jpeg_finish_decompress(&src);
    if (err.pub.num_warnings)
        result = 0;
    else if (buf_size > out_size)
        result = -2;
    else {
        memcpy(out, buf, buf_size);
        result = (int64_t)buf_size;
    }
done:
    jpeg_destroy_compress(&dst);
    jpeg_destroy_decompress(&src);
    free(buf);
    return result;
}

/* 1 when decode_region cuts this JPEG to a crop's intervals, else 0. */
int ffcv_dr_seekable(const uint8_t *jpeg, uint64_t size) {
    struct layout l;
    return read_layout(jpeg, size, &l) == 0;
}

/* Read the JPEG's header into info (width, height, colour components, bits
 * per sample) and, if decode is set, decode the whole image at 1/8 scale,
 * discarding the pixels, to check it. Returns -1 when libjpeg gives up, else
 * the number of warnings (corrupt data, premature end of file: libjpeg
 * decodes through those, padding with grey). */
int ffcv_dr_check_jpeg(const uint8_t *jpeg, uint64_t size, int decode, uint32_t *info) {
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    JSAMPROW row = NULL;
    cinfo.err = quiet_errors(&err);
    if (setjmp(err.jump)) {
        free(row);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, jpeg, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    info[0] = cinfo.image_width;
    info[1] = cinfo.image_height;
    info[2] = (uint32_t)cinfo.num_components;
    info[3] = (uint32_t)cinfo.data_precision;
    if (!decode) {
        jpeg_destroy_decompress(&cinfo);
        return 0;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = 8;
    jpeg_start_decompress(&cinfo);
    row = malloc((size_t)cinfo.output_width * 3);
    if (row == NULL) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    while (cinfo.output_scanline < cinfo.output_height)
        jpeg_read_scanlines(&cinfo, &row, 1);
    jpeg_finish_decompress(&cinfo);
    int warnings = (int)err.pub.num_warnings;
    free(row);
    jpeg_destroy_decompress(&cinfo);
    return warnings;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpeg",
    "libjpeg-turbo region decoding; the functions are called from numba and ctypes", -1, NULL};

PyMODINIT_FUNC PyInit__jpeg(void) { return PyModule_Create(&module); }
