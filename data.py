"""Datasets -> FFCV .beton files, and the FFCV loaders that feed training and evaluation.

Write once, read many times:

    python data.py write --dataset fashion_mnist --root data/fashion_mnist --split train \
        --out data/fmnist_train.beton
    python data.py info data/fmnist_train.beton

Every beton gets a sidecar `FILE.beton.json` (classes, channels, resolution, per-channel
mean/std used for normalisation, source) whose last key `complete` is written last; readers
call `beton_info()`, which refuses missing, truncated or mismatched files with one clear line.

Readers:
- `build_ssl_loader(...)` -> `SSLLoader`: `for views, labels in loader` gives views
  (B, V, C, H, W) float32, normalised, on `device`; V independent augmentations per image.
- `build_eval_loader(...)` -> `EvalLoader`: `for images, labels, indices in loader`,
  deterministic resize + centre crop, every sample of the (sharded) set exactly once.

How the SSL pipeline splits the work (SPEC §7):
1. CPU, inside FFCV (numba): `DecodeViews` decodes each stored image ONCE and cuts all V
   random-resized crops (non-square, torchvision's algorithm) + horizontal flips from it.
   Its random numbers are a counter-based hash of (seed + rank, epoch, sample index, view),
   so the crops do not depend on thread scheduling, batch composition, or skipped batches.
2. Device, in torch (`ViewAugment`): colour jitter (random order per image, as
   torchvision), grayscale, Gaussian blur, solarize, with per-view random parameters drawn
   on the CPU from a generator seeded by (seed + rank, epoch, batch index).
3. Normalisation with the sidecar's mean/std.
"""
import argparse
import gzip
import json
import math
import multiprocessing as mp
import os
import queue
import struct
import sys
import threading
import time
import warnings
from dataclasses import dataclass, replace

import numba
import numpy as np
import torch
import torch.nn.functional as F

import cv2
from ffcv.fields import IntField, NDArrayField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.libffcv import ctypes_imdecode, ctypes_resize
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.reader import Reader
from ffcv.transforms import ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder
from ffcv.types import HeaderType
from ffcv.writer import DatasetWriter

SIDECAR_VERSION = 1
DATASETS = ('fashion_mnist', 'mnist', 'imagefolder', 'cifar10', 'cifar100', 'stl10', 'cifar10_npz')
RECIPES = ('cifar', 'cifar_strong', 'imagenet', 'crop', 'noise')
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
FASHION_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                   'Sneaker', 'Bag', 'Ankle boot']
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


# ---- sources: indexable datasets the writer reads ----------------------------------------------
# Each source returns (image uint8 (H, W, C), label int). The writer's worker processes call
# __getitem__ once per sample; the shared accumulator there gives exact mean/std of everything
# written without a second decoding pass.

class _Stats:
    """Pixel moments shared across the (forked) writer workers: count, sums and the channel
    Gram matrix sum_pixels x x^T, from which both per-channel and luma mean/std follow exactly.

    Layout of the 14 doubles: images, pixels, sum[3], gram[3 x 3] (1-channel data: slot 0s).
    """
    def __init__(self):
        self.acc = mp.Array('d', 14)

    def add(self, img):
        flat = img.reshape(-1, img.shape[2])
        f = flat.astype(np.float32)
        gram = (f.T @ f).astype(np.float64)  # float32 BLAS: ~1e-6 relative, plenty for stats
        s = flat.sum(0, dtype=np.int64)
        c = img.shape[2]
        with self.acc.get_lock():
            a = self.acc
            a[0] += 1
            a[1] += flat.shape[0]
            for i in range(c):
                a[2 + i] += s[i]
                for j in range(c):
                    a[5 + 3 * i + j] += gram[i, j]

    def result(self, channels):
        a = np.array(self.acc[:])
        n = max(a[1], 1.0)
        mean = a[2:2 + channels] / n
        second = a[5:].reshape(3, 3)[:channels, :channels] / n
        std = np.sqrt(np.maximum(np.diag(second) - mean ** 2, 0.0))
        w = np.asarray(GRAY_WEIGHTS) if channels == 3 else np.ones(1)
        gmean = float(w @ mean)
        gstd = math.sqrt(max(float(w @ second @ w) - gmean ** 2, 0.0))
        r = lambda v: [round(float(t), 4) for t in np.atleast_1d(v)]
        return dict(images_seen=int(a[0]), mean=r(mean), std=r(std), gray_mean=r(gmean)[0],
                    gray_std=r(gstd)[0])


def fit_max_side(img, max_res):
    """Shrink (never enlarge) so that max(H, W) <= max_res; INTER_AREA like ffcv's writer."""
    if max_res is None or max(img.shape[:2]) <= max_res:
        return img
    h, w = img.shape[:2]
    ratio = max_res / max(h, w)
    size = (max(1, int(w * ratio)), max(1, int(h * ratio)))
    out = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return out[:, :, None] if out.ndim == 2 else out


class _Source:
    """Base: `load(i)` gives the raw image (H, W) or (H, W, 3); labels/classes set by subclass."""
    channels = 3
    labels = None
    classes = None

    def __init__(self, max_res):
        self.max_res = max_res
        self.stats = _Stats()
        self.indices = None  # set by the writer (limit); maps beton index -> source index
        self.fixed_shape = None  # set by the writer for NDArray storage
        # ffcv's writer waits forever when a worker process dies, so a sample that cannot be
        # read is replaced by a placeholder and reported (and the beton deleted) at the end.
        self.failures = mp.Value('q', 0)
        self.first_failure = mp.Value('q', -1)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = int(self.indices[k])
        try:
            img = self.load(i)
            if img.ndim == 2:
                img = img[:, :, None]
            img = fit_max_side(np.ascontiguousarray(img), self.max_res)
        except Exception:
            with self.failures.get_lock():
                self.failures.value += 1
                if self.first_failure.value < 0:
                    self.first_failure.value = i
            img = np.zeros(self.fixed_shape or (8, 8, self.store_channels), np.uint8)
            return img, int(self.labels[i])
        self.stats.add(img)
        if self.store_channels == 3 and img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)  # gray stored in an RGB (jpg) field
        return np.ascontiguousarray(img), int(self.labels[i])


class ArraySource(_Source):
    """In-memory uint8 images: (N, H, W) gray or (N, H, W, 3) RGB."""
    def __init__(self, images, labels, classes, max_res):
        super().__init__(max_res)
        self.images, self.labels, self.classes = images, np.asarray(labels), list(classes)
        self.channels = 1 if images.ndim == 3 else 3

    def load(self, i):
        return self.images[i]

    def describe(self, i):
        return f'image {i}'


class FileSource(_Source):
    """Image files (ImageFolder layout), decoded with PIL and converted to RGB."""
    def __init__(self, paths, labels, classes, max_res):
        super().__init__(max_res)
        self.paths, self.labels, self.classes = paths, np.asarray(labels), list(classes)

    def load(self, i):
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            return np.asarray(im.convert('RGB'))

    def describe(self, i):
        return self.paths[i]


class JpegBytesSource(_Source):
    """JPEG files concatenated in one uint8 array with offsets (the cifar10_jpeg75.npz layout)."""
    def __init__(self, blob, offsets, labels, classes, max_res):
        super().__init__(max_res)
        self.blob, self.offsets = blob, offsets
        self.labels, self.classes = np.asarray(labels), list(classes)

    def load(self, i):
        buf = self.blob[self.offsets[i]:self.offsets[i + 1]]
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError('not a decodable JPEG')
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def describe(self, i):
        return f'JPEG {i} of the npz'


# ---- source loaders, one per --dataset ----

def _read_idx(path):
    """Read an IDX file (.gz or plain) into a numpy array (uint8 images or labels)."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack('>HBB', raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise SystemExit(f"data: {path} is not a uint8 IDX file (magic {raw[:4].hex()})")
    shape = struct.unpack('>' + 'I' * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise SystemExit(f"data: {path} is truncated ({data.size} of {int(np.prod(shape))} values)")
    return data.reshape(shape)


def _idx_source(name, root, split, max_res):
    prefix = {'train': 'train', 'test': 't10k'}.get(split)
    if prefix is None:
        raise SystemExit(f"data: --split for {name} is train or test, not {split!r}")
    files = []
    for kind in ('images-idx3-ubyte', 'labels-idx1-ubyte'):
        cands = [os.path.join(root, f'{prefix}-{kind}{ext}') for ext in ('.gz', '')]
        found = [c for c in cands if os.path.exists(c)]
        if not found:
            raise SystemExit(f"data: {cands[0]} is missing — for {name} put the IDX files in "
                             f"--root (scripts/setup.sh fetches Fashion-MNIST)")
        files.append(found[0])
    images, labels = _read_idx(files[0]), _read_idx(files[1])
    if len(images) != len(labels):
        raise SystemExit(f"data: {files[0]} has {len(images)} images but {files[1]} "
                         f"{len(labels)} labels")
    classes = FASHION_CLASSES if name == 'fashion_mnist' else [str(d) for d in range(10)]
    return ArraySource(images, labels, classes, max_res)


def _torchvision_source(name, root, split, max_res):
    import torchvision
    try:
        if name in ('cifar10', 'cifar100'):
            if split not in ('train', 'test'):
                raise SystemExit(f"data: --split for {name} is train or test, not {split!r}")
            tv = torchvision.datasets
            cls = tv.CIFAR10 if name == 'cifar10' else tv.CIFAR100
            ds = cls(root, train=split == 'train', download=False)
            return ArraySource(np.asarray(ds.data), ds.targets, ds.classes, max_res)
        if split not in ('train', 'test', 'unlabeled', 'train+unlabeled'):
            raise SystemExit(f"data: --split for stl10 is train, test, unlabeled or "
                             f"train+unlabeled, not {split!r}")
        ds = torchvision.datasets.STL10(root, split=split, download=False)
        images = np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1))  # (N, 3, 96, 96) -> HWC
        return ArraySource(images, ds.labels, ds.classes, max_res)
    except RuntimeError as e:
        cls_name = {'cifar10': 'CIFAR10', 'cifar100': 'CIFAR100', 'stl10': 'STL10'}[name]
        raise SystemExit(f"data: {name} not found under {root} ({e}) — download it once with "
                         f"`python -c \"import torchvision; torchvision.datasets.{cls_name}"
                         f"('{root}', download=True)\"`")


def _imagefolder_source(root, split, max_res):
    base = os.path.join(root, split)
    if not os.path.isdir(base):
        raise SystemExit(f"data: {base} is not a folder — imagefolder expects "
                         f"--root/<split>/<class>/<image>, e.g. --root imagenet --split train")
    classes = sorted(d.name for d in os.scandir(base) if d.is_dir())
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(base, cls), followlinks=True)):
            for n in sorted(names):
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, n))
                    labels.append(label)
    if not paths:
        raise SystemExit(f"data: no images ({', '.join(IMAGE_EXTENSIONS)}) under {base}/<class>/")
    return FileSource(paths, labels, classes, max_res)


def _npz_source(root, split, max_res):
    path = root if root.endswith('.npz') else os.path.join(root, 'cifar10_jpeg75.npz')
    if not os.path.exists(path):
        raise SystemExit(f"data: {path} is missing — cifar10_npz takes --root FILE.npz "
                         f"(layout: {{split}}_jpeg, {{split}}_offsets, {{split}}_labels, classes)")
    if split not in ('train', 'test'):
        raise SystemExit(f"data: --split for cifar10_npz is train or test, not {split!r}")
    z = np.load(path)
    return JpegBytesSource(z[f'{split}_jpeg'], z[f'{split}_offsets'], z[f'{split}_labels'],
                           [str(c) for c in z['classes']], max_res)


def open_source(dataset, root, split, max_res=None):
    """The indexable source for `dataset` (see DATASETS) at `root`, split `split`."""
    if dataset in ('fashion_mnist', 'mnist'):
        return _idx_source(dataset, root, split, max_res)
    if dataset in ('cifar10', 'cifar100', 'stl10'):
        return _torchvision_source(dataset, root, split, max_res)
    if dataset == 'imagefolder':
        return _imagefolder_source(root, split, max_res)
    if dataset == 'cifar10_npz':
        return _npz_source(root, split, max_res)
    raise SystemExit(f"data: unknown --dataset {dataset!r}; choose from {', '.join(DATASETS)}")


def limit_indices(n, limit):
    """Evenly spaced subset of range(n) of size `limit` (covers all classes of sorted data)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return (np.arange(limit, dtype=np.int64) * n) // limit


