"""Clustering metrics, collapse / dimension statistics, CLAMP packing statistics, and the
geometry scripts (eval_cluster.py, eval_geometry.py, plot_log.py, toys/) end to end."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from conftest import ROOT
from test_train import make_idx_dataset, run, write_idx

import data
import eval_cluster as ec
import eval_geometry as eg
import losses

sys.path.insert(0, os.path.join(ROOT, 'toys'))


# ---- clustering metrics -------------------------------------------------------------------------

def test_hungarian_accuracy_hand_made():
    # a relabelled perfect clustering is perfect
    acc, mapping = ec.hungarian_accuracy([0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 1, 1])
    assert acc == 1.0 and mapping == {2: 0, 0: 1, 1: 2}
    # class 0 -> {c0: 1, c1: 2}, class 1 -> {c0: 3}: best one-to-one is c1->0, c0->1: 5 of 6
    acc, mapping = ec.hungarian_accuracy([0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0])
    assert acc == pytest.approx(5 / 6) and mapping == {1: 0, 0: 1}
    # the greedy "largest cell first" choice (c0->1 with 3, then c1->0 with 2) agrees here, but not
    # below: greedy takes c0->0 (3), then c1->1 (0) = 3/7; the optimum is c0->1, c1->0 = 2+2 = 4/7
    acc, _ = ec.hungarian_accuracy([0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0, 0])
    assert acc == pytest.approx(4 / 7)


def test_hungarian_accuracy_more_clusters_than_classes():
    # 4 singleton clusters for 2 classes: only 2 clusters can be matched -> 2 of 4 correct
    acc, mapping = ec.hungarian_accuracy([0, 0, 1, 1], [0, 1, 2, 3])
    assert acc == 0.5 and len(mapping) == 2 and sorted(mapping.values()) == [0, 1]
    # purity (many-to-one) counts every pure cluster
    assert ec.purity([0, 0, 1, 1], [0, 1, 2, 3]) == 1.0
    assert ec.purity([0, 0, 1, 1], [5, 5, 5, 5]) == 0.5


def test_nmi_ari_hand_computed():
    t, p = [0, 0, 1, 1], [0, 0, 0, 1]
    # contingency [[2, 0], [1, 1]]: sum C(n_ij, 2) = 1, rows 2 + ... = 2, cols 3, C(4, 2) = 6,
    # expected = 2 * 3 / 6 = 1, max = (2 + 3) / 2 -> ARI = (1 - 1) / (2.5 - 1) = 0
    assert ec.ari(t, p) == pytest.approx(0.0, abs=1e-12)
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_t, h_p = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert ec.nmi(t, p) == pytest.approx(mi / ((h_t + h_p) / 2), rel=1e-12)
    # identical partitions up to relabelling; and the degenerate single-group case (sklearn: 1)
    assert ec.nmi([0, 0, 1, 2], [5, 5, 3, 9]) == pytest.approx(1.0)
    assert ec.ari([0, 0, 1, 2], [5, 5, 3, 9]) == pytest.approx(1.0)
    assert ec.nmi([1, 1, 1], [0, 0, 0]) == 1.0 and ec.ari([1, 1, 1], [0, 0, 0]) == 1.0


@pytest.mark.parametrize('k_true,k_pred,n', [(2, 2, 50), (10, 10, 500), (3, 17, 200), (10, 1, 40)])
def test_nmi_ari_match_sklearn(k_true, k_pred, n):
    rng = np.random.default_rng(k_true * 100 + k_pred)
    t = rng.integers(0, k_true, n)
    p = np.where(rng.random(n) < 0.6, t % k_pred, rng.integers(0, k_pred, n))  # correlated labelings
    assert ec.nmi(t, p) == pytest.approx(normalized_mutual_info_score(t, p), abs=1e-10)
    assert ec.ari(t, p) == pytest.approx(adjusted_rand_score(t, p), abs=1e-10)


def test_kmeans_and_codes_assign():
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    y = np.repeat(np.arange(3), 30)
    x = torch.tensor(centres[y] + 0.3 * rng.standard_normal((90, 3)))
    assert ec.hungarian_accuracy(y, ec.kmeans_assign(x, 3, n_init=3, seed=0))[0] == 1.0
    codes = losses.make_cplearn_codes(16, 8, torch.Generator().manual_seed(0))
    h = torch.tanh(3 * codes.T[[5, 2, 7]])  # embeddings with the sign pattern of codes 5, 2, 7
    assert ec.codes_assign(h, codes).tolist() == [5, 2, 7]


def test_nearest_subspace_separates_orthogonal_planes():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    planes = [basis[:, :2], basis[:, 2:4]]  # two orthogonal 2-D subspaces of R^6

    def sample(n):
        y = torch.arange(n) % 2
        coef = torch.randn(n, 2, generator=g, dtype=torch.float64)
        return torch.stack([planes[c] @ a for c, a in zip(y.tolist(), coef)]), y

    (xtr, ytr), (xte, yte) = sample(200), sample(100)
    for center in (True, False):
        pred = ec.nearest_subspace(xtr, ytr, xte, n_components=2, center=center)
        assert torch.equal(pred, yte)
    # one component per class cannot hold a 2-D plane: accuracy drops well below 100%
    assert (ec.nearest_subspace(xtr, ytr, xte, n_components=1) == yte).double().mean() < 0.95


# ---- dimension and collapse statistics ----------------------------------------------------------

def test_participation_ratio_and_effective_rank():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(20000, 8, generator=g, dtype=torch.float64)
    assert eg.participation_ratio(iso) == pytest.approx(8, abs=0.15)
    assert eg.effective_rank(iso) == pytest.approx(8, abs=0.1)
    line = torch.randn(500, 1, generator=g, dtype=torch.float64) * torch.randn(1, 8, generator=g, dtype=torch.float64)
    assert eg.participation_ratio(line + 3.0) == pytest.approx(1.0, abs=1e-9)  # centring removes the offset
    assert eg.effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    two = iso[:, :2]  # 2 equal directions
    assert eg.participation_ratio(two) == pytest.approx(2, abs=0.05)


def test_collapse_spectrum_counts_the_rank():
    g = torch.Generator().manual_seed(0)
    n, d, r = 300, 16, 5
    a = torch.rand(n, r, generator=g, dtype=torch.float64)
    a[0] = 0  # min(E) = 0, so min-max scaling is a pure rescaling and keeps the rank
    e = a @ torch.rand(r, d, generator=g, dtype=torch.float64)
    s = eg.collapse_spectrum(e)
    assert s.shape == (d,) and np.all(np.diff(s) <= 1e-12)
    assert (s > 1e-10 * s[0]).sum() == r
    # without a zero minimum the min-max shift adds the constant direction: rank r + 1
    assert (eg.collapse_spectrum(e[1:] + 1.0) > 1e-10).sum() == r + 1
    # unscaled: E^T E / n itself
    s_raw = eg.collapse_spectrum(e, scale=False)
    assert s_raw.sum() == pytest.approx(float((e ** 2).sum() / n), rel=1e-10)


def test_gmm_entropy_of_a_gaussian():
    g = torch.Generator().manual_seed(0)
    sigma, d = 0.5, 4
    x = sigma * torch.randn(4000, d, generator=g, dtype=torch.float64)
    out = eg.gmm_entropy(x, components=(1, 8000), repeats=3, samples=4000, scale=False)
    assert 8000 not in out  # K > n is skipped
    mean, std = out[1]
    assert mean == pytest.approx(0.5 * d * math.log(2 * math.pi * math.e * sigma ** 2), abs=0.08)
    assert 0 < std < 0.1


# ---- CLAMP packing statistics -------------------------------------------------------------------

def _hand_placed(centres, radii, spread=0.01):
    """Unit-free hand geometry: V = 2 views at c_i +- spread along the last axis."""
    c = torch.tensor(centres, dtype=torch.float64)
    off = torch.zeros_like(c)
    off[:, -1] = spread
    return torch.stack([c + off, c - off], 1), c, torch.tensor(radii, dtype=torch.float64)


def test_packing_on_hand_placed_spheres():
    # three spheres of radius 0.6 at x = 0, 1, 3 (r_s = 1, so radii are taken as given)
    x, c, r = _hand_placed([[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0]], [0.6, 0.6, 0.6])
    p = eg.packing_from_geometry(x, c, r, r_s=1.0, pot_pow=2.0, max_range=1.5)
    # 0-1: D = 1 < 0.99 * 1.2 -> contact; 1-2 (D = 2) and 0-2 (D = 3) not; no self-contact for the
    # isolated sphere even though D_22 = 0 < r_2 + r_2 (the official code would count 1 there)
    assert p['contacts'].tolist() == [1, 1, 0]
    assert p['overlap'] == 1
    e01 = (1 - 1.0 / (1.2 + 1e-6)) ** 2  # sigma = min(r_0 + r_1 + 1e-6, 1.5), as the loss
    assert p['energy'] == pytest.approx([e01 / 2, e01 / 2, 0.0])
    assert p['nn_dist'] == pytest.approx([1.0, 1.0, 2.0])
    assert sorted(p['pair_dist'].tolist()) == pytest.approx([1.0, 2.0, 3.0])
    s = eg.packing_summary(p)
    assert s['rattler_frac'] == pytest.approx(1 / 3) and s['frac_contact'] == pytest.approx(2 / 3)
    assert s['contacts'] == pytest.approx(2 / 3) and s['nc_acc'] == 1.0
    assert s['energy_pp'] == pytest.approx(e01 / 3) and s['overlap_frac'] == pytest.approx(1 / 3)


def test_packing_contact_vs_overlap_criteria():
    # radii 1 and D = 1.6: a contact by the diagnostic (1.6 < 0.99 * 2) but not an overlap of the
    # loss, whose contact distance is capped at max_range = 1.5
    x, c, r = _hand_placed([[0.0, 0], [1.6, 0]], [1.0, 1.0])
    p = eg.packing_from_geometry(x, c, r, r_s=1.0, max_range=1.5)
    assert p['contacts'].tolist() == [1, 1] and p['overlap'] == 0 and p['energy'].sum() == 0
    # views placed nearer the other centre are misassigned: nearest-centre accuracy 0.5
    x2 = torch.stack([c, c.flip(0)], 1)
    assert eg.packing_summary(eg.packing_from_geometry(x2, c, r, r_s=1.0))['nc_acc'] == 0.5


def test_packing_stats_agree_with_training_diagnostics():
    z = torch.randn(40, 4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z[:20] += 2.0 * torch.randn(20, 1, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for r_s in (7.0, 2.0):
        arrays, ours = eg.packing_stats(z, r_s=r_s)
        theirs = losses.clamp_diagnostics(z, r_s=r_s)
        for k, v in theirs.items():
            assert ours[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
        assert arrays['radius'].shape == (40,) and arrays['pair_dist'].shape == (40 * 39 // 2,)
        # the per-particle energy sums to the loss's own E (log_energy=False, no size term)
        assert arrays['energy'].sum() == pytest.approx(losses.clamp(z, r_s=r_s, log_energy=False).item(), rel=1e-9)


# ---- scripts end to end -------------------------------------------------------------------------



@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """Tiny betons, a 2-epoch CLAMP run and a 1-epoch CPLearn run (narrow ResNet-18, CPU)."""
    d = tmp_path_factory.mktemp('geo')
    make_idx_dataset(str(d))
    paths = {s: str(d / f'{s}.beton') for s in ('train', 'test')}
    for split, out in paths.items():
        run(['data.py', 'write', '--dataset', 'fashion_mnist', '--root', str(d), '--split', split, '--out', out])
    common = ['train_ssl.py', '--data_path', paths['train'], '--val_path', paths['test'], '--arch', 'resnet18',
              '--width', '8', '--batch_size', '16', '--num_views', '2', '--recipe', 'crop', '--workers', '1',
              '--dtype', 'float32', '--optimizer', 'sgd', '--blr', '0.05', '--warmup_epochs', '0', '--diag_batch',
              '16', '--knn_every', '1', '--knn_k', '5', '--print_freq', '2', '--epochs', '2']
    run(common + ['--output_dir', str(d / 'clamp'), '--loss', 'clamp', '--proj_dims', '32-16'])
    run(common + ['--output_dir', str(d / 'cpl'), '--loss', 'cplearn', '--proj_dims', '32', '--proj_last_bn', '1',
                  '--proj_out_act', 'tanh', '--cplearn_codes', '64', '--epochs', '1', '--knn_every', '0'])
    return {'dir': d, **paths, 'clamp': str(d / 'clamp'), 'cpl': str(d / 'cpl')}


def test_eval_cluster_end_to_end(tiny, tmp_path):
    out = tmp_path / 'c1'
    p = run(['eval_cluster.py', '--weights', tiny['clamp'], '--assign', 'kmeans', '--nearest_subspace', '1',
             '--ns_components', '3', '--kmeans_n_init', '2', '--output_dir', str(out), '--workers', '1'])
    r = json.load(open(out / 'results.json'))
    assert r['split'] == 'train' and r['num_samples'] == 64 and r['augmentation'] == 'un-augmented'
    assert 'kmeans k=2 on train (un-augmented, 64 samples)' in p.stdout
    # two easy classes (bright top vs bottom half): k-means with k = 2 and the subspaces find them
    assert r['kmeans']['clusters_used'] == 2 and r['kmeans']['acc'] >= 90 and r['kmeans']['nmi'] > 0.5
    assert r['nearest_subspace']['pca_acc'] >= 90 and r['nearest_subspace']['num_test'] == 32
    # CPLearn codes + augmented-pass averaging on the test split
    out = tmp_path / 'c2'
    run(['eval_cluster.py', '--weights', tiny['cpl'], '--assign', 'codes', 'kmeans', '--features', 'projector',
         '--split', 'test', '--aug_passes', '2', '--output_dir', str(out), '--workers', '1'])
    r = json.load(open(out / 'results.json'))
    assert r['num_samples'] == 32 and r['augmentation'].startswith('mean of 2 augmented passes')
    assert 1 <= r['codes']['clusters_used'] <= 32 and 0 <= r['codes']['nmi'] <= 1
    # asking a CLAMP run for codes is one clear line, no traceback
    p = run(['eval_cluster.py', '--weights', tiny['clamp'], '--assign', 'codes', '--output_dir', str(tmp_path / 'c3')],
            check=False)
    assert p.returncode != 0 and 'CPLearn checkpoint' in p.stderr and 'Traceback' not in p.stderr


def test_eval_geometry_end_to_end(tiny, tmp_path):
    out = tmp_path / 'g'
    run(['eval_geometry.py', '--weights', tiny['clamp'], tiny['cpl'], '--names', 'CLAMP', 'CPLearn',
         '--num_images', '24', '--num_views', '3', '--gmm_components', '2', '4', '--gmm_repeats', '2',
         '--gmm_samples', '500', '--output_dir', str(out), '--workers', '1'])
    g = json.load(open(out / 'geometry.json'))
    assert [m['name'] for m in g['models']] == ['CLAMP (random init)', 'CLAMP', 'CPLearn']
    assert [m['init'] for m in g['models']] == ['random', 'pretrained', 'pretrained']
    for m in g['models']:
        assert m['num_images'] == 24 and m['num_views'] == 3 and m['num_spectrum_images'] == data.beton_info(tiny['test'])['num_samples']
        assert len(m['backbone']['spectrum']) == 64 and 1 <= m['backbone']['participation_ratio'] <= 64
        assert m['gmm']['components'] == [2, 4] and all(np.isfinite(m['gmm']['mean']))
        pk = m['packing']
        assert 0 <= pk['nc_acc'] <= 1 and 0 <= pk['contacts'] <= 23 and pk['rattler_frac'] + pk['frac_contact'] == pytest.approx(1)
    assert g['models'][0]['projector']['dim'] == 16 and g['models'][2]['projector']['dim'] == 32
    # the random-init reference really is different weights
    assert g['models'][0]['packing'] != g['models'][1]['packing']
    for f in ('spectrum.png', 'gmm_entropy.png', 'packing.png'):
        assert os.path.getsize(out / f) > 10000
    p = run(['eval_geometry.py', '--weights', str(tmp_path / 'nope'), '--output_dir', str(tmp_path / 'g2')], check=False)
    assert p.returncode != 0 and 'does not exist' in p.stderr and 'Traceback' not in p.stderr


def test_plot_log(tiny, tmp_path):
    import plot_log
    out = tmp_path / 'log.png'
    plot_log.main(plot_log.get_args_parser().parse_args([tiny['clamp'], tiny['cpl'], '--output', str(out)]))
    assert os.path.getsize(out) > 10000
    rows = plot_log.read_log(tiny['clamp'])
    assert [r['epoch'] for r in rows] == [0, 1]
    assert plot_log.series(rows, 'test_diag_contacts')[0] == [0, 1]
    assert plot_log.series(plot_log.read_log(tiny['cpl']), 'test_knn_top1') == ([], [])  # kNN off there
    (tmp_path / 'bad.txt').write_text('{"epoch": 0}\nnot json\n')
    with pytest.raises(SystemExit):
        plot_log.read_log(str(tmp_path / 'bad.txt'))


def _fake_mnist(root):
    """Two images per digit, digit d drawn as a bright bar at row 2d (deterministic)."""
    x = np.zeros((20, 28, 28), dtype=np.uint8)
    y = np.tile(np.arange(10), 2)
    for i, d in enumerate(y):
        x[i, 2 * d + 2:2 * d + 5, 4:24] = 255
    write_idx(os.path.join(root, 't10k-images-idx3-ubyte.gz'), x, 2051)
    write_idx(os.path.join(root, 't10k-labels-idx1-ubyte.gz'), y, 2049)


def test_clamp_toy_runs(tmp_path):
    import clamp_mnist
    _fake_mnist(str(tmp_path))
    images = clamp_mnist.load_digits(str(tmp_path), str(tmp_path / 'cache'))
    assert images.shape == (10, 784) and images[3].reshape(28, 28)[9].max() == 1.0  # digit 3: row 2*3+3
    out = tmp_path / 'toy'
    args = clamp_mnist.get_args_parser().parse_args(
        ['--mnist_dir', str(tmp_path), '--steps', '30', '--frames', '3', '--lr', '1e-3', '--num_views', '4',
         '--hidden', '32', '--output_dir', str(out)])
    clamp_mnist.main(args)
    stats = json.load(open(out / 'stats.json'))
    assert [h['step'] for h in stats['history']] == [0, 15, 30]
    # packing improves: fewer contacts / lower energy than at the start
    assert stats['history'][-1]['energy_pp'] < stats['history'][0]['energy_pp']
    assert len(os.listdir(out / 'frames')) == 3
    assert os.path.getsize(out / 'clamp_mnist.gif') > 5000 and os.path.getsize(out / 'clamp_mnist_strip.png') > 5000
    with pytest.raises(SystemExit):
        clamp_mnist.load_digits(str(tmp_path / 'empty'), str(tmp_path / 'cache'))


def test_nmce_toy_runs(tmp_path):
    import nmce_spirals
    x, y = nmce_spirals.make_spirals(100, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(x[:50], -x[50:]) and y.tolist() == [0] * 50 + [1] * 50  # mirror-image arms
    # neighbour views: both views of a pair lie on the pair's own spiral (angle = radius mod 2 pi for
    # spiral 0, + pi for spiral 1), and they differ
    v, yv = nmce_spirals.make_views(200, 'neighbour', sigma=0.0, step=5.0, noise=0.0,
                                    generator=torch.Generator().manual_seed(1))
    v = v.double()
    phase = torch.atan2(v[..., 1], v[..., 0]) - v.norm(dim=-1) - math.pi * yv[:, None]
    assert torch.allclose(torch.cos(phase), torch.ones_like(phase), atol=1e-4)
    assert (v[:, 0] - v[:, 1]).norm(dim=-1).mean() > 0.5
    out = tmp_path / 'sp'
    args = nmce_spirals.get_args_parser().parse_args(
        ['--steps', '20', '--tcr_steps', '10', '--eval_every', '10', '--batch_size', '128', '--hidden', '32', '--num_eval', '256',
         '--output_dir', str(out)])
    nmce_spirals.main(args)
    r = json.load(open(out / 'results.json'))
    assert [h['step'] for h in r['history']] == [0, 10, 20] and 50 <= r['accuracy'] <= 100
    assert os.path.getsize(out / 'nmce_spirals.png') > 10000


# ---- NMCE clustering stages ---------------------------------------------------------------------

def test_pre_feature_is_the_projector_without_its_last_linear():
    import train_cluster
    from models import MLP
    pre, width = train_cluster.pre_feature_of(MLP(512, '4096-128', bn=True))  # the TCR recipe's projector
    assert [type(m).__name__ for m in pre] == ['Linear', 'BatchNorm1d', 'ReLU'] and width == 4096
    assert train_cluster.pre_feature_of(MLP(512, '128')) == (None, None)
    p = train_cluster.gumbel_softmax(torch.zeros(4, 3), tau=1.0)
    assert torch.allclose(p.sum(-1), torch.ones(4)) and (p > 0).all()


def test_cluster_stage_resume_is_exact(tiny, tmp_path):
    """Stopped after epoch 1 and re-run, stage 2 ends with the same weights as an unbroken run: the
    checkpoint carries the RNG state (Gumbel noise), the loader's order follows the epoch."""
    common = ['train_cluster.py', '--weights', tiny['clamp'], '--stage', 'frozen', '--z_dim', '8', '--epochs', '2',
              '--batch_size', '16', '--eval_samples', '16', '--workers', '1', '--dtype', 'float32',
              '--num_clusters', '2']
    run(common + ['--output_dir', str(tmp_path / 'whole')])
    p = run(common + ['--output_dir', str(tmp_path / 'split'), '--stop_at_epoch', '1'])
    assert 'stopping' in p.stdout
    assert torch.load(tmp_path / 'split' / 'checkpoint.pth', weights_only=False)['epoch'] == 1
    run(common + ['--output_dir', str(tmp_path / 'split')])
    a, b = (torch.load(tmp_path / d / 'checkpoint.pth', weights_only=False) for d in ('whole', 'split'))
    assert a['epoch'] == b['epoch'] == 2
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


