"""Per-view cost of the pieces of the CPU decoder (data.py), one view at a time, one thread.

    .venv/bin/python bench/decoder_ops.py              # the per-view numbers quoted in BENCHMARKS.md

Times, in ms per view of --res px (random uint8 pixels; the ops do not branch on content):
each colour op of the decoder path (numba, float32 on a planar scratch; the uint8 -> float
pass also mirrored, which is how flipped views with colour ops are flipped), _apply_colour with
only a blur at three sigmas and with all four jitter ops, the horizontal flip (in place, and the
allocating `o[:] = o[:, ::-1].copy()` it replaced), and libffcv's OpenCV resize of square crops of
a --stored px image to --res px next to the decoder's own INTER_AREA (data._area_resize, used for
crops that shrink along both axes), and how far apart the two resizes' outputs are. Not a test.

    git show e3c9eca:data.py > /tmp/data_before.py
    .venv/bin/python bench/decoder_ops.py --against /tmp/data_before.py   # A/B of two data.py
    .venv/bin/python bench/decoder_ops.py --interpolation                # bilinear vs area crop resize

--against: time the whole per-view colour stage (`_apply_colour`) of this data.py and of another
one side by side, alternating between the two every round (single timings on a shared machine
move by 50 %; the minimum over interleaved rounds of the same work does not), and how far apart
their pixels are. Rows: jitter only (unflipped and flipped), blur only at three sigmas, and
the imagenet recipe's own draws (both view types, flip p 0.5).
"""
import argparse
import os
import sys
import time

os.environ.setdefault('NUMBA_NUM_THREADS', '1')
import numba  # noqa: E402
import numpy as np  # noqa: E402
from ffcv.libffcv import ctypes_resize  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser('bench/decoder_ops.py: per-view cost of the decoder pieces')
    p.add_argument('--res', type=int, default=224, help='view side in px (default 224)')
    p.add_argument('--stored', type=int, nargs='+', default=[224, 448],
                   help='stored image sides whose crops are resized to --res (default 224 448)')
    p.add_argument('--reps', type=int, default=300, help='timed calls per row, after one warm-up (default 300)')
    p.add_argument('--against', default=None, metavar='DATA_PY',
                   help='another version of data.py (e.g. from `git show <commit>:data.py`): time the '
                        'per-view colour stage of both, in alternating rounds, and print how far apart '
                        'their pixels are, instead of the per-op table')
    p.add_argument('--rounds', type=int, default=15, help='--against: alternating rounds per row; the minimum over them is reported (default 15)')
    p.add_argument('--interpolation', action='store_true',
                   help='instead of the per-op table: the crop resize of RandomResizedCrop boxes (scale '
                        '0.08-1) of each --stored image to --res, bilinear (torchvision\'s, the default) '
                        'against area (stock FFCV\'s), the two alternating --rounds times (minimum kept)')
    return p


def interpolation(args):
    """ms per view of data._resize_crop over the same 200 RandomResizedCrop boxes, both kinds of
    weights, alternating rounds; a smooth image (the resize does not branch on content)."""
    rng = np.random.default_rng(0)
    out = np.zeros((args.res, args.res, 3), np.uint8)
    print(f'| ms per {args.res} px view, 1 thread, 200 RandomResizedCrop boxes (scale 0.08-1), minimum of '
          f'{args.rounds} alternating rounds | bilinear (default) | area (FFCV) |')
    print('|---|---|---|')
    for side in args.stored:
        small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
        img = np.ascontiguousarray(np.kron(small, np.ones((8, 8, 1), np.uint8)))
        boxes = [data._rrc_box(np.uint64(7), s, 0, side, side, 0.08, 1.0, np.log(3 / 4), np.log(4 / 3))
                 for s in range(200)]
        scr = np.empty(data.area_scratch_size(args.res, side, side), np.float32)
        best = {True: float('inf'), False: float('inf')}
        for _ in range(args.rounds):
            for bilinear in (True, False):
                i, j, ch, cw = boxes[0]
                data._resize_crop(img, side, side, i, ch, j, cw, out, scr, False, bilinear)  # compiled
                t0 = time.perf_counter()
                for i, j, ch, cw in boxes:
                    data._resize_crop(img, side, side, i, ch, j, cw, out, scr, False, bilinear)
                best[bilinear] = min(best[bilinear], (time.perf_counter() - t0) / len(boxes) * 1e3)
        print(f'| {side} px image | {best[True]:.3f} | {best[False]:.3f} |')


