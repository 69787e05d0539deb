"""Clustering evaluation of frozen features (SPEC §3 NMCE, §4 CPLearn, §8).

    python eval_cluster.py --weights runs/demo/clamp                       # k-means, train split
    python eval_cluster.py --weights runs/cplearn --assign codes kmeans --features projector
    python eval_cluster.py --weights runs/tcr --aug_passes 16 --nearest_subspace 1   # NMCE's protocol
    python eval_cluster.py --weights runs/nmce_cluster --assign head      # a train_cluster.py run

Cluster assignments come from k-means on the features (`kmeans`), from CPLearn's argmax over its
fixed codes (`codes`, needs a checkpoint with `model.codes`), or from the cluster head of a
train_cluster.py run (`head`). Each is scored against the labels with Hungarian accuracy
(one-to-one matching of clusters to classes, scipy), NMI (arithmetic normalisation, sklearn's
default), ARI and purity (many-to-one). NMCE reports these on the TRAIN split, un-augmented
(the default here); the split used is printed and recorded.

Also: the nearest-subspace classifier (per-class PCA with 30 components fitted on the train
features, a test sample goes to the class of smallest residual; NMCE `evals/supervised.py`) and
NMCE's feature averaging over augmented passes (`--aug_passes 16`). One process (no torchrun).
"""
import argparse
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import data
import utils

# ---- metrics: Hungarian accuracy, NMI, ARI, purity --------------------------------------------


