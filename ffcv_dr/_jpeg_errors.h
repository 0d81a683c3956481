/* libjpeg's error manager for ffcv-dr's C files: errors jump back to the
 * caller's setjmp, and nothing is printed. */
#include <setjmp.h>
#include <stdio.h>
#include <jpeglib.h>

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

static void on_error(j_common_ptr cinfo) {
    longjmp(((struct error_manager *)cinfo->err)->jump, 1);
}

static void on_message(j_common_ptr cinfo) { (void)cinfo; }

static inline struct jpeg_error_mgr *quiet_errors(struct error_manager *err) {
    jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.output_message = on_message;
    return &err->pub;
}
