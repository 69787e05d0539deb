"""Every --loss runs through train_ssl.py for a few steps on a tiny beton (in-process, CPU)."""
import json
import os

import pytest
import torch

from test_train import TINY, betons, read_log  # noqa: F401  (betons is a fixture)

import train_ssl

# The architecture pieces each objective needs, as a user would pass them (scripts/ hold the full recipes).
METHODS = {
    'clamp': [],
    'mmcr': ['--proj_bn', '1', '--proj_bias', '0'],
    'mmcr_me': ['--loss', 'mmcr', '--ema', '1', '--ema_final', '0.99'],
    'tcr': ['--proj_bn', '1'],
    'cplearn': ['--proj_dims', '32', '--proj_last_bn', '1', '--proj_out_act', 'tanh', '--cplearn_codes', '64'],
    'simclr': ['--proj_bn', '1'],
    'simclr_geo': ['--loss', 'simclr', '--geometric', '1', '--temperature', '0.05'],
    'mocov3': ['--pred_dims', '32-16', '--ema', '1', '--proj_bn', '1'],
    'byol': ['--pred_dims', '32-16', '--ema', '1', '--proj_bn', '1', '--forward_views', 'separately'],
    'byol_geo': ['--loss', 'byol', '--pred_dims', '32-16', '--ema', '1', '--geometric', '1'],
    'simsiam': ['--pred_dims', '32-16', '--proj_bn', '1'],
    'swav': ['--swav_prototypes', '10', '--freeze_prototypes_epochs', '0.5'],
    'barlow_twins': ['--proj_last_bn', '1'],
    'vicreg': ['--proj_bn', '1'],
    'align_uniform': [],
    # multi-crop (2 large + 2 small views) and SwAV's queue (full after 2 steps, used from then on)
    'swav_multicrop_queue': ['--loss', 'swav', '--swav_prototypes', '10', '--num_small_views', '2',
                             '--small_res', '12', '--swav_queue_size', '32', '--swav_queue_start_epoch', '0',
                             '--sinkhorn_iters', '3'],
    'clamp_multicrop': ['--loss', 'clamp', '--num_small_views', '2', '--small_res', '12'],
}


@pytest.mark.parametrize('name', sorted(METHODS))
def test_every_loss_trains(betons, tmp_path, name):  # noqa: F811
    flags = METHODS[name]
    loss = name if '--loss' not in flags else flags[flags.index('--loss') + 1]
    argv = ['--data_path', betons['train'], '--val_path', betons['test'], '--output_dir', str(tmp_path),
            '--epochs', '1', '--loss', loss] + TINY + ['--knn_every', '0', '--workers', '1'] + flags
    args = train_ssl.get_args_parser().parse_args(argv)
    train_ssl.main(args)
    log = read_log(tmp_path)
    assert len(log) == 1 and log[0]['train_loss'] == log[0]['train_loss']  # finite, not NaN
    assert os.path.exists(tmp_path / 'backbone.pth')
    ck = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    if '--swav_queue_size' in flags:  # the queue is saved per rank: 4 steps x 16 images pushed
        (q,) = ck['swav_queue']
        assert q['count'] == 64 and q['q'].shape == (32, 2, 16) and q['q'].norm(dim=-1).min() > 0.99
    else:
        assert ck['swav_queue'] is None


def test_mcr2_is_refused_with_a_pointer(betons, tmp_path, capsys):  # noqa: F811
    args = train_ssl.get_args_parser().parse_args(['--data_path', betons['train'], '--output_dir', str(tmp_path),
                                                   '--loss', 'mcr2'] + TINY)
    with pytest.raises(SystemExit):
        train_ssl.main(args)
    assert 'clustering' in capsys.readouterr().err


def test_swav_queue_joins_the_sinkhorn_batch():
    """make_loss_fn feeds SwAV the queue's scores once the queue is full and active, then pushes
    the batch's assignment views; an inactive queue only fills."""
    import torch.nn as nn
    import losses
    args = train_ssl.get_args_parser().parse_args(['--data_path', 'x', '--loss', 'swav'])
    g = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.prototypes = nn.Linear(8, 5, bias=False)
    out = {'z': torch.randn(4, 3, 8, generator=g)}
    queue = train_ssl.EmbeddingQueue(8, 2, 8, 'cpu')
    fn = train_ssl.make_loss_fn(args, None, queue)
    plain = train_ssl.make_loss_fn(args, None)(out, None, model)
    other = {'z': torch.randn(4, 3, 8, generator=g)}  # fill with other embeddings
    assert torch.allclose(fn(other, None, model), train_ssl.make_loss_fn(args, None)(other, None, model))
    assert queue.count == 4  # inactive: fills only, the loss is the queue-less one
    queue.active = True
    fn(other, None, model)
    assert queue.count == 8  # full from now on
    zq = queue.q.clone()
    with_queue = fn(out, None, model)
    scores = torch.nn.functional.normalize(out['z'], dim=-1) @ model.prototypes.weight.T
    ref = losses.swav(scores, queue_scores=zq @ model.prototypes.weight.T)
    assert torch.allclose(with_queue, ref) and not torch.allclose(with_queue, plain)
    assert torch.equal(queue.q[:4], torch.nn.functional.normalize(out['z'], dim=-1)[:, :2])
