"""NMCE toy (SPEC §3): two interleaved spirals clustered with MCR^2, one subspace per cluster.

    python toys/nmce_spirals.py                          # about 2 minutes on 2 CPU cores
    python toys/nmce_spirals.py --seed 3 --output_dir runs/toys/nmce_spirals_s3
    python toys/nmce_spirals.py --aug noise --fourier 0 --tcr_steps 0 --z_weight 4000 --steps 6000
                                                         # NMCE's own toy settings (stalls, see below)

Data: two 2-D spirals (a swiss-roll section and its point reflection, as NMCE-release's
NMCE_toy/demo_components.py), 1.5 turns each, pi apart. A network with two heads, a subspace head
(-> unit-norm z in R^3) and a cluster head (-> 2 logits), is trained in NMCE's two stages:
  1. --tcr_steps steps of TCR (losses.tcr: total coding rate of z plus view invariance; the
     cluster head is not trained yet),
  2. MCR^2 (losses.mcr2 on z and the view-averaged Gumbel-softmax memberships of the head).
Each spiral should become one cluster whose features lie in its own low-dimensional subspace,
the two subspaces orthogonal: in 3-D one spiral on a great circle, the other on the line
orthogonal to its plane.

Why the defaults differ from NMCE's toy notebook (Gaussian-noise views, a plain ELU MLP on the
raw coordinates, MCR^2 from step 0, 4000 x invariance, 30000 steps of 4096 points in 6-D), which
on a CPU budget stalls with the inner turns of one spiral in the other cluster:
  * Views are neighbouring points of one spiral (--aug neighbour): the augmentation itself says
    which points form one manifold. Gaussian noise (sigma << pi) only says "nearby points agree",
    which a radial cut through both spirals satisfies almost as well as the true split, and the
    cut drifts out along the arms very slowly.
  * Random Fourier features of the input (--fourier): a plain MLP on (x, y) learns the
    pi-periodic radial pattern of interleaved spirals slowly (spectral bias; the classic
    two-spirals problem).
  * A TCR stage first (--tcr_steps): with a random cluster head MCR^2 is ~0 for any features
    (both clusters look alike), so its gradient cannot stop the invariance term from collapsing
    every feature onto one point, where it stays. TCR spreads the features first.
  * --z_weight 50 instead of 4000: the neighbour views tie points --step apart along the
    spiral, a much stronger constraint than noise, so a smaller weight keeps it comparable to
    the coding-rate terms (a few nats).

Writes --output_dir/nmce_spirals.png (input plane coloured by cluster; the features on the
sphere with each cluster's principal line and plane; per-cluster singular values) and
results.json (clustering accuracy of the head vs the spiral identity, singular values, principal
angles between the cluster subspaces, the evaluation history).
"""
import argparse
import json
import math
import os
import sys
import time

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
from eval_geometry import COLOURS, grouped_bars, save_figure, unit_sphere  # noqa: E402

# ---- data ---------------------------------------------------------------------------------------

T0 = 1.5 * math.pi  # first parameter of sklearn's swiss roll


def spiral_arm(t):
    """Points (t cos t, t sin t) of the first spiral at parameters t (n,) -> (n, 2); the second
    spiral is the point reflection -spiral_arm(t), pi further out along every ray."""
    return torch.stack([t * torch.cos(t), t * torch.sin(t)], -1)


def sample_t(n, turns, generator=None):
    """n parameters uniform in [1.5 pi, 1.5 pi + 2 pi turns] (turns = 1.5: sklearn's swiss roll)."""
    return T0 + 2 * math.pi * turns * torch.rand(n, generator=generator)


def make_spirals(n, noise=0.1, generator=None, turns=1.5):
    """n points of two interleaved spirals (n/2 each) plus N(0, noise^2) jitter; coordinates within
    about +-14 for turns = 1.5 (NMCE's toy). -> (x (n, 2) float32, spiral id (n,) int64)."""
    half = n // 2
    arm = spiral_arm(sample_t(half, turns, generator))
    x = torch.cat([arm, -arm]) + noise * torch.randn(2 * half, 2, generator=generator)
    return x.float(), torch.cat([torch.zeros(half), torch.ones(half)]).long()


