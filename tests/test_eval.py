"""The evaluation stages: train_linear.py, train_semisl.py and eval_knn.py end to end on a tiny
beton with a narrow ResNet (CPU), and the pieces whose answers can be worked out by hand: a
linearly separable feature cache, hand-made kNN features, seeded subsets and splits."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import utils
from test_train import make_idx_dataset, read_log, run, ssl_cmd

TINY_EVAL = ['--workers', '1', '--dtype', 'float32', '--batch_size', '16', '--print_freq', '2']


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """Two-class tiny betons (64 train / 32 test) and a 1-epoch CLAMP pretraining run folder."""
    d = tmp_path_factory.mktemp('tiny_eval')
    make_idx_dataset(str(d))
    out = {}
    for split in ('train', 'test'):  # in-process: saves an interpreter start-up each
        out[split] = str(d / f'{split}.beton')
        data.write_beton('fashion_mnist', str(d), split, out[split], num_workers=1)
    # width 8: at width 4 the channels_last conv backward of this CPU torch build corrupts the heap
    run(ssl_cmd(out, d / 'ssl', epochs=1, extra=['--width', '8', '--knn_every', '0', '--diag_batch', '0']))
    out['ssl'] = str(d / 'ssl')
    return out


def data_flags(tiny):
    return ['--data_path', tiny['train'], '--val_path', tiny['test']]


def results(out_dir):
    with open(os.path.join(out_dir, 'results.json')) as f:
        return json.load(f)


def call_main(module, argv):
    """Run a stage's main() in this process (for runs that read no beton: no ffcv pipeline to
    compile, and no interpreter start-up)."""
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


# ---- train_linear.py ---------------------------------------------------------------------------

def test_linear_cached_end_to_end_then_resume_on_its_features(tiny, tmp_path):
    import train_linear
    out = tmp_path / 'lin'
    p = run(['train_linear.py', '--weights', tiny['ssl'], '--output_dir', out, '--epochs', '3', '--lr', '0.1', '1.0',
             '--val_fraction', '0.25', '--dump_features', '1'] + data_flags(tiny) + TINY_EVAL)
    r = results(out)
    assert r['protocol'] == 'cached-centre-crop' and r['backbone_unchanged'] is True
    assert (r['num_train'], r['num_val'], r['num_test']) == (48, 16, 32) and '32 test samples' in p.stdout
    assert r['selected_by'] == 'val_top1' and r['lr'] in (0.1, 1.0) and 0 <= r['epoch'] < 3
    papers = r['best_test_epoch_lr_(papers_habit)']
    assert papers['test_top1'] >= r['test_top1'] and 'looking at the test set' in papers['note']
    log = read_log(out)
    assert [row['epoch'] for row in log] == [0, 1, 2] and set(log[0]['test_top1']) == {'0.1', '1'}
    assert log[r['epoch']]['test_top1'][f"{r['lr']:g}"] == r['test_top1']
    val = [int(v) for v in open(out / 'val_indices.txt').read().split()]
    labels = utils.beton_labels(tiny['train'])
    assert len(val) == 16 and torch.bincount(labels[val]).tolist() == [8, 8]  # stratified
    # the dumped features replay the same training in-process: stop after one epoch, resume, and
    # land on exactly the numbers of the uninterrupted run
    replay = tmp_path / 'replay'
    flags = ['--load_features', out / 'features.pth', '--output_dir', replay, '--epochs', '3', '--lr', '0.1', '1.0',
             '--val_fraction', '0.25'] + TINY_EVAL
    assert call_main(train_linear, flags + ['--stop_at_epoch', '1']) is None
    assert torch.load(replay / 'checkpoint.pth', weights_only=False)['epoch'] == 1
    r2 = call_main(train_linear, flags)
    log2 = read_log(replay)
    assert [row['epoch'] for row in log2] == [0, 1, 2]
    for a, b in zip(log, log2):
        assert a['test_top1'] == b['test_top1'] and a['val_top1'] == b['val_top1']
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5)
    assert (r2['lr'], r2['epoch'], r2['test_top1']) == (r['lr'], r['epoch'], r['test_top1'])


def test_linear_rrc_flip_from_backbone_file(tiny, tmp_path):
    out = tmp_path / 'lin'
    run(['train_linear.py', '--weights', os.path.join(tiny['ssl'], 'backbone.pth'), '--output_dir', out,
         '--epochs', '2', '--lr', '0.1', '0.3', '--cache_features', '0', '--head_bn', '1']
        + data_flags(tiny) + TINY_EVAL)
    r = results(out)
    assert r['protocol'] == 'rrc-flip' and r['backbone_unchanged'] is True
    assert (r['num_train'], r['num_val'], r['num_test']) == (58, 6, 32)  # round(10% of 32) = 3 per class
    assert len(read_log(out)) == 2


def separable_features(n_per_class, num_classes=4, dim=8, seed=0):
    """Class c: coordinate c in [3, 5], every other coordinate in [-1, 1]: argmax separates the
    classes with a margin of 2, so a linear head can (and should) reach 100%."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = torch.rand(len(y), dim, generator=g) * 2 - 1
    x[torch.arange(len(y)), y] += 4
    return x, y