def _load_copy(path):
    """Import a copy of another data.py as module `data_against` (numba caches it by that name)."""
    if not os.path.isfile(path):
        raise SystemExit(f'bench/decoder_ops.py: --against {path}: no such file (e.g. git show '
                         f'<commit>:data.py > {path})')
    import importlib
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix='decoder_ops_')
    shutil.copy(path, os.path.join(d, 'data_against.py'))
    sys.path.insert(0, d)
    return importlib.import_module('data_against')


def _colour_runner(mod):
    """njit loop: copy view k % n into a work buffer and run mod._apply_colour with params q[k]."""
    apply = mod._apply_colour

    @numba.njit
    def run(views, scratch, q, flips, radius, out):
        for k in range(q.shape[0]):
            o = out[k % out.shape[0]]
            o[:] = views[k % views.shape[0]]
            apply(o, scratch, q[k], radius, flips[k])
    return run


def against(args):
    """Interleaved A/B of the per-view colour stage of two data.py versions (see the docstring)."""
    other = _load_copy(args.against)
    rng = np.random.default_rng(0)
    res = args.res
    small = rng.integers(0, 256, (16, res // 4, res // 4, 3), dtype=np.uint8)
    views = np.ascontiguousarray(np.repeat(np.repeat(small, 4, 1), 4, 2))  # smooth-ish pixels
    table = data.colour_table(data.recipe_specs('imagenet'))
    radius = int(table[:, 10].max())
    scratch = np.zeros(data.colour_scratch_size(res, radius), np.float32)
    key, n = data._epoch_key(3, 0), 64
    recipe = np.stack([data._colour_params(key, s, s % 2, table[s % 2]) for s in range(n)])
    cases = []
    jit = np.zeros(14)
    jit[0], jit[1:4], jit[4], jit[5:9] = 1, (1.2, 0.8, 1.3), 0.05, (2, 0, 3, 1)
    for flip in (False, True):
        cases.append((f'jitter only{", flipped" if flip else ""}', np.tile(jit, (n, 1)), np.full(n, flip)))
    for sigma in (0.1, 1.0, 2.0):
        q = np.zeros(14)
        q[10], q[11] = 1, sigma
        cases.append((f'blur only, sigma {sigma}', np.tile(q, (n, 1)), np.zeros(n, bool)))
    cases.append((f'imagenet recipe draws ({n} views, flip p 0.5)', recipe, rng.random(n) < 0.5))
    runs = {'this data.py': _colour_runner(data), args.against: _colour_runner(other)}
    outs = {k: np.zeros((n, res, res, 3), np.uint8) for k in runs}
    print(f'ms per {res} px view, _apply_colour, 1 thread: min over {args.rounds} interleaved rounds of {n} views')
    print(f'| views | {" | ".join(runs)} | ratio | max pixel difference |')
    print('|---|---|---|---|---|')
    for name, q, flips in cases:
        best = {k: float('inf') for k in runs}
        for k, run in runs.items():
            run(views, scratch, q, flips, radius, outs[k])  # compile + warm
        for _ in range(args.rounds):
            for k, run in runs.items():
                t0 = time.perf_counter()
                run(views, scratch, q, flips, radius, outs[k])
                best[k] = min(best[k], 1000 * (time.perf_counter() - t0) / n)
        a, b = best.values()
        u, v = (o.astype(np.int16) for o in outs.values())
        d = np.abs(u - v)
        diff = f'{d.max()} (on {(d > 0).mean():.1e} of the values)' if d.max() else '0'
        print(f'| {name} | {a:.3f} | {b:.3f} | {a / b:.2f} | {diff} |', flush=True)


@numba.njit
def _resize_n(img, out, side, ch, n):
    for _ in range(n):
        ctypes_resize(0, img.ctypes.data, side, side, 0, ch, 0, ch, out.ctypes.data,
                      out.shape[0], out.shape[1])


@numba.njit
def _resize_box(img, out, i, ch, j, cw):
    ctypes_resize(0, img.ctypes.data, img.shape[0], img.shape[1], i, i + ch, j, j + cw,
                  out.ctypes.data, out.shape[0], out.shape[1])


@numba.njit
def _area_n(img, out, ch, scr, n):
    for _ in range(n):
        data._area_resize(img, 0, ch, 0, ch, out, scr)


@numba.njit
def _copy_flip_n(o, n):  # the flip the decoder used before 2026-12-01
    for _ in range(n):
        o[:] = o[:, ::-1].copy()


@numba.njit
def _flip_n(o, n):
    for _ in range(n):
        data._flip_u8(o)


def timed(fn, reps):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1000 * (time.perf_counter() - t0) / reps


def main(args):
    rng = np.random.default_rng(0)
    res, reps = args.res, args.reps
    view = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
    n = res * res * 3
    scratch = np.zeros(data.colour_scratch_size(res, 6), np.float32)
    x, src, dst = scratch[:n], view.reshape(n).copy(), view.reshape(n).copy()
    f = np.float32(1.1)
    rows = [('uint8 -> planar float', lambda: data._u8_to_planar(src, x, res * res)),
            ('uint8 -> planar float, mirrored (the flip)', lambda: data._u8_to_planar_flipped(src, x, res, res)),
            ('brightness', lambda: data._brightness(x, f)),
            ('contrast', lambda: data._contrast(x, f, res, scratch[n:n + res])),
            ('saturation', lambda: data._saturation(x, f)),
            ('hue', lambda: data._hue(x, np.float32(0.05))),
            ('grayscale', lambda: data._grayscale(x)),
            ('planar float -> uint8', lambda: data._planar_to_u8(x, dst, res * res, 3, False)),
            ('planar float -> uint8 + solarize', lambda: data._planar_to_u8(x, dst, res * res, 3, True))]
    for sigma in (0.1, 1.0, 2.0):
        q = np.zeros(14)
        q[10], q[11] = 1, sigma
        rows.append((f'_apply_colour: blur only, sigma {sigma}',
                     lambda q=q: data._apply_colour(view.copy(), scratch, q, 6)))
    q = np.zeros(14)
    q[0], q[1:4], q[4], q[5:9] = 1, 1.1, 0.05, [0, 1, 2, 3]
    rows.append(('_apply_colour: the four jitter ops', lambda: data._apply_colour(view.copy(), scratch, q, 6)))
    rows.append(('copy of the view (subtract from the two above)', lambda: view.copy()))
    o = view.copy()
    rows.append(('flip, in place (_flip_u8)', lambda: _flip_n(o, 1)))
    rows.append(('flip, o[:] = o[:, ::-1].copy() (before)', lambda: _copy_flip_n(o, 1)))
    out = np.zeros((res, res, 3), np.uint8)
    for side in args.stored:
        img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        for frac in (0.3, 0.7, 1.0):
            ch = max(1, min(side - 1, int(frac * side)))
            rows.append((f'resize {ch} px crop of a {side} px image -> {res} px, libffcv (OpenCV)',
                         lambda img=img, side=side, ch=ch: _resize_n(img, out, side, ch, 1)))
            if ch >= res:
                scr = np.empty(data.area_scratch_size(res, side, side), np.float32)
                rows.append((f'resize {ch} px crop of a {side} px image -> {res} px, data._area_resize',
                             lambda img=img, ch=ch, scr=scr: _area_n(img, out, ch, scr, 1)))
    print(f'ms per {res} px view, 1 thread, {reps} calls each')
    for name, fn in rows:
        print(f'| {name} | {timed(fn, reps):.3f} |')
    side = 2 * res  # agreement: random crops shrinking along both axes of a smooth image
    small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    img = np.ascontiguousarray(np.kron(small, np.ones((8, 8, 1), np.uint8)))  # blocks: edges
    img = np.ascontiguousarray((img.astype(np.uint16) + np.roll(img, 3, (0, 1))) // 2).astype(np.uint8)
    scr = np.empty(data.area_scratch_size(res, side, side), np.float32)
    ref, worst, differ = np.zeros_like(out), 0, 0
    for _ in range(reps):
        ch, cw = (int(v) for v in rng.integers(res, side + 1, 2))
        i, j = int(rng.integers(0, side - ch + 1)), int(rng.integers(0, side - cw + 1))
        _resize_box(img, ref, i, ch, j, cw)
        data._area_resize(img, i, ch, j, cw, out, scr)
        d = np.abs(ref.astype(int) - out)
        worst, differ = max(worst, int(d.max())), differ + int((d > 0).sum())
    print(f'_area_resize vs libffcv, {reps} random shrinking crops of a {side} px image: max '
          f'|difference| {worst} grey level(s), on {differ / (reps * out.size):.1e} of the values')


if __name__ == '__main__':
    a = get_args_parser().parse_args()
    against(a) if a.against else (interpolation(a) if a.interpolation else main(a))