# ---- writer + sidecar ------------------------------------------------------------------------

def sidecar_path(path):
    return str(path) + '.json'


def names_path(path):
    """`FILE.beton.names.txt`: the image file of every sample of an imagefolder beton, relative to
    --root/--split, one per line in beton order (SimCLR's 1% / 10% lists name files)."""
    return str(path) + '.names.txt'


def _write_json_atomic(path, obj):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _page_size(src, fmt):
    """Smallest power-of-two page (>= ffcv's 2 MiB minimum) holding two of the largest samples.
    Each writer worker leaves its last page partly empty, so small pages keep small betons small;
    for image files of unknown size without --max_res, 8 MiB (jpg) or 32 MiB (raw)."""
    if isinstance(src, ArraySource):
        biggest = int(np.prod(src.images.shape[1:])) * 3
    elif isinstance(src, JpegBytesSource):
        biggest = int(np.diff(src.offsets).max()) * 20  # decoded raw is ~10-20x the JPEG
    elif src.max_res is not None:
        biggest = src.max_res ** 2 * 3
    else:
        biggest = (8 if fmt == 'jpg' else 32) << 19
    page = 1 << 21
    while page < 2 * biggest:
        page <<= 1
    return page


def write_beton(dataset, root, split, out, fmt='raw', max_res=None, jpeg_quality=90,
                num_workers=4, limit=None):
    """Convert one split of a dataset to `out` (.beton) + `out.json` sidecar; returns the sidecar.

    fmt: 'raw' (exact pixels; 1-channel data stored as an NDArrayField (H, W, 1), 3-channel as
    an RGBImageField) or 'jpg' (RGBImageField, JPEG at `jpeg_quality`; gray data is stored as
    3 equal channels). max_res shrinks images so the longer side is <= max_res (raw 1-channel
    data needs a fixed size, so it is resized to a square). limit keeps an evenly spaced subset.
    The beton is written under a temporary name and renamed at the end; the sidecar's
    `complete` flag is written last, so an interrupted write is always detectable.
    """
    if fmt not in ('raw', 'jpg'):
        raise SystemExit(f"data: --format is raw or jpg, not {fmt!r}")
    src = open_source(dataset, root, split, max_res)
    n_all = len(src.labels)
    src.indices = limit_indices(n_all, limit)
    gray_raw = src.channels == 1 and fmt == 'raw'
    src.store_channels = 1 if gray_raw else 3
    if gray_raw:
        h, w = fit_max_side(np.ascontiguousarray(src.load(0))[:, :, None], max_res).shape[:2]
        image_field = NDArrayField(np.dtype('u1'), (h, w, 1))
        src.fixed_shape = (h, w, 1)
    else:
        image_field = RGBImageField(write_mode=fmt, max_resolution=None, jpeg_quality=jpeg_quality)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for stale in (out, sidecar_path(out), names_path(out)):
        if os.path.exists(stale):
            os.remove(stale)  # a half-replaced pair must never look valid
    tmp = f'{out}.tmp{os.getpid()}'
    t0 = time.time()
    writer = DatasetWriter(tmp, {'image': image_field, 'label': IntField()},
                           page_size=_page_size(src, fmt), num_workers=max(1, num_workers))
    writer.from_indexed_dataset(src, chunksize=64)
    if src.failures.value:
        os.remove(tmp)
        i = src.first_failure.value
        try:
            src.load(i)
            why = 'no error on a second read'
        except Exception as e:
            why = repr(e)
        raise SystemExit(f"data: {src.failures.value} image(s) could not be read; the first is "
                         f"{src.describe(i)}: {why} — fix or remove it and write again")
    stats = src.stats.result(src.channels)
    if stats.pop('images_seen') != len(src):
        os.remove(tmp)
        raise SystemExit(f"data: writer saw fewer images than {len(src)} — a worker failed; "
                         f"see the error above")
    reader = Reader(tmp)
    md = reader.metadata['f0']
    if gray_raw:
        res = [int(h), int(w)]
        min_res = res
    else:
        res = [int(md['height'].max()), int(md['width'].max())]
        min_res = [int(md['height'].min()), int(md['width'].min())]
    os.replace(tmp, out)
    names_file = None
    if isinstance(src, FileSource):  # written before the sidecar, whose `complete` comes last
        base = os.path.join(root, split)
        names = [os.path.relpath(src.paths[i], base).replace(os.sep, '/') for i in src.indices]
        names_file = os.path.basename(names_path(out))
        with open(f'{names_path(out)}.tmp{os.getpid()}', 'w') as f:
            f.write(''.join(n + '\n' for n in names))
        os.replace(f'{names_path(out)}.tmp{os.getpid()}', names_path(out))
    info = dict(
        version=SIDECAR_VERSION,
        source=dict(dataset=dataset, root=os.path.abspath(root), split=split, limit=limit,
                    source_samples=n_all),
        num_samples=len(src),
        num_classes=len(src.classes),
        classes=src.classes,
        channels=src.channels,
        resolution=res,
        min_resolution=min_res,
        storage=fmt,
        image_field='ndarray' if gray_raw else 'rgb',
        jpeg_quality=jpeg_quality if fmt == 'jpg' else None,
        max_res=max_res,
        **stats,
        stats_note='mean/std in [0,255] over all written images, after max_res resizing and '
                   'before JPEG encoding',
        names_file=names_file,
        beton_bytes=os.path.getsize(out),
        write_seconds=round(time.time() - t0, 1),
        complete=True,
    )
    _write_json_atomic(sidecar_path(out), info)
    return info


def _write_hint(path):
    return (f"write it with `python data.py write --dataset NAME --root DIR --split SPLIT "
            f"--out {path}`")


def beton_info(path):
    """The validated sidecar of `path` as a dict; SystemExit with one line if anything is off."""
    path = str(path)
    if not os.path.exists(path):
        raise SystemExit(f"data: {path} is missing — {_write_hint(path)}")
    side = sidecar_path(path)
    if not os.path.exists(side):
        raise SystemExit(f"data: {side} (the sidecar of {path}) is missing — the beton was not "
                         f"written by data.py or its write was interrupted; {_write_hint(path)}")
    try:
        with open(side) as f:
            info = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"data: {side} is not valid JSON ({e}) — {_write_hint(path)}")
    if info.get('complete') is not True:
        raise SystemExit(f"data: {side} is marked incomplete (interrupted write) — "
                         f"{_write_hint(path)}")
    size = os.path.getsize(path)
    if size != info.get('beton_bytes'):
        raise SystemExit(f"data: {path} has {size} bytes but its sidecar says "
                         f"{info.get('beton_bytes')} (truncated or replaced) — "
                         f"{_write_hint(path)}")
    header = np.fromfile(path, dtype=HeaderType, count=1)
    if len(header) != 1 or int(header[0]['num_samples']) != info['num_samples']:
        raise SystemExit(f"data: {path} header disagrees with its sidecar's num_samples "
                         f"{info['num_samples']} — {_write_hint(path)}")
    info['path'] = path
    return info


def norm_stats(info, channels):
    """(mean, std) tensors of shape (channels,) in [0, 1] units for normalising model inputs."""
    if channels == 1:
        mean, std = [info['gray_mean']], [info['gray_std']]
    elif info['channels'] == 1:
        mean, std = info['mean'] * 3, info['std'] * 3
    else:
        mean, std = info['mean'], info['std']
    return (torch.tensor(mean, dtype=torch.float32) / 255.0,
            torch.tensor(std, dtype=torch.float32).clamp_min(1e-3) / 255.0)


# ---- counter-based random numbers for the numba crop op --------------------------------------
# numba's np.random inside prange gives each thread its own stream, so which sample receives
# which crop depends on scheduling: not reproducible. A hash of (key, sample, view, draw) is a
# pure function, identical with the compiler on or off, in any thread, after any skip.
# Explicit signatures: called from plain Python (compiler off), a lazily typed helper could pick
# an int64 overload for a uint64 key and overflow.

_U = np.uint64
# Under NUMBA_DISABLE_JIT=1 these helpers run on numpy uint64 scalars, whose intended wrap-around
# (arithmetic mod 2**64) numpy reports as overflow: silenced for this module only.
warnings.filterwarnings('ignore', message='overflow encountered in scalar', category=RuntimeWarning,
                        module=__name__)


@numba.njit('uint64(uint64)', cache=True)
def _mix64(x):
    """splitmix64 finaliser: a bijective avalanche on uint64."""
    x = (x ^ (x >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U(27))) * _U(0x94D049BB133111EB)
    return x ^ (x >> _U(31))


@numba.njit('uint64(int64, int64)', cache=True)
def _epoch_key(seed, epoch):
    """Per-(seed + rank, epoch) key: int64 in, uint64 out."""
    return _mix64(_mix64(_U(seed) + _U(0x9E3779B97F4A7C15)) ^ _U(epoch))


@numba.njit('float64(uint64, int64, int64, int64)', cache=True)
def _uniform(key, sample, view, draw):
    """Uniform float64 in [0, 1) from (key, sample index, view index, draw number)."""
    h = _mix64(key ^ _mix64(_U(sample) * _U(0xD1B54A32D192ED03) + _U(view) * _U(0x8CB92BA72F3D8DD7)
                            + _U(draw)))
    return (h >> _U(11)) * (1.0 / 9007199254740992.0)


_FLIP_DRAW = 30  # draws 0..19: crop attempts, 20/21: crop position, 30: flip


@numba.njit('UniTuple(int64, 4)(uint64, int64, int64, int64, int64, float64, float64, float64, '
            'float64)', cache=True)
