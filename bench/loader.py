"""Throughput of data.build_ssl_loader: images/s after a warm-up (numba compile excluded).

    .venv/bin/python bench/loader.py --datasets fmnist cifar_npz --workers 2 --views 2
    .venv/bin/python bench/loader.py --datasets imagenette --res 224 --batch_size 64

Each (dataset, recipe, decode_once) row builds a fresh loader, runs `--warmup` batches (the
first one compiles the numba pipeline; its time is reported as `first_batch_s`), then times
`--batches` batches (wrapping into further epochs when needed). images/s counts images, not
views (views/s = images/s x V). cpu_ms_per_image (process CPU time, all threads) is the number
to compare on a shared machine, where wall-clock rates swing with other users' load.
Betons are written on first use under --beton_dir (full train splits; Imagenette is extracted
from /work/shared/data). Prints a table and writes JSON to bench/out/loader_<time>.json.
Not a test: numbers depend on the machine and its load.
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import data  # noqa: E402

SHARED = Path('/work/shared/data')
SOURCES = {  # name -> (write_beton kwargs, native res, full recipe)
    'fmnist': (dict(dataset='fashion_mnist', root=str(ROOT / 'data' / 'fashion_mnist'),
                    split='train'), 28, 'cifar'),
    'cifar_npz': (dict(dataset='cifar10_npz', root=str(SHARED / 'cifar10_jpeg75.npz'),
                       split='train'), 32, 'cifar'),
    'cifar_npz_jpg': (dict(dataset='cifar10_npz', root=str(SHARED / 'cifar10_jpeg75.npz'),
                           split='train', fmt='jpg'), 32, 'cifar'),
    'imagenette': (dict(dataset='imagefolder', split='train', fmt='jpg'), 224, 'imagenet'),
}


def get_args_parser():
    p = argparse.ArgumentParser('bench/loader.py: SSL loader throughput')
    p.add_argument('--datasets', nargs='+', default=['fmnist', 'cifar_npz'], choices=list(SOURCES),
                   help='which betons to read (written on first use)')
    p.add_argument('--recipes', nargs='+', default=['crop', 'full'],
                   help="recipes to time; 'full' = the dataset's full recipe (cifar / imagenet)")
    p.add_argument('--decode', nargs='+', default=['once'], choices=['once', 'per_view'],
                   help='once: DecodeViews cuts all V views from one decode (default); '
                        'per_view: one re-decoding pipeline per view, as stock FFCV')
    p.add_argument('--workers', type=int, default=2, help='ffcv CPU threads (default 2)')
    p.add_argument('--views', type=int, default=2, help='views per image (default 2)')
    p.add_argument('--batch_size', type=int, default=256, help='images per batch (default 256)')
    p.add_argument('--res', type=int, default=None, help='output side (default: native / 224)')
    p.add_argument('--warmup', type=int, default=5, help='warm-up batches, compile included')
    p.add_argument('--batches', type=int, default=50, help='timed batches (default 50)')
    p.add_argument('--device', default='cpu', help='where views are produced (cpu or cuda)')
    p.add_argument('--ffcv_only', action='store_true',
                   help='time only the FFCV stage (decode + crops, uint8 out), not the torch '
                        'colour ops / normalisation')
    p.add_argument('--torch_threads', type=int, default=None,
                   help='torch intra-op threads for the colour ops (default: torch default)')
    p.add_argument('--beton_dir', default=str(ROOT / 'bench' / 'out' / 'betons'),
                   help='where betons are written / found')
    p.add_argument('--out', default=str(ROOT / 'bench' / 'out'), help='folder for the JSON')
    return p


def ensure_beton(name, beton_dir):
    """Path of the beton for `name`, written (in a subprocess: ffcv's writer forks) if absent."""
    kw, _, _ = SOURCES[name]
    path = Path(beton_dir) / f'{name}.beton'
    try:
        data.beton_info(path)
        return str(path)
    except SystemExit:
        pass
    kw = dict(kw, out=str(path), num_workers=os.cpu_count() or 1)
    if name == 'imagenette':
        src = Path(beton_dir) / 'imagenette'
        if not (src / 'train').is_dir():
            print(f'extracting {SHARED / "imagenette_224.tar"} -> {src}', flush=True)
            with tarfile.open(SHARED / 'imagenette_224.tar') as tar:
                tar.extractall(src, filter='data')
        kw['root'] = str(src)
    print(f'writing {path}', flush=True)
    code = 'import sys, json; sys.path.insert(0, sys.argv[1]); import data; ' \
           'data.write_beton(**json.loads(sys.argv[2]))'
    subprocess.run([sys.executable, '-c', code, str(ROOT), json.dumps(kw)], check=True)
    return str(path)


def time_loader(path, recipe, res, args, decode_once):
    """(first-batch s, images/s wall, process CPU ms per image) over args.batches batches.
    CPU time (all threads: ffcv's and torch's) is the robust number on a shared machine."""
    t0 = time.perf_counter()
    ld = data.build_ssl_loader(path, args.batch_size, args.views, res, recipe=recipe,
                               workers=args.workers, device=args.device, decode_once=decode_once)
    sync = torch.cuda.synchronize if args.device.startswith('cuda') else (lambda: None)

    def batches():
        while True:
            if args.ffcv_only:  # the FFCV stage alone, through data.py's epoch plumbing
                order = ld._loader.traversal_order.sample_order(0)[:len(ld) * ld.batch_size]
                yield from data._drain(data._start_epoch(ld._loader, order))
            else:
                yield from ld

    it = batches()
    first = None
    for i in range(args.warmup):
        next(it)
        if first is None:
            sync()
            first = time.perf_counter() - t0
    sync()
    t1, c1 = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(args.batches):
        n += next(it)[0].shape[0]
    sync()
    wall, cpu = time.perf_counter() - t1, time.process_time() - c1
    return first, n / wall, 1000 * cpu / n


def main(args):
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rows = []
    for name in args.datasets:
        path = ensure_beton(name, args.beton_dir)
        _, native, full = SOURCES[name]
        res = args.res or native
        for recipe in args.recipes:
            recipe = full if recipe == 'full' else recipe
            for decode in args.decode:
                first, ips, cpu_ms = time_loader(path, recipe, res, args, decode == 'once')
                row = dict(dataset=name, recipe=recipe, decode=decode, res=res, views=args.views,
                           batch_size=args.batch_size, workers=args.workers, device=args.device,
                           ffcv_only=args.ffcv_only, torch_threads=torch.get_num_threads(),
                           first_batch_s=round(first, 1), images_per_s=round(ips, 1),
                           views_per_s=round(ips * args.views, 1),
                           cpu_ms_per_image=round(cpu_ms, 3), load_avg=round(os.getloadavg()[0], 1))
                rows.append(row)
                print(f"{name:12s} {recipe:9s} {decode:8s} res {res:3d}  first batch "
                      f"{first:5.1f} s  {ips:8.1f} images/s  {ips * args.views:8.1f} views/s  "
                      f"{cpu_ms:7.3f} CPU ms/image  (load {os.getloadavg()[0]:.1f})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    out = Path(args.out) / f"loader_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(dict(argv=sys.argv, cpus=os.cpu_count(), rows=rows), indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
