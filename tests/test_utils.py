"""utils.py: optimiser groups, LARS exclusion, schedules, kNN, atomic checkpoints, run folder."""
import argparse
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import utils


def test_param_groups_by_rank_catch_downsample_bn():
    from models import ResNet
    net = ResNet('resnet18', width=8)
    decay, no_decay = utils.param_groups(net, 1e-4)
    assert all(p.ndim > 1 for p in decay['params']) and all(p.ndim <= 1 for p in no_decay['params'])
    ds_bn = net.layer2[0].downsample[1].weight
    assert any(p is ds_bn for p in no_decay['params'])
    assert no_decay['weight_decay'] == 0.0 and no_decay['lars_exclude']


def test_lars_excludes_1d_params_and_adapts_others():
    w = nn.Parameter(torch.full((4, 4), 2.0))
    b = nn.Parameter(torch.full((4,), 2.0))
    opt = utils.LARS([{'params': [w], 'weight_decay': 0.5},
                      {'params': [b], 'weight_decay': 0.0, 'lars_exclude': True}], lr=1.0, momentum=0.0, eta=0.001)
    w.grad = torch.ones_like(w)
    b.grad = torch.ones_like(b)
    opt.step()
    # excluded: plain SGD step of lr * grad, no decay
    torch.testing.assert_close(b.detach(), torch.full((4,), 1.0))
    # adapted: update = eta * ||w|| / ||g + wd w|| * (g + wd w)
    g = torch.ones(4, 4) + 0.5 * 2.0
    q = 0.001 * torch.full((4, 4), 2.0).norm() / g.norm()
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 2.0) - q * g)


@pytest.mark.parametrize('grad_scale', [1.0, 1e-4])
def test_lars_clip_is_solo_learns(grad_scale):
    """clip=True: each tensor steps by min(eta ||w|| / (||g|| + wd ||w|| + 1e-8), lr) * (g + wd w)
    (solo-learn's clip_lars_lr): a large gradient takes the trust-ratio step, not lr times it; a tiny
    one is capped at the plain SGD step."""
    torch.manual_seed(0)
    w0, g0 = torch.randn(8, 5), grad_scale * torch.randn(8, 5)
    lr, eta, wd = 0.4, 0.02, 1e-4
    w = nn.Parameter(w0.clone())
    opt = utils.LARS([{'params': [w], 'weight_decay': wd}], lr=lr, momentum=0.0, eta=eta, clip=True)
    w.grad = g0.clone()
    opt.step()
    ratio = eta * w0.norm() / (g0.norm() + wd * w0.norm() + 1e-8)
    step = min(ratio.item(), lr)
    assert (step == lr) == (grad_scale < 1)  # both branches of the clip are exercised
    torch.testing.assert_close(w.detach(), w0 - step * (g0 + wd * w0))