def test_linear_head_reaches_100_on_separable_cache(tmp_path):
    import train_linear
    torch.save({'train': separable_features(60), 'test': separable_features(25, seed=1)}, tmp_path / 'f.pth')
    r = call_main(train_linear, ['--load_features', tmp_path / 'f.pth', '--output_dir', tmp_path / 'lin',
                                 '--epochs', '15', '--lr', '0.1', '1.0', '--batch_size', '32', '--dtype', 'float32'])
    assert r['test_top1'] == 100.0 and r['val_top1'] == 100.0 and r['num_test'] == 100 and r['num_val'] == 24
    assert r['protocol'] == 'cached-centre-crop' and r['backbone_unchanged'] is None


def test_linear_refuses_lr_grid_without_validation(tmp_path, capsys):
    import train_linear
    torch.save({'train': separable_features(4), 'test': separable_features(2)}, tmp_path / 'f.pth')
    with pytest.raises(SystemExit):
        call_main(train_linear, ['--load_features', tmp_path / 'f.pth', '--output_dir', tmp_path / 'lin',
                                 '--val_fraction', '0', '--lr', '0.1', '1.0'])
    assert 'needs a validation split' in capsys.readouterr().err


def test_freeze_checks_catch_a_moving_backbone():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    snap = utils.snapshot_state(net)
    utils.assert_unchanged(net, snap)
    net[1].running_mean += 1e-3  # a buffer counts: BN statistics must not move either
    with pytest.raises(SystemExit) as e:
        utils.assert_unchanged(net, snap)
    assert e.value.code == 5
    head = nn.Linear(3, 2)
    opt = torch.optim.SGD(list(head.parameters()) + [net[0].weight], lr=0.1)
    with pytest.raises(RuntimeError, match='outside the head'):
        utils.assert_trains_only(opt, head)


# ---- train_semisl.py ---------------------------------------------------------------------------

def semisl_cmd(tiny, out, extra=()):
    return ['train_semisl.py', '--weights', tiny['ssl'], '--output_dir', out, '--epochs', '2',
            '--train_percent', '10'] + data_flags(tiny) + TINY_EVAL + list(extra)