def contingency(y_true, y_pred):
    """Counts C[i, j] = #{samples of class i in cluster j} over the labels that occur.
    y_true, y_pred: (n,) integer arrays -> (C (n_classes, n_clusters) int64, classes, clusters)."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"labels and assignments must be equal-length and non-empty, got "
                         f"{y_true.shape} and {y_pred.shape}")
    classes, ti = np.unique(y_true, return_inverse=True)
    clusters, pi = np.unique(y_pred, return_inverse=True)
    c = np.zeros((len(classes), len(clusters)), dtype=np.int64)
    np.add.at(c, (ti, pi), 1)
    return c, classes, clusters


def hungarian_accuracy(y_true, y_pred):
    """Best one-to-one matching of clusters to classes (scipy's linear_sum_assignment on the
    contingency table). With more clusters than classes the unmatched clusters count as wrong
    (as NMCE's cluster_match). -> (accuracy in [0, 1], {cluster: matched class})."""
    c, classes, clusters = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(c, maximize=True)
    mapping = {clusters[j].item(): classes[i].item() for i, j in zip(rows, cols)}
    return c[rows, cols].sum() / c.sum(), mapping


def _entropy(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(y_true, y_pred):
    """Normalised mutual information, I(T; P) / mean(H(T), H(P)) (sklearn's default 'arithmetic'
    normalisation). 1 when both labelings are a single group (sklearn's convention)."""
    c, _, _ = contingency(y_true, y_pred)
    if c.shape[0] == c.shape[1] == 1:
        return 1.0
    n = c.sum()
    a, b = c.sum(1, keepdims=True), c.sum(0, keepdims=True)
    nz = c > 0
    mi = float((c[nz] / n * np.log(n * c[nz] / (a @ b)[nz])).sum())
    denom = max(0.5 * (_entropy(a.ravel()) + _entropy(b.ravel())), np.finfo(np.float64).eps)
    return max(mi, 0.0) / denom


def _comb2(x):
    x = np.asarray(x, dtype=np.float64)
    return x * (x - 1) / 2


def ari(y_true, y_pred):
    """Adjusted Rand index (Hubert & Arabie): (index - expected) / (max - expected) over pair
    counts. 1 for identical partitions up to relabelling, ~0 for independent ones; 1 in the
    degenerate cases where max == expected (sklearn's convention)."""
    c, _, _ = contingency(y_true, y_pred)
    index = _comb2(c).sum()
    sa, sb = _comb2(c.sum(1)).sum(), _comb2(c.sum(0)).sum()
    expected = sa * sb / _comb2(c.sum())
    best = 0.5 * (sa + sb)
    if best == expected:
        return 1.0
    return float((index - expected) / (best - expected))


def purity(y_true, y_pred):
    """Fraction of samples in their cluster's majority class (many-to-one: meaningful when there
    are far more clusters than classes, e.g. CPLearn's 16384 codes)."""
    c, _, _ = contingency(y_true, y_pred)
    return c.max(0).sum() / c.sum()


def cluster_scores(y_true, y_pred):
    """All scores of one assignment, as plain floats (percent for acc and purity, as papers print)."""
    acc, _ = hungarian_accuracy(y_true, y_pred)
    return {'acc': 100.0 * acc, 'nmi': nmi(y_true, y_pred), 'ari': ari(y_true, y_pred),
            'purity': 100.0 * purity(y_true, y_pred), 'clusters_used': int(len(np.unique(y_pred)))}


# ---- assignments -------------------------------------------------------------------------------


def kmeans_assign(feats, k, n_init=10, seed=0, normalize=False):
    """k-means (sklearn, k-means++ init, best of n_init) on feats (n, F) -> (n,) cluster ids."""
    from sklearn.cluster import KMeans
    x = F.normalize(feats, dim=1) if normalize else feats
    if len(x) < k:
        utils.fail(f"k-means with {k} clusters needs at least {k} samples, got {len(x)}")
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x.double().numpy())


def codes_assign(h, codes):
    """CPLearn: cluster = argmax over codes of the logits h W (the positive logit scale of
    losses.cplearn_logits does not change the argmax). h: (n, f), codes: (f, c) -> (n,)."""
    return (h.float() @ codes.float()).argmax(1).numpy()


# ---- nearest-subspace classifier ---------------------------------------------------------------


def nearest_subspace(train_f, train_y, test_f, n_components=30, center=True):
    """NMCE's nearest-subspace classifier: for each class, the top principal directions of its
    train features (PCA around the class mean when center=True; an uncentred SVD, NMCE's
    'TruncatedSVD' variant, when False); a test sample goes to the class whose subspace leaves the
    smallest residual norm. train_f (n, F), train_y (n,), test_f (m, F) -> (m,) predicted classes.
    A class with fewer samples than n_components keeps only the directions its samples span (n - 1
    once centred): a further singular vector would be an arbitrary direction orthogonal to the data,
    and would shrink that class's residuals."""
    train_f, test_f = train_f.double(), test_f.double()
    classes = torch.unique(train_y)
    residuals = []
    for c in classes:
        xc = train_f[train_y == c]
        mean = xc.mean(0) if center else torch.zeros(xc.shape[1], dtype=xc.dtype)
        k = min(n_components, len(xc) - (1 if center else 0), xc.shape[1])
        basis = torch.linalg.svd(xc - mean, full_matrices=False).Vh[:k].T  # (F, k) orthonormal
        y = test_f - mean
        residuals.append((y - (y @ basis) @ basis.T).norm(dim=1))
    return classes[torch.stack(residuals, 1).argmin(1)]


# ---- networks and features ---------------------------------------------------------------------


def load_networks(weights, init='pretrained', seed=0):
    """(backbone, projector or None, codes or None, cluster head or None, saved args) from a
    train_ssl run folder / checkpoint.pth / backbone.pth or a train_cluster.py run. init='random'
    gives the same architecture freshly initialised (codes, a fixed buffer, still come from the
    checkpoint)."""
    file, kind = utils.resolve_weights(weights)
    ck = utils.load_checkpoint_file(file)
    load = init == 'pretrained'
    if isinstance(ck, dict) and 'cluster_head' in ck:  # a train_cluster.py run
        import train_cluster
        net, a = train_cluster.load_cluster_net(ck, file, load_weights=load, seed=seed)
        # 'backbone' = the pooled features (NMCE's "pool"), 'projector' = the subspace features
        return (net.backbone, nn.Sequential(net.pre_feature, net.subspace), None,
                nn.Sequential(net.pre_feature, net.cluster), a)
    if kind == 'checkpoint':
        net, a = utils.load_pretrained(file, 'projector', load_weights=load, seed=seed)
        backbone, projector = net[0], net[1]
        codes = ck['model'].get('model.codes') if 'model' in ck else None
    else:
        backbone, a = utils.load_pretrained(file, 'backbone', load_weights=load, seed=seed)
        projector, codes = None, None
    return backbone, projector, codes, None, a


@torch.no_grad()
def embed(nets, batches, device, amp, limit=0):
    """Run every image batch through backbone -> projector (and cluster head); callers put the
    modules in eval mode. nets: dict with 'backbone' and optional 'projector' / 'head' modules; batches yields
    (images (B, C, H, W), labels (B,)); limit > 0 stops after that many samples.
    -> ({'backbone': (n, F), 'projector': (n, d), 'head': (n, K)} on CPU float32, labels (n,))."""
    out, labels, n = {k: [] for k in nets}, [], 0
    for x, y in batches:
        if limit:
            x, y = x[:limit - n], y[:limit - n]
        with amp:
            f = nets['backbone'](x.to(device, non_blocking=True))
            res = {'backbone': f}
            if 'projector' in nets:
                res['projector'] = nets['projector'](f)
            if 'head' in nets:
                res['head'] = nets['head'](f)
        for k, v in res.items():
            out[k].append(v.float().cpu())
        labels.append(y.cpu())
        n += len(y)
        if limit and n >= limit:
            break
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(labels)


def split_features(nets, path, args, a, device, amp, norm_from=None):
    """Features of one split: un-augmented (centre crop) for --aug_passes 0, else the mean over
    --aug_passes augmented passes of the --aug_recipe (NMCE: 16 passes; raw features averaged).
    norm_from: the train beton, whose mean/std normalise the test split too."""
    res, ch = args.res or a.res, args.channels or a.channels
    # --max_samples: evenly spaced over the beton (the first N of a class-sorted beton miss classes)
    idx = data.limit_indices(data.beton_info(path)['num_samples'], args.max_samples or None)
    if args.aug_passes == 0:
        loader = data.build_eval_loader(path, args.batch_size, res, channels=ch, workers=args.workers,
                                        device=device, norm_from=norm_from, indices=idx)
        return embed(nets, ((x, y) for x, y, _ in loader), device, amp)
    loader = data.build_ssl_loader(path, args.batch_size, 1, res, recipe=args.aug_recipe, channels=ch,
                                   workers=args.workers, seed=args.seed, device=device, drop_last=False,
                                   scale=(args.aug_min_scale, 1.0), order='sequential', norm_from=norm_from,
                                   indices=idx)
    total, labels = None, None
    for p in range(args.aug_passes):
        loader.set_epoch(p)  # a new draw of crops per pass; the sequential order stays the same
        feats, y = embed(nets, ((v[:, 0], y) for v, y in loader), device, amp)
        if labels is not None and not torch.equal(labels, y):
            raise RuntimeError('augmented passes did not visit the samples in the same order')
        total = feats if total is None else {k: total[k] + feats[k] for k in total}
        labels = y
    return {k: v / args.aug_passes for k, v in total.items()}, labels


# ---- flags -------------------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser('manifold-ssl clustering evaluation', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = utils.add_weights_args(p)
    g.add_argument('--features', default='backbone', choices=['backbone', 'projector'],
                   help='Features k-means and the nearest-subspace classifier use: backbone (NMCE\'s '
                        '"pool" features) or projector output (CPLearn\'s tanh embedding; the subspace '
                        'head of a train_cluster.py run). (default: %(default)s)')
    g = p.add_argument_group('eval')
    g.add_argument('--assign', nargs='+', default=['kmeans'], choices=['kmeans', 'codes', 'head'],
                   help='Cluster assignments to score: kmeans on --features; codes = CPLearn argmax over '
                        'the fixed code matrix (a cplearn checkpoint); head = argmax of a train_cluster.py '
                        'cluster head. Several at once, e.g. --assign codes kmeans. (default: %(default)s)')
    g.add_argument('--split', default='train', choices=['train', 'test'],
                   help='Split the assignments are scored on. NMCE reports the train set, un-augmented; '
                        'CPLearn the test set. (default: %(default)s)')
    g.add_argument('--num_clusters', type=int, default=None,
                   help='k of k-means. Default: the number of distinct labels in the split.')
    g.add_argument('--kmeans_n_init', type=int, default=10,
                   help='k-means restarts (k-means++ seeds); the best inertia wins. (default: %(default)s)')
    g.add_argument('--kmeans_normalize', type=utils.str2bool, default=False,
                   help='L2-normalise features before k-means. NMCE\'s code uses raw features (0); 1 '
                        'often helps features trained on the sphere. (default: %(default)s)')
    g.add_argument('--nearest_subspace', type=utils.str2bool, default=False,
                   help='Also fit per-class PCA subspaces on the train features and classify the test '
                        'features by smallest residual (needs both betons). (default: %(default)s)')
    g.add_argument('--ns_components', type=int, default=30,
                   help='Principal components per class for --nearest_subspace (NMCE: 30). (default: %(default)s)')
    g.add_argument('--aug_passes', type=int, default=0,
                   help='0: features of the un-augmented images (centre crop). P > 0: the mean of the '
                        'features of P augmented passes (NMCE evaluates with 16). (default: %(default)s)')
    g.add_argument('--aug_recipe', default='crop', choices=list(data.RECIPES),
                   help='Augmentation of the passes (crop = RandomResizedCrop + flip, NMCE\'s '
                        '"cifar10_sup"). (default: %(default)s)')
    g.add_argument('--aug_min_scale', type=float, default=0.08,
                   help='Smallest crop area fraction of the augmented passes. (default: %(default)s)')
    g.add_argument('--max_samples', type=int, default=0,
                   help='Use only N samples of each split, evenly spaced (0 = all). k-means and the CPU cost '
                        'scale with N. (default: %(default)s)')
    g.add_argument('--batch_size', type=int, default=512, help='Images per forward pass. (default: %(default)s)')
    g = utils.add_data_args(p, need_train=False)
    g.description = ('--data_path / --val_path default to the betons recorded in the run\'s args.json '
                     '(printed at start).')
    utils.add_run_args(p, default_output='runs/cluster')
    return p


# ---- main --------------------------------------------------------------------------------------


def resolve_paths(args, a):
    """--data_path / --val_path, defaulting to the betons the run trained with (printed)."""
    for flag, saved in (('data_path', getattr(a, 'data_path', None)), ('val_path', getattr(a, 'val_path', None))):
        if getattr(args, flag) is None and saved:
            setattr(args, flag, saved)
            print(f"| --{flag} {saved} (from the run's args.json)")
    need = {'train': ['data_path'], 'test': ['val_path']}[args.split]
    if args.nearest_subspace:
        need = ['data_path', 'val_path']
    for flag in need:
        if not getattr(args, flag):
            utils.fail(f"--{flag} is needed (split {args.split}{', nearest subspace' if args.nearest_subspace else ''})")
        data.beton_info(getattr(args, flag))


def main(args):
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        utils.fail('eval_cluster.py runs as one process; launch it with plain python, not torchrun')
    if args.aug_passes < 0 or args.max_samples < 0 or args.ns_components < 1:
        utils.fail('--aug_passes and --max_samples must be >= 0 and --ns_components >= 1')
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    utils.fix_random_seeds(args.seed)
    backbone, projector, codes, head, a = load_networks(args.weights, args.init, args.seed)
    if 'codes' in args.assign and codes is None:
        utils.fail(f"--assign codes needs a CPLearn checkpoint.pth with its code matrix; {args.weights} has none")
    if 'head' in args.assign and head is None:
        utils.fail(f"--assign head needs a train_cluster.py run; {args.weights} has no cluster head")
    if args.features == 'projector' and projector is None:
        utils.fail(f"--features projector needs a checkpoint.pth (full model); {args.weights} holds only a backbone")
    resolve_paths(args, a)
    used = {args.split} | ({'train', 'test'} if args.nearest_subspace else set())
    utils.eval_input(args, a, [data.beton_info(args.data_path if s == 'train' else args.val_path) for s in sorted(used)])
    utils.prepare_output_dir(args)
    nets = {'backbone': backbone.to(device).eval()}
    if projector is not None:
        nets['projector'] = projector.to(device).eval()
    if head is not None:
        nets['head'] = head.to(device).eval()
    amp = utils.autocast_ctx(args.dtype, device)
    how = 'un-augmented' if args.aug_passes == 0 else f'mean of {args.aug_passes} augmented passes ({args.aug_recipe})'

    splits = {args.split}
    if args.nearest_subspace:
        splits |= {'train', 'test'}
    # the test split is normalised with the train beton's mean/std, as in training (and so the
    # nearest-subspace fit on train features applies to test features); its own only without one
    train_stats = utils.train_norm_source(args.data_path) if 'test' in splits else None
    feats = {s: split_features(nets, args.data_path if s == 'train' else args.val_path, args, a, device, amp,
                               norm_from=None if s == 'train' else train_stats)
             for s in sorted(splits)}
    for s, (f, y) in feats.items():
        print(f"| {s}: {len(y)} samples ({how}), {args.features} features of dim {f[args.features].shape[1]}")

    f, y = feats[args.split]
    k = args.num_clusters or int(len(torch.unique(y)))
    result = {'weights': args.weights, 'init': args.init, 'split': args.split, 'features': args.features,
              'augmentation': how, 'num_samples': len(y), 'num_classes': int(len(torch.unique(y)))}
    for method in args.assign:
        if method == 'kmeans':
            pred = kmeans_assign(f[args.features], k, args.kmeans_n_init, args.seed, args.kmeans_normalize)
        elif method == 'codes':
            pred = codes_assign(f['projector'], codes)
        else:
            pred = f['head'].argmax(1).numpy()
        s = cluster_scores(y.numpy(), pred)
        result[method] = s
        extra = f" k={k}" if method == 'kmeans' else ''
        print(f"| {method}{extra} on {args.split} ({how}, {len(y)} samples): ACC {s['acc']:.2f}  NMI {s['nmi']:.4f}  "
              f"ARI {s['ari']:.4f}  purity {s['purity']:.2f}  ({s['clusters_used']} clusters used)")
    if args.nearest_subspace:
        (trf, try_), (tef, tey) = feats['train'], feats['test']
        ns = {}
        for name, center in (('pca', True), ('svd', False)):
            pred = nearest_subspace(trf[args.features], try_, tef[args.features], args.ns_components, center)
            ns[f'{name}_acc'] = 100.0 * (pred == tey).double().mean().item()
        result['nearest_subspace'] = {**ns, 'components': args.ns_components, 'num_train': len(try_),
                                      'num_test': len(tey)}
        print(f"| nearest subspace ({args.ns_components} components per class, train -> test): "
              f"PCA {ns['pca_acc']:.2f}  uncentred SVD {ns['svd_acc']:.2f}")
    return utils.finish_run(args.output_dir, result, log=True)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
