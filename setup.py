"""The C extensions, called from numba through ctypes: libjpeg-turbo region
decoding (ffcv_dr/_jpeg.c) and OpenCV crop resizing (ffcv_dr/_resize.cpp),
built against the system libraries FFCV itself links."""
import subprocess

from setuptools import Extension, setup


def opencv_flags():
    try:
        cflags, libs = (subprocess.check_output(['pkg-config', flag, 'opencv4'], text=True).split()
                        for flag in ('--cflags', '--libs-only-L'))
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f'ffcv-dr needs OpenCV 4 found by pkg-config (as FFCV does): {e}')
    return dict(include_dirs=[f[2:] for f in cflags if f.startswith('-I')],
                library_dirs=[f[2:] for f in libs if f.startswith('-L')])


setup(ext_modules=[
    Extension('ffcv_dr._jpeg', ['ffcv_dr/_jpeg.c', 'ffcv_dr/_restarts.c'], libraries=['jpeg'],
              depends=['ffcv_dr/_jpeg_errors.h']),
    Extension('ffcv_dr._resize', ['ffcv_dr/_resize.cpp'], libraries=['opencv_imgproc', 'opencv_core'],
              extra_compile_args=['-O3'], **opencv_flags()),
])
