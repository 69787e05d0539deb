"""Tests of data.py: beton writers + sidecars, the SSL / eval loaders, ViewAugment.

Betons are written once per session in a subprocess (ffcv's writer forks workers; forking a
process where a loader ran can hang on numba's lock). numba compilation of the ffcv pipelines is
switched off here (the ops then run as plain Python), so test data is tiny. Real data
(/work/shared/data, data/fashion_mnist) is used when present and skipped otherwise.
"""
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ffcv.pipeline.compiler import Compiler  # noqa: E402

import data  # noqa: E402

SHARED = Path('/work/shared/data')
FMNIST = ROOT / 'data' / 'fashion_mnist'
N_IDX = 40  # synthetic IDX images, 16x16, label = index (so labels identify samples)


@pytest.fixture(autouse=True, scope='module')
def no_numba():
    """Plain-Python ffcv ops: no 15-120 s compile per pipeline."""
    was = Compiler.is_enabled
    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(was)


# ---- synthetic sources ----

def smooth_gray(n, h, w, seed=0):
    """n distinct smooth images: a per-image level plus a per-image gradient (crops of one image
    look alike, crops of different images do not)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    level = rng.permutation(np.linspace(20, 230, n))
    slope = rng.uniform(-30, 30, size=(n, 2))
    img = level[:, None, None] + slope[:, :1, None] * yy + slope[:, 1:, None] * xx
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def write_idx(path, arr):
    header = struct.pack('>HBB', 0, 8, arr.ndim) + struct.pack('>' + 'I' * arr.ndim, *arr.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + arr.tobytes())


def make_idx(root):
    root.mkdir(parents=True)
    train = smooth_gray(N_IDX, 16, 16, seed=1)
    write_idx(root / 'train-images-idx3-ubyte.gz', train)
    write_idx(root / 'train-labels-idx1-ubyte.gz', np.arange(N_IDX, dtype=np.uint8))
    write_idx(root / 't10k-images-idx3-ubyte.gz', train[:10])
    write_idx(root / 't10k-labels-idx1-ubyte.gz', np.arange(10, dtype=np.uint8))
    return train


def make_folder(root):
    """3 classes x 4 PNGs: 'ant' and 'bee' 16x16 RGB (exact round trip), 'cow' 12x20."""
    from PIL import Image
    rng = np.random.default_rng(2)
    images = {}
    for cls, shape in (('ant', (16, 16)), ('bee', (16, 16)), ('cow', (12, 20))):
        (root / 'train' / cls).mkdir(parents=True)
        for k in range(4):
            img = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / 'train' / cls / f'{k}.png')
            images[(cls, k)] = img
    return images


def extract_imagenette(dst, classes=2, per_class=4):
    with tarfile.open(SHARED / 'imagenette_224.tar') as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith('train/')]
        wnids = sorted({m.name.split('/')[1] for m in members})[:classes]
        keep = []
        for wnid in wnids:
            keep += sorted((m for m in members if m.name.split('/')[1] == wnid),
                           key=lambda m: m.name)[:per_class]
        tar.extractall(dst, members=keep, filter='data')
    return wnids


WRITER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import data
jobs = json.loads(sys.argv[2])
data.main(jobs[0])                       # the CLI once
errors = {}
for kw in jobs[1:]:
    try:
        data.write_beton(**kw)
    except SystemExit as e:              # recorded for the tests that expect a failure
        errors[kw['out']] = str(e)
print(json.dumps(errors))
'''


@pytest.fixture(scope='session')
def betons(tmp_path_factory):
    """Write every beton the tests read, in one subprocess. Returns {name: path} (+ sources)."""
    tmp = tmp_path_factory.mktemp('betons')
    idx_images = make_idx(tmp / 'idx')
    folder_images = make_folder(tmp / 'folder')
    out = {k: str(tmp / f'{k}.beton') for k in ('idx', 'idx_test', 'idx_jpg', 'folder', 'broken')}
    shutil.copytree(tmp / 'folder', tmp / 'broken')
    (tmp / 'broken' / 'train' / 'bee' / '9.jpg').write_bytes(b'not a jpeg at all')
    jobs = [['write', '--dataset', 'fashion_mnist', '--root', str(tmp / 'idx'), '--split',
             'train', '--out', out['idx'], '--num_workers', '1'],
            dict(dataset='fashion_mnist', root=str(tmp / 'idx'), split='test', out=out['idx_test'],
                 num_workers=1),
            dict(dataset='mnist', root=str(tmp / 'idx'), split='train', out=out['idx_jpg'],
                 fmt='jpg', num_workers=1),
            dict(dataset='imagefolder', root=str(tmp / 'folder'), split='train',
                 out=out['folder'], num_workers=1),
            dict(dataset='imagefolder', root=str(tmp / 'broken'), split='train',
                 out=out['broken'], num_workers=1)]
    if FMNIST.joinpath('train-images-idx3-ubyte.gz').exists():
        out['fmnist'] = str(tmp / 'fmnist.beton')
        jobs.append(dict(dataset='fashion_mnist', root=str(FMNIST), split='train',
                         out=out['fmnist'], limit=200, num_workers=1))
    if SHARED.joinpath('cifar10_jpeg75.npz').exists():
        out['npz'] = str(tmp / 'npz.beton')
        jobs.append(dict(dataset='cifar10_npz', root=str(SHARED / 'cifar10_jpeg75.npz'),
                         split='test', out=out['npz'], limit=100, num_workers=1))
    if SHARED.joinpath('imagenette_224.tar').exists():
        out['imagenette_wnids'] = extract_imagenette(tmp / 'imagenette')
        out['imagenette_root'] = str(tmp / 'imagenette')
        out['imagenette'] = str(tmp / 'imagenette.beton')
        jobs.append(dict(dataset='imagefolder', root=str(tmp / 'imagenette'), split='train',
                         out=out['imagenette'], fmt='jpg', max_res=64, num_workers=1))
    r = subprocess.run([sys.executable, '-c', WRITER, str(ROOT), json.dumps(jobs)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out['errors'] = json.loads(r.stdout.strip().splitlines()[-1])
    out['idx_images'], out['folder_images'] = idx_images, folder_images
    return out


def unnormalise(x, info, channels):
    """Model input -> pixel values in [0, 255]."""
    mean, std = data.norm_stats(info, channels)
    shape = [1] * (x.dim() - 3) + [channels, 1, 1]
    return (x * std.view(shape) + mean.view(shape)) * 255


def eval_pixels(path, res, channels, **kw):
    """All (pixels uint8 (N, C, res, res), labels, indices) of an eval loader, in order."""
    ld = data.build_eval_loader(path, batch_size=16, res=res, channels=channels, **kw)
    xs, ys, ids = zip(*ld)
    x = unnormalise(torch.cat(xs), ld.info, channels).round().clamp(0, 255).to(torch.uint8)
    return x, torch.cat(ys), torch.cat(ids)


def _clone(v):
    return [t.clone() for t in v] if isinstance(v, list) else v.clone()


def ssl_batches(path, epochs=1, **kw):
    kw = dict(dict(batch_size=8, num_views=2, res=12, recipe='cifar', workers=1, seed=3), **kw)
    ld = data.build_ssl_loader(path, **kw)
    return ld, [[(_clone(v), y.clone()) for v, y in ld] for _ in range(epochs)]


# ---- statistics of the augmentation laws (SPEC §7, torchvision.transforms.v2) ----
# Every draw below is a fixed function of a seed, so these tests are deterministic; the bounds
# are still set where a correct law passes with a wide margin: Kolmogorov-Smirnov distances at 3x
# the 5 % critical value 1.36 / sqrt(n) (a correct law exceeds it with probability ~1e-14),
# chi-square of the 24 orders below 80 (23 degrees of freedom: mean 23, sd 6.8), rates within 5
# binomial standard deviations (exact where the probability is 0 or 1).

LOG_R = (np.log(3 / 4), np.log(4 / 3))


def ks_uniform(x, lo, hi):
    """Kolmogorov-Smirnov distance between the sample x and the uniform law on [lo, hi]."""
    u = np.sort((np.asarray(x, np.float64) - lo) / (hi - lo))
    k = np.arange(1, len(u) + 1) / len(u)
    return max((k - u).max(), (u - k + 1 / len(u)).max())


def ks_two(a, b):
    """Two-sample Kolmogorov-Smirnov distance (ties handled: ECDFs compared at every value)."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    x = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, x, 'right') / len(a)
                  - np.searchsorted(b, x, 'right') / len(b)).max()


def ks_bound(n, m=None):
    """3x the 5 % critical value of the one-sample (m None) or two-sample KS distance."""
    return 3 * 1.36 / np.sqrt(n if m is None else n * m / (n + m))


