"""Throughput of data.build_ssl_loader vs a torchvision DataLoader doing the same recipe.

    .venv/bin/python bench/loader.py --datasets cifar_npz imagenette --recipes full --views 2 4 8 \
        --loaders ffcv torchvision                       # the Speed I table (BENCHMARKS.md)
    .venv/bin/python bench/loader.py --datasets fmnist cifar_npz --workers 2 --views 2

Loaders: 'ffcv' = data.build_ssl_loader (colour ops where --colour says: 'decoder' = numba
inside the ffcv decoder on the CPU threads, 'torch' = batched torch ops in the main process);
'torchvision' = torch.utils.data.DataLoader over the same images (PIL decode of the same
JPEGs / pixels) with torchvision.transforms.v2 per view, the same SPEC §7 recipe and view
types (data.recipe_specs), same workers and batch size, output (B, V, C, H, W) normalised
float32. Both outputs are ready for the model.

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
import io
import json
import multiprocessing as mp
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
    # the same images upsampled to 448 px storage (JPEG q 90): the decode cost of an ImageNet
    # beton (ffcv-imagenet stores 256-512 px), views still cut at 224 px
    'imagenette448': (dict(dataset='imagefolder', split='train', fmt='jpg'), 224, 'imagenet'),
}
UPSAMPLED_SIDE = 448


def get_args_parser():
    p = argparse.ArgumentParser('bench/loader.py: SSL loader throughput')
    p.add_argument('--datasets', nargs='+', default=['fmnist', 'cifar_npz'], choices=list(SOURCES),
                   help='which betons to read (written on first use under --beton_dir; imagenette448 = Imagenette '
                        'upsampled once to 448 px storage, an ImageNet-like decode cost, views still 224 px)')
    p.add_argument('--recipes', nargs='+', default=['crop', 'full'],
                   help="recipes to time; 'full' = the dataset's full recipe (cifar / imagenet)")
    p.add_argument('--loaders', nargs='+', default=['ffcv'], choices=['ffcv', 'torchvision'],
                   help='ffcv: data.build_ssl_loader; torchvision: DataLoader + transforms.v2 baseline')
    p.add_argument('--colour', nargs='+', default=['decoder'], choices=['decoder', 'torch'],
                   help="ffcv: where the colour ops run (decoder: numba in the ffcv threads; torch: "
                        "batched torch ops in the main process) (default decoder)")
    p.add_argument('--decode', nargs='+', default=['once'], choices=['once', 'per_view'],
                   help='once: DecodeViews cuts all V views from one decode (default); '
                        'per_view: one re-decoding pipeline per view, as stock FFCV')
    p.add_argument('--interpolation', default='bilinear', choices=['bilinear', 'area'],
                   help="ffcv: how crops are resized: bilinear = torchvision's antialiased RandomResizedCrop "
                        "(what the torchvision baseline does), area = stock FFCV's INTER_AREA (default bilinear)")
    p.add_argument('--workers', type=int, default=2, help='ffcv threads / DataLoader worker processes (default 2)')
    p.add_argument('--views', type=int, nargs='+', default=[2], help='views per image, one row each (default 2)')
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


def imagenette_root(beton_dir):
    src = Path(beton_dir) / 'imagenette'
    if not (src / 'train').is_dir():
        print(f'extracting {SHARED / "imagenette_224.tar"} -> {src}', flush=True)
        with tarfile.open(SHARED / 'imagenette_224.tar') as tar:
            tar.extractall(src, filter='data')
    return str(src)


def _upsample_one(job):
    from PIL import Image
    src, dst = job
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    Image.open(src).convert('RGB').resize((UPSAMPLED_SIDE, UPSAMPLED_SIDE), Image.BICUBIC).save(dst, quality=90)


def imagenette448_root(beton_dir):
    """Imagenette's train split resized to UPSAMPLED_SIDE px (written once, in parallel)."""
    src, dst = Path(imagenette_root(beton_dir)), Path(beton_dir) / f'imagenette{UPSAMPLED_SIDE}'
    if not (dst / 'train' / '.complete').exists():
        jobs = [(str(f), str(dst / f.relative_to(src))) for f in sorted((src / 'train').rglob('*'))
                if f.is_file()]
        print(f'upsampling {len(jobs)} images to {UPSAMPLED_SIDE} px -> {dst}', flush=True)
        with mp.Pool(os.cpu_count()) as pool:
            pool.map(_upsample_one, jobs, chunksize=64)
        (dst / 'train' / '.complete').touch()
    return str(dst)


