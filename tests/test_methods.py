"""Every --loss runs through train_ssl.py for a few steps on a tiny beton (in-process, CPU)."""
import json
import os

import pytest

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
    'byol': ['--pred_dims', '32-16', '--ema', '1', '--proj_bn', '1'],
    'byol_geo': ['--loss', 'byol', '--pred_dims', '32-16', '--ema', '1', '--geometric', '1'],
    'simsiam': ['--pred_dims', '32-16', '--proj_bn', '1'],
    'swav': ['--swav_prototypes', '10', '--freeze_prototypes_epochs', '0.5'],
    'barlow_twins': ['--proj_last_bn', '1'],
    'vicreg': ['--proj_bn', '1'],
    'align_uniform': [],
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


def test_mcr2_is_refused_with_a_pointer(betons, tmp_path, capsys):  # noqa: F811
    args = train_ssl.get_args_parser().parse_args(['--data_path', betons['train'], '--output_dir', str(tmp_path),
                                                   '--loss', 'mcr2'] + TINY)
    with pytest.raises(SystemExit):
        train_ssl.main(args)
    assert 'clustering' in capsys.readouterr().err
