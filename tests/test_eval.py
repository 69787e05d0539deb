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
             '--val_fraction', '0.25', '--dump_features', '1', '--cache_features', '1'] + data_flags(tiny) + TINY_EVAL)
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


def test_linear_rrc_flip_from_backbone_file_resumes_exactly(tiny, tmp_path):
    flags = ['--weights', os.path.join(tiny['ssl'], 'backbone.pth'), '--epochs', '2', '--lr', '0.1', '0.3',
             '--cache_features', '0', '--head_bn', '1', '--crop_min_scale', '0.3'] + data_flags(tiny) + TINY_EVAL
    out = tmp_path / 'lin'
    run(['train_linear.py', '--output_dir', out] + flags)
    r = results(out)
    assert r['protocol'] == 'rrc-flip' and r['backbone_unchanged'] is True
    assert 'RandomResizedCrop(scale=(0.3, 1)' in r['train_augmentation'] and 'streamed' in r['train_augmentation']
    assert (r['num_train'], r['num_val'], r['num_test']) == (58, 6, 32)  # round(10% of 32) = 3 per class
    # stopped after epoch 0 and resumed: the streamed crops, heads and numbers replay exactly
    cut = tmp_path / 'cut'
    run(['train_linear.py', '--output_dir', cut, '--stop_at_epoch', '1'] + flags)
    p = run(['train_linear.py', '--output_dir', cut] + flags)
    assert 'resumed from' in p.stdout
    log, log2 = read_log(out), read_log(cut)
    assert [row['epoch'] for row in log2] == [0, 1]
    for a, b in zip(log, log2):
        assert [a[k] for k in ('train_loss', 'val_top1', 'test_top1')] == [b[k] for k in ('train_loss', 'val_top1',
                                                                                           'test_top1')]
    assert log[0]['train_loss'] != log[1]['train_loss']
    assert results(cut)['test_top1'] == r['test_top1']


@pytest.fixture(scope='module')
def wide(tmp_path_factory):
    """An imagefolder beton of 16 wide images (16 x 40 px, RGB, stored raw): 8-px white bands at
    both sides, black in between (the centre square is columns 12-27). Classes a (12) and b (4)."""
    from PIL import Image
    d = tmp_path_factory.mktemp('wide')
    img = np.zeros((16, 40, 3), np.uint8)
    img[:, :8] = img[:, 32:] = 255
    for cls, n in (('a', 12), ('b', 4)):
        os.makedirs(d / 'train' / cls)
        for i in range(n):
            Image.fromarray(img).save(d / 'train' / cls / f'{cls}{i}.png')
    path = str(d / 'wide.beton')
    data.write_beton('imagefolder', str(d), 'train', path, num_workers=1)
    return path


def test_rrc_flip_crops_come_from_the_whole_stored_image(wide):
    """The old training source cut its crops from a cache of centre crops, which here never show
    white; the streamed crops must (sometimes), with --crop_min_scale reaching the loader, only
    the given train indices read, and a pure function of (seed, epoch) for resumes."""
    import contextlib
    from argparse import Namespace
    import train_linear
    info = data.beton_info(wide)
    mean, std = data.norm_stats(info, 3)
    white = ((1 - mean) / std)[0].item()
    net = lambda x: x[:, 0].amax((1, 2)).unsqueeze(1)  # noqa: E731  (B, 1): brightest pixel of a crop
    centre = utils.extract_features(net, data.build_eval_loader(wide, 8, 16, workers=1), 'cpu',
                                    contextlib.nullcontext())[0]
    assert centre.shape == (16, 1) and (centre < 0.5 * white).all()  # centre crops: never the side bands
    labels = utils.beton_labels(wide)
    train_idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15])  # 8 of class a, all 4 of b
    seen = {}
    for min_scale in (0.08, 1.0):
        args = Namespace(cache_features=False, data_path=wide, batch_size=4, res=16, channels=3, workers=1,
                         seed=0, crop_min_scale=min_scale)
        batches, steps = train_linear.build_train_source(args, net, (train_idx, labels[train_idx]), 'cpu',
                                                         contextlib.nullcontext(), 0, 1)
        assert steps == 3
        feats, ys = [], []
        for epoch in range(3):
            for f, y in batches(epoch):
                feats.append(f)
                ys.append(y)
        f, y = torch.cat(feats)[:, 0], torch.cat(ys)
        assert torch.bincount(y).tolist() == [24, 12]  # each epoch: the 12 train indices, no other sample
        seen[min_scale] = (f > 0.5 * white).float().mean().item()
        again = torch.cat([f for f, _ in batches(2)])[:, 0]
        assert torch.equal(again, f[-12:])  # epoch 2 replays exactly (a resumed run sees the same crops)
    # scale (0.08, 1): some crops reach the bands, some do not; scale 1 can never fit a box of
    # ratio <= 4/3 into 16 x 40, so every crop is torchvision's fallback, the centred 16 x 21 box
    # (columns 9-29): never white
    assert 0.1 < seen[0.08] < 0.9 and seen[1.0] == 0