def test_cluster_stages_end_to_end(tiny, tmp_path):
    s2, s3 = tmp_path / 's2', tmp_path / 's3'
    common = ['--epochs', '1', '--batch_size', '16', '--eval_samples', '0', '--workers', '1', '--dtype', 'float32',
              '--num_clusters', '2']
    run(['train_cluster.py', '--weights', tiny['clamp'], '--stage', 'frozen', '--z_dim', '8',
         '--output_dir', str(s2)] + common)
    log = [json.loads(line) for line in open(s2 / 'log.txt')]
    assert log[0]['epoch'] == 0 and np.isfinite(log[0]['train_loss']) and 'train_cluster_acc' in log[0]
    ck = torch.load(s2 / 'checkpoint.pth', weights_only=False)
    src = torch.load(os.path.join(tiny['clamp'], 'checkpoint.pth'), weights_only=False)['model']
    for k, v in ck['model'].items():  # stage 2 leaves the backbone and the pre-feature exactly as loaded
        if k.startswith('backbone.'):
            assert torch.equal(v, src['model.' + k]), k
        if k.startswith('pre_feature.'):
            assert torch.equal(v, src['model.projector.' + k[len('pre_feature.'):]]), k
    run(['train_cluster.py', '--weights', str(s2), '--stage', 'finetune', '--lr', '0.003',
         '--output_dir', str(s3)] + common)
    moved = torch.load(s3 / 'checkpoint.pth', weights_only=False)['model']
    assert any(not torch.equal(moved[k], ck['model'][k]) for k in moved if k.startswith('backbone.'))
    out = tmp_path / 'ev'
    run(['eval_cluster.py', '--weights', str(s3), '--assign', 'head', '--output_dir', str(out), '--workers', '1'])
    r = json.load(open(out / 'results.json'))
    assert r['num_samples'] == 64 and 1 <= r['head']['clusters_used'] <= 2 and 50 <= r['head']['acc'] <= 100
    p = run(['train_cluster.py', '--weights', tiny['clamp'], '--stage', 'finetune', '--output_dir',
             str(tmp_path / 'bad')] + common, check=False)
    assert p.returncode != 0 and 'starts from a train_cluster.py run' in p.stderr and 'Traceback' not in p.stderr