def test_semisl_end_to_end_with_resume(tiny, tmp_path):
    out = tmp_path / 'semi'
    run(semisl_cmd(tiny, out, ['--stop_at_epoch', '1']))
    ck = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert ck['epoch'] == 1 and not os.path.exists(out / 'results.json')
    p = run(semisl_cmd(tiny, out))
    assert 'resumed from' in p.stdout and 'epoch 1' in p.stdout
    log = read_log(out)
    assert [row['epoch'] for row in log] == [0, 1] and 'test_top1' in log[1] and 'test_top1' not in log[0]
    r = results(out)
    assert r['num_labelled'] == 6 and r['num_test'] == log[1]['num_test'] == 32 and '32 test samples' in p.stdout
    assert r['test_top1'] == log[1]['test_top1'] and 0 <= r['test_top1'] <= r['test_top5'] == 100.0  # 2 classes
    assert 'backbone finetune' in r['protocol'] and r['lr_backbone'] == pytest.approx(0.05 * r['lr_head'])
    idx = [int(v) for v in open(out / 'subset_indices.txt').read().split()]
    assert torch.bincount(utils.beton_labels(tiny['train'])[idx]).tolist() == [3, 3]  # floor(10% of 32) per class
    # the resumed run moved the backbone (fine-tuning) from where the checkpoint left it
    sd = torch.load(out / 'checkpoint.pth', weights_only=False)['model']
    assert ck['epoch'] == 1 and not torch.equal(sd['backbone.conv1.weight'], ck['model']['backbone.conv1.weight'])


def test_semisl_frozen_backbone_on_a_subset_file(tiny, tmp_path):
    (tmp_path / 'subset.txt').write_text('3\n0\n1\n10\n')
    run(semisl_cmd(tiny, tmp_path / 's', ['--subset_file', tmp_path / 'subset.txt', '--backbone_weights', 'freeze']))
    r = results(tmp_path / 's')
    assert r['num_labelled'] == 4 and r['backbone_unchanged'] is True and r['subset'].startswith('file')
    assert open(tmp_path / 's' / 'subset_indices.txt').read() == '0\n1\n3\n10\n'


def test_balanced_subset_and_stratified_split():
    labels = torch.tensor([0] * 100 + [1] * 30 + [2] * 7)
    a = utils.balanced_subset(labels, 10, seed=0)
    assert torch.bincount(labels[a]).tolist() == [10, 3, 1]  # floor(10% of n_c), at least one
    assert torch.equal(a, utils.balanced_subset(labels, 10, seed=0))
    assert not torch.equal(a, utils.balanced_subset(labels, 10, seed=1))
    assert torch.bincount(labels[utils.balanced_subset(labels, 29, 0)]).tolist() == [29, 8, 2]  # no 28.999
    assert len(utils.balanced_subset(labels, 100, 0)) == len(labels)
    train, val = utils.stratified_split(labels, 0.1, seed=3)
    assert torch.bincount(labels[val]).tolist() == [10, 3, 1]
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(len(labels)))
    assert torch.equal(val, utils.stratified_split(labels, 0.1, seed=3)[1])


def test_subset_file_names_map_to_beton_order(tmp_path, capsys):
    from PIL import Image
    import train_semisl
    for cls in ('a', 'b'):
        os.makedirs(tmp_path / 'train' / cls)
        for i in range(3):
            Image.new('RGB', (4, 4)).save(tmp_path / 'train' / cls / f'{cls}{i}.png')
    info = {'path': 'x.beton', 'source': {'dataset': 'imagefolder', 'root': str(tmp_path), 'split': 'train',
                                          'limit': None, 'source_samples': 6}}
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    (tmp_path / 'list.txt').write_text('b1.png\na0.png\n\n')
    assert train_semisl.read_subset_file(str(tmp_path / 'list.txt'), info, labels).tolist() == [0, 4]
    (tmp_path / 'bad.txt').write_text('b1.png\nzz.png\n')
    with pytest.raises(SystemExit):
        train_semisl.read_subset_file(str(tmp_path / 'bad.txt'), info, labels)
    assert '1 names are not in the beton' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a beton whose labels do not match the folder's
        train_semisl.read_subset_file(str(tmp_path / 'list.txt'), info, torch.tensor([1, 0, 0, 0, 0, 0]))
    assert 'disagree on the labels' in capsys.readouterr().err


