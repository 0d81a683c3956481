/* Region decoding with libjpeg-turbo, for the replay decoder.
 *
 * A stored crop says in advance which rows and columns are needed. libjpeg
 * can skip the inverse DCT, upsampling and colour conversion outside them
 * (jpeg_crop_scanline, jpeg_skip_scanlines), stop after the last needed row
 * and scale by 1/2, 1/4 or 1/8 inside the IDCT. FFCV's libffcv only offers a
 * lossless transform before decoding, which costs more than it saves.
 * Called from numba kernels by symbol name (see ffcv_dr/jpeg.py), and from
 * Python through ctypes.
 */
#include <Python.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <jpeglib.h>

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

static void on_error(j_common_ptr cinfo) {
    longjmp(((struct error_manager *)cinfo->err)->jump, 1);
}

static void on_message(j_common_ptr cinfo) { (void)cinfo; }

/* Decode rows [top, top + height) and at least columns [left, left + width)
 * of the JPEG scaled by 1/denom, as RGB, into out (row stride 3 * the
 * decoded width). The columns are widened to iMCU boundaries: geometry[0]
 * receives the first decoded column and geometry[1] the decoded width.
 * Returns 0, or -1 when the JPEG is corrupt or the region does not fit. */
int ffcv_dr_decode_region(const uint8_t *jpeg, uint64_t size, uint32_t denom,
                  uint32_t top, uint32_t height, uint32_t left, uint32_t width,
                  uint8_t *out, uint64_t out_size, uint32_t *geometry) {
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    JSAMPROW rows[16];
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.output_message = on_message;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, jpeg, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = denom;
    jpeg_start_decompress(&cinfo);
    if (height == 0 || width == 0 || top + height > cinfo.output_height ||
        left + width > cinfo.output_width) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    JDIMENSION x = left, w = width;
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

/* Read the JPEG's header into info (width, height, colour components, bits
 * per sample) and, if decode is set, decode the whole image at 1/8 scale,
 * discarding the pixels, to check it. Returns -1 when libjpeg gives up, else
 * the number of warnings (corrupt data, premature end of file: libjpeg
 * decodes through those, padding with grey). */
int ffcv_dr_check_jpeg(const uint8_t *jpeg, uint64_t size, int decode, uint32_t *info) {
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    JSAMPROW row = NULL;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.output_message = on_message;
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
