/* Timers for benchmarks/region_profile.py: the region decoder's stages on
 * one JPEG, each the fastest of reps runs. Built with ffcv_dr/_jpeg.c
 * itself, so the piece timed is the one the loader cuts. */
#include "../ffcv_dr/_jpeg.c"
#include <time.h>

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The piece region_piece cuts (malloc'd; NULL when the JPEG is not seekable
 * or the region needs all of it), with its size and offset. */
uint8_t *profile_piece(const uint8_t *jpeg, uint64_t size, uint32_t denom, uint32_t top,
                       uint32_t height, uint32_t left, uint32_t width, uint64_t *piece_size,
                       uint32_t *dy, uint32_t *dx) {
    struct layout l;
    if (read_layout(jpeg, size, &l) != 0)
        return NULL;
    return region_piece(jpeg, size, &l, denom, top, height, left, width, piece_size, dy, dx);
}

/* Seconds to decode the region: through the splice path (ffcv_dr_decode_region)
 * when spliced is set, else libjpeg's decode of the JPEG as it is. */
double profile_decode(const uint8_t *jpeg, uint64_t size, uint32_t denom, uint32_t top,
                      uint32_t height, uint32_t left, uint32_t width, uint8_t *out,
                      uint64_t out_size, int spliced, int reps) {
    double best = 1e9;
    uint32_t geometry[2];
    for (int r = 0; r < reps; r++) {
        double start = seconds();
        int status = spliced ? ffcv_dr_decode_region(jpeg, size, 0, 0, denom, top, height, left, width,
                                                     out, out_size, geometry)
                             : decode_region(jpeg, size, 0, 0, denom, top, height, left, width,
                                             out, out_size, geometry);
        double t = seconds() - start;
        if (status != 0)
            return -1.0;
        if (t < best) best = t;
    }
    return best;
}

/* Seconds to cut the piece (reading the layout included). */
double profile_cut(const uint8_t *jpeg, uint64_t size, uint32_t denom, uint32_t top,
                   uint32_t height, uint32_t left, uint32_t width, int reps) {
    double best = 1e9;
    for (int r = 0; r < reps; r++) {
        uint64_t n;
        uint32_t dy, dx;
        double start = seconds();
        free(profile_piece(jpeg, size, denom, top, height, left, width, &n, &dy, &dx));
        double t = seconds() - start;
        if (t < best) best = t;
    }
    return best;
}

/* Seconds for libjpeg's entropy decoding alone: jpeg_read_coefficients. */
double profile_entropy(const uint8_t *jpeg, uint64_t size, int reps) {
    double best = 1e9;
    for (int r = 0; r < reps; r++) {
        struct jpeg_decompress_struct cinfo;
        struct error_manager err;
        double start = seconds();
        cinfo.err = quiet_errors(&err);
        if (setjmp(err.jump)) {
            jpeg_destroy_decompress(&cinfo);
            return -1.0;
        }
        jpeg_create_decompress(&cinfo);
        jpeg_mem_src(&cinfo, jpeg, (unsigned long)size);
        jpeg_read_header(&cinfo, TRUE);
        jpeg_read_coefficients(&cinfo);
        jpeg_destroy_decompress(&cinfo);
        double t = seconds() - start;
        if (t < best) best = t;
    }
    return best;
}