IMAGE_FOLDERS = {'imagenette': imagenette_root, 'imagenette448': imagenette448_root}  # name -> root(beton_dir)


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
    if name in IMAGE_FOLDERS:
        kw['root'] = IMAGE_FOLDERS[name](beton_dir)
    print(f'writing {path}', flush=True)
    code = 'import sys, json; sys.path.insert(0, sys.argv[1]); import data; ' \
           'data.write_beton(**json.loads(sys.argv[2]))'
    subprocess.run([sys.executable, '-c', code, str(ROOT), json.dumps(kw)], check=True)
    return str(path)


def _cpu_s(pid):
    """utime + stime of a process in seconds (/proc), for DataLoader worker processes."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def _timed(it, args, sync, workers_pids=()):
    """Run the warm-up, then time args.batches batches: (first batch s, images/s, CPU ms/image)."""
    t0 = time.perf_counter()
    first = None
    for _ in range(args.warmup):
        next(it)
        if first is None:
            sync()
            first = time.perf_counter() - t0
    sync()
    pids = workers_pids() if callable(workers_pids) else workers_pids
    w0 = sum(_cpu_s(p) for p in pids)
    t1, c1 = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(args.batches):
        n += next(it)[1].shape[0]
    sync()
    wall, cpu = time.perf_counter() - t1, time.process_time() - c1
    cpu += sum(_cpu_s(p) for p in pids) - w0
    return first, n / wall, 1000 * cpu / n


def time_ffcv(path, recipe, res, views, args, decode_once, colour):
    """FFCV path: (first-batch s, images/s wall, process CPU ms per image, all threads)."""
    ld = data.build_ssl_loader(path, args.batch_size, views, res, recipe=recipe,
                               workers=args.workers, device=args.device, decode_once=decode_once,
                               colour=colour, interpolation=args.interpolation)
    sync = torch.cuda.synchronize if args.device.startswith('cuda') else (lambda: None)

    def batches():
        while True:
            if args.ffcv_only:  # the FFCV stage alone, through data.py's epoch plumbing
                order = ld._loader.traversal_order.sample_order(0)[:len(ld) * ld.batch_size]
                for out in data._drain(data._start_epoch(ld._loader, order)):
                    yield out[0], out[-1]
            else:
                yield from ld

    return _timed(batches(), args, sync)


class TVViews(torch.utils.data.Dataset):
    """The baseline: PIL image -> V views, view v through transforms[v % T] (torchvision v2)."""

    def __init__(self, name, beton_dir, transforms):
        self.name, self.transforms = name, transforms
        if name.startswith('cifar_npz'):
            src = data.open_source('cifar10_npz', str(SHARED / 'cifar10_jpeg75.npz'), 'train')
            self.blob, self.offsets, self.labels = src.blob, src.offsets, src.labels
        elif name in IMAGE_FOLDERS:
            src = data.open_source('imagefolder', IMAGE_FOLDERS[name](beton_dir), 'train')
            self.paths, self.labels = src.paths, src.labels
        else:
            raise SystemExit(f'bench: no torchvision baseline for {name}')
        self.views = 2

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        if self.name.startswith('cifar_npz'):  # decode the same JPEG bytes the beton was written from
            img = Image.open(io.BytesIO(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes()))
        else:
            img = Image.open(self.paths[i])
        img = img.convert('RGB')
        T = len(self.transforms)
        return torch.stack([self.transforms[v % T](img) for v in range(self.views)]), int(self.labels[i])


def tv_transforms(recipe, res, mean, std, scale=(0.08, 1.0)):
    """torchvision.transforms.v2 pipelines of the view types of data.recipe_specs(recipe)."""
    from torchvision.transforms import v2
    out = []
    for sp in data.recipe_specs(recipe):
        t = [v2.RandomResizedCrop(res, scale=scale, antialias=True), v2.RandomHorizontalFlip()]
        if sp.jitter_prob:
            t.append(v2.RandomApply([v2.ColorJitter(*sp.jitter)], p=sp.jitter_prob))
        if sp.gray_prob:
            t.append(v2.RandomGrayscale(p=sp.gray_prob))
        if sp.blur_prob:  # BYOL / torchvision habit: kernel 23 px at 224 px (10 % of the side)
            k = max(3, (res // 10) | 1)
            t.append(v2.RandomApply([v2.GaussianBlur(k, sigma=sp.blur_sigma)], p=sp.blur_prob))
        if sp.solarize_prob:
            t.append(v2.RandomSolarize(threshold=128, p=sp.solarize_prob))
        t += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        out.append(v2.Compose(t))
    return out


def time_torchvision(name, path, recipe, res, views, args):
    mean, std = data.norm_stats(data.beton_info(path), 3)
    ds = TVViews(name, args.beton_dir, tv_transforms(recipe, res, mean.tolist(), std.tolist()))
    ds.views = views
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                     num_workers=args.workers, persistent_workers=True)

    def batches():
        while True:
            yield from dl

    # CPU time = this process + its DataLoader worker processes (alive after the warm-up)
    return _timed(batches(), args, lambda: None, lambda: [c.pid for c in mp.active_children()])


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
            for views in args.views:
                runs = []
                for loader in args.loaders:
                    if loader == 'torchvision':
                        runs.append(('torchvision', '-', '-', lambda: time_torchvision(
                            name, path, recipe, res, views, args)))
                        continue
                    for decode in args.decode:
                        for colour in args.colour:
                            runs.append(('ffcv', decode, colour, lambda d=decode, c=colour: time_ffcv(
                                path, recipe, res, views, args, d == 'once', c)))
                for loader, decode, colour, fn in runs:
                    first, ips, cpu_ms = fn()
                    row = dict(dataset=name, recipe=recipe, loader=loader, decode=decode, colour=colour,
                               res=res, views=views, batch_size=args.batch_size, workers=args.workers,
                               device=args.device, ffcv_only=args.ffcv_only, interpolation=args.interpolation,
                               torch_threads=torch.get_num_threads(), first_batch_s=round(first, 1),
                               images_per_s=round(ips, 1), views_per_s=round(ips * views, 1),
                               cpu_ms_per_image=round(cpu_ms, 3), load_avg=round(os.getloadavg()[0], 1))
                    rows.append(row)
                    print(f"{name:11s} {recipe:8s} {loader:11s} {decode:8s} {colour:7s} res {res:3d} V {views}  "
                          f"first {first:5.1f} s  {ips:8.1f} img/s  {ips * views:8.1f} views/s  "
                          f"{cpu_ms:7.3f} CPU ms/img  (load {os.getloadavg()[0]:.1f})", flush=True)
    ratio_table(rows)
    os.makedirs(args.out, exist_ok=True)
    out = Path(args.out) / f"loader_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(dict(argv=sys.argv, cpus=os.cpu_count(), rows=rows), indent=1))
    print(f'wrote {out}')


def ratio_table(rows):
    """Speed-up of each ffcv row over the torchvision row of the same (dataset, recipe, V), and
    the cost of V views relative to V = 2 per image (wall time per image)."""
    key = lambda r: (r['dataset'], r['recipe'], r['views'])
    base = {key(r): r for r in rows if r['loader'] == 'torchvision'}
    two = {(r['dataset'], r['recipe'], r['loader'], r['decode'], r['colour']): r for r in rows if r['views'] == 2}
    for r in rows:
        b = base.get(key(r))
        r['speedup_vs_torchvision'] = round(r['views_per_s'] / b['views_per_s'], 2) if b and r is not b else None
        t = two.get((r['dataset'], r['recipe'], r['loader'], r['decode'], r['colour']))
        r['time_per_image_vs_v2'] = round(t['images_per_s'] / r['images_per_s'], 2) if t else None
    print('\n| data | recipe | loader (colour ops) | V | views/s | CPU-ms/image | x torchvision (views/s) '
          '| x torchvision (CPU) | time/image vs V=2 | load |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        b = base.get(key(r))
        cpu_x = f"{b['cpu_ms_per_image'] / r['cpu_ms_per_image']:.1f}" if b and r is not b else '–'
        sp = f"{r['speedup_vs_torchvision']:.1f}" if r['speedup_vs_torchvision'] else '–'
        tv = f"{r['time_per_image_vs_v2']:.2f}" if r['time_per_image_vs_v2'] else '–'
        name = r['loader'] + (f" ({r['colour']})" if r['loader'] == 'ffcv' else '')
        print(f"| {r['dataset']} | {r['recipe']} | {name} | {r['views']} | {r['views_per_s']:.0f} | "
              f"{r['cpu_ms_per_image']:.3f} | {sp} | {cpu_x} | {tv} | {r['load_avg']} |")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