def _rrc_box(key, sample, view, h, w, smin, smax, log_rmin, log_rmax):
    """torchvision RandomResizedCrop box (top, left, height, width): area fraction uniform in
    [smin, smax], log aspect ratio uniform; 10 tries, then the centre crop of clamped ratio.
    Width and height are drawn separately, so crops are not square in general."""
    area = h * w
    for t in range(10):
        target = area * (smin + (smax - smin) * _uniform(key, sample, view, 2 * t))
        ratio = math.exp(log_rmin + (log_rmax - log_rmin) * _uniform(key, sample, view, 2 * t + 1))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            i = int(_uniform(key, sample, view, 20) * (h - ch + 1))
            j = int(_uniform(key, sample, view, 21) * (w - cw + 1))
            return i, j, ch, cw
    in_ratio = w / h
    if in_ratio < math.exp(log_rmin):
        cw = w
        ch = int(round(w / math.exp(log_rmin)))
    elif in_ratio > math.exp(log_rmax):
        ch = h
        cw = int(round(h * math.exp(log_rmax)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@numba.njit('UniTuple(int64, 4)(int64, int64, float64)', cache=True)
def _center_box(h, w, ratio):
    """Centred square of side ratio * min(h, w): the resize + centre-crop of evaluation."""
    c = max(1, int(ratio * min(h, w)))
    return (h - c) // 2, (w - c) // 2, c, c


# ---- colour augmentation inside the decoder (CPU path): per view, from the counter hash --------

# per view type, a float64 row: b, c, s, h strengths, jitter p, gray p, blur p, sigma lo, sigma hi,
# solarize p, blur radius
_P_JITTER, _P_GRAY, _P_BLUR, _P_SIG, _P_SOL, _P_RADIUS = 4, 5, 6, 7, 9, 10
_COLOUR_DRAW = 40  # hash draws 40..52 (crops use 0..21 and 30)


def colour_table(specs):
    """(T, 11) float64 table of a list of ColourSpec (view type t = row t) for the decoder path;
    None when every spec is the identity."""
    if all(sp.is_identity for sp in specs):
        return None
    if any(sp.noise_std for sp in specs):
        raise ValueError("the decoder colour path has no Gaussian-noise views (use colour='torch')")
    return np.array([[*sp.jitter, sp.jitter_prob, sp.gray_prob, sp.blur_prob, *sp.blur_sigma,
                      sp.solarize_prob, math.ceil(3 * sp.blur_sigma[1])] for sp in specs],
                    dtype=np.float64)


@numba.njit(cache=True, fastmath=False)
def _colour_params(key, sample, view, p):
    """One view's random colour parameters from the counter hash: [jitter?, brightness,
    contrast, saturation, hue factors, order of the 4 ops (4 entries), gray?, blur?, sigma,
    solarize?] (14 floats). Same distribution as ViewAugment.sample_params."""
    out = np.zeros(14)
    u = _uniform(key, sample, view, _COLOUR_DRAW)
    out[0] = 1.0 if u < p[_P_JITTER] else 0.0
    for k in range(3):
        lo, hi = max(0.0, 1.0 - p[k]), 1.0 + p[k]
        out[1 + k] = lo + (hi - lo) * _uniform(key, sample, view, _COLOUR_DRAW + 1 + k)
    out[4] = -p[3] + 2.0 * p[3] * _uniform(key, sample, view, _COLOUR_DRAW + 4)
    keys = np.empty(4)
    for k in range(4):
        keys[k] = _uniform(key, sample, view, _COLOUR_DRAW + 5 + k)
    order = np.argsort(keys)
    for k in range(4):
        out[5 + k] = order[k]
    out[9] = 1.0 if _uniform(key, sample, view, _COLOUR_DRAW + 9) < p[_P_GRAY] else 0.0
    out[10] = 1.0 if _uniform(key, sample, view, _COLOUR_DRAW + 10) < p[_P_BLUR] else 0.0
    lo, hi = p[_P_SIG], p[_P_SIG + 1]
    out[11] = lo + (hi - lo) * _uniform(key, sample, view, _COLOUR_DRAW + 11)
    out[12] = 1.0 if _uniform(key, sample, view, _COLOUR_DRAW + 12) < p[_P_SOL] else 0.0
    return out


@numba.njit(cache=True, fastmath=False)
def _clamp01(v):
    return np.float32(0.0) if v < 0 else (np.float32(1.0) if v > 1 else v)


def colour_scratch_size(res, max_radius):
    """float32 scratch per sample that _apply_colour needs for views of side <= res."""
    return 2 * res * res * 3 + res + 2 * max_radius  # planar work + blur temp, one padded row


# Each colour op is its own small njit function: LLVM vectorises the flat loops of a small
# function better than the same loops inside one large one. The float32 work buffer is planar
# (R plane, G plane, B plane, each h * w): the per-pixel ops (saturation, hue, grayscale) then
# read and write three contiguous arrays and vectorise; on the interleaved layout they ran 2-3x
# slower (bench/decoder_ops.py --against). A grayscale view keeps only plane 0 (blur, solarize
# and the uint8 pass read it for all three channels). The blur's row pass indexes slices of `pad`
# from 0: indexing pad[lo + k] (numba's negative-index wrap-around check on every access) ran it
# 10x slower; unsigned indices (np.uint64) do the same for strided loops.
# Every helper says fastmath=False: one compiled first from inside an ffcv pipeline (ffcv compiles
# those with fastmath=True) inherits the caller's flags, and numba caches that build for every later
# process, so a view's last bits depended on which process compiled first (bench/decoder_ops.py
# --against, tests/test_data.py::test_numba_compiled_pipeline_matches_python). Not slower here.
_WR, _WG, _WB = np.float32(0.2989), np.float32(0.587), np.float32(0.114)


@numba.njit(cache=True, fastmath=False)
def _u8_to_planar(src, x, npix):
    """Interleaved uint8 (npix * 3) -> planar float32 in [0, 1]: x[c * npix + p] = src[3 p + c] / 255."""
    inv = np.float32(1.0 / 255.0)
    r, g, b = x[:npix], x[npix:2 * npix], x[2 * npix:3 * npix]
    for p in range(npix):
        q = np.uint64(3 * p)
        r[p] = np.float32(src[q]) * inv
        g[p] = np.float32(src[q + 1]) * inv
        b[p] = np.float32(src[q + 2]) * inv


@numba.njit(cache=True, fastmath=False)
def _u8_to_planar_flipped(src, x, h, w):
    """_u8_to_planar of the horizontally mirrored view: each uint8 row is first reversed value by
    value into a small buffer (a vectorised byte reversal; the pixels come out in B, G, R order),
    then split into the planes with R and B exchanged. Writing or reading the planes in mirrored
    order instead is not vectorised (2-4x slower)."""
    inv = np.float32(1.0 / 255.0)
    npix, w3 = h * w, 3 * w
    r, g, b = x[:npix], x[npix:2 * npix], x[2 * npix:3 * npix]
    tmp = np.empty(w3, np.uint8)
    for i in range(h):
        s = src[i * w3:(i + 1) * w3]
        for k in range(w3):
            tmp[k] = s[np.uint64(w3 - 1 - k)]
        rr, gg, bb = r[i * w:(i + 1) * w], g[i * w:(i + 1) * w], b[i * w:(i + 1) * w]
        for j in range(w):
            q = np.uint64(3 * j)
            bb[j] = np.float32(tmp[q]) * inv
            gg[j] = np.float32(tmp[q + 1]) * inv
            rr[j] = np.float32(tmp[q + 2]) * inv


@numba.njit(cache=True, fastmath=False)
def _flip_u8(o):
    """Mirror a (h, w, 3) uint8 view in place: each row reversed value by value into a small
    buffer (vectorised; pixels then in B, G, R order), then copied back with R and B exchanged.
    (The `o[:] = o[:, ::-1].copy()` this replaced allocated a view-sized array and cost 6x as much;
    swapping pixels pairwise is not vectorised.)"""
    h, w = o.shape[0], o.shape[1]
    w3 = 3 * w
    f = o.reshape(h * w3)
    tmp = np.empty(w3, np.uint8)
    for i in range(h):
        row = f[i * w3:(i + 1) * w3]
        for k in range(w3):
            tmp[k] = row[np.uint64(w3 - 1 - k)]
        for j in range(w):
            q = np.uint64(3 * j)
            row[q] = tmp[q + 2]
            row[q + 1] = tmp[q + 1]
            row[q + 2] = tmp[q]


@numba.njit(cache=True, fastmath=False)
def _brightness(x, f):  # blend with black (any layout)
    for k in range(x.shape[0]):
        x[k] = _clamp01(f * x[k])


@numba.njit(cache=True, fastmath=False)
def _contrast(x, f, w, acc):  # blend with the mean luma of the image
    """x planar (3 planes of rows of w); acc: w floats of scratch. Each plane's sum is taken down
    the columns first (float32, one vectorised add per row: a single running sum is a chain of
    dependent adds, not vectorised), then across them in float64."""
    n = x.shape[0]
    npix = n // 3
    s = np.zeros(3)  # float64 in both modes
    for c in range(3):
        pl = x[c * npix:(c + 1) * npix]
        for k in range(w):
            acc[k] = pl[k]
        for i in range(1, npix // w):
            row = pl[i * w:(i + 1) * w]
            for k in range(w):
                acc[k] += row[k]
        t = np.float64(0.0)
        for k in range(w):
            t += acc[k]
        s[c] = t
    m = _WR * s[0] + _WG * s[1] + _WB * s[2]
    mf = np.float32(m / npix) * (np.float32(1.0) - f)
    for k in range(n):
        x[k] = _clamp01(f * x[k] + mf)


@numba.njit(cache=True, fastmath=False)
def _saturation(x, f):  # blend with the pixel's luma (planar x)
    npix = x.shape[0] // 3
    r, g, b = x[:npix], x[npix:2 * npix], x[2 * npix:3 * npix]
    g1 = np.float32(1.0) - f
    for p in range(npix):
        gl = (_WR * r[p] + _WG * g[p] + _WB * b[p]) * g1
        r[p] = _clamp01(f * r[p] + gl)
        g[p] = _clamp01(f * g[p] + gl)
        b[p] = _clamp01(f * b[p] + gl)


@numba.njit(cache=True, fastmath=False)
def _hue(x, f):  # rotate in HSV by f turns (torchvision's formula; |f| <= 0.5; planar x)
    npix = x.shape[0] // 3
    R, G, B = x[:npix], x[npix:2 * npix], x[2 * npix:3 * npix]
    one, six = np.float32(1.0), np.float32(6.0)
    shift = six * np.float32(f)
    for p in range(npix):
        r, g, b = R[p], G[p], B[p]
        mx = max(r, max(g, b))
        delta = mx - min(r, min(g, b))
        d = delta if delta > 0 else one
        num, off = g - b, np.float32(0.0)  # one division, not one per branch
        if mx != r:
            num, off = (b - r, np.float32(2.0)) if mx == g else (r - g, np.float32(4.0))
        h6 = off + num / d + shift  # in [-4, 8): remainder mod 6 by one conditional add/subtract
        h6 = h6 + six if h6 < 0 else (h6 - six if h6 >= six else h6)
        vs = delta  # value x saturation = mx (delta / mx): no division for it
        k0 = h6 + np.float32(5.0)
        k0 = k0 - six if k0 >= six else k0
        k1 = h6 + np.float32(3.0)
        k1 = k1 - six if k1 >= six else k1
        k2 = h6 + one
        k2 = k2 - six if k2 >= six else k2
        R[p] = mx - vs * _clamp01(min(k0, np.float32(4.0) - k0))
        G[p] = mx - vs * _clamp01(min(k1, np.float32(4.0) - k1))
        B[p] = mx - vs * _clamp01(min(k2, np.float32(4.0) - k2))


@numba.njit(cache=True, fastmath=False)
def _grayscale(x):
    """Luma of planar x into plane 0 only; planes 1 and 2 are left stale (the caller then treats
    the view as one plane)."""
    npix = x.shape[0] // 3
    r, g, b = x[:npix], x[npix:2 * npix], x[2 * npix:3 * npix]
    for p in range(npix):
        r[p] = _WR * r[p] + _WG * g[p] + _WB * b[p]


@numba.njit(cache=True, fastmath=False)
def _blur_rows(x, t, pad, ker, nrows, w, rad):
    """Horizontal pass of the separable blur, x -> t, over nrows rows of w values (all planes'
    rows in a row), each copied into `pad` with reflected borders."""
    nk = 2 * rad + 1
    mid = pad[rad:rad + w]
    kc = ker[rad]
    for i in range(nrows):
        row = x[i * w:(i + 1) * w]
        for k in range(w):  # interior: a straight copy
            mid[k] = row[k]
        for a in range(1, rad + 1):  # reflected borders
            pad[rad - a] = row[a]
            pad[rad + w + a - 1] = row[w - 1 - a]
        out = t[i * w:(i + 1) * w]
        for k in range(w):
            out[k] = kc * mid[k]
        for a in range(rad):  # symmetric taps: one multiply per pair
            ka, p0, p1 = ker[a], pad[a:a + w], pad[nk - 1 - a:nk - 1 - a + w]
            for k in range(w):
                out[k] += ka * (p0[k] + p1[k])


@numba.njit(cache=True, fastmath=False)
def _blur_cols(t, x, ker, planes, h, w, rad):
    """Vertical pass, t -> x, for each of `planes` planes of h rows of w, rows reflected at the
    top and bottom of the plane."""
    kc = ker[rad]
    for c in range(planes):
        tp, xp = t[c * h * w:(c + 1) * h * w], x[c * h * w:(c + 1) * h * w]
        for i in range(h):
            out, row = xp[i * w:(i + 1) * w], tp[i * w:(i + 1) * w]
            for k in range(w):
                out[k] = kc * row[k]
            for a in range(rad):  # rows i - (rad - a) and i + (rad - a), reflected
                i0, i1 = i - (rad - a), i + (rad - a)
                i0 = -i0 if i0 < 0 else i0
                i1 = 2 * (h - 1) - i1 if i1 >= h else i1
                ka, r0, r1 = ker[a], tp[i0 * w:(i0 + 1) * w], tp[i1 * w:(i1 + 1) * w]
                for k in range(w):
                    out[k] += ka * (r0[k] + r1[k])


@numba.njit(cache=True, fastmath=False)
def _planar_to_u8(x, dst, npix, planes, solarize):
    """Planar float32 -> interleaved uint8 (solarized first if asked), rounded half up and
    clamped; planes == 1: plane 0 is written to all three channels (a grayscale view)."""
    half, top, one, zero = np.float32(0.5), np.float32(255.0), np.float32(1.0), np.float32(0.0)
    r = x[:npix]
    g = x[npix:2 * npix] if planes == 3 else r
    b = x[2 * npix:3 * npix] if planes == 3 else r
    for p in range(npix):
        q = np.uint64(3 * p)
        v0, v1, v2 = r[p], g[p], b[p]
        if solarize:
            v0 = one - v0 if v0 >= half else v0
            v1 = one - v1 if v1 >= half else v1
            v2 = one - v2 if v2 >= half else v2
        v0, v1, v2 = v0 * top + half, v1 * top + half, v2 * top + half
        dst[q] = np.uint8(min(max(v0, zero), top))
        dst[q + 1] = np.uint8(min(max(v1, zero), top))
        dst[q + 2] = np.uint8(min(max(v2, zero), top))


@numba.njit(cache=True, fastmath=False)
def _apply_colour(o, scratch, q, max_radius, flip=False):
    """Apply parameters q (from _colour_params) to one view o (h, w, 3) uint8, in place, working
    in planar float32 on `scratch` (colour_scratch_size floats); the ops of ViewAugment.apply in its
    order (jitter steps, gray, blur, solarize), rounded to uint8 once at the end. flip: mirror the
    view first (read mirrored by the uint8 -> float pass; every op here commutes with the flip)."""
    jit, gray, blur, sol = q[0] > 0, q[9] > 0, q[10] > 0, q[12] > 0
    if not (jit or gray or blur or sol):
        if flip:
            _flip_u8(o)
        return
    h, w = o.shape[0], o.shape[1]
    npix = h * w
    n = 3 * npix
    src = o.reshape(n)
    x = scratch[:n]
    if flip:
        _u8_to_planar_flipped(src, x, h, w)
    else:
        _u8_to_planar(src, x, npix)
    if jit:
        for step in range(4):
            op = int(q[5 + step])
            f = np.float32(q[1 + op])
            if op == 0:
                _brightness(x, f)
            elif op == 1:
                _contrast(x, f, w, scratch[n:n + w])
            elif op == 2:
                _saturation(x, f)
            else:
                _hue(x, q[4])
    planes = 3
    if gray:
        _grayscale(x)
        planes = 1
    if blur:  # separable Gaussian, reflect padding, support 3 sigma
        rad = min(max_radius, int(math.ceil(3.0 * q[11])), h - 1, w - 1)
        nk = 2 * rad + 1
        ker = np.empty(nk, dtype=np.float32)
        total = np.float32(0.0)
        for a in range(nk):  # math.exp in float64 (libm in both modes), then float32 steps
            d = (a - rad) / q[11]
            ker[a] = np.float32(math.exp(-0.5 * d * d))
            total += ker[a]
        for a in range(nk):
            ker[a] = ker[a] / total
        t = scratch[n:2 * n]
        pad = scratch[2 * n:2 * n + w + 2 * rad]
        _blur_rows(x, t, pad, ker, planes * h, w, rad)
        _blur_cols(t, x, ker, planes, h, w, rad)
    _planar_to_u8(x, src, npix, planes, sol)


# ---- crop resize: torchvision's antialiased bilinear (default) or OpenCV's INTER_AREA -------------
# One separable resampler, rows first (contiguous, vectorised) then columns, with either weights:
# - 'bilinear' (default): torchvision's resize(antialias=True), i.e. what RandomResizedCrop and
#   Resize do in torchvision v2 and PIL's BILINEAR: a triangle of half-width max(1, scale) source
#   pixels. Upsampling (almost every CIFAR crop: 32 px crops of 32 px images) is plain bilinear.
# - 'area': stock FFCV's cv::resize(INTER_AREA). Upsampling with it is a box filter, i.e. nearest
#   neighbour at integer factors (a 16 px crop to 32 px repeats each pixel twice): not the
#   RandomResizedCrop of SPEC §7. Kept for comparisons with FFCV (--interpolation area). Its
#   shrinking crops use OpenCV's area weights (computeResizeAreaTab) here, 3.5-5x faster than
#   libffcv's scalar call and within 1 grey level of it (bench/decoder_ops.py); growing ones go to
#   libffcv.

def area_scratch_size(res, max_h, max_w):
    """float32 scratch the crop resize needs for outputs of side <= res from images <= max_h x
    max_w, either kind of weights: th taps of <= ceil(2 ch / th) + 1 weights (<= 2 max_h + 3 res
    floats), the same across, one source row padded by 3 kx <= 3 (2 max_w + 1) floats."""
    res, max_h, max_w = int(res), int(max_h), int(max_w)  # a field's shape may hold uint64
    # + the output row's float sums (3 res) and, for crops that grow vertically (rows <= res), every
    # source row resized across (3 res per row)
    return (2 * max_h + 3 * res) + (2 * max_w + 3 * res) + 3 * max_w + 3 * (2 * max_w + 1) + 3 * res + 3 * res * res


@numba.njit(cache=True, fastmath=False)
def _triangle_taps(ssize, dsize, k, first, wts):
    """Antialiased bilinear weights of an ssize -> dsize resize, as torch's interpolate(
    mode='bilinear', antialias=True, align_corners=False) computes them: output d, centred at
    scale (d + 1/2) in source pixels, takes sources [x0, x1) with weights max(0, 1 - |x + 1/2 -
    centre| / support), support = max(1, scale), normalised to sum 1. Stored as output d = sum_t
    wts[d k + t] * input[first[d] + t], t < k (windows moved left where they would run past the
    end; extra weights zero)."""
    scale = ssize / dsize
    support = scale if scale >= 1.0 else 1.0
    for d in range(dsize):
        centre = scale * (d + 0.5)
        x0 = max(int(centre - support + 0.5), 0)
        x1 = min(int(centre + support + 0.5), ssize)
        base = max(min(x0, ssize - k), 0)
        first[d] = base
        for t in range(k):
            wts[d * k + t] = 0.0
        total = 0.0
        for x in range(x0, x1):
            total += max(0.0, 1.0 - abs(x + 0.5 - centre) / support)
        for x in range(x0, x1):
            wts[d * k + x - base] = np.float32(max(0.0, 1.0 - abs(x + 0.5 - centre) / support) / total)


@numba.njit(cache=True, fastmath=False)
def _area_taps(ssize, dsize, k, first, wts):
    """Area weights of a ssize -> dsize (<= ssize) resize: output d = sum_t wts[d k + t] *
    input[first[d] + t], t < k; OpenCV's computeResizeAreaTab (same 1e-3 cut-offs, float weights),
    each window moved left where it would run past the end (extra weights zero)."""
    scale = 1.0 / (dsize / ssize)
    for d in range(dsize):
        fs1 = d * scale
        fs2 = fs1 + scale
        cell = min(scale, ssize - fs1)
        s1, s2 = int(math.ceil(fs1)), int(math.floor(fs2))
        s2 = min(s2, ssize - 1)
        s1 = min(s1, s2)
        left = s1 - fs1 > 1e-3
        base = min(s1 - 1 if left else s1, ssize - k)
        first[d] = base
        for t in range(k):
            wts[d * k + t] = 0.0
        if left:
            wts[d * k + s1 - 1 - base] = np.float32((s1 - fs1) / cell)
        for s in range(s1, s2):
            wts[d * k + s - base] = np.float32(1.0 / cell)
        if fs2 - s2 > 1e-3:
            wts[d * k + s2 - base] = np.float32(min(min(fs2 - s2, 1.0), cell) / cell)


@numba.njit(cache=True, fastmath=False)
def _area_resize(img, i0, ch, j0, cw, out, scr, flip=False):
    """Rows [i0, i0+ch) x cols [j0, j0+cw) of img (H, W, 3) uint8 -> out (th, tw, 3), OpenCV's
    INTER_AREA; needs ch >= th, cw >= tw and area_scratch_size floats of scr. flip: write the
    columns mirrored (a horizontal flip at no cost)."""
    _sep_resize(img, i0, ch, j0, cw, out, scr, flip, False)


@numba.njit(cache=True, fastmath=False)
def _bilinear_resize(img, i0, ch, j0, cw, out, scr, flip=False):
    """_area_resize with torchvision's antialiased bilinear weights (any crop size, growing or
    shrinking along either axis); the same arguments."""
    _sep_resize(img, i0, ch, j0, cw, out, scr, flip, True)


@numba.njit(cache=True, fastmath=False)
def _hpass(row, fx, wx, kx, tw, flip, dst):
    """One row's horizontal taps: dst[3 p + c] = sum_t wx[dx kx + t] * row[3 (fx[dx] + t) + c] for
    output column dx at p = dx (tw - 1 - dx if flip); row is float32, padded past its end."""
    if kx == 2:  # bilinear growth: two taps
        for dx in range(tw):
            b = np.uint64(3 * fx[dx])  # unsigned: no wrap-around check
            p = np.uint64(3 * (tw - 1 - dx) if flip else 3 * dx)
            wa, wb = wx[2 * dx], wx[2 * dx + 1]
            for c in range(3):
                dst[p + c] = wa * row[b + c] + wb * row[b + 3 + c]
    elif kx == 3:  # shrinks by 1-2x (area), 1-1.5x (bilinear): three taps, unrolled (~2x faster)
        for dx in range(tw):
            b = np.uint64(3 * fx[dx])
            p = np.uint64(3 * (tw - 1 - dx) if flip else 3 * dx)
            wa, wb, wc = wx[3 * dx], wx[3 * dx + 1], wx[3 * dx + 2]
            for c in range(3):
                dst[p + c] = wa * row[b + c] + wb * row[b + 3 + c] + wc * row[b + 6 + c]
    elif kx == 4:  # bilinear shrinks by 1.5-2x
        for dx in range(tw):
            b = np.uint64(3 * fx[dx])
            p = np.uint64(3 * (tw - 1 - dx) if flip else 3 * dx)
            wa, wb, wc, wd = wx[4 * dx], wx[4 * dx + 1], wx[4 * dx + 2], wx[4 * dx + 3]
            for c in range(3):
                dst[p + c] = (wa * row[b + c] + wb * row[b + 3 + c] + wc * row[b + 6 + c]
                              + wd * row[b + 9 + c])
    else:
        for dx in range(tw):
            b, p = 3 * fx[dx], 3 * (tw - 1 - dx) if flip else 3 * dx
            for c in range(3):
                v = np.float32(0.0)
                for t in range(kx):
                    v += wx[dx * kx + t] * row[b + 3 * t + c]
                dst[p + c] = v


@numba.njit(cache=True, fastmath=False)
def _sep_resize(img, i0, ch, j0, cw, out, scr, flip, triangle):
    """The separable resize of a crop, in float32, rounded half up to uint8 once. triangle: the
    weights of _triangle_taps (two taps along an axis that grows), else _area_taps (which need a
    shrink along both axes). A crop that shrinks vertically is done rows first (per output row the
    weighted sum of its source rows, contiguous and vectorised, then the columns); one that grows
    vertically columns first (each source row resized across once, then the output rows blended
    from two of those, vectorised), so the per-pixel column taps run on the fewer rows."""
    th, tw = out.shape[0], out.shape[1]
    if triangle:  # taps per output: 2 where the axis grows, else ceil(2 scale) (the triangle's width)
        ky = 2 if ch <= th else (2 * ch + th - 1) // th
        kx = 2 if cw <= tw else (2 * cw + tw - 1) // tw
    else:
        ky, kx = (ch + th - 1) // th + 1, (cw + tw - 1) // tw + 1
    fy, fx = np.empty(th, np.int64), np.empty(tw, np.int64)
    wy, wx = scr[:th * ky], scr[th * ky:th * ky + tw * kx]
    n3, t3 = 3 * cw, 3 * tw
    o0 = th * ky + tw * kx
    # the source row, padded: a window of a crop narrower than kx reads past its end (weight 0)
    row = scr[o0:o0 + n3 + 3 * kx]
    row[n3:] = 0.0
    acc = scr[o0 + n3 + 3 * kx:o0 + n3 + 3 * kx + t3]
    if triangle:
        _triangle_taps(ch, th, ky, fy, wy)
        _triangle_taps(cw, tw, kx, fx, wx)
    else:
        _area_taps(ch, th, ky, fy, wy)
        _area_taps(cw, tw, kx, fx, wx)
    w3 = img.shape[1] * 3
    src = img.reshape(img.shape[0] * w3)
    o = out.reshape(th * t3)
    half, top, zero = np.float32(0.5), np.float32(255.0), np.float32(0.0)
    if ch >= th:  # rows first
        for dy in range(th):
            a = (i0 + fy[dy]) * w3 + 3 * j0
            r0, w0 = src[a:a + n3], wy[dy * ky]
            for q in range(n3):
                row[q] = w0 * np.float32(r0[q])
            for t in range(1, ky):
                wt = wy[dy * ky + t]
                if wt != 0:
                    rt = src[a + t * w3:a + t * w3 + n3]
                    for q in range(n3):
                        row[q] += wt * np.float32(rt[q])
            _hpass(row, fx, wx, kx, tw, flip, acc)
            orow = o[dy * t3:(dy + 1) * t3]  # rounded here, not in a helper: numba's dispatch
            for q in range(t3):             # from ffcv's pipeline failed on that call (KeyError)
                orow[q] = np.uint8(min(max(acc[q] + half, zero), top))
        return
    rows = scr[o0 + n3 + 3 * kx + t3:o0 + n3 + 3 * kx + t3 + ch * t3]  # columns first
    for r in range(ch):
        a = (i0 + r) * w3 + 3 * j0
        rs = src[a:a + n3]
        for q in range(n3):
            row[q] = np.float32(rs[q])
        _hpass(row, fx, wx, kx, tw, flip, rows[r * t3:(r + 1) * t3])
    for dy in range(th):  # ky == 2 here: two rows blended and rounded in one vectorised pass
        b = fy[dy]
        r0, w0 = rows[b * t3:(b + 1) * t3], wy[2 * dy]
        w1 = wy[2 * dy + 1]
        r1 = rows[(b + 1) * t3:(b + 2) * t3] if w1 != 0 else r0
        orow = o[dy * t3:(dy + 1) * t3]
        for q in range(t3):
            orow[q] = np.uint8(min(max(w0 * r0[q] + w1 * r1[q] + half, zero), top))


@numba.njit
def _resize_crop(img, h, w, i, ch, j, cw, o, scr, flip, bilinear):
    """Rows [i, i+ch) x cols [j, j+cw) of img (h, w, 3) -> o. bilinear: _bilinear_resize (mirrored
    there if flip); else INTER_AREA: _area_resize where the crop shrinks along both axes (mirrored
    there if flip), libffcv's OpenCV call otherwise. Returns whether a flip is still to be done."""
    if bilinear:
        _bilinear_resize(img, i, ch, j, cw, o, scr, flip)
        return False
    if ch >= o.shape[0] and cw >= o.shape[1]:
        _area_resize(img, i, ch, j, cw, o, scr, flip)
        return False
    ctypes_resize(0, img.ctypes.data, h, w, i, i + ch, j, j + cw, o.ctypes.data,
                  o.shape[0], o.shape[1])
    return flip


# ---- ffcv operation: decode once, cut V views ------------------------------------------------

class DecodeViews(Operation):
    """FFCV decoder: decode each image once, cut `num_views` crops resized to (res, res).

    Output per sample: uint8 (num_views, res, res, 3) (1-channel storage is expanded to 3).
    Multi-crop (`small_views` K > 0): one flat uint8 buffer holding the V large views, then K
    small views of side `small_res` cut with area range `small_scale` (SwAV/DINO: 2 x 224 px,
    0.14-1 plus K x 96 px, 0.05-0.14), all from one decode; `flat_sizes` gives the split.
    mode 'random': RandomResizedCrop(scale, ratio) + horizontal flip p=`flip_prob`, per view;
    mode 'center': centred square of side `center_ratio` * min(H, W) (num_views copies).
    `view_offset` shifts the view index fed to the hash, so V single-view ops (the re-decoding
    layout of stock FFCV, kept for benchmarks) cut exactly the crops of one V-view op.
    The epoch enters through a tiny int64 buffer that `SSLLoader` fills when an epoch's memory
    is allocated (global arrays are compile-time constants in numba, so it cannot be a global).
    interpolation: 'bilinear' (default) resizes crops as torchvision's RandomResizedCrop and
    Resize (antialiased bilinear, `_bilinear_resize`); 'area' as stock FFCV (INTER_AREA: by
    `_area_resize` where crops shrink along both axes, 3.5-5x faster than libffcv's OpenCV call and
    within 1 grey level of it, else by libffcv; its upsampling is a box filter).
    Memory: like ffcv's own RandomResizedCrop decoder, a per-sample (max H * max W * 3) scratch
    buffer for JPEG/gray storage, times (batches_ahead + 2) * batch_size; plus float32 scratch
    for the colour ops and the resize (colour_scratch_size + area_scratch_size floats per sample;
    ~1.2 MB at 224 px views with colour ops on the decoder).
    """
    def __init__(self, res, num_views=1, mode='random', scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 flip_prob=0.5, center_ratio=1.0, seed=0, view_offset=0, small_views=0,
                 small_res=96, small_scale=(0.05, 0.14), colour=None, threads=2,
                 interpolation='bilinear'):
        super().__init__()
        if interpolation not in ('bilinear', 'area'):
            raise ValueError(f"DecodeViews interpolation is 'bilinear' or 'area', not {interpolation!r}")
        self.interpolation = interpolation
        if mode not in ('random', 'center'):
            raise ValueError(f"DecodeViews mode is 'random' or 'center', not {mode!r}")
        if small_views and mode != 'random':
            raise ValueError("DecodeViews: small (multi-crop) views need mode 'random'")
        self.res, self.num_views, self.mode = int(res), int(num_views), mode
        self.scale, self.ratio, self.flip_prob = tuple(scale), tuple(ratio), float(flip_prob)
        self.center_ratio, self.seed = float(center_ratio), int(seed)
        self.view_offset = int(view_offset)
        self.small_views, self.small_res = int(small_views), int(small_res)
        self.small_scale = tuple(small_scale)
        self.colour = colour  # colour_table(specs) or None: colour ops here, on the CPU
        self.threads = int(threads)  # ffcv worker threads (parallel chunks per batch)
        self.colour_radius = int(colour[:, _P_RADIUS].max()) if colour is not None else 0

    @property
    def flat_sizes(self):
        """Multi-crop layout: bytes of the V large and of the K small views in one flat sample."""
        return (self.num_views * self.res ** 2 * 3, self.small_views * self.small_res ** 2 * 3)

    def declare_state_and_memory(self, previous_state):
        f = self.field
        if isinstance(f, NDArrayField):
            if f.dtype != np.uint8 or len(f.shape) != 3 or f.shape[2] != 1:
                raise ValueError(f"DecodeViews reads uint8 (H, W, 1) arrays, got {f.dtype} "
                                 f"{f.shape}")
            self._gray, (h, w) = True, f.shape[:2]
            scratch = h * w * 3
        elif isinstance(f, RGBImageField):
            self._gray = False
            h, w = int(self.metadata['height'].max()), int(self.metadata['width'].max())
            any_jpg = bool((self.metadata['mode'] == 0).any())
            scratch = h * w * 3 if any_jpg else 1
        else:
            raise ValueError(f"DecodeViews reads RGBImageField or NDArrayField, not "
                             f"{type(f).__name__}")
        out = (self.num_views, self.res, self.res, 3)
        if self.small_views:  # two sizes in one flat buffer: decode once for all V + K crops
            out = (sum(self.flat_sizes),)
        u1 = np.dtype('<u1')
        # float32 per chunk: the colour ops' scratch, then the area resize's
        self._colour_floats = (colour_scratch_size(self.res, self.colour_radius)
                               if self.colour is not None else 0)
        sides = (self.res, self.small_res) if self.small_views else (self.res,)
        cscratch = self._colour_floats + max(area_scratch_size(r, h, w) for r in sides)
        return (replace(previous_state, jit_mode=True, shape=out, dtype=u1),
                (AllocationQuery(out, u1), AllocationQuery((scratch,), u1),
                 AllocationQuery((1,), np.dtype('<i8')),
                 AllocationQuery((cscratch,), np.dtype('<f4'))))

    def generate_code(self):
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        V, offset, seed, res = self.num_views, self.view_offset, self.seed, self.res
        random_mode, flip_prob = self.mode == 'random', self.flip_prob
        center_ratio, bilinear = self.center_ratio, self.interpolation == 'bilinear'
        smin, smax = float(self.scale[0]), float(self.scale[1])
        lrmin, lrmax = math.log(self.ratio[0]), math.log(self.ratio[1])
        gray = self._gray
        gh, gw = (int(self.field.shape[0]), int(self.field.shape[1])) if gray else (0, 0)

        colour = self.colour if self.colour is not None else np.zeros((1, 11))
        has_colour, n_types, radius = self.colour is not None, len(colour), self.colour_radius
        c0 = self._colour_floats  # the area resize's scratch starts here in each chunk's row
        # the batch is cut into n_slots contiguous chunks run in parallel; chunk sl uses float32
        # colour scratch row sl for all its views, so that memory stays in cache (a row per
        # sample would stream from DRAM at ImageNet size)
        n_slots = max(1, 2 * self.threads)

        def cut_views(img, out, key, s, h, w, cs):
            """img (h, w, 3) -> out (V, res, res, 3): one crop (+ flip) (+ colour) per view."""
            for v in range(V):
                view = offset + v
                if random_mode:
                    i, j, ch, cw = _rrc_box(key, s, view, h, w, smin, smax, lrmin, lrmax)
                else:
                    i, j, ch, cw = _center_box(h, w, center_ratio)
                o = out[v]
                flip = flip_prob > 0 and _uniform(key, s, view, _FLIP_DRAW) < flip_prob
                flip = _resize_crop(img, h, w, i, ch, j, cw, o, cs[c0:], flip, bilinear)  # flip to do?
                if has_colour:  # a flip the resize did not do rides on the colour ops
                    _apply_colour(o, cs, _colour_params(key, s, view, colour[v % n_types]), radius,
                                  flip)
                elif flip:
                    _flip_u8(o)

        K, r = self.small_views, self.small_res
        nbig = self.flat_sizes[0]
        cut_large = Compiler.compile(cut_views)
        ssmin, ssmax = float(self.small_scale[0]), float(self.small_scale[1])

        def cut_multi(img, out, key, s, h, w, cs):
            """img -> flat out: V large crops (res) then K small crops (small_res, small_scale);
            small view k hashes as view index offset + V + k."""
            cut_large(img, out[:nbig].reshape(V, res, res, 3), key, s, h, w, cs)
            small = out[nbig:].reshape(K, r, r, 3)
            for k in range(K):
                view = offset + V + k
                i, j, ch, cw = _rrc_box(key, s, view, h, w, ssmin, ssmax, lrmin, lrmax)
                o = small[k]
                flip = flip_prob > 0 and _uniform(key, s, view, _FLIP_DRAW) < flip_prob
                flip = _resize_crop(img, h, w, i, ch, j, cw, o, cs[c0:], flip, bilinear)  # flip to do?
                if has_colour:  # view types restart at the first small view
                    _apply_colour(o, cs, _colour_params(key, s, view, colour[k % n_types]), radius,
                                  flip)
                elif flip:
                    _flip_u8(o)

        cut = Compiler.compile(cut_multi if K else cut_views)

        # Two decoders, because numba types both sides of an `if` and the metadata differ:
        # NDArrayField stores a bare pointer per sample, RGBImageField a record.
        if gray:
            def decode(batch_indices, my_storage, metadata, storage_state):
                dst, scratch, epoch_buf, cscratch = my_storage
                key = _epoch_key(seed, epoch_buf[0, 0])
                n = len(batch_indices)
                slots = min(n, n_slots)
                for sl in my_range(slots):  # contiguous chunks: colour scratch row sl stays cached
                    for b in range(sl * n // slots, (sl + 1) * n // slots):
                        s = np.int64(batch_indices[b])
                        plane = mem_read(metadata[s], storage_state).reshape(gh, gw)
                        img = scratch[b][:gh * gw * 3].reshape(gh, gw, 3)
                        for c in range(3):
                            img[:, :, c] = plane
                        cut(img, dst[b], key, s, gh, gw, cscratch[sl])
                return dst[:n]
        else:
            def decode(batch_indices, my_storage, metadata, storage_state):
                dst, scratch, epoch_buf, cscratch = my_storage
                key = _epoch_key(seed, epoch_buf[0, 0])
                n = len(batch_indices)
                slots = min(n, n_slots)
                for sl in my_range(slots):
                    for b in range(sl * n // slots, (sl + 1) * n // slots):
                        s = np.int64(batch_indices[b])
                        field = metadata[s]
                        data = mem_read(field['data_ptr'], storage_state)
                        h, w = np.int64(field['height']), np.int64(field['width'])
                        if field['mode'] == 0:  # jpg: decode into this sample's scratch buffer
                            buf = scratch[b]
                            ctypes_imdecode(data.ctypes.data, data.size, h, w, buf.ctypes.data,
                                            h, w, 0, 0, 1, 1, False, False)
                            img = buf[:h * w * 3].reshape(h, w, 3)
                        else:
                            img = data.reshape(h, w, 3)
                        cut(img, dst[b], key, s, h, w, cscratch[sl])
                return dst[:n]

        decode.is_parallel = True
        return decode


def _fill_epoch_buffers(loader, ops, get_epoch):
    """Wrap the loader graph's per-epoch memory allocation so that every DecodeViews op's
    epoch buffer holds the current epoch before the epoch's worker thread starts."""
    graph = loader.graph
    original = graph.allocate_memory
    node_ids = [node.id for op in ops for node in graph.operation_to_node[op]]

    def allocate_memory(batch_size, batches_ahead):
        memory = original(batch_size, batches_ahead)
        for nid in node_ids:
            memory['operation'][nid][2][...] = get_epoch()
        return memory

    graph.allocate_memory = allocate_memory


# ---- traversal order: same permutation on every rank, then a strided shard ------------------

class ShardedOrder(TraversalOrder):
    """Epoch e's order: permutation by np.random.default_rng(seed + e) (identical on every rank
    and to ffcv's RANDOM order at world_size 1), padded by wrapping to a multiple of world_size
    like torch's DistributedSampler, then rank::world_size. Needs no process group."""
    def __init__(self, shuffle, rank, world_size):
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size

    def __call__(self, loader):  # ffcv instantiates a custom order by calling it with the loader
        super().__init__(loader)
        return self

    def sample_order(self, epoch):
        idx = self.indices
        if self.shuffle:
            idx = np.random.default_rng(self.seed + epoch).permutation(idx)
        per_rank = -(-len(idx) // self.world_size)
        pad = per_rank * self.world_size - len(idx)
        if pad:
            idx = np.concatenate([idx, idx[:pad]])
        return idx[self.rank::self.world_size]


# ---- ViewAugment: batched per-image colour augmentations in torch ---------------------------

@dataclass(frozen=True)
class ColourSpec:
    """One view type's colour augmentation; probabilities are per view, exact."""
    jitter: tuple = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue strengths
    jitter_prob: float = 0.0
    gray_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_prob: float = 0.0
    noise_std: float = 0.0

    @property
    def is_identity(self):
        return not (self.jitter_prob or self.gray_prob or self.blur_prob or self.solarize_prob
                    or self.noise_std)


def recipe_specs(recipe, blur_prob=0.0, noise_std=0.1):
    """View types of a recipe: a list of ColourSpec; view v uses spec v % len(list)."""
    if recipe in ('cifar', 'cifar_strong'):
        j = (0.4, 0.4, 0.4, 0.1) if recipe == 'cifar' else (0.8, 0.8, 0.8, 0.2)
        return [ColourSpec(j, 0.8, 0.2, blur_prob)]
    if blur_prob:
        raise ValueError(f"blur_prob is a flag of the cifar recipes; recipe {recipe!r} "
                         f"fixes its own blur")
    if recipe == 'imagenet':  # BYOL's asymmetric pair, alternated over the V views
        j = (0.4, 0.4, 0.2, 0.1)
        return [ColourSpec(j, 0.8, 0.2, blur_prob=1.0, solarize_prob=0.0),
                ColourSpec(j, 0.8, 0.2, blur_prob=0.1, solarize_prob=0.2)]
    if recipe == 'crop':
        return [ColourSpec()]
    if recipe == 'noise':
        return [ColourSpec(noise_std=noise_std)]
    raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")


def _gray(x):
    """(N, 3, H, W) -> (N, 1, H, W) luma (torchvision weights)."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a, b, f):
    return (f * a + (1 - f) * b).clamp_(0, 1)


def adjust_brightness(x, f):
    return _blend(x, torch.zeros_like(x), f)


def adjust_contrast(x, f):
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, _gray(x), f)


def adjust_hue(x, f):
    """Rotate hue by f (n,) turns (torchvision semantics), per image. x (n, 3, H, W) in [0, 1]."""
    r, g, b = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, 1.0)
    d = torch.where(delta > 0, delta, 1.0)
    h = torch.where(maxc == r, (g - b) / d,
                    torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h6 = torch.remainder(h + 6.0 * f.view(-1, 1, 1), 6.0)  # hue in sextants, shifted
    # branch-free HSV -> RGB: channel = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6
    vs = maxc * s
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(maxc - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, 1)


def gaussian_blur(x, sigma, max_sigma=2.0):
    """Separable Gaussian blur with a per-image sigma (N,), reflect padding; image i's kernel has
    radius min(ceil(3 sigma_i), ceil(3 max_sigma)) (capped below the image size; OpenCV's and
    PIL's truncation at ~3 sigma; torchvision's fixed 23-px kernel at 224 px keeps < 0.3 % more
    of the mass), weights normalised per image."""
    n, c, h, w = x.shape
    radius = min(int(math.ceil(3 * max_sigma)), h - 1, w - 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sig = sigma[:, None].to(x)
    k = torch.exp(-0.5 * (t[None] / sig) ** 2)
    k = k * (t[None].abs() <= torch.ceil(3 * sigma[:, None].to(torch.float64)).to(x))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, K)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode='reflect')
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x):
    return torch.where(x >= 0.5, 1.0 - x, x)


class ViewAugment(torch.nn.Module):
    """Per-view colour augmentations of a (B, V, 3, H, W) batch in [0, 1], on its device.

    View v has type v % len(specs) (the 'imagenet' recipe alternates A: blur 1.0 / no solarize
    and B: blur 0.1 / solarize 0.2). Every random choice is per view, drawn on the CPU from
    `generator` (so CPU and GPU runs see the same parameters and no device sync is needed),
    then applied to the chosen subsets only. Colour jitter follows torchvision's ColorJitter:
    factors uniform in [max(0, 1 - s), 1 + s] (hue in [-s, s]), the four ops in a random
    order per image, each clamped to [0, 1].
    """
    def __init__(self, specs):
        super().__init__()
        self.specs = list(specs)

    def view_types(self, num_views):
        return [v % len(self.specs) for v in range(num_views)]

    @staticmethod
    def sample_params(n, spec, generator=None):
        """Random parameters for n views of one type; dict of CPU tensors of leading size n."""
        g = generator
        u = lambda *shape: torch.rand(*shape, generator=g)
        b, c, s, h = spec.jitter
        lo_hi = [(max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s),
                 (-h, h)]
        factors = torch.stack([lo + (hi - lo) * u(n) for lo, hi in lo_hi], 1)
        lo, hi = spec.blur_sigma
        return dict(
            jitter=u(n) < spec.jitter_prob,
            factors=factors,                       # (n, 4): brightness, contrast, saturation, hue
            order=torch.argsort(u(n, 4), dim=1),   # (n, 4): op applied at step k
            gray=u(n) < spec.gray_prob,
            blur=u(n) < spec.blur_prob,
            sigma=lo + (hi - lo) * u(n),
            solarize=u(n) < spec.solarize_prob,
        )

    @staticmethod
    def apply(x, p, spec, generator=None, inplace=False):
        """Apply sampled params p to x (n, 3, H, W) in [0, 1]. inplace: modify and return x
        (which may be a strided view), else work on a copy.

        Jitter, step k of each image's random order: brightness, contrast and saturation are
        one blend a*x + bg*gray(x) + bm*mean(gray(x)), clamped, over the whole batch (images
        doing another op at step k get a=1, bg=bm=0: an exact no-op), hue runs on its subset.
        """
        dev = x.device
        active = lambda mask: mask.nonzero().squeeze(1)  # CPU masks: no device sync
        if not inplace:
            x = x.clone()
        if spec.jitter_prob > 0:
            n = x.shape[0]
            for k in range(4):
                op = torch.where(p['jitter'], p['order'][:, k], -1)
                f = p['factors']
                a = torch.ones(n, dtype=f.dtype)
                bg, bm = torch.zeros_like(a), torch.zeros_like(a)
                for i, coef in ((0, None), (1, bm), (2, bg)):  # brightness, contrast, saturation
                    sel = op == i
                    a[sel] = f[sel, i]
                    if coef is not None:
                        coef[sel] = 1 - f[sel, i]
                if (op >= 0).logical_and(op <= 2).any():
                    coefs = torch.stack([a, bg, bm], 1).to(dev, x.dtype, non_blocking=True)
                    coefs = coefs.view(n, 3, 1, 1, 1)
                    gray = _gray(x)
                    shift = coefs[:, 1] * gray + coefs[:, 2] * gray.mean((1, 2, 3), keepdim=True)
                    x.mul_(coefs[:, 0]).add_(shift).clamp_(0, 1)
                sel = active(op == 3)
                if sel.numel():
                    sd = sel.to(dev, non_blocking=True)
                    x.index_copy_(0, sd, adjust_hue(x[sd], f[sel, 3].to(dev, x.dtype)))
        for name, fn in (('gray', lambda y, s: _gray(y).expand_as(y)),
                         ('blur', lambda y, s: gaussian_blur(y, s.to(dev), spec.blur_sigma[1])),
                         ('solarize', lambda y, s: solarize(y))):
            sel = active(p[name])
            if sel.numel():
                sd = sel.to(dev, non_blocking=True)
                x.index_copy_(0, sd, fn(x[sd], p['sigma'][sel]).contiguous())
        if spec.noise_std > 0:
            x.add_(torch.randn(x.shape, device=dev, generator=generator), alpha=spec.noise_std)
        return x

    def forward(self, x, generator=None, noise_generator=None, inplace=False):
        """x (B, V, 3, H, W) float in [0, 1] -> same shape, each view augmented independently.

        Views of type t are the strided slice x[:, t::T]; when V % T == 0 it flattens to
        (B * V / T, 3, H, W) without a copy and is augmented in place (inplace=True: in x itself).
        """
        if not inplace:
            x = x.clone()
        B, V = x.shape[:2]
        T = len(self.specs)
        for t, spec in enumerate(self.specs):
            sub = x[:, t::T]
            n = B * sub.shape[1]
            if n == 0:
                continue
            p = self.sample_params(n, spec, generator)
            if spec.is_identity:
                continue
            try:
                self.apply(sub.view(n, *x.shape[2:]), p, spec, noise_generator, inplace=True)
            except RuntimeError:  # not flattenable as a view (V % T != 0): copy and write back
                ys = self.apply(sub.reshape(n, *x.shape[2:]), p, spec, noise_generator, inplace=True)
                x[:, t::T] = ys.view(sub.shape)
        return x


# ---- shared loader plumbing -------------------------------------------------------------------

def _mix_seed(*parts):
    """64-bit mix of integers in Python (torch generator seeds; no numba needed)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def _ffcv_loader(path, batch_size, workers, order, seed, indices, pipelines, drop_last):
    """An ffcv Loader, keeping the caller's torch thread count (ffcv's Compiler.set_num_threads
    also calls torch.set_num_threads(workers) in the calling thread)."""
    threads = torch.get_num_threads()
    try:
        return Loader(path, batch_size=batch_size, num_workers=workers, order=order, seed=seed,
                      indices=indices, pipelines=pipelines, drop_last=drop_last)
    finally:
        torch.set_num_threads(threads)


def _image_pipeline_tail(device):
    device = torch.device(device)
    return [ToTensor()] + ([ToDevice(device, non_blocking=True)] if device.type != 'cpu' else [])


class _Closed(Exception):
    """Raised in the loader thread when its iterator was closed: stop before the next batch."""


class _EpochIterator(EpochIterator):
    """ffcv's EpochIterator, except that an exception in its worker thread (a numba compile or
    decode error) is re-raised in the consumer instead of leaving it blocked forever, and that
    close() stops the thread before its next batch and waits for it. ffcv's close() only flags
    the thread, which kept decoding ahead into a consumer that had left: at interpreter exit
    (a preempted or stopped run, a benchmark) OpenCV's thread-local state was torn down under a
    running resize and the process aborted ('terminate called ... terminated TLS container')."""
    _error = None

    def run(self):
        try:
            super().run()
        except _Closed:
            pass
        except BaseException as e:
            self._error = e
            self.output_queue.put(None)

    def run_pipeline(self, *args, **kwargs):
        if self.terminate_event.is_set():
            raise _Closed
        return super().run_pipeline(*args, **kwargs)

    def close(self):
        self.terminate_event.set()
        if threading.current_thread() is not self:
            deadline = time.monotonic() + 300  # at most the batch in progress
            while self.is_alive() and time.monotonic() < deadline:
                try:  # unblock the thread's put into a full queue: ffcv's end-of-epoch put of
                    while True:  # None has no timeout, so it would wait for a consumer forever
                        self.output_queue.get_nowait()
                except queue.Empty:
                    pass
                self.join(timeout=0.05)
        super().close()

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self._error is not None:
                raise RuntimeError(f"data: the ffcv loader thread failed: {self._error!r}") \
                    from self._error
            raise


def _start_epoch(loader, order):
    """Start an epoch over an explicit `order` (ffcv's Loader.__iter__ minus its own epoch
    bookkeeping). The worker thread starts now and prepares batches ahead."""
    threads = torch.get_num_threads()
    Compiler.set_num_threads(loader.num_workers)
    torch.set_num_threads(threads)
    return _EpochIterator(loader, order)


def _drain(it):
    """Yield from an EpochIterator, closing its worker thread even when the consumer stops."""
    try:
        yield from it
    finally:
        it.close()


def _to_unit_float(x):
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [0, 1], contiguous (the permute is done
    on the uint8 data: a quarter of the bytes of a float copy)."""
    nd = x.dim()
    perm = list(range(nd - 3)) + [nd - 1, nd - 3, nd - 2]
    return x.permute(*perm).contiguous().float().mul_(1 / 255)


@numba.njit(parallel=True, cache=True)
def _u8_to_input(src, dst, scale, shift, mode):
    """src (N, H, W, 3) uint8 -> dst (N, C, H, W) float32 = v * scale[c] + shift[c], one pass,
    parallel over N. mode 0: C = 3; 1: C = 1 from plane 0 (gray storage); 2: C = 1 luma."""
    n, hw = src.shape[0], src.shape[1] * src.shape[2]
    wr, wg, wb = np.float32(GRAY_WEIGHTS[0]), np.float32(GRAY_WEIGHTS[1]), np.float32(GRAY_WEIGHTS[2])
    inv = np.float32(1.0 / 255.0)
    s3 = src.reshape(n, hw * 3)
    d = dst.reshape(n, dst.shape[1] * hw)
    for i in numba.prange(n):
        a, b = s3[i], d[i]
        if mode == 0:
            for c in range(3):
                sc, sh, off = scale[c], shift[c], c * hw
                for p in range(hw):
                    b[off + p] = np.float32(a[3 * p + c]) * sc + sh
        elif mode == 1:
            sc, sh = scale[0], shift[0]
            for p in range(hw):
                b[p] = np.float32(a[3 * p]) * sc + sh
        else:
            sc, sh = scale[0], shift[0]
            for p in range(hw):
                v = (wr * (np.float32(a[3 * p]) * inv) + wg * (np.float32(a[3 * p + 1]) * inv)
                     + wb * (np.float32(a[3 * p + 2]) * inv))
                b[p] = v * sc + sh


_POOL = {}


def _pooled(shape, keep=4):
    """A float32 array of `shape` for a batch, reused once nothing refers to it any more (only
    this pool does: refcount 2 in getrefcount). Fresh arrays of ImageNet-size batches (> 32 MB,
    always mmap-ed by glibc) cost more in page faults than the conversion itself."""
    arrays = _POOL.setdefault(shape, [])
    for a in arrays:
        if sys.getrefcount(a) == 3:  # the list, the loop variable, getrefcount's argument
            return a
    a = np.empty(shape, dtype=np.float32)
    if len(arrays) < keep:
        arrays.append(a)
    return a


def to_input(x, channels, mean, std, gray_source):
    """uint8 (..., H, W, 3) -> normalised float32 (..., C, H, W) for the model in one pass: a
    parallel numba kernel on CPU tensors (JIT on), else torch ops doing the same float32
    arithmetic (GPU tensors; tests with the JIT off), so both give identical values.
    3 channels and gray storage: v * (1 / (255 std)) + (-mean / std); luma: the luma of v / 255,
    then * (1 / std) + (-mean / std)."""
    mode = 0 if channels == 3 else (1 if gray_source else 2)
    std32, mean32 = std.float(), mean.float()
    scale = (1.0 / (std32.double() * (255.0 if mode < 2 else 1.0))).float()
    shift = (-mean32.double() / std32.double()).float()
    lead = x.shape[:-3]
    h, w = x.shape[-3:-1]
    if x.device.type == 'cpu' and not numba.config.DISABLE_JIT:
        src = x.reshape(-1, h, w, 3).contiguous().numpy()
        out = _pooled((src.shape[0], channels, h, w))
        _u8_to_input(src, out, scale.cpu().numpy(), shift.cpu().numpy(), mode)
        return torch.from_numpy(out).view(*lead, channels, h, w)
    dims = list(range(x.dim() - 3)) + [x.dim() - 1, x.dim() - 3, x.dim() - 2]
    v = x.permute(*dims).float()  # (..., 3, H, W)
    shape = [1] * (v.dim() - 3) + [channels, 1, 1]
    if mode == 1:
        v = v[..., 0:1, :, :]
    elif mode == 2:
        u = v * torch.tensor(1.0 / 255.0, dtype=torch.float32)
        v = (GRAY_WEIGHTS[0] * u[..., 0:1, :, :] + GRAY_WEIGHTS[1] * u[..., 1:2, :, :]
             + GRAY_WEIGHTS[2] * u[..., 2:3, :, :])
    return (v * scale.to(v.device).view(shape) + shift.to(v.device).view(shape)).contiguous()


def _finish(x, channels, mean, std, gray_source):
    """(..., 3, H, W) in [0, 1], owned by the caller -> channel selection + normalisation, in
    place where possible. channels=1: the stored plane of 1-channel data (exact), else luma."""
    if channels == 1 and gray_source:
        x = x[..., 0:1, :, :].contiguous()
    elif channels == 1:
        x = (GRAY_WEIGHTS[0] * x[..., 0:1, :, :] + GRAY_WEIGHTS[1] * x[..., 1:2, :, :]
             + GRAY_WEIGHTS[2] * x[..., 2:3, :, :])
    shape = [1] * (x.dim() - 3) + [channels, 1, 1]
    return x.sub_(mean.view(shape)).div_(std.view(shape))


def _check_indices(indices, info):
    """A subset of sample indices as uint64 (ffcv's index type), validated against the beton."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or len(idx) == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty 1-D array of ints, got {idx.dtype} "
                         f"{idx.shape}")
    if idx.min() < 0 or idx.max() >= info['num_samples']:
        raise ValueError(f"indices outside [0, {info['num_samples']}) of {info['path']}")
    return idx.astype(np.uint64)


def _check_common(info, res, channels, workers, batch_size):
    if channels not in (1, 3):
        raise ValueError(f"channels is 1 or 3, not {channels}")
    if res < 1 or batch_size < 1 or workers < 1:
        raise ValueError(f"res, batch_size and workers must be >= 1 (got {res}, {batch_size}, "
                         f"{workers})")


# ---- SSL loader --------------------------------------------------------------------------------

class SSLLoader:
    """Multi-view SSL batches: `for views, labels in loader`.

    views: float32 (B, V, C, H, W) normalised, on `device`; labels: int64 (B,) on `device`.
    With small (multi-crop) views, `views` is a list [large (B, V, C, H, W), small (B, K, C,
    h, h)]; the small group gets the same colour recipe (view types restart at its view 0)
    with its own random draws, so the large views equal those of a loader without small ones.
    `len(loader)`: batches per epoch on this rank. Each `iter()` runs epoch `loader.epoch` and
    then advances it; `set_epoch(e)` after a resume makes the next epoch e (order AND crops).
    `iter_from(k)` starts epoch `loader.epoch` at batch k without reading batches < k (free:
    every random choice is keyed on (seed + rank, epoch, sample or batch index)), giving the
    same batches k, k+1, ... as an uninterrupted epoch. `state_dict()` records (epoch, next
    batch) as the consumer has seen them; `load_state_dict()` makes the next iter() resume there.
    """
    def __init__(self, loader, ops, info, batch_size, num_views, res, channels, device, seed,
                 rank, augment, mean, std):
        self._loader, self._ops, self.info = loader, ops, info
        self.batch_size, self.num_views = batch_size, num_views
        self.small_views, self.small_res = ops[0].small_views, ops[0].small_res
        self.res, self.channels = res, channels
        self.device, self.seed, self.rank = torch.device(device), seed, rank
        self.augment, self.mean, self.std = augment, mean.to(self.device), std.to(self.device)
        self.epoch, self._resume_batch = 0, 0
        self._position = (0, 0)
        self._running_epoch = 0
        self._names = list(loader.pipeline_specs)
        _fill_epoch_buffers(loader, ops, lambda: self._running_epoch)

    def __len__(self):
        return len(self._loader)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def state_dict(self):
        return {'epoch': self._position[0], 'batch': self._position[1]}

    def load_state_dict(self, state):
        self.epoch, self._resume_batch = int(state['epoch']), int(state['batch'])

    def __iter__(self):
        start, self._resume_batch = self._resume_batch, 0
        return self.iter_from(start)

    def iter_from(self, batch_index):
        """Iterator over epoch `self.epoch` from batch `batch_index`; advances `self.epoch`."""
        epoch, n = self.epoch, len(self)
        if not 0 <= batch_index <= n:
            raise ValueError(f"iter_from: batch_index {batch_index} outside [0, {n}]")
        order = self._loader.traversal_order.sample_order(epoch)[:n * self.batch_size]
        self._running_epoch = epoch  # read by the epoch-buffer hook when the iterator allocates
        batches = _drain(_start_epoch(self._loader, order[batch_index * self.batch_size:]))
        self.epoch = epoch + 1
        return self._generate(batches, epoch, batch_index)

    def _generate(self, batches, epoch, first):
        aug_seed = self.seed + self.rank
        dev = self.device
        for k, out in enumerate(batches, start=first):
            named = dict(zip(self._names, out))
            if self.small_views:  # multi-crop: split the flat buffer into the two sizes
                flat, (nbig, _) = named['image'], self._ops[0].flat_sizes
                B, r, R = flat.shape[0], self.small_res, self.res
                groups = [flat[:, :nbig].view(B, self.num_views, R, R, 3),
                          flat[:, nbig:].view(B, self.small_views, r, r, 3)]
            elif 'image' in named and len(self._ops) == 1:
                groups = [named['image']]
            else:  # one re-decoding pipeline per view (benchmark layout)
                rest = [named[f'view{v}'] for v in range(1, self.num_views)]
                groups = [torch.cat([named['image']] + rest, 1)]
            labels = named['label'].reshape(-1).to(dev, torch.int64, copy=True)
            views = []
            for g, x in enumerate(groups):
                if self.augment is None:  # colour done in the decoder: uint8 -> input in one pass
                    views.append(to_input(x.to(dev, non_blocking=True), self.channels, self.mean,
                                          self.std, self.info['channels'] == 1))
                    continue
                x = _to_unit_float(x.to(dev, non_blocking=True))  # (B, V, 3, H, W) in [0, 1]
                if g == 0 and x.shape[1] != self.num_views:  # 'noise': one decoded view, V copies
                    x = x.expand(-1, self.num_views, -1, -1, -1).contiguous()
                # group 0 draws exactly what a loader without small views draws
                gen = torch.Generator().manual_seed(_mix_seed(aug_seed, epoch, k, *[2] * g))
                noise_gen = torch.Generator(device=dev).manual_seed(
                    _mix_seed(aug_seed, epoch, k, 1, *[2] * g))
                if self.augment is not None:  # colour ops in torch (else done in the decoder)
                    x = self.augment(x, gen, noise_gen, inplace=True)
                views.append(_finish(x, self.channels, self.mean, self.std,
                                     self.info['channels'] == 1))
            self._position = (epoch, k + 1)
            yield (views if self.small_views else views[0]), labels
        self._position = (epoch + 1, 0)


def build_ssl_loader(path, batch_size, num_views, res, recipe='cifar', channels=3, workers=2,
                     seed=0, distributed=False, rank=0, world_size=1, device='cpu',
                     drop_last=True, scale=(0.08, 1.0), order='random', blur_prob=0.0,
                     noise_std=0.1, decode_once=True, indices=None, small_views=0, small_res=96,
                     small_scale=(0.05, 0.14), colour='auto', norm_from=None, interpolation='bilinear'):
    """Multi-view SSL loader over a beton written by `write_beton` (see `SSLLoader`).

    batch_size: images per rank per batch (each with num_views views); res: output side;
    recipe: one of RECIPES (SPEC §7); channels: 1 or 3 given to the model (1 = luma);
    workers: CPU threads of ffcv; seed: the same on every rank (order), augmentations use
    seed + rank; distributed/rank/world_size: strided shard of one shared permutation
    (distributed=True is required when world_size > 1); scale: RandomResizedCrop area range;
    order: 'random' or 'sequential'; blur_prob: blur p for the cifar recipes (σ in [0.1, 2]);
    noise_std: σ of the 'noise' recipe in [0, 1] pixel units; decode_once=False re-decodes the
    image for every view as stock FFCV does (same crops; for benchmarks only); indices: draw only
    from these beton sample indices (e.g. a train split without its held-out part); shuffling
    and sharding act on this subset, and len(loader) counts it. small_views K > 0: multi-crop,
    K extra crops of side small_res with area range small_scale from the same decode (pass
    scale=(0.14, 1) for the SwAV/DINO large crops); batches then hold [large, small].
    colour: where the per-view colour ops run. 'decoder': inside the ffcv decoder, per view right
    after its crop, on the CPU worker threads (numba, uint8 out; random parameters from the
    counter hash per (sample, view)); 'torch': ViewAugment's batched torch ops on `device`
    (random parameters per batch from a torch generator); 'auto' (default): 'torch' when
    `device` is a GPU, else 'decoder'. Both draw from the same distribution (SPEC §7).
    norm_from: beton whose sidecar mean/std normalise (the TRAIN beton when reading augmented
    views of a test split); default: this beton's own. interpolation: how crops are resized,
    'bilinear' (torchvision's RandomResizedCrop, antialiased) or 'area' (stock FFCV; see DecodeViews).
    """
    info = beton_info(path)
    _check_common(info, res, channels, workers, batch_size)
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if world_size > 1 and not distributed:
        raise ValueError(f"world_size {world_size} > 1 needs distributed=True")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if order not in ('random', 'sequential'):
        raise ValueError(f"order is 'random' or 'sequential', not {order!r}")
    specs = recipe_specs(recipe, blur_prob, noise_std)
    if colour == 'auto':
        colour = 'torch' if torch.device(device).type != 'cpu' or recipe == 'noise' else 'decoder'
    if colour not in ('decoder', 'torch'):
        raise ValueError(f"colour is 'auto', 'decoder' or 'torch', not {colour!r}")
    table = colour_table(specs) if colour == 'decoder' else None
    aug_seed = seed + rank
    tail = _image_pipeline_tail(device)
    if small_views < 0 or (small_views and not 1 <= small_res <= res):
        raise ValueError(f"small_views must be >= 0 and small_res in [1, res={res}] (got "
                         f"{small_views}, {small_res})")
    if small_views and (recipe == 'noise' or not decode_once):
        raise ValueError("small (multi-crop) views need decode_once=True and a cropping recipe")
    if recipe == 'noise':
        ops = [DecodeViews(res, 1, mode='center', flip_prob=0.0, seed=aug_seed,
                           interpolation=interpolation)]
    elif decode_once:
        ops = [DecodeViews(res, num_views, scale=scale, seed=aug_seed, small_views=small_views,
                           small_res=small_res, small_scale=small_scale, colour=table,
                           threads=workers, interpolation=interpolation)]
    else:
        ops = [DecodeViews(res, 1, scale=scale, seed=aug_seed, view_offset=v, threads=workers,
                           colour=None if table is None else np.roll(table, -v, axis=0),
                           interpolation=interpolation)
               for v in range(num_views)]
    pipelines = {'image': PipelineSpec('image', decoder=ops[0], transforms=list(tail)),
                 'label': [IntDecoder()] + _image_pipeline_tail(device)}
    for v, op in enumerate(ops[1:], start=1):
        pipelines[f'view{v}'] = PipelineSpec('image', decoder=op,
                                             transforms=_image_pipeline_tail(device))
    traversal = ShardedOrder(order == 'random', rank, world_size)
    subset = None if indices is None else _check_indices(indices, info)
    loader = _ffcv_loader(path, batch_size, workers, traversal, seed, subset, pipelines, drop_last)
    mean, std = norm_stats(beton_info(norm_from) if norm_from else info, channels)
    augment = ViewAugment(specs) if colour == 'torch' else None
    return SSLLoader(loader, ops, info, batch_size, num_views, res, channels, device, seed, rank,
                     augment, mean, std)


# ---- evaluation loader --------------------------------------------------------------------------

class EvalLoader:
    """Deterministic sequential batches: `for images, labels, indices in loader`.

    images: float32 (B, C, res, res) normalised on `device`; labels, indices: int64 (B,) on
    `device` (indices = sample index in the beton, for index-aware gathers). This rank's
    samples are the contiguous slice `loader.indices`; over all ranks every sample appears
    exactly once. No drop_last.
    """
    def __init__(self, loader, op, info, indices, batch_size, channels, device, mean, std):
        self._loader, self._op, self.info, self.indices = loader, op, info, indices
        self.batch_size, self.channels, self.device = batch_size, channels, torch.device(device)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.num_samples = len(indices)
        self._names = list(loader.pipeline_specs)
        _fill_epoch_buffers(loader, [op], lambda: 0)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        dev = self.device
        batches = _drain(_start_epoch(self._loader, self._loader.traversal_order.sample_order(0)))
        for k, out in enumerate(batches):
            named = dict(zip(self._names, out))
            labels = named['label'].reshape(-1).to(dev, torch.int64, copy=True)
            x = to_input(named['image'].to(dev, non_blocking=True)[:, 0], self.channels, self.mean,
                         self.std, self.info['channels'] == 1)
            start = k * self.batch_size
            idx = torch.from_numpy(self.indices[start:start + len(labels)])
            yield x, labels, idx.to(dev, torch.int64)


def build_eval_loader(path, batch_size, res, channels=3, workers=2, device='cpu', rank=0,
                      world_size=1, resize_ratio=None, norm_from=None, indices=None, interpolation='bilinear'):
    """Evaluation loader (see `EvalLoader`): centred square of side resize_ratio * min(H, W),
    resized to res. resize_ratio None: 1.0 when all stored images have one size (CIFAR,
    STL-10, Fashion-MNIST, pre-resized sets: the whole image, identity at native res), else
    0.875 (variable-size ImageNet-style sets: the usual resize 256 -> centre crop 224).
    norm_from: beton whose sidecar mean/std normalise (pass the TRAIN beton when reading a
    test set, so both use the same statistics); default `path` itself. indices: evaluate only
    these sample indices (in the given order; ranks get contiguous slices of it). interpolation:
    as build_ssl_loader's (torchvision's Resize: antialiased bilinear)."""
    info = beton_info(path)
    _check_common(info, res, channels, workers, batch_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if resize_ratio is None:
        resize_ratio = 1.0 if info['resolution'] == info['min_resolution'] else 0.875
    if not 0 < resize_ratio <= 1:
        raise ValueError(f"resize_ratio must be in (0, 1], got {resize_ratio}")
    everything = np.arange(info['num_samples'], dtype=np.int64)
    subset = everything if indices is None else _check_indices(indices, info).astype(np.int64)
    indices = np.array_split(subset, world_size)[rank]
    if len(indices) == 0:
        raise ValueError(f"rank {rank} gets no samples: {len(subset)} samples "
                         f"over world_size {world_size}")
    op = DecodeViews(res, 1, mode='center', flip_prob=0.0, center_ratio=resize_ratio,
                     interpolation=interpolation)
    pipelines = {'image': PipelineSpec('image', decoder=op,
                                       transforms=_image_pipeline_tail(device)),
                 'label': [IntDecoder()] + _image_pipeline_tail(device)}
    loader = _ffcv_loader(path, batch_size, workers, OrderOption.SEQUENTIAL, 0,
                          indices.astype(np.uint64), pipelines, drop_last=False)
    mean, std = norm_stats(beton_info(norm_from) if norm_from else info, channels)
    return EvalLoader(loader, op, info, indices, batch_size, channels, device, mean, std)


# ---- command line -------------------------------------------------------------------------------

def get_args_parser():
    p = argparse.ArgumentParser('data.py: write and inspect .beton files', add_help=True)
    sub = p.add_subparsers(dest='cmd', required=True)
    w = sub.add_parser('write', help='convert a dataset split to FILE.beton + FILE.beton.json')
    w.add_argument('--dataset', required=True, choices=DATASETS,
                   help='source format: IDX .gz (fashion_mnist, mnist), ImageNet-style folders '
                        '(imagefolder), torchvision folders already downloaded (cifar10, '
                        'cifar100, stl10) or the JPEG npz (cifar10_npz)')
    w.add_argument('--root', required=True,
                   help='folder of the dataset (for cifar10_npz: the .npz file)')
    w.add_argument('--split', default='train',
                   help='train | test (IDX, CIFAR, npz); train | test | unlabeled | '
                        'train+unlabeled (stl10); the sub-folder name for imagefolder (train, val)')
    w.add_argument('--out', required=True, help='output FILE.beton (sidecar FILE.beton.json)')
    w.add_argument('--format', default='raw', choices=('raw', 'jpg'),
                   help='raw: exact pixels, fastest to read (default; right for images <= 64 px); '
                        'jpg: ~5-10x smaller, decoded every epoch (ImageNet-size data)')
    w.add_argument('--max_res', type=int, default=None,
                   help='shrink images so the longer side is <= this (default: keep). '
                        'ImageNet: 256-512 (ffcv uses ~500 with --format jpg)')
    w.add_argument('--jpeg_quality', type=int, default=90, help='JPEG quality for --format jpg')
    w.add_argument('--num_workers', type=int, default=min(8, os.cpu_count() or 1),
                   help='writer processes (default min(8, CPUs))')
    w.add_argument('--limit', type=int, default=None,
                   help='keep N evenly spaced samples (quick tests); default all')
    i = sub.add_parser('info', help='validate a beton and print its sidecar')
    i.add_argument('path')
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.cmd == 'write':
        info = write_beton(args.dataset, args.root, args.split, args.out, fmt=args.format,
                           max_res=args.max_res, jpeg_quality=args.jpeg_quality,
                           num_workers=args.num_workers, limit=args.limit)
        print(f"wrote {args.out}: {info['num_samples']} samples, {info['num_classes']} classes, "
              f"{info['channels']} channel(s), max {info['resolution']}, "
              f"{info['beton_bytes'] / 2 ** 20:.1f} MiB, mean {info['mean']} std {info['std']}")
    else:
        print(json.dumps(beton_info(args.path), indent=1))


if __name__ == '__main__':
    main()