def test_random_resized_crop_flip():
    x = torch.randn(5, 2, 8, 8)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    same = utils.random_resized_crop_flip(x, g(), scale=(1, 1), ratio=(1, 1), flip_prob=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)  # the whole image, pixel-aligned
    flipped = utils.random_resized_crop_flip(x, g(), scale=(1, 1), ratio=(1, 1), flip_prob=1.0)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)
    a, b = (utils.random_resized_crop_flip(x, g(), scale=(0.08, 1)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.allclose(a, x)
    assert a.min() >= x.min() - 1e-5 and a.max() <= x.max() + 1e-5  # bilinear: no overshoot


# ---- eval_knn.py -------------------------------------------------------------------------------

def test_knn_projector_euclidean_and_feature_round_trip(tiny, tmp_path):
    import eval_knn
    p = run(['eval_knn.py', '--weights', tiny['ssl'], '--features', 'projector', '--metric', 'euclidean',
             '--ks', '1', '5', '--output_dir', tmp_path / 'k1', '--workers', '1'] + data_flags(tiny))
    a = results(tmp_path / 'k1')
    assert a['features'] == 'projector' and a['metric'] == 'euclidean' and (a['num_train'], a['num_test']) == (64, 32)
    assert '32 test samples' in p.stdout
    feats = torch.load(tmp_path / 'k1' / 'features.pth', weights_only=False)
    assert feats['train'][0].shape == (64, 16)  # the projector's output width (proj_dims 32-16)
    # the dumped features give the same answer in-process, and match the kNN computed by hand here
    b = call_main(eval_knn, ['--weights', 'unused', '--load_features', tmp_path / 'k1' / 'features.pth',
                             '--metric', 'euclidean', '--ks', '1', '5', '--output_dir', tmp_path / 'k2'])
    keys = ('top1_k1', 'top1_k5', 'top5_k5')
    assert {k: b[k] for k in keys} == {k: a[k] for k in keys}
    (tr_f, tr_y), (te_f, te_y) = feats['train'], feats['test']
    nearest = tr_y[torch.cdist(te_f, tr_f).argmin(1)]
    assert a['top1_k1'] == pytest.approx(100.0 * (nearest == te_y).float().mean().item())


def test_knn_on_hand_made_features(tmp_path):
    """Bank (cosine): b0 (1,0) class 0; b1 (1,1), b2 (1,-1) class 1; b3 (-1,1), b4 (0,-1) class 2.
    Queries: q0 = (1,0) label 0; q1 = (0,1) label 2; q2 = (0,1) label 1. q1/q2 are equally close to
    b1 (class 1) and b3 (class 2): the vote tie goes to the lower class, 1. Worked out by hand:
                                       exp T=0.07        uniform
      k=2  (tie inside the top-k)      q0 ok q1 x q2 ok  q0 ok (1:1 tie -> 0), q1 x, q2 ok
      k=3  (larger than class 0)       q0 ok q1 x q2 ok  q0 x (2 votes for 1), q1 x, q2 x (1:1:1 -> 0)
      k=10 (more than the 5 in bank)   q0 ok q1 x q2 ok  q0 x (1:2:2 -> 1), q1 x, q2 ok
    (exp: q0's own class-0 neighbour at similarity 1 outweighs two class-1 ones at 0.71.)"""
    import eval_knn
    bank = torch.tensor([[1., 0.], [1., 1.], [1., -1.], [-1., 1.], [0., -1.]])
    queries = torch.tensor([[1., 0.], [0., 1.], [0., 1.]])
    torch.save({'train': (bank, torch.tensor([0, 1, 1, 2, 2])), 'test': (queries, torch.tensor([0, 2, 1]))},
               tmp_path / 'f.pth')
    expect = {'exp': {2: 200 / 3, 3: 200 / 3, 10: 200 / 3}, 'uniform': {2: 200 / 3, 3: 0.0, 10: 100 / 3}}
    for weighting, table in expect.items():
        r = call_main(eval_knn, ['--weights', 'unused', '--load_features', tmp_path / 'f.pth', '--ks', '2', '3', '10',
                                 '--weighting', weighting, '--temperature', '0.07',
                                 '--output_dir', tmp_path / weighting])
        assert {k: r[f'top1_k{k}'] for k in table} == pytest.approx(table), weighting
        assert all(r[f'top5_k{k}'] == 100.0 for k in table) and r['num_test'] == 3
