"""The one C extension: libjpeg-turbo region decoding (ffcv_dr/_jpeg.c)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension('ffcv_dr._jpeg', ['ffcv_dr/_jpeg.c'], libraries=['jpeg'])])
