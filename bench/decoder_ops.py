"""Per-view cost of the pieces of the CPU decoder (data.py), one view at a time, one thread.

    .venv/bin/python bench/decoder_ops.py              # the per-view numbers quoted in BENCHMARKS.md

Times, in ms per view of --res px (random uint8 pixels; the ops do not branch on content):
each colour op of the decoder path (numba, float32 on an interleaved scratch), _apply_colour with
only a blur at three sigmas and with all four jitter ops, the horizontal flip (in place, and the
allocating `o[:] = o[:, ::-1].copy()` it replaced), and libffcv's OpenCV resize of square crops of
a --stored px image to --res px next to the decoder's own INTER_AREA (data._area_resize, used for
crops that shrink along both axes), and how far apart the two resizes' outputs are. Not a test.
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
    return p


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
    rows = [('uint8 -> float', lambda: data._u8_to_unit(src, x)),
            ('brightness', lambda: data._brightness(x, f)),
            ('contrast', lambda: data._contrast(x, f, 3 * res, scratch[n:n + 3 * res])),
            ('saturation', lambda: data._saturation(x, f)),
            ('hue', lambda: data._hue(x, np.float32(0.05))),
            ('grayscale', lambda: data._grayscale(x)),
            ('float -> uint8', lambda: data._unit_to_u8(x, dst, False)),
            ('float -> uint8 + solarize', lambda: data._unit_to_u8(x, dst, True))]
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
    main(get_args_parser().parse_args())
