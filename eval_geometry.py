"""Geometry of learned representations: collapse, effective dimension and manifold packing.

    python eval_geometry.py --weights runs/demo/clamp                  # + its random init, by default
    python eval_geometry.py --weights runs/clamp runs/mmcr runs/cplearn --names CLAMP MMCR CPLearn

For each checkpoint, on the test set (--spectrum_images, default all; --num_images for packing):
  * un-augmented images -> backbone and projector features:
      - CPLearn's dimensional-collapse spectrum: log eigenvalues of E^T E / n (E globally min-max
        scaled, not centred; emsansone/CPLearn main_collapses.py) against their rank;
      - CPLearn's intra-cluster collapse curve: entropy of diagonal-covariance Gaussian mixtures
        with K components (Monte-Carlo, --gmm_repeats estimates of --gmm_samples samples) vs K;
      - participation ratio (sum l)^2 / sum l^2 of the covariance eigenvalues and effective rank
        exp(H(s / sum s)) of the singular values (Roy & Vetterli 2007) of the centred features;
  * V augmented views per image -> projector outputs (B, V, d) -> CLAMP packing statistics
    (SPEC §1): radii, centre distances, contact numbers WITHOUT self-contacts, rattler fraction,
    energy per particle, overlapping-pair fraction, nearest-centre accuracy, and their histograms.
All models go on the same figures. Writes OUTPUT_DIR/geometry.json, spectrum.png,
gmm_entropy.png and packing.png. One process (no torchrun).
"""
import argparse
import json
import math
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import losses  # noqa: E402
import utils  # noqa: E402
from eval_cluster import embed, load_networks  # noqa: E402

# ---- statistics of a point cloud: effective dimension and collapse ------------------------------


def _centred_eigs(x):
    """Eigenvalues (descending, float64, >= 0) of the covariance of x (n, d), via the smaller Gram."""
    x = torch.as_tensor(x, dtype=torch.float64)
    x = x - x.mean(0)
    gram = x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T
    return torch.linalg.eigvalsh(gram / max(1, len(x) - 1)).clamp_min(0).flip(0)


def participation_ratio(x):
    """(sum lambda)^2 / sum lambda^2 of the covariance of x (n, d): d for isotropic data, 1 for
    data on a line. A soft count of the dimensions the variance spreads over."""
    ev = _centred_eigs(x)
    return float(ev.sum() ** 2 / (ev ** 2).sum().clamp_min(1e-300))


def effective_rank(x):
    """exp of the entropy of the normalised singular values of the centred x (n, d) (Roy &
    Vetterli 2007): between 1 (rank 1) and min(n, d) (all singular values equal)."""
    s = _centred_eigs(x).sqrt()
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def minmax_scale(e):
    """Global (not per-dimension) min-max scaling to [0, 1], as CPLearn's preprocessing."""
    e = torch.as_tensor(e, dtype=torch.float64)
    span = (e.max() - e.min()).clamp_min(1e-12)
    return (e - e.min()) / span


def collapse_spectrum(e, scale=True):
    """CPLearn's dimensional-collapse spectrum: eigenvalues (= singular values, the matrix is PSD)
    of E^T E / n in descending order, E (n, d) globally min-max scaled when scale=True and NOT
    centred (as the official code). -> (d,) float64 numpy array. Rank-r data has r non-zero
    values (r + 1 after min-max scaling when min(E) != 0: the shift adds the constant direction)."""
    e = minmax_scale(e) if scale else torch.as_tensor(e, dtype=torch.float64)
    return torch.linalg.eigvalsh(e.T @ e / len(e)).clamp_min(0).flip(0).numpy()