def rate_tol(p, n):
    """5 binomial standard deviations of a rate p measured on n draws (0 when p is 0 or 1)."""
    return 5 * np.sqrt(p * (1 - p) / n)


def order_chi2(order):
    """Chi-square of the counts of the 24 orders of the 4 jitter ops (each row a permutation of
    0..3; every one of the 24 must occur)."""
    order = np.asarray(order)
    assert (np.sort(order, 1) == np.arange(4)).all(), 'an order is not a permutation of the 4 ops'
    _, counts = np.unique(order @ (4 ** np.arange(4)), axis=0, return_counts=True)
    assert len(counts) == 24, f'only {len(counts)} of the 24 orders occur'
    e = len(order) / 24
    return float(((counts - e) ** 2 / e).sum())


def check_colour_law(p, spec, what):
    """Assert that the parameters p (sample_params' layout, n views of one type) follow SPEC §7 /
    torchvision's ColorJitter + RandomGrayscale + GaussianBlur + solarize for ColourSpec spec:
    each jitter factor uniform on [max(0, 1 - s), 1 + s] (hue on [-h, h]), the 4 ops in one of
    the 24 orders uniformly, sigma uniform on blur_sigma, the jitter/gray/blur/solarize rates,
    and all of these independent (pairwise correlations ~0)."""
    p = {k: np.asarray(v) for k, v in p.items()}
    n = len(p['jitter'])
    b, c, s, h = spec.jitter
    laws = [(max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)]
    for k, (lo, hi) in enumerate(laws):
        f = p['factors'][:, k]
        assert lo - 1e-6 <= f.min() and f.max() <= hi + 1e-6, (what, 'bcsh'[k], f.min(), f.max())
        d = ks_uniform(f, lo, hi)
        assert d < ks_bound(n), (what, 'bcsh'[k], d)
    lo, hi = spec.blur_sigma
    assert lo - 1e-6 <= p['sigma'].min() and p['sigma'].max() <= hi + 1e-6, what
    assert ks_uniform(p['sigma'], lo, hi) < ks_bound(n), (what, 'sigma', ks_uniform(p['sigma'], lo, hi))
    assert order_chi2(p['order']) < 80, (what, 'order', order_chi2(p['order']))
    for name, prob in (('jitter', spec.jitter_prob), ('gray', spec.gray_prob),
                       ('blur', spec.blur_prob), ('solarize', spec.solarize_prob)):
        rate = p[name].astype(np.float64).mean()
        assert abs(rate - prob) <= rate_tol(prob, n), (what, name, rate, prob)
    cols = [p['factors'][:, k] for k in range(4)] + [p['sigma'], p['order'][:, 0]]
    cols += [p[k] for k in ('jitter', 'gray', 'blur', 'solarize') if 0 < p[k].mean() < 1]
    corr = np.corrcoef(np.stack(cols).astype(np.float64)) - np.eye(len(cols))
    assert np.abs(corr).max() < 5 / np.sqrt(n), (what, 'correlated draws', np.abs(corr).max())


# ---- writers and sidecars ----

def test_idx_round_trip_exact(betons):
    info = data.beton_info(betons['idx'])
    assert (info['num_samples'], info['channels'], info['resolution']) == (N_IDX, 1, [16, 16])
    assert info['image_field'] == 'ndarray' and info['storage'] == 'raw'
    assert info['classes'][0] == 'T-shirt/top' and info['complete'] is True
    src = betons['idx_images'].astype(np.float64)
    assert info['mean'][0] == pytest.approx(src.mean(), abs=1e-3)
    assert info['std'][0] == pytest.approx(src.std(), abs=1e-3)
    x, y, idx = eval_pixels(betons['idx'], 16, 1)
    assert x.shape == (N_IDX, 1, 16, 16)
    assert torch.equal(x[:, 0], torch.from_numpy(betons['idx_images']))
    assert torch.equal(y, torch.arange(N_IDX)) and torch.equal(idx, torch.arange(N_IDX))
    assert data.beton_info(betons['idx_test'])['num_samples'] == 10


def test_gray_jpg_storage(betons):
    info = data.beton_info(betons['idx_jpg'])
    assert info['image_field'] == 'rgb' and info['channels'] == 1 and info['classes'][3] == '3'
    x, _, _ = eval_pixels(betons['idx_jpg'], 16, 1)
    err = (x[:, 0].float() - torch.from_numpy(betons['idx_images']).float()).abs().mean()
    assert err < 2.0  # JPEG q90 of smooth images