def test_cosine_lr_warmup_and_end():
    lrs = [utils.cosine_lr(s, 100, 10, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert utils.cosine_momentum(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert utils.cosine_momentum(100, 100, 0.99, 1.0) == pytest.approx(1.0)


def test_knn_hand_computed():
    # bank: class 0 at +x, class 1 at +y; query near +x but with k=3 and T large, votes by count
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    by = torch.tensor([0, 0, 1, 1, 1])
    q = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    qy = torch.tensor([0, 1])
    # k=1: nearest neighbour decides -> both right
    assert utils.knn_classify(bank, by, q, qy, ks=(1,), T=0.07)[1][0] == 100.0
    # k=5 uniform: class 1 has 3 of 5 votes for both queries -> query 0 wrong -> 50%
    assert utils.knn_classify(bank, by, q, qy, ks=(5,), weighting='uniform')[5][0] == 50.0
    # k=5 with sharp exp weights: the two close class-0 neighbours outweigh -> 100%
    assert utils.knn_classify(bank, by, q, qy, ks=(5,), T=0.01)[5][0] == 100.0
    # k larger than the bank is clipped, not an error
    assert utils.knn_classify(bank, by, q, qy, ks=(50,), weighting='uniform')[50][0] == 50.0


def test_knn_euclidean_at_feature_scale_and_top5_with_small_k():
    """Three well separated classes of norm ~24 (pooled ResNet features): every euclidean
    weighting classifies them all (exp(-d/0.07) underflowed to 0 for every neighbour and voted
    class 0: 33 %). With k = 1 only the neighbour's class is a top-5 guess (DINO's min(5, k))."""
    g = torch.Generator().manual_seed(0)
    centres = 24 * torch.eye(3, 16)
    y = torch.arange(3).repeat_interleave(20)
    f = centres[y] + 3 * torch.randn(60, 16, generator=g)
    bank, by, q, qy = f[::2], y[::2], f[1::2], y[1::2]
    assert torch.cdist(q, bank).min(1).values.min() > 7  # the regime the old code failed in
    for w in ('exp', 'inverse', 'uniform'):
        r = utils.knn_classify(bank, by, q, qy, ks=(10,), T=0.07, metric='euclidean', weighting=w)
        assert r[10][0] == 100.0, w
    with pytest.raises(ValueError):
        utils.knn_classify(bank, by, q, qy, metric='cosine', weighting='inverse')
    rnd = torch.randn(200, 8, generator=g)
    ry = torch.randint(0, 10, (200,), generator=g)
    top1, top5 = utils.knn_classify(rnd[:100], ry[:100], rnd[100:], ry[100:], ks=(1,))[1]
    assert top5 == top1  # one neighbour, one guess (the 4 lowest unvoted classes counted: ~+40 points)


def test_knn_ties_are_deterministic():
    # two bank points at equal similarity with different labels: a 1-1 vote tie goes to the lower
    # class index, whatever the bank order
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[1.0, 0.0]])
    assert utils.knn_classify(bank, torch.tensor([1, 0, 1]), q, torch.tensor([0]), ks=(2,), weighting='uniform')[2][0] == 100.0
    # the 3rd neighbour (orthogonal, label 1) breaks the tie at k=3
    assert utils.knn_classify(bank, torch.tensor([1, 0, 1]), q, torch.tensor([1]), ks=(3,), weighting='uniform')[3][0] == 100.0
    assert utils.knn_classify(bank, torch.tensor([1, 0]), q, torch.tensor([0]), ks=(2,), weighting='uniform')[2][0] == 100.0


def test_atomic_save_survives_failed_write(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.pth')
    utils.save_on_master({'epoch': 1}, path)
    def boom(obj, f):
        f.write(b'partial')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', boom)
    with pytest.raises(SystemExit):
        utils.save_on_master({'epoch': 2}, path)
    monkeypatch.undo()
    assert torch.load(path)['epoch'] == 1 and not os.path.exists(path + '.tmp')


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    p = tmp_path / 'checkpoint.pth'
    p.write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit):
        utils.load_checkpoint_file(str(p))
    assert 'corrupt' in capsys.readouterr().err


def test_output_dir_refuses_other_hyperparameters(tmp_path, capsys):
    a = argparse.Namespace(output_dir=str(tmp_path), force_resume=False, blr=0.1, workers=2)
    utils.prepare_output_dir(a)
    rec = json.load(open(tmp_path / 'args.json'))
    assert rec['args']['blr'] == 0.1 and 'git_sha' in rec and 'command' in rec
    utils.prepare_output_dir(argparse.Namespace(**{**vars(a), 'workers': 8}))  # resume-free flag: fine
    with pytest.raises(SystemExit):
        utils.prepare_output_dir(argparse.Namespace(**{**vars(a), 'blr': 0.2}))
    assert 'different hyper-parameters' in capsys.readouterr().err
    utils.prepare_output_dir(argparse.Namespace(**{**vars(a), 'blr': 0.2, 'force_resume': True}))