def gmm_entropy(e, components=(10, 20, 50, 100, 200), repeats=10, samples=10000, seed=0, scale=True):
    """CPLearn's intra-cluster collapse curve: for each K, fit a diagonal-covariance Gaussian
    mixture (sklearn) to E (n, d) (min-max scaled) and estimate its differential entropy
    -E[log p(x)] by Monte Carlo, `repeats` times with `samples` draws each. A lower entropy at
    large K = tighter clusters. -> {K: (mean, std)}; K > n is skipped, a failed fit gives nan."""
    from sklearn.mixture import GaussianMixture
    x = (minmax_scale(e) if scale else torch.as_tensor(e, dtype=torch.float64)).numpy()
    out = {}
    for k in components:
        if k > len(x):
            print(f"| gmm: K={k} > {len(x)} samples, skipped")
            continue
        try:
            gmm = GaussianMixture(n_components=k, covariance_type='diag', random_state=seed).fit(x)
        except ValueError as err:  # e.g. a fully collapsed embedding
            print(f"| gmm: K={k} did not fit ({err}); recorded as nan")
            out[k] = (float('nan'), float('nan'))
            continue
        est = []
        for r in range(repeats):
            gmm.random_state = seed + 1 + r  # sample() draws from the estimator's random_state
            est.append(-gmm.score_samples(gmm.sample(samples)[0]).mean())
        out[k] = (float(np.mean(est)), float(np.std(est)))
    return out


# ---- CLAMP packing statistics -----------------------------------------------------------------