def make_views(n, aug='neighbour', sigma=0.2, step=5.0, noise=0.1, generator=None, turns=1.5):
    """Two views of n spiral points (n/2 per spiral) -> (views (n, 2, 2) float32, spiral id (n,)).

    aug 'noise' (NMCE's toy): both views are the jittered point plus N(0, sigma^2) noise.
    aug 'neighbour': the second view is another point of the same spiral, an arc length
    s ~ U(-step, step) away (dt = s / sqrt(1 + t^2), kept on the spiral), each view with its own
    jitter and sigma noise. The pairs never join the two spirals, whatever the step."""
    half = n // 2
    t = sample_t(half, turns, generator)
    t2 = t
    if aug == 'neighbour':
        s = step * (2 * torch.rand(half, generator=generator) - 1)
        t2 = (t + s / torch.sqrt(1 + t * t)).clamp(T0, T0 + 2 * math.pi * turns)
    a, b = spiral_arm(t), spiral_arm(t2)
    views = torch.stack([torch.cat([a, -a]), torch.cat([b, -b])], 1)  # (n, V=2, 2)
    jitter = noise * torch.randn(2 * half, 2 if aug == 'neighbour' else 1, 2, generator=generator)
    views = views + jitter + sigma * torch.randn(2 * half, 2, 2, generator=generator)
    return views.float(), torch.cat([torch.zeros(half), torch.ones(half)]).long()


# ---- model ---------------------------------------------------------------------------------------


class SubspaceClusterMLP(nn.Module):
    """ELU MLP backbone with a subspace head (unit-norm z) and a cluster head (logits), as the NMCE
    toy's MLP_net; with fourier > 0 the MLP reads gain * [sin(xB), cos(xB)], B (2, fourier) fixed
    N(0, fourier_scale^2) frequencies (random Fourier features)."""

    def __init__(self, hidden=128, depth=5, z_dim=3, n_clusters=2, fourier=0, fourier_scale=0.5,
                 fourier_gain=8.0, generator=None):
        super().__init__()
        d = 2
        self.fourier_gain = fourier_gain
        if fourier:
            self.register_buffer('freqs', fourier_scale * torch.randn(2, fourier, generator=generator))
            d = 2 * fourier
        else:
            self.freqs = None
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ELU()]
            d = hidden
        self.backbone = nn.Sequential(*layers)
        self.subspace = nn.Linear(hidden, z_dim)
        self.cluster = nn.Linear(hidden, n_clusters)

    def forward(self, x):
        if self.freqs is not None:
            u = x @ self.freqs
            # O(1) inputs give nearly identical features at init (the head's bias dominates) and
            # the invariance term collapses them; the gain restores the spread raw +-14 inputs have
            x = self.fourier_gain * torch.cat([torch.sin(u), torch.cos(u)], -1)
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


def subspace_dim(sv, tol=0.1):
    """Number of normalised singular values above tol (the cluster's effective dimension)."""
    return int(sum(v > tol for v in sv))


def principal_angles_deg(a, b):
    """Principal angles in degrees between span(rows of a) and span(rows of b) (orthonormal rows);
    all 90 = orthogonal subspaces."""
    cos = np.linalg.svd(np.asarray(a) @ np.asarray(b).T, compute_uv=False)
    return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0))).tolist()


@torch.no_grad()
def evaluate(net, x, y):
    net.eval()
    z, logits = net(x)
    net.train()
    pred = logits.argmax(1)
    acc, _ = hungarian_accuracy(y.numpy(), pred.numpy())
    return z, pred, 100.0 * acc


# ---- figure --------------------------------------------------------------------------------------


