"""NMCE toy (SPEC §3): two interleaved spirals clustered with MCR^2, one subspace per cluster.

    python toys/nmce_spirals.py                          # ~3 min on 2 CPU cores
    python toys/nmce_spirals.py --steps 3000 --output_dir runs/toys/nmce_spirals

Data: two 2-D spirals (a swiss-roll section and its mirror image, as NMCE-release's
NMCE_toy/demo_components.py). Views: x + sigma * N(0, I), sigma = 0.2. Network: an ELU MLP
with two heads, a subspace head (-> R^3, normalised) and a cluster head (-> 2 logits).
Objective: losses.mcr2 (eps 0.01) on the view-averaged features and view-averaged Gumbel-softmax
memberships, minus 4000 x the cosine agreement of the two views (losses.mcr2's z_weight).
Each spiral should become one cluster whose features lie in a low-dimensional subspace,
the subspaces of the two clusters far apart (near-orthogonal). The arms separate slowly: the
default 6000 steps of 1024 points reach ~81% accuracy (inner turns still mixed); NMCE's notebook
trains 30000 steps of 4096 points (and a 6-D feature space) for a clean split.

Writes --output_dir/nmce_spirals.png (input plane coloured by cluster; the 3-D features with
each cluster's principal line and plane; per-cluster singular values) and results.json
(clustering accuracy vs the spiral identity, singular values, angle between the subspaces).
"""
import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import losses  # noqa: E402
import utils  # noqa: E402
from eval_cluster import hungarian_accuracy  # noqa: E402

# ---- data ---------------------------------------------------------------------------------------


def spiral_arm(t):
    """Points (t cos t, t sin t) of the first arm at parameters t (n,) -> (n, 2); the second arm is
    its point reflection -arm(t)."""
    return torch.stack([t * torch.cos(t), t * torch.sin(t)], -1)


def sample_t(n, turns, generator=None):
    """n spiral parameters uniform in [1.5 pi, 1.5 pi + 2 pi turns] (sklearn's swiss roll for turns=1.5)."""
    return T0 + 2 * math.pi * turns * torch.rand(n, generator=generator)


T0 = 1.5 * math.pi


def make_spirals(n, noise=0.1, generator=None, turns=1.5):
    """n points of two interleaved spirals (n/2 each): t uniform in [1.5 pi, 1.5 pi + 2 pi turns],
    (t cos t, t sin t) and its point reflection, plus N(0, noise^2) jitter. turns = 1.5 is
    sklearn's swiss roll (NMCE's toy; coordinates within about +-14; the arms are pi apart).
    -> (x (n, 2) float32, spiral id (n,) int64)."""
    half = n // 2
    arm = spiral_arm(sample_t(half, turns, generator))
    x = torch.cat([arm, -arm]) + noise * torch.randn(2 * half, 2, generator=generator)
    return x.float(), torch.cat([torch.zeros(half), torch.ones(half)]).long()


def make_views(n, aug='neighbour', sigma=0.2, step=1.0, noise=0.1, generator=None, turns=1.5):
    """Two views of n spiral points (n/2 per arm) -> (views (n, 2, 2) float32, spiral id (n,)).

    aug 'noise' (NMCE's toy): both views are the point plus N(0, sigma^2) noise, so the invariance
    term only ties together points closer than ~sigma. aug 'neighbour': the second view is another
    point of the same arm, up to `step` away along the curve (arc length s ~ U(-step, step), i.e.
    dt = s / sqrt(1 + t^2)), both views with the sigma noise: the augmentation itself says which
    points belong to one manifold (the arms are pi apart, so step < pi never links the two arms)."""
    half = n // 2
    t = sample_t(half, turns, generator)
    t2 = t
    if aug == 'neighbour':
        s = step * (2 * torch.rand(half, generator=generator) - 1)
        t2 = (t + s / torch.sqrt(1 + t * t)).clamp(T0, T0 + 2 * math.pi * turns)
    a, b = spiral_arm(t), spiral_arm(t2)
    views = torch.stack([torch.cat([a, -a]), torch.cat([b, -b])], 1)  # (n, V=2, 2)
    views = views + noise * torch.randn(2 * half, 2 if aug == 'neighbour' else 1, 2, generator=generator)  # jitter
    views = views + sigma * torch.randn(2 * half, 2, 2, generator=generator)
    return views.float(), torch.cat([torch.zeros(half), torch.ones(half)]).long()


# ---- model ---------------------------------------------------------------------------------------


