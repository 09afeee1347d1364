"""Datasets of (image, binary target mask) pairs for prompting episodes.

Every builder returns a :class:`Dataset`, a list of :class:`Sample` objects. Masks are read,
converted to ``bool`` ``(H, W)`` arrays and validated once, when the dataset is built; images
are only *opened* then (to read their size, so that size mismatches fail early) and decoded
lazily by :meth:`Sample.load_image`.

Conventions shared by all loaders:

* Images are ``(H, W, 3)`` ``uint8`` RGB after the EXIF orientation has been applied
  (``PIL.ImageOps.exif_transpose``); masks and label maps get the same transpose, so a mask
  drawn on the image *as displayed* lines up with it.
* Alpha channels are **dropped** (the stored colour values are kept as they are, not
  composited onto a background).
* 16-bit images are scaled to 8 bit by the full range of the 16-bit type
  (``round(v * 255 / 65535)``), never clipped. 32-bit integer images whose values fit in
  ``0..65535`` are treated as 16-bit; other integer and float images are scaled by the actual
  range of their values (floats already in ``[0, 1]`` are multiplied by 255).
* Masks: foreground is ``value > threshold`` on the 8-bit scale after that conversion, taking
  the maximum over the colour channels (alpha ignored). JPEG masks are not exactly binary,
  hence the threshold.
* Anything that cannot be used raises :class:`DataError` naming the file and the fix. Builders
  take ``on_error="skip"`` to skip such samples instead: each skip is logged as a warning and
  recorded in :attr:`Dataset.skipped`. Nothing is dropped silently and masks are never resized.
* Images larger than :data:`~envs.data.images.MAX_IMAGE_PIXELS` pixels are refused before
  decoding.

Layout: file decoding (:mod:`~envs.data.images`), samples and datasets
(:mod:`~envs.data.dataset`), one module per source (:mod:`~envs.data.folders`,
:mod:`~envs.data.kvasir`, :mod:`~envs.data.camvid`, :mod:`~envs.data.coco`), and where the
shared evaluation data lives (:mod:`~envs.data.shared`).
"""

from envs.data.camvid import (
    CAMVID_CLASSES,
    CAMVID_IGNORE_INDEX,
    camvid,
    camvid_class_id,
    label_map_dataset,
)
from envs.data.coco import coco_dataset
from envs.data.dataset import Dataset, OnError, Sample
from envs.data.folders import folder_pairs
from envs.data.images import (
    IMAGE_SUFFIXES,
    LABEL_SUFFIXES,
    MASK_SUFFIXES,
    MAX_IMAGE_PIXELS,
    SKIP_FIX,
    DataError,
    load_image,
    load_label_map,
    load_mask,
    read_image_size,
    rgb_array,
    validate_mask,
)
from envs.data.kvasir import kvasir_seg
from envs.data.shared import DATA_ENV, shared_data_root

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_IGNORE_INDEX",
    "DATA_ENV",
    "IMAGE_SUFFIXES",
    "LABEL_SUFFIXES",
    "MASK_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "OnError",
    "SKIP_FIX",
    "DataError",
    "Dataset",
    "Sample",
    "camvid",
    "camvid_class_id",
    "coco_dataset",
    "folder_pairs",
    "kvasir_seg",
    "label_map_dataset",
    "load_image",
    "load_label_map",
    "load_mask",
    "read_image_size",
    "rgb_array",
    "shared_data_root",
    "validate_mask",
]