def test_imagefolder_round_trip(betons):
    info = data.beton_info(betons['folder'])
    assert info['classes'] == ['ant', 'bee', 'cow'] and info['num_samples'] == 12
    assert info['resolution'] == [16, 20] and info['min_resolution'] == [12, 16]
    x, y, _ = eval_pixels(betons['folder'], 16, 3, resize_ratio=1.0)
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for k in range(8):  # the square images come back exactly
        ref = betons['folder_images'][(('ant', 'bee')[k // 4], k % 4)]
        assert torch.equal(x[k].permute(1, 2, 0), torch.from_numpy(ref))
    # 12x20 'cow' images: centred 12x12 square resized to 16x16
    assert x.shape == (12, 3, 16, 16)
    allpix = np.concatenate([v.reshape(-1, 3) for v in betons['folder_images'].values()])
    assert info['mean'] == pytest.approx(allpix.mean(0).tolist(), abs=1e-3)
    assert info['std'] == pytest.approx(allpix.std(0).tolist(), abs=1e-3)
    luma = allpix @ np.asarray(data.GRAY_WEIGHTS)
    assert (info['gray_mean'], info['gray_std']) == pytest.approx((luma.mean(), luma.std()), abs=1e-3)


@pytest.mark.skipif(not FMNIST.joinpath('train-images-idx3-ubyte.gz').exists(),
                    reason='data/fashion_mnist absent (scripts/setup.sh fetches it)')
def test_real_fashion_mnist(betons):
    keep = data.limit_indices(60000, 200)
    images = data._read_idx(str(FMNIST / 'train-images-idx3-ubyte.gz'))[keep]
    labels = data._read_idx(str(FMNIST / 'train-labels-idx1-ubyte.gz'))[keep]
    x, y, _ = eval_pixels(betons['fmnist'], 28, 1)
    assert torch.equal(x[:, 0], torch.from_numpy(images))
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    assert len(set(labels.tolist())) == 10


@pytest.mark.skipif(not SHARED.joinpath('cifar10_jpeg75.npz').exists(),
                    reason='/work/shared/data/cifar10_jpeg75.npz absent')
def test_cifar10_npz(betons):
    import cv2
    z = np.load(SHARED / 'cifar10_jpeg75.npz')
    keep = data.limit_indices(10000, 100)
    off = z['test_offsets']
    ref = np.stack([cv2.cvtColor(cv2.imdecode(z['test_jpeg'][off[i]:off[i + 1]], cv2.IMREAD_COLOR),
                                 cv2.COLOR_BGR2RGB) for i in keep])
    info = data.beton_info(betons['npz'])
    assert info['classes'][0] == 'airplane' and info['resolution'] == [32, 32]
    x, y, _ = eval_pixels(betons['npz'], 32, 3)
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(ref))
    assert torch.equal(y, torch.from_numpy(z['test_labels'][keep]))


@pytest.mark.skipif(not SHARED.joinpath('imagenette_224.tar').exists(),
                    reason='/work/shared/data/imagenette_224.tar absent')
def test_real_imagenette(betons):
    from PIL import Image
    info = data.beton_info(betons['imagenette'])
    assert info['classes'] == betons['imagenette_wnids'] and info['num_samples'] == 8
    assert max(info['resolution']) <= 64 and info['storage'] == 'jpg'
    x, y, _ = eval_pixels(betons['imagenette'], 48, 3, resize_ratio=1.0)
    first = sorted((Path(betons['imagenette_root']) / 'train' / info['classes'][0]).iterdir())[0]
    im = Image.open(first).convert('RGB')
    s = min(im.size)
    im = im.crop(((im.width - s) // 2, (im.height - s) // 2, (im.width - s) // 2 + s,
                  (im.height - s) // 2 + s)).resize((48, 48), Image.BILINEAR)
    ref = torch.from_numpy(np.array(im)).permute(2, 0, 1).float()
    assert (x[0].float() - ref).abs().mean() < 12  # JPEG q90 + two different resizers
    ld, (batches,) = ssl_batches(betons['imagenette'], batch_size=4, num_views=4, res=32,
                                 recipe='imagenet')
    assert batches[0][0].shape == (4, 4, 3, 32, 32) and torch.isfinite(batches[0][0]).all()


def test_sidecar_validation(betons, tmp_path):
    bad = tmp_path / 'bad.beton'
    with pytest.raises(SystemExit, match='is missing'):
        data.beton_info(bad)
    shutil.copy(betons['idx'], bad)
    with pytest.raises(SystemExit, match='sidecar .* is missing|is missing — the beton'):
        data.beton_info(bad)
    side = json.loads(Path(betons['idx'] + '.json').read_text())
    Path(str(bad) + '.json').write_text(json.dumps(dict(side, complete=False)))
    with pytest.raises(SystemExit, match='incomplete'):
        data.beton_info(bad)
    Path(str(bad) + '.json').write_text(json.dumps(side)[:-20])
    with pytest.raises(SystemExit, match='not valid JSON'):
        data.beton_info(bad)
    Path(str(bad) + '.json').write_text(json.dumps(side))
    data.beton_info(bad)  # a faithful copy is valid
    with open(bad, 'r+b') as f:
        f.truncate(side['beton_bytes'] - 100)
    with pytest.raises(SystemExit, match='bytes but its sidecar'):
        data.build_ssl_loader(bad, 8, 2, 12)


def test_writer_errors_and_no_leftovers(betons, tmp_path):
    with pytest.raises(SystemExit, match='is missing'):
        data.write_beton('mnist', str(tmp_path), 'train', str(tmp_path / 'x.beton'))
    with pytest.raises(SystemExit, match='download'):
        data.write_beton('cifar10', str(tmp_path), 'train', str(tmp_path / 'x.beton'))
    with pytest.raises(SystemExit, match='train or test'):
        data.write_beton('fashion_mnist', str(tmp_path), 'val', str(tmp_path / 'x.beton'))
    assert not list(tmp_path.iterdir())
    written = os.listdir(Path(betons['idx']).parent)
    assert 'idx.beton.json' in written and not [f for f in written if '.tmp' in f]


def test_unreadable_image_fails_cleanly(betons):
    """ffcv's writer hangs when a worker dies; ours finishes, deletes the beton, names the file."""
    msg = betons['errors'][betons['broken']]
    assert 'could not be read' in msg and '9.jpg' in msg
    assert not [f for f in os.listdir(Path(betons['broken']).parent) if f.startswith('broken.')]
    assert list(betons['errors']) == [betons['broken']]


def test_limit_indices():
    assert data.limit_indices(10, None).tolist() == list(range(10))
    assert data.limit_indices(10, 5).tolist() == [0, 2, 4, 6, 8]
    assert data.limit_indices(60000, 200)[-1] == 59700


# ---- SSL loader ----

def test_views_are_distinct_crops_of_one_image(betons):
    ld, (batches,) = ssl_batches(betons['idx'], recipe='crop', channels=1, num_views=3,
                                 scale=(0.3, 1.0))
    assert len(ld) == N_IDX // 8 and len(batches) == N_IDX // 8
    views, labels = batches[0]
    assert views.shape == (8, 3, 1, 12, 12) and views.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    m = views.mean((2, 3, 4))  # (B, V) mean brightness of each view
    same = (m[:, 0] - m[:, 1]).abs().mean()
    other = (m[:, 0] - m.roll(1, 0)[:, 1]).abs().mean()
    assert same < 0.5 * other
    assert not torch.equal(views[:, 0], views[:, 1]) and not torch.equal(views[:, 1], views[:, 2])
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == N_IDX  # one epoch = every image once


def test_crops_not_square():
    key = data._epoch_key(0, 0)
    shapes = {data._rrc_box(key, s, 0, 64, 64, 0.08, 1.0, np.log(3 / 4), np.log(4 / 3))[2:]
              for s in range(200)}
    assert sum(h != w for h, w in shapes) > len(shapes) // 2
    for h, w in shapes:
        assert 0 < h <= 64 and 0 < w <= 64 and 3 / 4 - 0.1 < w / h < 4 / 3 + 0.1


def rrc_boxes(h, w, n, scale=(0.08, 1.0), seed=0, view=0):
    """(n, 4) int boxes (top, left, height, width) of _rrc_box for samples 0..n-1."""
    key = data._epoch_key(seed, 0)
    return np.array([data._rrc_box(key, s, view, h, w, *scale, *LOG_R) for s in range(n)])


def torchvision_boxes(h, w, n, scale=(0.08, 1.0), seed=0):
    """(n, 4) boxes (i, j, h, w) of torchvision's own RandomResizedCrop sampling."""
    from torchvision.transforms import RandomResizedCrop
    img = torch.empty(1, h, w)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return np.array([RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
                         for _ in range(n)])


def test_rrc_box_area_ratio_position_laws():
    """_rrc_box where no try is rejected (area <= 0.7 of a 2000 px square: area * ratio < 1), so
    the laws show unconditioned: area fraction uniform on [smin, smax] (not its side), log aspect
    ratio uniform on [log 3/4, log 4/3] (not the ratio), top and left uniform over the valid
    positions (not a corner, not the centre), all independent."""
    h = w = 2000
    n = 20000
    i, j, ch, cw = rrc_boxes(h, w, n, (0.08, 0.7)).T
    area, log_ratio = ch * cw / (h * w), np.log(cw / ch)
    top, left = (i + 0.5) / (h - ch + 1), (j + 0.5) / (w - cw + 1)  # uniform on (0, 1)
    assert (i >= 0).all() and (i + ch <= h).all() and (j >= 0).all() and (j + cw <= w).all()
    assert 0.08 - 1e-3 < area.min() and area.max() < 0.7 + 1e-3
    assert LOG_R[0] - 1e-2 < log_ratio.min() and log_ratio.max() < LOG_R[1] + 1e-2
    bound = ks_bound(n)
    for name, x, lo, hi in (('area', area, 0.08, 0.7), ('log ratio', log_ratio, *LOG_R),
                            ('top', top, 0, 1), ('left', left, 0, 1)):
        d = ks_uniform(x, lo, hi)
        assert d < bound, (name, d, bound)
    corr = np.corrcoef(np.stack([area, log_ratio, top, left])) - np.eye(4)
    assert np.abs(corr).max() < 5 / np.sqrt(n), corr
    # other samples and views draw other boxes (the hash sees both)
    other = rrc_boxes(h, w, 200, (0.08, 0.7), view=1)
    assert (other != np.stack([i, j, ch, cw], 1)[:200]).any(1).mean() > 0.95


@pytest.mark.parametrize('h,w', [(240, 320), (50, 200)])
def test_rrc_box_matches_torchvision(h, w):
    """Default scale (0.08, 1): rejected tries condition the accepted boxes, so compare with
    torchvision's own RandomResizedCrop.get_params on the same image: two-sample KS of area
    fraction, log aspect ratio, top, left, height and width, and the same rate of centre-crop
    fallbacks after 10 failed tries (50 x 200: ~81 % of tries fail, ~13 % of boxes fall back;
    fewer tries fall back more often, more tries less)."""
    n = 4000
    ours, ref = rrc_boxes(h, w, n), torchvision_boxes(h, w, n)
    stats = lambda b: dict(area=b[:, 2] * b[:, 3] / (h * w), log_ratio=np.log(b[:, 3] / b[:, 2]),
                           top=b[:, 0], left=b[:, 1], height=b[:, 2], width=b[:, 3])
    so, sr = stats(ours), stats(ref)
    for k in so:
        d = ks_two(so[k], sr[k])
        assert d < ks_bound(n, n), (k, d, ks_bound(n, n))
    fallback = tuple(torchvision_boxes(h, w, 1, scale=(2.0, 3.0))[0])  # every try fails
    f_ours, f_ref = (ours == fallback).all(1).mean(), (ref == fallback).all(1).mean()
    assert abs(f_ours - f_ref) <= 5 * np.sqrt(2 * f_ref * (1 - f_ref) / n) + 1e-3, (f_ours, f_ref)


def test_rrc_box_fallback():
    """After 10 failed tries: torchvision's centre crop with the ratio clamped to [3/4, 4/3] (a very
    wide or very tall image), or the whole image (an area range beyond the image)."""
    key = data._epoch_key(0, 0)
    cases = [((10, 1000, 0.08, 1.0), (0, 493, 10, 13)), ((1000, 10, 0.08, 1.0), (493, 0, 13, 10)),
             ((30, 40, 1.5, 2.0), (0, 0, 30, 40)), ((64, 200, 1.5, 2.0), (0, 57, 64, 85))]
    for (h, w, smin, smax), box in cases:
        assert tuple(torchvision_boxes(h, w, 1, (smin, smax))[0]) == box  # the reference
        for s in range(20):
            assert data._rrc_box(key, s, s % 3, h, w, smin, smax, *LOG_R) == box, (h, w, smin, smax)


def test_channels_gray_and_rgb(betons):
    _, (b1,) = ssl_batches(betons['idx'], recipe='crop', channels=1)
    _, (b3,) = ssl_batches(betons['idx'], recipe='crop', channels=3)
    v1, v3 = b1[0][0], b3[0][0]
    assert v1.shape[2] == 1 and v3.shape[2] == 3
    assert torch.allclose(v3[:, :, 0], v3[:, :, 2]) and torch.allclose(v3[:, :, 0], v1[:, :, 0])
    _, (bf,) = ssl_batches(betons['folder'], batch_size=4, recipe='cifar', channels=1)
    assert bf[0][0].shape == (4, 2, 1, 12, 12)
    # normalisation: the eval images of the train set are ~zero-mean, unit-std
    ld = data.build_eval_loader(betons['idx'], 64, 16, channels=3)
    x = torch.cat([b[0] for b in ld])
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2


def test_fixed_seed_identical_and_epochs_differ(betons):
    ld, (e0, e1) = ssl_batches(betons['folder'], epochs=2, batch_size=4, num_views=2)
    _, (again,) = ssl_batches(betons['folder'], batch_size=4, num_views=2)
    for (va, ya), (vb, yb) in zip(e0, again):
        assert torch.equal(va, vb) and torch.equal(ya, yb)
    assert not torch.equal(e0[0][0], e1[0][0])  # a new epoch: new order and new crops
    ld.set_epoch(1)  # after a resume, epoch 1 is epoch 1, not epoch 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e1, ld))
    _, (other,) = ssl_batches(betons['folder'], batch_size=4, num_views=2, seed=4)
    assert not torch.equal(e0[0][0], other[0][0])


@pytest.mark.parametrize('colour', ['decoder', 'torch'])
def test_resume_mid_epoch(betons, colour):
    ld, (full,) = ssl_batches(betons['idx'], recipe='imagenet', num_views=4, colour=colour)
    ld.set_epoch(0)
    tail = [v for v, _ in ld.iter_from(2)]
    assert len(tail) == len(full) - 2
    assert all(torch.equal(a, b[0]) for a, b in zip(tail, full[2:]))
    ld.set_epoch(0)
    it = iter(ld)
    next(it), next(it), next(it)
    state = ld.state_dict()
    assert state == {'epoch': 0, 'batch': 3}
    ld2 = data.build_ssl_loader(betons['idx'], 8, 4, 12, recipe='imagenet', workers=1, seed=3,
                                colour=colour)
    ld2.load_state_dict(state)
    rest = [v for v, _ in ld2]
    assert all(torch.equal(a, b[0]) for a, b in zip(rest, full[3:])) and len(rest) == 2
    assert ld2.epoch == 1 and ld2.state_dict() == {'epoch': 1, 'batch': 0}


def test_leaving_an_epoch_stops_the_loader_thread(betons):
    """Breaking out of an epoch (preemption, --stop_at_epoch, a benchmark) closes the ffcv thread
    before the next batch and waits for it: no thread decodes on into interpreter exit."""
    import threading
    import time
    for consumed in (1, None):  # mid-epoch; and when the thread has put every batch into ffcv's
        # queue (3 deep), so that it waits in its put of the end-of-epoch marker (no timeout)
        before = set(threading.enumerate())
        ld = data.build_ssl_loader(betons['idx'], 2, 2, 12, recipe='imagenet', workers=1, seed=3)
        assert len(ld) > 4
        it = iter(ld)
        for _ in range(consumed or len(ld) - 3):
            next(it)
        started = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        assert started, 'the loader runs a worker thread'
        time.sleep(0.0 if consumed else 1.5)
        t0 = time.monotonic()
        it.close()  # what dropping the iterator does
        assert not any(t.is_alive() for t in started) and time.monotonic() - t0 < 30
        assert len([v for v, _ in ld]) == len(ld)  # the loader is still usable: next epoch in full


@pytest.mark.parametrize('recipe', ['crop', 'imagenet'])
def test_decode_once_matches_per_view_decoding(betons, recipe):
    _, (once,) = ssl_batches(betons['folder'], batch_size=4, num_views=3, recipe=recipe)
    _, (per,) = ssl_batches(betons['folder'], batch_size=4, num_views=3, recipe=recipe,
                            decode_once=False)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(once, per))


def test_multi_crop_two_sizes_from_one_decode(betons):
    """K small crops of another size: [large (B, V, C, R, R), small (B, K, C, r, r)]; the large
    views equal a loader without small views; small crops are crops of the same image with
    their own area range; a resumed epoch replays both groups."""
    kw = dict(batch_size=8, num_views=2, res=12, recipe='imagenet', channels=1)
    ld, (mc,) = ssl_batches(betons['idx'], small_views=3, small_res=6, scale=(0.14, 1.0), **kw)
    _, (plain,) = ssl_batches(betons['idx'], scale=(0.14, 1.0), **kw)
    (large, small), y = mc[0]
    assert large.shape == (8, 2, 1, 12, 12) and small.shape == (8, 3, 1, 6, 6)
    assert all(torch.equal(a[0][0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(mc, plain))
    m_l, m_s = large.mean((2, 3, 4)), small.mean((2, 3, 4))
    same = (m_l[:, :1] - m_s).abs().mean()
    other = (m_l.roll(1, 0)[:, :1] - m_s).abs().mean()
    assert same < 0.5 * other
    assert not torch.equal(small[:, 0], small[:, 1])
    ld.set_epoch(0)
    tail = list(ld.iter_from(3))
    assert all(torch.equal(a[0][1], b[0][1]) for a, b in zip(tail, mc[3:]))
    # the small views hash as views V.., so their boxes follow small_scale, not scale
    key = data._epoch_key(3, 0)
    lr = (np.log(3 / 4), np.log(4 / 3))
    for s in range(50):
        i, j, h, w = data._rrc_box(key, s, 2, 16, 16, 0.05, 0.14, *lr)
        assert h * w <= 0.14 * 256 * 1.3
    with pytest.raises(ValueError, match='small'):
        data.build_ssl_loader(betons['idx'], 8, 2, 12, small_views=2, small_res=20)
    with pytest.raises(ValueError, match='small'):
        data.build_ssl_loader(betons['idx'], 8, 2, 12, recipe='noise', small_views=2, small_res=6)


@pytest.mark.parametrize('colour,T,V,K,decode_once', [
    ('decoder', 2, 4, 3, True), ('decoder', 3, 5, 0, True), ('decoder', 2, 3, 0, False),
    ('torch', 2, 4, 3, True), ('torch', 3, 5, 0, True)])
def test_loader_view_types_as_applied(betons, monkeypatch, colour, T, V, K, decode_once):
    """Through the SSL loader, view v gets view type v % T and small (multi-crop) view k type
    k % T, in both colour paths, read off the outputs: with type 0 = grayscale p 1 and the other
    types identity, exactly the views of type 0 of the RGB images come out gray."""
    specs = [data.ColourSpec(gray_prob=1.0)] + [data.ColourSpec()] * (T - 1)
    monkeypatch.setattr(data, 'recipe_specs', lambda *a, **kw: specs)
    kw = dict(small_views=K, small_res=6) if K else {}
    ld, (batches,) = ssl_batches(betons['folder'], batch_size=4, num_views=V, colour=colour,
                                 decode_once=decode_once, **kw)
    for views, _ in batches:
        for x in (views if K else [views]):
            px = unnormalise(x, ld.info, 3)  # (B, n, 3, h, w) in grey levels
            gray = (px.amax(2) - px.amin(2)).amax((2, 3)) < 0.05
            assert gray.tolist() == [[v % T == 0 for v in range(x.shape[1])]] * x.shape[0]


@pytest.mark.parametrize('decode_once', [True, False])
def test_decoder_imagenet_types_by_view_index(betons, monkeypatch, decode_once):
    """The 'imagenet' recipe in the decoder, as drawn for each view the loader cuts: view v gets
    table row v % 2 (A, B, A, B), so views 0 and 2 are always blurred and never solarized, views
    1 and 3 blurred ~10 % and solarized ~20 % of the time."""
    table = data.colour_table(data.recipe_specs('imagenet'))
    drawn, colour_params = [], data._colour_params

    def spy(key, s, view, p):
        q = colour_params(key, s, view, p)
        drawn.append((view, p.copy(), q))
        return q

    monkeypatch.setattr(data, '_colour_params', spy)
    monkeypatch.setattr(data, '_apply_colour', lambda o, cs, q, radius, flip=False: None)  # fast
    ld = data.build_ssl_loader(betons['idx'], 8, 4, 12, recipe='imagenet', workers=1, seed=3,
                               colour='decoder', decode_once=decode_once)
    for epoch in range(3):
        ld.set_epoch(epoch)
        assert len([v for v, _ in ld]) == len(ld)
    assert len(drawn) == 3 * 4 * N_IDX
    for view, p, _ in drawn:
        assert np.array_equal(p, table[view % 2]), view
    for v in range(4):
        q = np.stack([q for view, _, q in drawn if view == v])
        blur, sol = (q[:, 10] > 0).mean(), (q[:, 12] > 0).mean()
        if v % 2 == 0:
            assert blur == 1.0 and sol == 0.0, (v, blur, sol)
        else:
            assert 0 < blur < 0.25 and 0.07 < sol < 0.35, (v, blur, sol)


def test_decoder_flip_rate(betons):
    """Horizontal flip p 0.5, drawn per view (independently across an image's views) and applied
    in every decoder path: large and small (multi-crop) views without colour ops (as with
    colour='torch', whose ViewAugment never flips), and views with the decoder's colour ops;
    with INTER_AREA resizing also the crops that grow (flipped by _flip_u8 / the colour pass, not
    by the resize). Seen in the outputs: the 'idx' images are ramps, so a view's mean left-right
    step has the sign of its image's unless the view is mirrored (jitter/gray keep the sign)."""
    slope = np.diff(betons['idx_images'].astype(np.float64), axis=2).mean((1, 2))  # levels / px
    info = data.beton_info(betons['idx'])
    runs = [dict(recipe='crop', num_views=4, small_views=4, small_res=8, epochs=2),
            dict(recipe='cifar', colour='decoder', num_views=4, epochs=2)]
    runs += [dict(r, interpolation='area') for r in runs]  # bilinear flips inside the resize
    for kw in runs:
        _, epochs = ssl_batches(betons['idx'], channels=1, **kw)
        for g in range(2 if 'small_views' in kw else 1):
            flips, decided = [], []
            for views, y in (b for batches in epochs for b in batches):
                x = views[g] if isinstance(views, list) else views
                px = unnormalise(x, info, 1)[:, :, 0]  # (B, V, h, w)
                step = (px[..., 1:] - px[..., :-1]).mean((2, 3)).numpy()
                steep = np.abs(slope[y.numpy()]) >= 0.5
                flips.append((np.sign(step) != np.sign(slope[y.numpy()])[:, None])[steep])
                decided.append((np.abs(step) > 0.02)[steep])
            flips, decided = np.concatenate(flips), np.concatenate(decided)
            assert decided.mean() > 0.9, (kw, g, decided.mean())
            n = decided.sum()
            rate = flips[decided].mean()
            assert abs(rate - 0.5) <= rate_tol(0.5, n), (kw, g, rate, n)
            whole = decided.all(1)  # images whose 4 views all show their orientation
            same = (flips[whole] == flips[whole][:, :1]).all(1).mean()
            assert whole.sum() >= 20 and same < 0.35, (kw, g, same)  # independent: 1/8


def test_input_buffers_reused_only_when_released():
    """to_input's pooled output arrays: never handed out while any tensor still views them."""
    x = torch.randint(0, 256, (2, 2, 8, 8, 3), dtype=torch.uint8)
    m, s = torch.tensor([.4, .5, .6]), torch.tensor([.2, .2, .2])
    ref = data._finish(data._to_unit_float(x), 3, m, s, False)
    src = x.reshape(-1, 8, 8, 3).numpy()
    scale, shift = (1 / (255 * s)).numpy(), (-m / s).numpy()
    a = torch.from_numpy(data._pooled((4, 3, 8, 8)))
    b = torch.from_numpy(data._pooled((4, 3, 8, 8)))
    assert a.data_ptr() != b.data_ptr()
    keep, pa = a[1], a.data_ptr()
    del a
    assert torch.from_numpy(data._pooled((4, 3, 8, 8))).data_ptr() != pa  # a slice still views it
    del keep
    c = data._pooled((4, 3, 8, 8))
    assert c.ctypes.data == pa  # released: reused
    data._u8_to_input(src, c, scale, shift, 0)  # plain Python here (JIT off in tests)
    assert torch.allclose(torch.from_numpy(c).view(2, 2, 3, 8, 8), ref, atol=1e-5)


def test_noise_recipe(betons):
    _, (b,) = ssl_batches(betons['idx'], recipe='noise', num_views=3, res=16, channels=1,
                          noise_std=0.05)
    v = b[0][0]
    d = (v[:, 0] - v[:, 1]) * data.beton_info(betons['idx'])['std'][0] / 255
    assert 0.05 * 0.9 < d.std().item() / np.sqrt(2) < 0.05 * 1.1  # independent noise per view
    assert not torch.equal(v[:, 1], v[:, 2])


FLOAT_OPS = r'''
import numpy as np
def float_ops(data):
    """Float32 results of the decoder's colour and resize helpers on fixed random inputs: every
    rounding shows (a uint8 view would hide most)."""
    rng = np.random.default_rng(0)
    h, w = 40, 48
    x = rng.random(h * w * 3, dtype=np.float32)
    out = {}
    for name, fn in (('contrast', lambda v: data._contrast(v, np.float32(0.7), w, np.empty(w, np.float32))),
                     ('saturation', lambda v: data._saturation(v, np.float32(1.3))),
                     ('hue', lambda v: data._hue(v, np.float32(0.21))),
                     ('grayscale', data._grayscale)):
        v = x.copy()
        fn(v)
        out[name] = v
    ker = np.array([0.05, 0.1, 0.2, 0.3, 0.2, 0.1, 0.05], np.float32)
    t = np.empty_like(x)
    data._blur_rows(x, t, np.empty(w + 6, np.float32), ker, 3 * h, w, 3)  # planar: 3 planes of h rows
    out['blur_rows'] = t.copy()
    v = np.empty_like(x)
    data._blur_cols(t, v, ker, 3, h, w, 3)
    out['blur_cols'] = v
    img = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    o = np.empty((31, 29, 3), np.uint8)
    data._area_resize(img, 3, 80, 5, 61, o, np.empty(data.area_scratch_size(31, 90, 70), np.float32))
    out['area_resize'] = o
    return out
'''
exec(FLOAT_OPS)

JIT_RUN = FLOAT_OPS + r'''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import numba
assert not numba.config.DISABLE_JIT, 'numba JIT is off in the subprocess'
import data
out = {}
for name, path in json.loads(sys.argv[2]).items():
    ld = data.build_ssl_loader(path, 8, 3, 12, recipe='imagenet', workers=2, seed=3)
    out[name] = [(v, y) for v, y in ld]
    ld = data.build_ssl_loader(path, 8, 2, 12, recipe='imagenet', workers=2, seed=3,
                               small_views=2, small_res=6)
    out[name + '_mc'] = [(v, y) for v, y in ld]
    for ch in (1, 3):  # eval loader: the fused uint8 -> normalised input kernel, both channel modes
        out[name + f'_eval{ch}'] = [x for x, _, _ in data.build_eval_loader(path, 16, 12, channels=ch)]
if sys.argv[4] == '1':  # as the pipelines compiled them
    out['float_ops'] = {k: torch.from_numpy(v) for k, v in float_ops(data).items()}
torch.save(out, sys.argv[3])
'''


def test_numba_compiled_pipeline_matches_python(betons, tmp_path):
    """The production path: numba-compiled ops (prange over 2 threads) give bit-identical batches
    to the plain-Python ops (JPEG RGB decoder; the 1-channel one differs only in how it reads
    the pixels). Runs in a subprocess with the JIT on (tests/conftest.py turns it off here) and
    an empty numba cache, so the helpers are compiled inside ffcv's fastmath pipeline, which they
    would inherit without their explicit fastmath=False (their float32 results then differ from
    Python's in the last bits, and a cached copy made elsewhere would differ again); 1-2 min."""
    paths = {'idx_jpg': betons['idx_jpg'], 'idx': betons['idx']}  # RGB (JPEG) and gray decoders
    jit_env = {name: v for name, v in os.environ.items() if name != 'NUMBA_DISABLE_JIT'}
    procs = []  # one process per decoder, each with its own empty cache: both cores compile at once
    for i, (k, path) in enumerate(paths.items()):
        env = {**jit_env, 'NUMBA_CACHE_DIR': str(tmp_path / f'numba_cache_{k}')}
        with open(tmp_path / f'err_{k}', 'w') as err:
            procs.append(subprocess.Popen([sys.executable, '-c', JIT_RUN, str(ROOT), json.dumps({k: path}),
                                           str(tmp_path / f'jit_{k}.pt'), str(int(i == 0))], env=env,
                                          stdout=subprocess.DEVNULL, stderr=err))
    refs = {}  # the plain-Python batches, made here while they compile
    for k, path in paths.items():
        refs[k] = ssl_batches(path, recipe='imagenet', num_views=3)[1][0]
        refs[k + '_mc'] = ssl_batches(path, recipe='imagenet', num_views=2, small_views=2, small_res=6)[1][0]
        for ch in (1, 3):
            refs[k + f'_eval{ch}'] = [x for x, _, _ in data.build_eval_loader(path, 16, 12, channels=ch)]
    jit = {}
    for (k, _), p in zip(paths.items(), procs):
        p.wait(timeout=600)
        assert p.returncode == 0, (tmp_path / f'err_{k}').read_text()[-3000:]
        jit.update(torch.load(tmp_path / f'jit_{k}.pt'))
    for k in paths:
        assert len(jit[k]) == len(refs[k]) == N_IDX // 8
        for (va, ya), (vb, yb) in zip(refs[k], jit[k]):
            assert torch.equal(va, vb) and torch.equal(ya, yb)
        for (va, ya), (vb, yb) in zip(refs[k + '_mc'], jit[k + '_mc']):  # multi-crop: flat two-size buffer
            assert all(torch.equal(a, b) for a, b in zip(va, vb)) and torch.equal(ya, yb)
        for ch in (1, 3):
            ref = refs[k + f'_eval{ch}']
            assert len(ref) == len(jit[k + f'_eval{ch}'])
            assert all(torch.equal(a, b) for a, b in zip(ref, jit[k + f'_eval{ch}']))
    ref = float_ops(data)
    for name, v in jit['float_ops'].items():
        assert np.array_equal(v.numpy(), ref[name]), name


def test_distributed_shards(betons):
    per_rank = []
    for rank in range(2):
        ld = data.build_ssl_loader(betons['idx'], 4, 2, 12, recipe='crop', workers=1, seed=5,
                                   distributed=True, rank=rank, world_size=2)
        assert len(ld) == N_IDX // 2 // 4
        per_rank.append(torch.cat([y for _, y in ld]).tolist())
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(N_IDX))
    with pytest.raises(ValueError, match='distributed=True'):
        data.build_ssl_loader(betons['idx'], 4, 2, 12, rank=1, world_size=2)


def test_indices_subset(betons):
    keep = np.arange(3, N_IDX, 3)  # 13 samples
    ld = data.build_ssl_loader(betons['idx'], 4, 2, 12, recipe='crop', workers=1, seed=5,
                               indices=keep, drop_last=False)
    assert len(ld) == 4
    seen = torch.cat([y for _, y in ld]).tolist()
    assert sorted(seen) == keep.tolist()
    x, y, idx = eval_pixels(betons['idx'], 16, 1, indices=keep[::-1].copy(), rank=1, world_size=2)
    assert idx.tolist() == keep[::-1][7:].tolist() and torch.equal(y, idx)  # label = index
    with pytest.raises(ValueError, match='outside'):
        data.build_eval_loader(betons['idx'], 4, 16, indices=[0, N_IDX])


def test_sharded_order_pads_like_distributed_sampler():
    class FakeLoader:
        indices, seed, distributed = np.arange(10, dtype=np.uint64), 7, True
    orders = [data.ShardedOrder(True, r, 3)(FakeLoader()).sample_order(2) for r in range(3)]
    assert all(len(o) == 4 for o in orders)
    perm = np.random.default_rng(9).permutation(np.arange(10))
    padded = np.concatenate([perm, perm[:2]])
    for r in range(3):
        assert orders[r].tolist() == padded[r::3].tolist()


# ---- eval loader ----

def test_eval_loader_sequential_and_sharded(betons):
    x, y, idx = eval_pixels(betons['idx'], 16, 1)
    assert idx.tolist() == list(range(N_IDX))
    shards = [eval_pixels(betons['idx'], 16, 1, rank=r, world_size=3) for r in range(3)]
    ids = [s[2].tolist() for s in shards]
    assert sum(len(i) for i in ids) == N_IDX and sorted(sum(ids, [])) == list(range(N_IDX))
    assert all(ids[r] == sorted(ids[r]) for r in range(3))  # contiguous, in order
    for xs, ys, i in shards:
        assert torch.equal(xs, x[i]) and torch.equal(ys, y[i])
    ld = data.build_eval_loader(betons['idx'], 16, 16, channels=1)
    assert len(ld) == 3 and ld.num_samples == N_IDX  # 40 = 16 + 16 + 8, no drop_last


# ---- ViewAugment ----

def test_view_augment_parameter_rates():
    g = torch.Generator().manual_seed(0)
    a, b = data.recipe_specs('imagenet')
    n = 40000
    pa, pb = data.ViewAugment.sample_params(n, a, g), data.ViewAugment.sample_params(n, b, g)
    tol = 0.01
    for p in (pa, pb):
        assert abs(p['gray'].float().mean() - 0.2) < tol
        assert abs(p['jitter'].float().mean() - 0.8) < tol
        f = p['factors']
        assert f[:, 0].min() >= 0.6 and f[:, 0].max() <= 1.4 and f[:, 2].max() <= 1.2
        assert f[:, 3].abs().max() <= 0.1 and f[:, 3].std() > 0.05
        assert torch.equal(p['order'].sort(1).values, torch.arange(4).expand(n, 4))
        assert p['sigma'].min() >= 0.1 and p['sigma'].max() <= 2.0
    assert pa['blur'].all() and not pa['solarize'].any()
    assert abs(pb['blur'].float().mean() - 0.1) < tol
    assert abs(pb['solarize'].float().mean() - 0.2) < tol
    # first op of the random order is uniform over the four ops
    counts = torch.bincount(pa['order'][:, 0], minlength=4).float() / n
    assert (counts - 0.25).abs().max() < tol
    aug = data.ViewAugment([a, b])
    assert aug.view_types(4) == [0, 1, 0, 1]


@pytest.mark.parametrize('recipe', ['imagenet', 'cifar', 'cifar_strong'])
def test_view_augment_colour_law(recipe):
    """ViewAugment.sample_params, every view type of the recipe: the full law of SPEC §7 (KS of
    each jitter factor and of sigma against their uniform laws, chi-square of the 24 op orders,
    exact rates, independence); the 'imagenet' types are A (blur 1, no solarize) then B (blur 0.1,
    solarize 0.2), both jitter (0.4, 0.4, 0.2, 0.1) p 0.8 and gray p 0.2."""
    specs = data.recipe_specs(recipe)
    if recipe == 'imagenet':
        j = (0.4, 0.4, 0.2, 0.1)
        assert [(sp.jitter, sp.jitter_prob, sp.gray_prob, sp.blur_prob, sp.solarize_prob)
                for sp in specs] == [(j, 0.8, 0.2, 1.0, 0.0), (j, 0.8, 0.2, 0.1, 0.2)]
    else:
        j = (0.4, 0.4, 0.4, 0.1) if recipe == 'cifar' else (0.8, 0.8, 0.8, 0.2)
        assert [(sp.jitter, sp.jitter_prob, sp.gray_prob) for sp in specs] == [(j, 0.8, 0.2)]
    assert all(sp.blur_sigma == (0.1, 2.0) for sp in specs)
    g = torch.Generator().manual_seed(11)
    for t, spec in enumerate(specs):
        check_colour_law(data.ViewAugment.sample_params(40000, spec, g), spec, (recipe, t))


@pytest.mark.parametrize('T,V', [(2, 4), (2, 5), (3, 4), (3, 6)])
def test_view_augment_view_types_as_applied(T, V):
    """forward applies spec v % T to view v (also when V % T != 0), read off its outputs: with
    type 0 = solarize p 1, type 1 = gray p 1, type 2 = identity and inputs in [0.6, 1], a view is
    solarized (all < 0.5), gray (equal channels, >= 0.6) or untouched."""
    specs = [data.ColourSpec(solarize_prob=1.0), data.ColourSpec(gray_prob=1.0),
             data.ColourSpec()][:T]
    x = 0.6 + 0.4 * torch.rand(6, V, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    y = data.ViewAugment(specs)(x, torch.Generator().manual_seed(1))
    solarized = (y < 0.5).all(4).all(3).all(2)
    gray = ((y[:, :, 0] == y[:, :, 1]) & (y[:, :, 1] == y[:, :, 2])).all(3).all(2)
    gray &= (y >= 0.6).all(4).all(3).all(2)
    same = (y == x).all(4).all(3).all(2)
    kind = torch.stack([solarized, gray, same], -1)  # (B, V, 3): which of the 3 effects
    assert (kind.sum(-1) == 1).all()
    assert kind.int().argmax(-1).tolist() == [[v % T for v in range(V)]] * 6


def test_view_augment_imagenet_types_by_view_index(monkeypatch):
    """The 'imagenet' recipe through forward, as applied: the parameters that forward hands to
    apply for each view (rows identified by their content) give view 0, 2 (type A) blur always
    and no solarize, view 1, 3 (type B) blur 0.1 and solarize 0.2; each view exactly once."""
    B, V = 3000, 4
    code = ((torch.arange(B * V, dtype=torch.float32) + 1) / (B * V + 1)).view(B, V, 1, 1, 1)
    x = code.expand(B, V, 3, 2, 2).contiguous()
    seen = {}

    def spy(xs, p, spec, generator=None, inplace=False):
        k = ((xs[:, 0, 0, 0].double() * (B * V + 1)).round().long() - 1).tolist()
        for r, kk in enumerate(k):
            assert kk not in seen
            seen[kk] = (bool(p['blur'][r]), bool(p['solarize'][r]), spec)
        return xs

    specs = data.recipe_specs('imagenet')
    monkeypatch.setattr(data.ViewAugment, 'apply', staticmethod(spy))
    data.ViewAugment(specs)(x, torch.Generator().manual_seed(2))
    assert sorted(seen) == list(range(B * V))
    for v in range(V):
        blur, sol, spec = zip(*(seen[b * V + v] for b in range(B)))
        assert all(sp is specs[v % 2] for sp in spec), v
        blur, sol = np.mean(blur), np.mean(sol)
        if v % 2 == 0:
            assert blur == 1.0 and sol == 0.0, (v, blur, sol)
        else:
            assert abs(blur - 0.1) <= rate_tol(0.1, B) and abs(sol - 0.2) <= rate_tol(0.2, B), (v, blur, sol)


def _decoder_params(spec_row, n, view, seed=0):
    """The decoder path's parameters of n samples (hash draws), in sample_params' layout."""
    key = data._epoch_key(seed, 0)
    q = np.stack([data._colour_params(key, s, view, spec_row) for s in range(n)])
    return dict(jitter=torch.from_numpy(q[:, 0] > 0), factors=torch.from_numpy(q[:, 1:5]).float(),
                order=torch.from_numpy(q[:, 5:9]).long(), gray=torch.from_numpy(q[:, 9] > 0),
                blur=torch.from_numpy(q[:, 10] > 0), sigma=torch.from_numpy(q[:, 11]).float(),
                solarize=torch.from_numpy(q[:, 12] > 0)), q


N_DECODER = 10000  # hash draws per view type (plain Python: ~0.35 ms each)


@pytest.fixture(scope='module')
def decoder_colour_draws():
    """The decoder's colour parameters of samples 0..N_DECODER-1 for view 0 (type A) and view 1
    (type B) of the 'imagenet' recipe, in sample_params' layout."""
    table = data.colour_table(data.recipe_specs('imagenet'))
    return [_decoder_params(table[v], N_DECODER, v)[0] for v in (0, 1)]


def test_decoder_colour_parameter_rates(decoder_colour_draws):
    """The decoder path (colour='decoder') draws from the distribution of ViewAugment.sample_params:
    exact per-view probabilities, factor ranges, uniform op order; view types A/B of 'imagenet'."""
    pa, pb = decoder_colour_draws
    n, tol = N_DECODER, 0.015
    for p in (pa, pb):
        assert abs(p['gray'].float().mean() - 0.2) < tol
        assert abs(p['jitter'].float().mean() - 0.8) < tol
        f = p['factors']
        assert 0.6 <= f[:, 0].min() and f[:, 0].max() <= 1.4 and 0.8 <= f[:, 2].min() and f[:, 2].max() <= 1.2
        assert abs(f[:, 0].mean() - 1) < tol and abs(f[:, 0].std() - 0.8 / 12 ** 0.5) < tol  # uniform
        assert f[:, 3].abs().max() <= 0.1 and abs(f[:, 3].std() - 0.2 / 12 ** 0.5) < tol
        assert torch.equal(p['order'].sort(1).values, torch.arange(4).expand(n, 4))
        assert (torch.bincount(p['order'][:, 0], minlength=4).float() / n - 0.25).abs().max() < tol
        assert p['sigma'].min() >= 0.1 and p['sigma'].max() <= 2.0
    assert pa['blur'].all() and not pa['solarize'].any()
    assert abs(pb['blur'].float().mean() - 0.1) < tol and abs(pb['solarize'].float().mean() - 0.2) < tol
    # independent of each other and of the crop draws: gray and jitter uncorrelated
    both = (pa['gray'] & pa['jitter']).float().mean()
    assert abs(both - 0.16) < tol
    assert data.colour_table(data.recipe_specs('crop')) is None


def test_decoder_colour_law(decoder_colour_draws):
    """The decoder's _colour_params, both 'imagenet' view types: the full law of SPEC §7 (as
    test_view_augment_colour_law for the torch path: KS of each factor and of sigma, the 24
    orders, exact rates, independence), and view 0's draws independent of view 1's."""
    specs = data.recipe_specs('imagenet')
    pa, pb = decoder_colour_draws
    for t, p in enumerate((pa, pb)):
        check_colour_law(p, specs[t], ('decoder', t))
    both = np.corrcoef(np.concatenate([pa['factors'], pb['factors']], 1).T.astype(np.float64))
    assert np.abs(both[:4, 4:]).max() < 5 / np.sqrt(N_DECODER)  # views draw independently


def test_decoder_colour_ops_equal_torch_ops():
    """Given the same parameters, the decoder's numba colour ops equal ViewAugment.apply (the torch
    ops that match torchvision) up to the final rounding to uint8 (<= 1 level)."""
    specs = data.recipe_specs('imagenet')
    table = data.colour_table(specs)
    rng = np.random.default_rng(0)
    for view in (0, 1):
        p, q = _decoder_params(table[view], 24, view, seed=5)
        imgs = rng.integers(0, 256, size=(24, 20, 20, 3), dtype=np.uint8)
        imgs = np.repeat(np.repeat(imgs[:, ::2, ::2], 2, 1), 2, 2)  # some smoothness
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
        ref = (data.ViewAugment.apply(x, p, specs[view]).permute(0, 2, 3, 1) * 255).round()
        for i in range(24):
            o = imgs[i].copy()
            scratch = np.empty(data.colour_scratch_size(20, int(table[view, 10])), np.float32)
            data._apply_colour(o, scratch, q[i], int(table[view, 10]))
            assert np.abs(o.astype(np.float64) - ref[i].numpy()).max() <= 1.0, (view, i, q[i])
        assert (q[:, 0] > 0).any() and (q[:, 9] > 0).any() and (q[:, 10] > 0).any()


def test_decoder_flip_rides_on_the_colour_pass():
    """The decoder's in-place flip mirrors the view, and _apply_colour(flip=True) equals the colour
    ops applied to the mirrored view, to the bit (with and without ops drawn, odd widths)."""
    table = data.colour_table(data.recipe_specs('imagenet'))
    _, q = _decoder_params(table[0], 8, 0, seed=2)
    rng = np.random.default_rng(1)
    for w in (7, 8):
        img = rng.integers(0, 256, size=(5, w, 3), dtype=np.uint8)
        o = img.copy()
        data._flip_u8(o)
        assert np.array_equal(o, img[:, ::-1])
        scratch = np.empty(data.colour_scratch_size(w, int(table[0, 10])), np.float32)
        for qi in [np.zeros(14)] + list(q):
            a, b = img.copy(), img[:, ::-1].copy()
            data._apply_colour(a, scratch, qi, int(table[0, 10]), True)
            data._apply_colour(b, scratch, qi, int(table[0, 10]))
            assert np.array_equal(a, b)


def test_area_resize_matches_opencv_inter_area():
    """The decoder's own resize of shrinking crops is OpenCV's INTER_AREA (what libffcv calls)
    to within 1 grey level, rarely: equal size (a copy), exact 2x, fractional 1-2x (the unrolled
    three-tap path), large shrinks (the general path), non-square crops, offsets; flip=True writes
    the mirror image of the same output (both paths)."""
    import cv2
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8), (90, 70),
                     interpolation=cv2.INTER_CUBIC)  # smooth, with edges (70 x 90)
    cases = [(0, 20, 0, 20, 20, 20), (3, 40, 5, 40, 20, 20), (1, 31, 2, 27, 20, 20),
             (0, 70, 0, 90, 12, 12), (10, 33, 7, 59, 16, 24), (5, 64, 0, 64, 64, 64),
             (0, 70, 1, 89, 8, 20)]
    diff = total = 0
    for i, ch, j, cw, th, tw in cases:
        out = np.zeros((th, tw, 3), np.uint8)
        scr = np.empty(data.area_scratch_size(max(th, tw), 70, 90), np.float32)
        data._area_resize(img, i, ch, j, cw, out, scr)
        ref = cv2.resize(img[i:i + ch, j:j + cw], (tw, th), interpolation=cv2.INTER_AREA)
        d = np.abs(out.astype(int) - ref)
        assert d.max() <= 1, (i, ch, j, cw, th, tw)
        diff, total = diff + (d > 0).sum(), total + d.size
        if (ch, cw) == (th, tw):
            assert np.array_equal(out, ref)
        mirrored = np.zeros_like(out)
        data._area_resize(img, i, ch, j, cw, mirrored, scr, True)
        assert np.array_equal(mirrored, out[:, ::-1])
    assert diff <= 0.002 * total


def test_bilinear_resize_matches_torchvision_resized_crop():
    """The decoder's default crop resize is torchvision v2's resized_crop (antialiased bilinear, what
    RandomResizedCrop does) on uint8 to within 1 grey level (its fixed-point weights round their own
    way), and the same weights applied in float64 (written out below from torch's antialias rule;
    torch's own float path, not its uint8 one, returns a constant column for some crops that shrink
    31x along one axis and grow along the other) to within 1 grey level, rarely: crops that
    grow (CIFAR), shrink (ImageNet-size storage) or both, down to 1 px wide crops and 1 px outputs;
    flip=True writes the mirror image of the same output. (INTER_AREA's upsampling, which FFCV uses, is a box filter:
    nearest neighbour at 2x, far from it; checked too.)"""
    import cv2
    import torchvision.transforms.v2.functional as TF
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8), (90, 70),
                     interpolation=cv2.INTER_CUBIC)  # smooth, with edges (70 x 90)
    chw = torch.from_numpy(img).permute(2, 0, 1)

    def weights(s, n):  # (n, s): output o centred at scale (o + 1/2), triangle of half-width max(1, scale)
        scale = s / n
        support = max(scale, 1.0)
        w = np.zeros((n, s))
        for o in range(n):
            c = scale * (o + 0.5)
            x = np.arange(max(int(c - support + 0.5), 0), min(int(c + support + 0.5), s))
            t = np.maximum(0.0, 1.0 - np.abs(x + 0.5 - c) / support)
            w[o, x] = t / t.sum()
        return w
    cases = [(0, 16, 0, 16, 32, 32), (3, 40, 5, 40, 20, 20), (1, 31, 2, 27, 20, 20), (0, 70, 0, 90, 12, 12),
             (10, 33, 7, 59, 40, 24), (5, 1, 4, 2, 9, 7), (2, 9, 3, 7, 1, 1)]
    cases += [tuple(int(v) for v in (rng.integers(0, 30), rng.integers(1, 41), rng.integers(0, 40),
                                     rng.integers(1, 51), rng.integers(1, 60), rng.integers(1, 60)))
              for _ in range(60)]
    diff = total = 0
    for i, ch, j, cw, th, tw in cases:
        out = np.zeros((th, tw, 3), np.uint8)
        scr = np.full(data.area_scratch_size(max(th, tw), 70, 90), np.nan, np.float32)
        data._bilinear_resize(img, i, ch, j, cw, out, scr)
        ref = TF.resized_crop(chw, i, j, ch, cw, [th, tw], antialias=True).permute(1, 2, 0).numpy()
        assert np.abs(out.astype(int) - ref).max() <= 1, (i, ch, j, cw, th, tw)
        exact = np.einsum('ys,stc,xt->yxc', weights(ch, th), img[i:i + ch, j:j + cw].astype(np.float64),
                          weights(cw, tw))
        d = np.abs(out - np.floor(exact + 0.5))
        assert d.max() <= 1, (i, ch, j, cw, th, tw)
        diff, total = diff + (d > 0).sum(), total + d.size
        mirrored = np.zeros_like(out)
        data._bilinear_resize(img, i, ch, j, cw, mirrored, scr, True)
        assert np.array_equal(mirrored, out[:, ::-1])
    assert diff <= 0.005 * total
    area = np.zeros((32, 32, 3), np.uint8)
    data._resize_crop(img, 70, 90, 0, 16, 0, 16, area, np.empty(data.area_scratch_size(32, 70, 90), np.float32),
                      False, False)
    assert np.array_equal(area, np.repeat(np.repeat(img[:16, :16], 2, 0), 2, 1))  # FFCV's 2x: nearest


def test_colour_ops_match_torchvision():
    import torchvision.transforms.v2.functional as TF
    x = torch.rand(3, 3, 17, 19, dtype=torch.float64)
    pairs = ((data.adjust_brightness, TF.adjust_brightness),
             (data.adjust_contrast, TF.adjust_contrast),
             (data.adjust_saturation, TF.adjust_saturation))
    for i, f in enumerate([0.6, 1.0, 1.37]):
        xi, ft = x[i:i + 1], torch.tensor([f], dtype=torch.float64).view(-1, 1, 1, 1)
        for ours, ref in pairs:
            assert torch.allclose(ours(xi, ft), ref(xi, f), atol=1e-6)
    hues = torch.tensor([-0.1, 0.03, 0.45], dtype=torch.float64)
    ours = data.adjust_hue(x, hues)
    for i in range(3):
        assert torch.allclose(ours[i], TF.adjust_hue(x[i], hues[i].item()), atol=1e-5)
    sig = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    blurred = data.gaussian_blur(x, sig)
    for i in range(3):  # support: 3 sigma per image
        k = 2 * int(np.ceil(3 * sig[i].item())) + 1
        ref = TF.gaussian_blur(x[i], kernel_size=k, sigma=sig[i].item())
        assert torch.allclose(blurred[i], ref, atol=1e-6)
        wide = TF.gaussian_blur(x[i], kernel_size=13, sigma=sig[i].item())
        assert (blurred[i] - wide).abs().max() < 2e-3  # the fixed 13-tap kernel: nearly the same
    assert torch.equal(data.solarize(x), TF.solarize(x, 0.5))


def test_jitter_in_random_order_matches_torchvision():
    """ViewAugment.apply's fused jitter == torchvision's four ops in each image's own order."""
    import torchvision.transforms.v2.functional as TF
    spec = data.ColourSpec(jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.7)
    x = torch.rand(24, 3, 9, 11, dtype=torch.float64)
    p = data.ViewAugment.sample_params(24, spec, torch.Generator().manual_seed(5))
    p['factors'] = p['factors'].double()
    y = data.ViewAugment.apply(x, p, spec)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(24):
        ref = x[i]
        if p['jitter'][i]:
            for op in p['order'][i].tolist():
                ref = fns[op](ref, p['factors'][i, op].item())
        assert torch.allclose(y[i], ref, atol=1e-5), i
    assert 0 < int(p['jitter'].sum()) < 24


def test_view_augment_forward():
    x = torch.rand(64, 4, 3, 8, 8)
    aug = data.ViewAugment(data.recipe_specs('imagenet'))
    y1 = aug(x, torch.Generator().manual_seed(1))
    y2 = aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(y1, y2) and y1.shape == x.shape and not torch.equal(y1, x)
    assert y1.min() >= 0 and y1.max() <= 1
    gray = data.ViewAugment([data.ColourSpec(gray_prob=1.0)])(x, torch.Generator())
    assert torch.allclose(gray[:, :, 0], gray[:, :, 1])
    assert torch.allclose(gray[:, :, 1], gray[:, :, 2])
    same = data.ViewAugment(data.recipe_specs('crop'))(x, torch.Generator())
    assert torch.equal(same, x)
    with pytest.raises(ValueError, match='unknown recipe'):
        data.recipe_specs('simclr')


def test_norm_from_normalises_with_the_other_betons_stats(betons):
    """norm_from (a test split read with the train beton's mean/std): same pixels, the other
    beton's affine; for the eval loader and the SSL loader alike."""
    own, train = data.beton_info(betons['idx_test']), data.beton_info(betons['idx'])
    (m0, s0), (m1, s1) = data.norm_stats(own, 1), data.norm_stats(train, 1)
    assert not torch.equal(m0, m1)
    for build in (lambda **kw: [x for x, _, _ in data.build_eval_loader(betons['idx_test'], 8, 12, channels=1, **kw)],
                  lambda **kw: [v for v, _ in data.build_ssl_loader(betons['idx_test'], 8, 2, 12, recipe='crop',
                                                                    channels=1, workers=1, seed=3, **kw)]):
        a, b = build(), build(norm_from=betons['idx'])
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            torch.testing.assert_close(x * s0.reshape(-1, 1, 1) + m0.reshape(-1, 1, 1),
                                       y * s1.reshape(-1, 1, 1) + m1.reshape(-1, 1, 1), atol=1e-4, rtol=0)
