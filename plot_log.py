"""Training dynamics: plot the per-epoch log.txt of one or more train_ssl runs.

    python plot_log.py runs/demo/clamp                                  # -> runs/demo/clamp/log.png
    python plot_log.py runs/clamp runs/mmcr --names CLAMP MMCR --output figures/dynamics.png

Panels (only those some run logged): loss, online-probe accuracy, kNN accuracy (top-1 solid,
top-5 dashed), learning rate, and the packing diagnostics of the held-out batch
(test_diag_*: nearest-centre accuracy, radius, contact number, fraction with a contact, centre
distance / std, singular-value ratio, energy per particle, overlapping-pair fraction,
participation ratio). log.txt holds one JSON object per epoch (utils.log_stats).
"""
import argparse
import json
import math
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import utils  # noqa: E402

# (log key, panel title); kNN top-5 is drawn dashed in the top-1 panel
PANELS = [
    ('train_loss', 'training loss'),
    ('train_probe_acc', 'online linear probe acc. (%, train views)'),
    ('test_knn_top1', 'kNN accuracy (%, test; -- top-5)'),
    ('train_lr', 'learning rate'),
    ('test_diag_nc_acc', 'nearest-centre accuracy'),
    ('test_diag_radius', 'mean radius r / r_s'),
    ('test_diag_contacts', 'contact number (self excluded)'),
    ('test_diag_frac_contact', 'fraction with >= 1 contact'),
    ('test_diag_center_dist', 'mean centre distance'),
    ('test_diag_center_std', 'std of centres'),
    ('test_diag_sv_ratio', 'centre singular values std/mean'),
    ('test_diag_energy_pp', 'energy per particle'),
    ('test_diag_overlap_frac', 'overlapping-pair fraction'),
    ('test_diag_pr', 'participation ratio (views)'),
]


def read_log(run):
    """The JSON lines of RUN/log.txt (or a log file itself) -> list of dicts, with a clear error for
    a missing or malformed file. Only per-epoch records (with an 'epoch' key) are kept."""
    path = os.path.join(run, 'log.txt') if os.path.isdir(run) else run
    if not os.path.isfile(path):
        utils.fail(f"{path} does not exist (pass a train_ssl run folder or its log.txt)")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                utils.fail(f"{path} line {i} is not JSON: {line[:80]!r}")
    rows = [r for r in rows if 'epoch' in r]
    if not rows:
        utils.fail(f"{path} has no per-epoch records (no 'epoch' key)")
    return rows


def series(rows, key):
    """(epochs, values) of the records that logged `key` (kNN and diagnostics skip some epochs)."""
    pts = [(r['epoch'], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(logs, names, path, title=None):
    """One panel per key of PANELS that at least one run logged; runs overlaid, one colour each."""
    keys = [(k, t) for k, t in PANELS if any(series(rows, k)[0] for rows in logs)]
    if not keys:
        utils.fail('none of the logs has a key this script plots (train_loss, test_knn_top1, test_diag_*)')
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for ax, (key, label) in zip(axes.flat, keys):
        for i, (rows, name) in enumerate(zip(logs, names)):
            x, y = series(rows, key)
            if not x:
                continue
            ax.plot(x, y, 'o-', ms=3, color=colours[i % 10], label=name)
            if key == 'test_knn_top1':
                x5, y5 = series(rows, 'test_knn_top5')
                ax.plot(x5, y5, '--', color=colours[i % 10], alpha=0.6)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel('epoch', fontsize=8)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        lo, hi = ax.get_xlim()
        if hi - lo < 1:  # a single epoch: a readable integer axis around it
            mid = round((lo + hi) / 2)
            ax.set_xlim(mid - 0.5, mid + 0.5)
            ax.set_xticks([mid])
        if key == 'train_lr':
            ax.ticklabel_format(axis='y', style='sci', scilimits=(-2, 2))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis('off')
    if len(logs) > 1 or title:
        axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [k for k, _ in keys]


def get_args_parser():
    p = argparse.ArgumentParser('manifold-ssl training-dynamics plot', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('log')
    g.add_argument('runs', nargs='+', help='train_ssl run folders (or their log.txt files), overlaid.')
    g.add_argument('--names', nargs='+', default=None, help='Legend names, one per run (default: folder names).')
    g.add_argument('--output', default=None,
                   help='PNG to write (default: FIRST_RUN/log.png).')
    g.add_argument('--title', default=None, help='Figure title.')
    return p


def main(args):
    names = args.names or [os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(r)))
                           for r in args.runs]
    if len(names) != len(args.runs):
        utils.fail(f"--names gives {len(names)} names for {len(args.runs)} runs")
    logs = [read_log(r) for r in args.runs]
    first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0])
    out = args.output or os.path.join(first, 'log.png')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    keys = plot_runs(logs, names, out, args.title)
    print(f"| {len(keys)} panels ({', '.join(keys)}) from {sum(map(len, logs))} epoch records -> {out}")
    return out


if __name__ == '__main__':
    main(get_args_parser().parse_args())