def test_subset_file_names_from_the_beton_names_file(wide, tmp_path, capsys):
    import shutil
    import train_semisl
    info = data.beton_info(wide)
    names = open(data.names_path(wide)).read().split()
    assert info['names_file'] == os.path.basename(data.names_path(wide))
    assert names == [f'a/a{i}.png' for i in sorted(range(12), key=str)] + [f'b/b{i}.png' for i in range(4)]
    moved = tmp_path / 'gone'
    shutil.move(os.path.join(info['source']['root'], 'train'), moved)  # no folder to walk: the names file serves
    try:
        (tmp_path / 'list.txt').write_text('b2.png\na10.png\n')
        idx = train_semisl.read_subset_file(str(tmp_path / 'list.txt'), info, utils.beton_labels(wide))
        assert idx.tolist() == [names.index('a/a10.png'), names.index('b/b2.png')]
    finally:
        shutil.move(moved, os.path.join(info['source']['root'], 'train'))
    broken = {**info, 'names_file': 'missing.names.txt'}
    with pytest.raises(SystemExit):
        train_semisl.read_subset_file(str(tmp_path / 'list.txt'), broken, utils.beton_labels(wide))
    assert 'is missing' in capsys.readouterr().err


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


def test_linear_resume_refuses_another_features_file(tmp_path, capsys):
    """--load_features is free to change on a re-run (a moved file), its content is not: epochs of
    two feature sets must not mix in one run."""
    import train_linear
    torch.save({'train': separable_features(10), 'test': separable_features(4, seed=1)}, tmp_path / 'a.pth')
    torch.save({'train': separable_features(10, seed=2), 'test': separable_features(4, seed=3)}, tmp_path / 'b.pth')
    common = ['--output_dir', tmp_path / 'lin', '--epochs', '2', '--lr', '0.1', '--batch_size', '16', '--dtype', 'float32']
    call_main(train_linear, ['--load_features', tmp_path / 'a.pth', '--stop_at_epoch', '1'] + common)
    os.rename(tmp_path / 'a.pth', tmp_path / 'a_moved.pth')
    with pytest.raises(SystemExit):
        call_main(train_linear, ['--load_features', tmp_path / 'b.pth'] + common)
    assert 'other data' in capsys.readouterr().err
    r = call_main(train_linear, ['--load_features', tmp_path / 'a_moved.pth'] + common)  # same content: resumes
    assert r['num_test'] == 16 and 'resumed from' in capsys.readouterr().out


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
    # ... and landed exactly where an uninterrupted run lands (the streamed crops replay epoch 1)
    whole = tmp_path / 'whole'
    run(semisl_cmd(tiny, whole))
    for a, b in zip(read_log(whole), log):
        assert {k: v for k, v in a.items() if 'time' not in k and k != 'elapsed_s'} == \
            {k: v for k, v in b.items() if 'time' not in k and k != 'elapsed_s'}
    sd_whole = torch.load(whole / 'checkpoint.pth', weights_only=False)['model']
    assert all(torch.equal(sd_whole[k], sd[k]) for k in sd)


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


@pytest.mark.parametrize('script,flags', [
    ('eval_knn.py', ['--weights', 'unused', '--load_features']),
    ('train_cluster.py', ['--stage', 'frozen', '--weights']),
])
def test_wrong_file_is_one_clear_line(tmp_path, script, flags):
    """A file that is not what the flag takes (a bare state dict): one line, no traceback, and
    no run folder written."""
    bad = tmp_path / 'sd.pth'
    torch.save(nn.Linear(2, 2).state_dict(), bad)
    out = tmp_path / 'out'
    p = run([script] + flags + [str(bad), '--output_dir', str(out)], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert ('not a features file' if script == 'eval_knn.py' else 'holds no saved run args') in p.stderr
    assert not (out / 'args.json').exists()