def plot(x, z, pred, subspaces, acc, angles, path):
    """Input plane by predicted cluster | features on the sphere with each cluster's top principal
    direction and top-two plane | per-cluster singular values. Features of more than 3 dimensions
    are drawn in the top three principal directions of all features."""
    k = len(subspaces)
    view = np.eye(z.shape[1])[:3] if z.shape[1] == 3 else np.linalg.svd(z, full_matrices=False)[2][:3]
    fig = plt.figure(figsize=(15, 4.6))
    ax = fig.add_subplot(1, 3, 1)
    for c in range(k):
        m = pred == c
        ax.scatter(x[m, 0], x[m, 1], s=2, color=COLOURS[c % 10], label=f'cluster {c}')
    ax.set_aspect('equal')
    ax.set_title(f'input: predicted clusters (accuracy {acc:.1f}%)', fontsize=10)
    ax.legend(fontsize=8, markerscale=4)

    ax = fig.add_subplot(1, 3, 2, projection='3d')
    unit_sphere(ax, colour='0.88', zoom=1.2)
    t = np.linspace(0, 2 * np.pi, 100)
    for c, sub in enumerate(subspaces):
        p = z[pred == c] @ view.T
        ax.scatter(p[:, 0], p[:, 1], p[:, 2], s=6, color=COLOURS[c % 10], depthshade=False)
        if sub is None:
            continue
        b = sub['basis'][:2] @ view.T
        line = np.outer([-1.25, 1.25], b[0])
        ax.plot(line[:, 0], line[:, 1], line[:, 2], color=COLOURS[c % 10], lw=1.5)
        if len(b) > 1:
            circle = np.outer(np.cos(t), b[0]) + np.outer(np.sin(t), b[1])  # great circle of span(u1, u2)
            ax.plot(circle[:, 0], circle[:, 1], circle[:, 2], '--', color=COLOURS[c % 10], lw=1)
    angle = f"principal angles {', '.join(f'{a:.0f}' for a in angles)} deg" if angles else ''
    ax.set_title('features on the sphere; lines: top principal direction,\n'
                 f'dashed: plane of the top two (per cluster); {angle}', fontsize=9)

    ax = fig.add_subplot(1, 3, 3)
    subs = [(c, s) for c, s in enumerate(subspaces) if s is not None]
    grouped_bars(ax, [s['sv'] for _, s in subs], [f'$\\sigma_{i + 1}$' for i in range(z.shape[1])],
                 [f"cluster {c} ({s['n']} points, dim {subspace_dim(s['sv'])})" for c, s in subs],
                 [COLOURS[c % 10] for c, _ in subs])
    ax.set_ylabel('singular value / largest')
    ax.set_title('dimension of each cluster\'s subspace', fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


# ---- flags and main -------------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser('NMCE double-spiral toy', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--batch_size', type=int, default=1024, help='Points per step (both spirals). (default: %(default)s)')
    g.add_argument('--turns', type=float, default=1.5, help='Turns of each spiral (NMCE: 1.5). (default: %(default)s)')
    g.add_argument('--data_noise', type=float, default=0.1, help='Jitter of the spiral points (NMCE: 0.1). (default: %(default)s)')
    g.add_argument('--aug', default='neighbour', choices=['neighbour', 'noise'],
                   help='Views: neighbour = two points of one spiral up to --step apart along it (the '
                        'augmentation names the manifold); noise = the point plus Gaussian noise twice '
                        '(NMCE\'s toy; with it the split stalls with inner turns mixed). (default: %(default)s)')
    g.add_argument('--step', type=float, default=5.0,
                   help='Largest arc length between neighbour views (the spirals are pi apart radially '
                        'and ~90 long). Larger steps tie longer stretches together: 15 maps each spiral '
                        'to about one point; 5 leaves one spiral a great-circle arc. (default: %(default)s)')
    g.add_argument('--sigma', type=float, default=0.2, help='Std of the Gaussian noise added to every view (NMCE: 0.2). (default: %(default)s)')
    g = p.add_argument_group('model')
    g.add_argument('--hidden', type=int, default=128, help='MLP width (5 ELU layers; NMCE toy: 128). (default: %(default)s)')
    g.add_argument('--z_dim', type=int, default=3,
                   help='Feature dimension. 3 draws it directly (one cluster a plane, the other the line '
                        'orthogonal to it); NMCE\'s notebook uses 6. (default: %(default)s)')
    g.add_argument('--fourier', type=int, default=64,
                   help='Random Fourier features of the input fed to the MLP; 0 = raw (x, y) as NMCE. '
                        '(default: %(default)s)')
    g.add_argument('--fourier_scale', type=float, default=0.5,
                   help='Std of the Fourier frequencies (rad per unit). The spirals repeat every 2 pi '
                        'along a ray; 0.5 rad per unit resolves that without making the features rough. '
                        '(default: %(default)s)')
    g.add_argument('--fourier_gain', type=float, default=8.0,
                   help='Amplitude of the Fourier features; ~1 leaves the features nearly constant at init '
                        '(the heads\' biases dominate), like raw inputs scaled to O(1). (default: %(default)s)')
    g = p.add_argument_group('ssl')
    g.add_argument('--tcr_steps', type=int, default=500,
                   help='Steps of NMCE stage 1 (TCR + invariance, head untrained) before MCR^2; 0 = MCR^2 '
                        'from the start (NMCE\'s toy; collapses with neighbour views). (default: %(default)s)')
    g.add_argument('--eps', type=float, default=0.01, help='Coding-rate distortion eps of TCR and MCR^2 (NMCE toy: 0.01). (default: %(default)s)')
    g.add_argument('--z_weight', type=float, default=50.0,
                   help='Weight of the two-view cosine agreement. NMCE uses 4000 with noise views; neighbour '
                        'views are a stronger constraint, and 4000 with them collapses every feature onto '
                        'one point. (default: %(default)s)')
    g.add_argument('--tau', type=float, default=0.2,
                   help='Gumbel-softmax temperature (NMCE toy notebook: 0.2; at 1 the soft memberships stay '
                        'near uniform and all points collapse into one cluster). (default: %(default)s)')
    g = p.add_argument_group('optim')
    g.add_argument('--steps', type=int, default=3000,
                   help='Adam steps in all, the TCR stage included. Seeds 0-5 at 3000 steps: 100%% for 5 '
                        'seeds (the clusters a line and the plane orthogonal to it), 97.4%% for seed 1; at '
                        '1500 steps one seed in three still had inner turns mixed (84%%). (default: %(default)s)')
    g.add_argument('--lr', type=float, default=1e-3, help='Adam learning rate, constant (NMCE toy). (default: %(default)s)')
    g = p.add_argument_group('log')
    g.add_argument('--eval_every', type=int, default=250, help='Steps between evaluations. (default: %(default)s)')
    g.add_argument('--num_eval', type=int, default=4096, help='Points of the evaluation set. (default: %(default)s)')
    g.add_argument('--output_dir', default=os.path.join(ROOT, 'runs', 'toys', 'nmce_spirals'),
                   help='(default: %(default)s)')
    g.add_argument('--seed', type=int, default=0, help='(default: %(default)s)')
    return p


def main(args):
    if args.z_dim < 2 or args.steps < 1 or args.batch_size < 4 or args.step < 0:
        utils.fail('--z_dim >= 2, --steps >= 1, --batch_size >= 4 and --step >= 0 are needed')
    if not 0 <= args.tcr_steps < args.steps:
        utils.fail(f'--tcr_steps ({args.tcr_steps}) must be in [0, --steps) ({args.steps}): the cluster head '
                   'trains only in the MCR^2 stage after it')
    utils.fix_random_seeds(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()
    gen = torch.Generator().manual_seed(args.seed)
    x_eval, y_eval = make_spirals(args.num_eval, args.data_noise, torch.Generator().manual_seed(args.seed + 1),
                                  args.turns)
    net = SubspaceClusterMLP(args.hidden, z_dim=args.z_dim, fourier=args.fourier, fourier_scale=args.fourier_scale,
                             fourier_gain=args.fourier_gain, generator=torch.Generator().manual_seed(args.seed + 2))
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-5)
    print(f"| stage 1: TCR for {args.tcr_steps} steps; stage 2: MCR^2 for {args.steps - args.tcr_steps} steps "
          f"({args.aug} views, batch {args.batch_size})")
    history = []
    for step in range(args.steps + 1):
        stage = 'tcr' if step < args.tcr_steps else 'mcr2'
        if step % args.eval_every == 0 or step == args.steps:
            _, _, acc = evaluate(net, x_eval, y_eval)
            rec = {'step': step, 'stage': stage, 'acc': acc}
            if step:
                rec.update(loss=loss.item(), z_sim=z_sim)
            history.append(rec)
            print(f"| step {step:5d} [{stage:4s}] head accuracy {acc:6.2f}%"
                  + (f"  loss {rec['loss']:9.3f}  view cosine {z_sim:.4f}" if step else '')
                  + ('  (head untrained until MCR^2)' if stage == 'tcr' else ''))
        if step == args.steps:
            break
        views, _ = make_views(args.batch_size, args.aug, args.sigma, args.step, args.data_noise, gen, args.turns)
        z, logits = net(views)
        if stage == 'tcr':
            loss = losses.tcr(z, eps=args.eps, z_weight=args.z_weight)
        else:
            loss = losses.mcr2(z, gumbel_softmax(logits, args.tau, gen), eps=args.eps, z_weight=args.z_weight)
        z_sim = (z[:, 0] * z[:, 1]).sum(-1).mean().item()
        if not torch.isfinite(loss):
            utils.fail(f"non-finite {stage} loss at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    z, pred, acc = evaluate(net, x_eval, y_eval)
    subs = cluster_subspaces(z, pred, 2)
    angles = []
    if None not in subs:
        dims = [max(1, subspace_dim(s['sv'])) for s in subs]
        angles = principal_angles_deg(subs[0]['basis'][:dims[0]], subs[1]['basis'][:dims[1]])
    wall = time.time() - t0
    plot(x_eval.numpy(), z.numpy(), pred, subs, acc, angles, os.path.join(args.output_dir, 'nmce_spirals.png'))
    result = {'accuracy': acc, 'principal_angles_deg': angles,
              'singular_values': [s['sv'] if s else None for s in subs],
              'subspace_dims': [subspace_dim(s['sv']) if s else 0 for s in subs], 'train_time_s': wall,
              'history': history, 'args': vars(args)}
    with open(os.path.join(args.output_dir, 'results.json'), 'w') as f:
        json.dump(result, f, indent=1)
    print(f"| head clustering accuracy {acc:.2f}%; cluster subspace dims {result['subspace_dims']}; normalised "
          f"singular values {[[round(v, 3) for v in s['sv']] if s else None for s in subs]}; principal angles "
          f"{[round(a, 1) for a in angles]} deg; {wall:.0f} s -> {args.output_dir}")
    return result


if __name__ == '__main__':
    main(get_args_parser().parse_args())
