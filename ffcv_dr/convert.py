"""``ffcv-dr convert``: an ImageFolder plus ml-dr reinforcements into one ``.beton``.

Three passes, each with a progress bar:
1. image headers (size, format, colour mode) to know the box space of every
   image and which ones need re-encoding (in parallel for large folders);
2. for a ``.tar``/``.tar.gz`` archive only: stream it once, validate every
   pickle and keep the compact records in memory-mapped scratch files;
3. FFCV's ``DatasetWriter`` (see :class:`_Writer`) writes the file under a
   temporary name, which is renamed only once everything is written and checked.
"""
from __future__ import annotations

import os
import shutil

from .intake import image_sizes, list_images, probe_images, readable
from .jobs import ConvertError, OutputLock, check_output, scratch_dir
from .mldr import DirectorySource, MldrError, TarSource, compile_here
from .storage import Storage
from .writer import FolderImages, output_dir, write_beton

__all__ = ['ConvertError', 'convert']


def convert(images_dir: str, output: str, mldr: str, num_workers: int = None,
            num_classes: int = None, skip_bad: bool = False, storage: Storage = Storage()) -> dict:
    """Write ``output`` from an ImageFolder and ml-dr reinforcements (dir or archive),
    the images stored as ``storage`` says. With ``skip_bad``, unreadable
    images are left out and listed in ``skipped``."""
    num_workers = num_workers or os.cpu_count()
    output_dir(output)
    if not os.path.exists(mldr):
        raise ConvertError(f'{mldr}: no such file or directory')
    check_output(output, [images_dir, mldr])
    with OutputLock(output):
        return _convert(images_dir, output, mldr, num_workers, num_classes, skip_bad, storage)


def _convert(images_dir, output, mldr, num_workers, num_classes, skip_bad, storage):
    images = list_images(images_dir, num_classes)
    n = len(images.paths)
    probes = probe_images(images, storage.max_resolution, num_workers, skip_bad)
    sizes = image_sizes(probes)
    images, probes, skipped = readable(images, probes)
    scratch = scratch_dir(output)
    try:
        compile_here()
        if os.path.isdir(mldr):
            source = DirectorySource(mldr, n, images.num_classes, sizes)
        else:
            source = TarSource(mldr, n, images.num_classes, sizes, scratch, num_workers)
        result = write_beton(output, FolderImages(images, probes, storage), source, scratch, num_workers)
        return {**result, 'skipped': skipped}
    except MldrError as e:
        raise ConvertError(str(e)) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