def packing_from_geometry(x, c, r, r_s=7.0, pot_pow=2.0, max_range=1.5, min_margin=1e-3):
    """Per-sub-manifold packing statistics from the geometry CLAMP's loss sees.

    x: (N, V, d) unit views; c: (N, d) centres; r: (N,) SCALED radii (the loss's r_i, = r_s x
    the RMS spread). Returns a dict of numpy arrays:
      radius (N)   r / r_s, the unscaled radius the training log reports;
      contacts (N) number of j != i with D_ij < 0.99 (r_i + r_j) (official criterion, self
                   excluded); rattlers are sub-manifolds with 0 contacts;
      nn_dist (N)  distance to the nearest other centre;
      energy (N)   1/2 sum_j (1 - D_ij / sigma_ij)^p over the loss's contacts (sums to E);
      pair_dist    D_ij for i < j (N (N - 1) / 2);
      overlap      number of pairs i < j in contact by the loss's criterion
                   (min_margin < D_ij < sigma_ij = min(r_i + r_j, max_range));
      own_nearest  (N, V) bool: is the view's nearest centre its own?"""
    n, v, _ = x.shape
    c64 = c.double()
    d = torch.cdist(c64, c64)
    off = ~torch.eye(n, dtype=torch.bool)
    sigma = (r[:, None] + r[None, :] + 1e-6).clamp_max(max_range).double()
    in_contact = (d < sigma) & (d > min_margin) & off
    pair_e = torch.where(in_contact, (1 - d / sigma).clamp_min(0) ** pot_pow, torch.zeros_like(d))
    near = (d < 0.99 * (r[:, None] + r[None, :]).double()) & off
    own = torch.stack([torch.cdist(x[:, k].double(), c64).argmin(1) == torch.arange(n) for k in range(v)], 1)
    iu = torch.triu_indices(n, n, 1)
    return {'radius': (r / r_s).double().numpy(), 'contacts': near.sum(1).numpy(),
            'nn_dist': d.masked_fill(~off, float('inf')).min(1).values.numpy(),
            'energy': (0.5 * pair_e.sum(1)).numpy(), 'pair_dist': d[iu[0], iu[1]].numpy(),
            'overlap': int(in_contact.sum().item() // 2), 'own_nearest': own.numpy()}


def packing_summary(p, c=None, x=None):
    """Scalars of a packing_from_geometry dict (the keys of losses.clamp_diagnostics where they
    coincide, plus medians, rattler fraction and nearest-neighbour distance). c (N, d) and x
    (N, V, d) add centre_std, sv_ratio and the participation ratio of the views."""
    n = len(p['radius'])
    s = {'nc_acc': float(p['own_nearest'].mean()), 'radius': float(p['radius'].mean()),
         'radius_median': float(np.median(p['radius'])), 'contacts': float(p['contacts'].mean()),
         'frac_contact': float((p['contacts'] > 0).mean()), 'rattler_frac': float((p['contacts'] == 0).mean()),
         'center_dist': float(p['pair_dist'].mean()), 'nn_center_dist': float(p['nn_dist'].mean()),
         'energy_pp': float(p['energy'].sum() / n), 'overlap_frac': 2.0 * p['overlap'] / (n * (n - 1))}
    if c is not None:
        sv = torch.linalg.svdvals(c.double())
        s['center_std'] = float(c.double().std(0).mean())
        s['sv_ratio'] = float(sv.std() / (sv.mean() + 1e-6))
    if x is not None:
        s['pr'] = participation_ratio(x.reshape(-1, x.shape[-1]))
    return s


def packing_stats(z, r_s=7.0, pot_pow=2.0, max_range=1.5, min_margin=1e-3):
    """z: (N, V, d) projector outputs of V views of N images -> (per-particle dict, summary).
    The geometry (global centring, L2 normalisation, centres, radii) is losses.clamp's own."""
    if z.ndim != 3 or z.shape[0] < 2 or z.shape[1] < 2:
        raise ValueError(f"packing_stats needs (N >= 2, V >= 2, d) views, got {tuple(z.shape)}")
    x, c, r = losses._clamp_geometry(z.double(), r_s)
    p = packing_from_geometry(x, c, r, r_s, pot_pow, max_range, min_margin)
    return p, packing_summary(p, c, x)


# ---- features of one checkpoint ---------------------------------------------------------------


def model_features(weights, init, args, device):
    """Clean features {'backbone': (n, F), 'projector': (n, d)} of --spectrum_images test images and
    the views' outputs (m, V, ·) of --num_images of them (both evenly spaced), plus the saved args."""
    backbone, projector, _, _, a = load_networks(weights, init, args.seed)
    nets = {'backbone': backbone.to(device).eval()}
    if projector is not None:
        nets['projector'] = projector.to(device).eval()
    amp = utils.autocast_ctx(args.dtype, device)
    path = args.val_path or a.val_path
    if not path:
        utils.fail(f"{weights} records no --val_path; pass --val_path (the test beton)")
    res, ch = utils.eval_input(args, a, [data.beton_info(path)])
    norm_from = utils.train_norm_source(getattr(a, 'data_path', None))  # normalise as in training
    # subsets evenly spaced over the test set (the first N of a class-sorted beton hold one or two
    # classes); the spectrum needs more images than feature dimensions, or it shows a false cliff
    n = data.beton_info(path)['num_samples']
    idx = data.limit_indices(n, args.num_images)
    loader = data.build_eval_loader(path, args.batch_size, res, channels=ch, workers=args.workers, device=device,
                                    norm_from=norm_from, indices=data.limit_indices(n, args.spectrum_images or None))
    clean, _ = embed(nets, ((x, y) for x, y, _ in loader), device, amp)
    v = args.num_views
    if args.recipe is None:  # every model gets the views of the first one's recipe
        args.recipe = getattr(a, 'recipe', None) or 'crop'
    views = data.build_ssl_loader(path, max(1, args.batch_size // v), v, res, recipe=args.recipe,
                                  channels=ch, workers=args.workers, seed=args.seed, device=device,
                                  drop_last=False, scale=(args.crop_min_scale, 1.0), order='sequential',
                                  norm_from=norm_from, indices=idx)
    flat, _ = embed(nets, ((x.flatten(0, 1), y.repeat_interleave(v)) for x, y in views), device, amp)
    viewed = {k: t.view(-1, v, t.shape[-1]) for k, t in flat.items()}
    return clean, viewed, a, path


def analyse(name, weights, init, args, device):
    """Every number of one model, as a JSON-ready dict, plus the per-particle arrays for the plots."""
    clean, viewed, a, path = model_features(weights, init, args, device)
    r_s = args.r_s or getattr(a, 'r_s', None) or 7.0
    out = {'name': name, 'weights': weights, 'init': init, 'loss': getattr(a, 'loss', None), 'val_path': path,
           'num_images': len(viewed['backbone']), 'num_spectrum_images': len(clean['backbone']),
           'num_views': args.num_views, 'recipe': args.recipe, 'r_s': r_s}
    for part, f in clean.items():
        if f.shape[1] > len(f):
            print(f"| {name}: warning: {len(f)} images for {f.shape[1]} {part} dimensions: the spectrum's "
                  f"tail past rank {len(f)} is zero by construction (raise --spectrum_images)")
        out[part] = {'dim': f.shape[1], 'participation_ratio': participation_ratio(f),
                     'effective_rank': effective_rank(f), 'spectrum': collapse_spectrum(f).tolist()}
    gpart = 'projector' if 'projector' in clean else 'backbone'
    g = gmm_entropy(clean[gpart], args.gmm_components, args.gmm_repeats, args.gmm_samples, args.seed)
    out['gmm'] = {'features': gpart, 'components': list(g), 'mean': [m for m, _ in g.values()],
                  'std': [s for _, s in g.values()]}
    zpart = 'projector' if 'projector' in viewed else 'backbone'
    arrays, summary = packing_stats(viewed[zpart], r_s)
    out['packing'] = {'features': zpart, **summary}
    print(f"| {name}: backbone PR {out['backbone']['participation_ratio']:.2f} erank "
          f"{out['backbone']['effective_rank']:.2f}" +
          (f" | projector PR {out['projector']['participation_ratio']:.2f} erank "
           f"{out['projector']['effective_rank']:.2f}" if 'projector' in out else ''))
    print(f"| {name}: packing ({zpart}, {out['num_images']} images x {args.num_views} views, r_s {r_s}): "
          + '  '.join(f"{k} {v:.4g}" for k, v in summary.items()))
    return out, arrays


# ---- figures -----------------------------------------------------------------------------------

COLOURS = plt.rcParams['axes.prop_cycle'].by_key()['color']


def save_figure(fig, path, dpi=110):
    """tight_layout, write the PNG, free the figure (every figure of the geometry stages and toys)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def grouped_bars(ax, groups, tick_labels, names, colours=COLOURS):
    """One bar per (group, position): groups is a list of equal-length value lists, drawn side by
    side at each tick and labelled names[i] (shared by the packing fractions and the toys' spectra)."""
    w = 0.8 / len(groups)
    for i, (vals, name) in enumerate(zip(groups, names)):
        ax.bar(np.arange(len(vals)) + i * w, vals, w, color=colours[i % len(colours)], label=name)
    ax.set_xticks(np.arange(len(tick_labels)) + 0.4 - w / 2, tick_labels)


def unit_sphere(ax, colour='0.85', zoom=1.3):
    """A unit-sphere wireframe on a 3-D axis with equal aspect and no axes (features after L2
    normalisation live on it)."""
    u, w = np.mgrid[0:2 * np.pi:24j, 0:np.pi:12j]
    ax.plot_wireframe(np.cos(u) * np.sin(w), np.sin(u) * np.sin(w), np.cos(w), color=colour, lw=0.4)
    for lim in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        lim(-1, 1)
    ax.set_box_aspect((1, 1, 1), zoom=zoom)
    ax.set_axis_off()


def plot_spectrum(results, path):
    parts = [p for p in ('backbone', 'projector') if any(p in r for r in results)]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        for i, r in enumerate(results):
            if part not in r:
                continue
            s = np.asarray(r[part]['spectrum'])
            ax.plot(np.arange(1, len(s) + 1), np.log(np.clip(s, 1e-30, None)), color=COLOURS[i % 10],
                    label=f"{r['name']} (PR {r[part]['participation_ratio']:.1f}, erank {r[part]['effective_rank']:.1f})")
        # values below ~1e-15 of the largest are float64 round-off, not signal
        top = max(r[part]['spectrum'][0] for r in results if part in r)
        ax.set_ylim(bottom=max(ax.get_ylim()[0], math.log(max(top, 1e-300) * 1e-15)))
        ax.set_xlabel('singular value rank index')
        ax.set_ylabel('log singular value of $E^TE/n$')
        ax.set_title(f'dimensional collapse: {part} features')
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_gmm(results, path):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, r in enumerate(results):
        k, m, s = (np.asarray(r['gmm'][key], dtype=float) for key in ('components', 'mean', 'std'))
        if len(k) == 0:
            continue
        ax.plot(k, m, 'o-', color=COLOURS[i % 10], label=f"{r['name']} ({r['gmm']['features']})")
        ax.fill_between(k, m - s, m + s, color=COLOURS[i % 10], alpha=0.2)
    ax.set_xscale('log')
    ax.set_xlabel('number of mixture components K')
    ax.set_ylabel('entropy estimate (nats)')
    ax.set_title('intra-cluster collapse (diagonal GMM)')
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_packing(results, arrays, path):
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [('radius', 'radius r / r_s', False), ('pair_dist', 'centre distance $D_{ij}$', False),
              ('contacts', 'contact number (self excluded)', True), ('energy', 'energy per sub-manifold', False),
              ('nn_dist', 'nearest-centre distance', False)]
    for ax, (key, label, integer) in zip(axes.flat, panels):
        vals = [a[key] for a in arrays]
        lo, hi = min(v.min() for v in vals), max(v.max() for v in vals)
        bins = np.arange(math.floor(lo), math.ceil(hi) + 2) - 0.5 if integer else np.linspace(lo, hi + 1e-9, 40)
        if integer and len(bins) > 60:
            bins = np.linspace(lo, hi + 1e-9, 40)
        for i, (r, v) in enumerate(zip(results, vals)):
            ax.hist(v, bins=bins, histtype='step', lw=1.5, density=True, color=COLOURS[i % 10], label=r['name'])
        ax.set_xlabel(label)
        ax.set_ylabel('density')
    axes[0, 0].legend(fontsize=8)
    ax = axes.flat[-1]
    keys = ['nc_acc', 'frac_contact', 'rattler_frac', 'overlap_frac']
    grouped_bars(ax, [[r['packing'][k] for k in keys] for r in results],
                 ['nearest-centre\naccuracy', 'with >= 1\ncontact', 'rattlers', 'overlapping\npairs'],
                 [r['name'] for r in results])
    ax.tick_params(axis='x', labelsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title('fractions')
    first = results[0]
    fig.suptitle(f"CLAMP packing statistics ({first['packing']['features']} outputs, {first['num_images']} test "
                 f"images x {first['num_views']} views, r_s {first['r_s']})")
    save_figure(fig, path)


# ---- flags and main ----------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser('manifold-ssl geometry analysis', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--weights', nargs='+', required=True,
                   help='One or more train_ssl run folders / checkpoint.pth (projector and packing '
                        'statistics need a checkpoint; a backbone.pth gives backbone statistics only).')
    g.add_argument('--names', nargs='+', default=None,
                   help='Legend names, one per --weights. Default: the run folder names.')
    g.add_argument('--random_baseline', type=utils.str2bool, default=True,
                   help='Also analyse the first --weights architecture at random init (seeded by --seed): '
                        'the "before pretraining" reference. (default: %(default)s)')
    g = p.add_argument_group('eval')
    g.add_argument('--num_images', type=int, default=1024,
                   help='Test images (evenly spaced over the test beton) for the packing statistics, which '
                        'cost O(N^2) and whose contact numbers grow with N: compare models at the same N. '
                        '(default: %(default)s)')
    g.add_argument('--spectrum_images', type=int, default=0,
                   help='Test images (evenly spaced) for the collapse spectrum, GMM entropy, participation '
                        'ratio and effective rank; 0 = the whole test set (CPLearn\'s protocol; fewer images '
                        'than feature dimensions cap the spectrum\'s rank). (default: %(default)s)')
    g.add_argument('--num_views', type=int, default=4,
                   help='Augmented views per image for the packing statistics (CLAMP: 4-16). (default: %(default)s)')
    g.add_argument('--recipe', default=None, choices=list(data.RECIPES),
                   help='Augmentation of the views. Default: the recipe the first --weights trained with.')
    g.add_argument('--crop_min_scale', type=float, default=0.08,
                   help='Smallest crop area fraction of the views. (default: %(default)s)')
    g.add_argument('--r_s', type=float, default=None,
                   help='CLAMP radius scale for the packing statistics. Default: each run\'s own --r_s, '
                        'else 7.0 (the CIFAR value).')
    g.add_argument('--gmm_components', type=int, nargs='+', default=[10, 20, 50, 100, 200],
                   help='K values of the intra-cluster collapse curve (CPLearn). (default: %(default)s)')
    g.add_argument('--gmm_repeats', type=int, default=10,
                   help='Monte-Carlo entropy estimates per K (mean and std plotted). (default: %(default)s)')
    g.add_argument('--gmm_samples', type=int, default=10000,
                   help='Samples per Monte-Carlo estimate. (default: %(default)s)')
    g.add_argument('--batch_size', type=int, default=512, help='Images per forward pass. (default: %(default)s)')
    g = utils.add_data_args(p, need_train=False)
    g.description = '--val_path defaults to the test beton recorded in each run\'s args.json.'
    utils.add_run_args(p, default_output='runs/geometry')
    return p


def model_list(args):
    """[(name, weights, init)] in plotting order: the random-init reference first."""
    names = args.names or [os.path.basename(os.path.normpath(w if os.path.isdir(w) else os.path.dirname(w)))
                           for w in args.weights]
    if len(names) != len(args.weights):
        utils.fail(f"--names gives {len(names)} names for {len(args.weights)} --weights")
    models = [(n, w, 'pretrained') for n, w in zip(names, args.weights)]
    if args.random_baseline:
        models.insert(0, (f'{names[0]} (random init)', args.weights[0], 'random'))
    return models


def main(args):
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        utils.fail('eval_geometry.py runs as one process; launch it with plain python, not torchrun')
    if args.num_images < 2 or args.num_views < 2:
        utils.fail('--num_images and --num_views must be >= 2 (packing needs pairs of images and of views)')
    for w in args.weights:
        utils.resolve_weights(w)  # a missing run is an error before any work
    models = model_list(args)
    utils.prepare_output_dir(args)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    results, arrays = [], []
    for name, weights, init in models:
        utils.fix_random_seeds(args.seed)
        r, arr = analyse(name, weights, init, args, device)
        results.append(r)
        arrays.append(arr)
    out = {'models': results}
    utils.atomic_write_text(os.path.join(args.output_dir, 'geometry.json'), json.dumps(out, indent=1))
    plot_spectrum(results, os.path.join(args.output_dir, 'spectrum.png'))
    plot_gmm(results, os.path.join(args.output_dir, 'gmm_entropy.png'))
    plot_packing(results, arrays, os.path.join(args.output_dir, 'packing.png'))
    utils.log_stats(args.output_dir, {r['name']: {'packing': r['packing'], 'gmm': r['gmm']} for r in results})
    print(f"| wrote geometry.json, spectrum.png, gmm_entropy.png, packing.png to {args.output_dir}")
    return out


if __name__ == '__main__':
    main(get_args_parser().parse_args())