class SubspaceClusterMLP(nn.Module):
    """ELU MLP backbone with a subspace head (unit-norm z) and a cluster head (logits), as the
    NMCE toy's MLP_net; optionally on random Fourier features of the input."""

    def __init__(self, hidden=256, depth=5, z_dim=3, n_clusters=2, fourier=0, fourier_scale=1.0, generator=None, gain=1.0):
        super().__init__()
        self.gain = gain
        d = 2
        if fourier:
            self.register_buffer('proj', fourier_scale * torch.randn(2, fourier, generator=generator))
            d = 2 * fourier
        else:
            self.proj = None
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ELU()]
            d = hidden
        self.backbone = nn.Sequential(*layers)
        self.subspace = nn.Linear(hidden, z_dim)
        self.cluster = nn.Linear(hidden, n_clusters)

    def forward(self, x):
        if self.proj is not None:
            u = x @ self.proj
            x = self.gain * torch.cat([torch.sin(u), torch.cos(u)], -1)
        h = self.backbone(x)
        return F.normalize(self.subspace(h), dim=-1), self.cluster(h)


def gumbel_softmax(logits, tau, generator=None):
    """Soft cluster memberships softmax((log_softmax(logits) + Gumbel noise) / tau) (NMCE's
    Gumble_Softmax without straight-through)."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-10, 1 - 1e-10)
    return ((F.log_softmax(logits, -1) - torch.log(-torch.log(u))) / tau).softmax(-1)


# ---- analysis ------------------------------------------------------------------------------------


def cluster_subspaces(z, assign, k):
    """Per cluster: singular values (normalised to the largest) and right singular vectors of its
    features (uncentred: a subspace through the origin, as MCR^2 sees it). z (n, d), assign (n,)."""
    out = []
    for c in range(k):
        zc = z[assign == c].double()
        if len(zc) < 2:
            out.append(None)
            continue
        _, s, vh = torch.linalg.svd(zc, full_matrices=False)
        out.append({'sv': (s / s[0]).tolist(), 'basis': vh.numpy(), 'n': len(zc)})
    return out


def principal_angle_deg(a, b):
    """Angle in degrees between two lines spanned by the unit vectors a and b (0 = same line)."""
    return float(np.degrees(np.arccos(min(1.0, abs(float(a @ b))))))


@torch.no_grad()
def evaluate(net, x, y):
    net.eval()
    z, logits = net(x)
    net.train()
    pred = logits.argmax(1)
    acc, _ = hungarian_accuracy(y.numpy(), pred.numpy())
    return z, pred, 100.0 * acc


# ---- figure --------------------------------------------------------------------------------------


def plot(x, z, pred, subspaces, acc, path):
    cols = ['tab:blue', 'tab:orange', 'tab:green', 'tab:red']
    fig = plt.figure(figsize=(15, 4.6))
    ax = fig.add_subplot(1, 3, 1)
    for c in range(len(subspaces)):
        m = pred == c
        ax.scatter(x[m, 0], x[m, 1], s=2, color=cols[c % 4], label=f'cluster {c}')
    ax.set_aspect('equal')
    ax.set_title(f'input: predicted clusters (accuracy {acc:.1f}%)', fontsize=10)
    ax.legend(fontsize=8, markerscale=4)

    ax = fig.add_subplot(1, 3, 2, projection='3d')
    u, w = np.mgrid[0:2 * np.pi:24j, 0:np.pi:12j]
    ax.plot_wireframe(np.cos(u) * np.sin(w), np.sin(u) * np.sin(w), np.cos(w), color='0.88', lw=0.4)
    t = np.linspace(0, 2 * np.pi, 100)
    for c, sub in enumerate(subspaces):
        m = (pred == c).numpy()
        ax.scatter(z[m, 0], z[m, 1], z[m, 2], s=2, color=cols[c % 4], depthshade=False)
        if sub is None:
            continue
        b = sub['basis']
        line = np.outer([-1.25, 1.25], b[0])
        ax.plot(line[:, 0], line[:, 1], line[:, 2], color=cols[c % 4], lw=2.5)
        circle = np.outer(np.cos(t), b[0]) + np.outer(np.sin(t), b[1])  # great circle of span(u1, u2)
        ax.plot(circle[:, 0], circle[:, 1], circle[:, 2], '--', color=cols[c % 4], lw=1)
    ax.set_box_aspect((1, 1, 1), zoom=1.2)
    ax.set_axis_off()
    ax.set_title('features on the sphere; lines: top principal direction,\n'
                 'dashed: plane of the top two (per cluster)', fontsize=9)

    ax = fig.add_subplot(1, 3, 3)
    width = 0.8 / len(subspaces)
    for c, sub in enumerate(subspaces):
        if sub is not None:
            ax.bar(np.arange(len(sub['sv'])) + c * width, sub['sv'], width, color=cols[c % 4],
                   label=f"cluster {c} ({sub['n']} points)")
    ax.set_xticks(np.arange(z.shape[1]) + 0.4 - width / 2, [f'$\\sigma_{i + 1}$' for i in range(z.shape[1])])
    ax.set_ylabel('singular value / largest')
    ax.set_title('dimension of each cluster\'s subspace', fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- flags and main -------------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser('NMCE double-spiral toy', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--batch_size', type=int, default=1024, help='Points per step (both spirals). (default: %(default)s)')
    g.add_argument('--sigma', type=float, default=0.2, help='Std of the Gaussian view noise (NMCE: 0.2). (default: %(default)s)')
    g.add_argument('--data_noise', type=float, default=0.1, help='Jitter of the spiral points (NMCE: 0.1). (default: %(default)s)')
    g.add_argument('--turns', type=float, default=1.5, help='Turns of each spiral (NMCE: 1.5). (default: %(default)s)')
    g.add_argument('--aug', default='neighbour', choices=['neighbour', 'noise'], help='x')
    g.add_argument('--step', type=float, default=1.0, help='x')
    g.add_argument('--fourier', type=int, default=0, help='x')
    g.add_argument('--fourier_scale', type=float, default=1.0, help='x')
    g.add_argument('--gain', type=float, default=1.0, help='x')
    g = p.add_argument_group('ssl')
    g.add_argument('--eps', type=float, default=0.01, help='MCR^2 distortion eps (NMCE toy: 0.01). (default: %(default)s)')
    g.add_argument('--z_weight', type=float, default=4000.0,
                   help='Weight of the two-view cosine agreement (SPEC: 4000). (default: %(default)s)')
    g.add_argument('--tau', type=float, default=0.2,
                   help='Gumbel-softmax temperature (NMCE toy notebook: 0.2; at 1 the soft memberships stay '
                        'near uniform and all points collapse into one cluster). (default: %(default)s)')
    g.add_argument('--z_dim', type=int, default=3, help='Feature dimension (3 to draw it). (default: %(default)s)')
    g.add_argument('--hidden', type=int, default=128, help='MLP width (5 ELU layers; NMCE toy: 128). (default: %(default)s)')
    g = p.add_argument_group('optim')
    g.add_argument('--steps', type=int, default=6000,
                   help='Adam steps. The arms separate slowly: ~67%% accuracy after 1000 steps, ~80%% after 6000 '
                        '(NMCE\'s notebook trains 30000 steps of 4096 points). (default: %(default)s)')
    g.add_argument('--lr', type=float, default=1e-3, help='Adam learning rate, constant (NMCE toy). (default: %(default)s)')
    g = p.add_argument_group('log')
    g.add_argument('--eval_every', type=int, default=200, help='Steps between evaluations. (default: %(default)s)')
    g.add_argument('--num_eval', type=int, default=4096, help='Points of the evaluation set. (default: %(default)s)')
    g.add_argument('--output_dir', default=os.path.join(ROOT, 'runs', 'toys', 'nmce_spirals'),
                   help='(default: %(default)s)')
    g.add_argument('--seed', type=int, default=0, help='(default: %(default)s)')
    return p


def main(args):
    if args.z_dim < 2 or args.steps < 1 or args.batch_size < 4:
        utils.fail('--z_dim >= 2, --steps >= 1 and --batch_size >= 4 are needed')
    utils.fix_random_seeds(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    x_eval, y_eval = make_spirals(args.num_eval, args.data_noise, torch.Generator().manual_seed(args.seed + 1),
                                  args.turns)
    net = SubspaceClusterMLP(args.hidden, z_dim=args.z_dim, fourier=args.fourier, fourier_scale=args.fourier_scale, generator=torch.Generator().manual_seed(args.seed + 2), gain=args.gain)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-5)
    history = []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            _, _, acc = evaluate(net, x_eval, y_eval)
            history.append({'step': step, 'acc': acc, **({'loss': loss.item(), 'z_sim': z_sim} if step else {})})
            print(f"| step {step:5d}  accuracy {acc:6.2f}%" + (f"  loss {loss.item():9.3f}  view cosine {z_sim:.4f}"
                                                                if step else ''))
        if step == args.steps:
            break
        views, _ = make_views(args.batch_size, args.aug, args.sigma, args.step, args.data_noise, gen, args.turns)
        z, logits = net(views)
        pi = gumbel_softmax(logits, args.tau, gen)
        loss = losses.mcr2(z, pi, eps=args.eps, z_weight=args.z_weight)
        z_sim = (z[:, 0] * z[:, 1]).sum(-1).mean().item()
        if not torch.isfinite(loss):
            utils.fail(f"non-finite MCR^2 loss at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    z, pred, acc = evaluate(net, x_eval, y_eval)
    subs = cluster_subspaces(z, pred, 2)
    angle = principal_angle_deg(subs[0]['basis'][0], subs[1]['basis'][0]) if None not in subs else float('nan')
    plot(x_eval.numpy(), z.numpy(), pred, subs, acc, os.path.join(args.output_dir, 'nmce_spirals.png'))
    result = {'accuracy': acc, 'angle_between_top_directions_deg': angle,
              'singular_values': [s['sv'] if s else None for s in subs], 'history': history, 'args': vars(args)}
    with open(os.path.join(args.output_dir, 'results.json'), 'w') as f:
        json.dump(result, f, indent=1)
    print(f"| clustering accuracy {acc:.2f}%; normalised singular values per cluster "
          f"{[[round(v, 3) for v in s['sv']] if s else None for s in subs]}; angle between the clusters' top "
          f"directions {angle:.1f} deg -> {args.output_dir}")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
