/* Antialiased resize of a crop with OpenCV, for the replay decoder.
 *
 * ml-dr resizes crops with PIL's bilinear filter, which widens its triangle
 * with the downscale factor f (variance f^2 / 6). OpenCV's INTER_AREA costs
 * several times its INTER_LINEAR when f is not an integer, and plain
 * INTER_LINEAR aliases. A blur of variance (f^2 - 1) / 6 followed by
 * INTER_LINEAR (whose triangle has variance 1/6) gives PIL's variance at
 * about a third of INTER_AREA's cost, and closer to PIL's pixels.
 * Called from numba kernels by symbol name (see ffcv_dr/jpeg.py).
 */
#include <Python.h>
#include <stdint.h>
#include <cmath>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

/* The blur along an axis scaled down by f: none when f <= 1; three taps
 * [a, 1 - 2a, a] (variance 2a) up to f = 2; a Gaussian beyond. */
static cv::Mat prefilter(double f) {
    double v = (f * f - 1.0) / 6.0;
    if (v <= 0.0)
        return cv::Mat();
    if (v <= 0.5) {
        double a = v / 2.0;
        return (cv::Mat_<float>(3, 1) << a, 1.0 - 2.0 * a, a);
    }
    double sigma = std::sqrt(v);
    return cv::getGaussianKernel(2 * (int)std::ceil(3.0 * sigma) + 1, sigma, CV_32F);
}

extern "C" {

/* dst (out_h x out_w RGB) <- rows [y0, y1) and columns [x0, x1) of src
 * (src_h x src_w RGB, rows contiguous), resized. The crop is blurred in
 * place and, as PIL sees a cropped image, its edges are replicated rather
 * than read from around it. Returns 0, or -1 when OpenCV fails. */
int ffcv_dr_resize_crop(uint8_t *src, uint32_t src_h, uint32_t src_w, uint32_t y0, uint32_t y1,
                   uint32_t x0, uint32_t x1, uint8_t *dst, uint32_t out_h, uint32_t out_w) {
    try {
        cv::Mat image((int)src_h, (int)src_w, CV_8UC3, src);
        cv::Mat crop = image(cv::Range((int)y0, (int)y1), cv::Range((int)x0, (int)x1));
        cv::Mat out((int)out_h, (int)out_w, CV_8UC3, dst);
        cv::Mat kx = prefilter((double)(x1 - x0) / out_w), ky = prefilter((double)(y1 - y0) / out_h);
        if (!kx.empty() || !ky.empty()) {
            cv::Mat one = (cv::Mat_<float>(1, 1) << 1.0f);
            cv::sepFilter2D(crop, crop, -1, kx.empty() ? one : kx, ky.empty() ? one : ky,
                            cv::Point(-1, -1), 0, cv::BORDER_REPLICATE | cv::BORDER_ISOLATED);
        }
        cv::resize(crop, out, out.size(), 0, 0, cv::INTER_LINEAR);
        return 0;
    } catch (...) {
        return -1;
    }
}

}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_resize",
    "OpenCV antialiased crop resizing; the function is called from numba", -1, NULL};

PyMODINIT_FUNC PyInit__resize(void) { return PyModule_Create(&module); }
