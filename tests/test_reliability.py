"""Reliability: a run SIGKILLed at random moments (including during checkpoint writes) and
restarted with the same command, or crashed once under torchrun --max-restarts, ends
bit-identical to an uninterrupted run; betons that do not fit the flags and checkpoints that do
not fit the network they declare are one clear line; --nan_policy skip drops a step exactly."""
import argparse
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_train import ENV, betons, read_log, run, ssl_cmd  # noqa: F401  (betons is a fixture)

FLAGS = ['--knn_every', '0', '--diag_batch', '0', '--ckpt_every_steps', '1']


def final_weights(out):
    return torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)['model']


def assert_same_weights(a, b, why):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f'{k} differs {why}'


@pytest.fixture(scope='module')
def reference(betons, tmp_path_factory):  # noqa: F811
    """Final weights of the uninterrupted 3-epoch (12-step) run every restart test must match."""
    ref = tmp_path_factory.mktemp('ref') / 'ref'
    run(ssl_cmd(betons, ref, epochs=3, extra=FLAGS))
    return final_weights(ref)


def test_sigkill_loop_resumes_bit_identical(betons, reference, tmp_path):  # noqa: F811
    out = tmp_path / 'killed'
    cmd = [sys.executable] + ssl_cmd(betons, out, epochs=3, extra=FLAGS)  # 12 steps
    rng = random.Random(0)
    kills, ckpt = 0, out / 'checkpoint.pth'
    while True:
        p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 5:
            # wait for this process to write (or start writing) one more checkpoint, then kill it a
            # random moment later: sometimes mid-step, sometimes inside torch.save
            before = os.path.getmtime(ckpt) if ckpt.exists() else 0
            while p.poll() is None and not (ckpt.exists() and os.path.getmtime(ckpt) > before) \
                    and not (out / 'checkpoint.pth.tmp').exists():
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.05))  # a step takes ~0.1 s: land inside the next one or two
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
                continue
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
        break
    assert kills >= 3, f'only {kills} kills landed'
    print(f'{kills} kills')
    assert_same_weights(reference, final_weights(out), f'after {kills} kills')


# ---- torchrun --max-restarts -------------------------------------------------------------------

def test_torchrun_max_restarts_recovers_bit_identical(betons, reference, tmp_path):  # noqa: F811
    """The worker SIGKILLs itself mid-step 5 (epoch 1, batch 1) on its first attempt only; torchrun
    restarts it, it resumes from checkpoint.pth by itself and ends as the uninterrupted run."""
    out = tmp_path / 'elastic'
    p = run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1', '--max-restarts', '3']
            + ssl_cmd(betons, out, epochs=3, extra=FLAGS + ['--crash_at_step', '5']))
    assert 'resumed from' in p.stdout and 'epoch 1, batch 1' in p.stdout, p.stdout[-2000:]  # it did crash
    assert p.stdout.count('resumed from') == 1  # once: the restarted worker does not crash again
    assert_same_weights(reference, final_weights(out), 'after a torchrun restart')


# ---- betons and checkpoints that do not fit the flags ------------------------------------------

WRITER = r'''
import sys
sys.path.insert(0, sys.argv[1])
import os
import cv2, numpy as np, torch
import data, train_ssl
from models import build_backbone
d = sys.argv[2]
data.write_beton('fashion_mnist', d, 'train', os.path.join(d, 'gray16.beton'), max_res=16, num_workers=1)
rng = np.random.default_rng(0)
for c in ('a', 'b'):
    os.makedirs(os.path.join(d, 'rgb', 'train', c))
    for i in range(4):
        cv2.imwrite(os.path.join(d, 'rgb', 'train', c, f'{i}.png'), rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
data.write_beton('imagefolder', os.path.join(d, 'rgb'), 'train', os.path.join(d, 'rgb.beton'), num_workers=1)
# backbone.pth files as train_ssl exports them (random weights: every run below is refused before
# it reads an image); the *_decl ones declare another network than their weights, as a file
# edited or assembled by hand would
a = vars(train_ssl.get_args_parser().parse_args(['--data_path', 'x.beton', '--arch', 'resnet18', '--width', '4']))
a.update(res=28, channels=1, in_chans=1, cifar_stem=True)
sd = build_backbone('resnet18', True, 4, 1).state_dict()
for name, declared in (('net28', {}), ('r50_decl', {'arch': 'resnet50'}), ('w8_decl', {'width': 8})):
    torch.save({'backbone': sd, 'args': {**a, **declared}}, os.path.join(d, name + '.pth'))
'''


@pytest.fixture(scope='module')
def misfits(tmp_path_factory):
    """A 16 px gray beton, a 3-channel beton, a 1-channel 28 px network and two files whose saved
    args declare another network than their weights, written in one subprocess."""
    from test_train import make_idx_dataset
    d = tmp_path_factory.mktemp('misfits')
    make_idx_dataset(str(d), n_train=16, n_test=16)
    r = subprocess.run([sys.executable, '-c', WRITER, ROOT, str(d)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {k: str(d / f) for k, f in (('gray16', 'gray16.beton'), ('rgb', 'rgb.beton'), ('net28', 'net28.pth'),
                                       ('r50_decl', 'r50_decl.pth'), ('w8_decl', 'w8_decl.pth'))}


CASES = {  # stage, weights, betons (train, val), extra flags, the message
    'ssl_res_above_stored': ('train_ssl.py', None, None, ['--res', '32'],
                             '--res 32 is larger than the images stored in'),
    'knn_trained_res_above_stored': ('eval_knn.py', 'net28', ('gray16', 'gray16'), [],
                                     'the resolution the network was trained at, 28 is larger than the images '
                                     'stored in'),
    'knn_rgb_beton_gray_net': ('eval_knn.py', 'net28', ('rgb', 'rgb'), [],
                               'stores 3-channel images but the network takes 1-channel input; pass --channels 1'),
    'semisl_rgb_beton_gray_net': ('train_semisl.py', 'net28', ('rgb', 'rgb'), ['--train_percent', '50'],
                                  'stores 3-channel images but the network takes 1-channel input'),
    'linear_channels_vs_net': ('train_linear.py', 'net28', None, ['--channels', '3'],
                               '--channels 3 but the network takes 1-channel input'),
    'knn_weights_of_another_arch': ('eval_knn.py', 'r50_decl', None, [],
                                    'holds the weights of a resnet18, width 4, 1-channel input, CIFAR stem, but '
                                    'its saved args declare a resnet50, width 4'),
    'linear_weights_of_another_width': ('train_linear.py', 'w8_decl', None, [],
                                        'holds the weights of a resnet18, width 4, 1-channel input, CIFAR stem, '
                                        'but its saved args declare a resnet18, width 8'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_misfit_is_one_clear_line(betons, misfits, tmp_path, case):  # noqa: F811
    stage, weights, paths, extra, message = CASES[case]
    out = tmp_path / 'out'
    if stage == 'train_ssl.py':
        cmd = ssl_cmd(betons, out, epochs=1, extra=['--knn_every', '0'] + extra)
    else:
        train, val = (misfits[paths[0]], misfits[paths[1]]) if paths else (betons['train'], betons['test'])
        cmd = [stage, '--weights', misfits[weights], '--data_path', train, '--val_path', val,
               '--output_dir', str(out), '--workers', '1'] + extra
    p = run(cmd, check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
    assert p.returncode == 2 and len(errors) == 1 and message in errors[0], p.stderr[-2000:]
    assert 'Traceback' not in p.stderr
    assert not out.exists()  # refused before the run folder is made


def test_beton_input_rules(capsys):
    """utils.check_beton_input / eval_input, every rule and its opt-in, in process."""
    import utils

    def refused(fn, *a, **kw):
        with pytest.raises(SystemExit):
            fn(*a, **kw)
        return capsys.readouterr().err

    gray = {'path': 'g.beton', 'channels': 1, 'resolution': [28, 28]}
    rgb = {**gray, 'path': 'c.beton', 'channels': 3}
    small = {**gray, 'path': 's.beton', 'resolution': [16, 12]}
    check = utils.check_beton_input
    check(gray, 28, 1, 1)
    check(gray, 16, 1, 1)  # downsampling is what a crop does anyway
    assert '--res 32 is larger than the images stored in g.beton (at most 28 px)' in refused(check, gray, 32, 1, 1)
    check(gray, 32, 1, 1, allow_upsample=True)
    assert 'pass --channels 3 to accept them replicated' in refused(check, gray, 28, 3, 3)
    check(gray, 28, 3, 3, channels_flag=3)  # asked for: gray replicated to 3 planes
    assert 'pass --channels 1 to accept them converted to luma' in refused(check, rgb, 28, 1, 1)
    check(rgb, 28, 1, 1, channels_flag=1)
    assert '--channels 3 but the network takes 1-channel input' in refused(check, gray, 28, 3, 1, channels_flag=3)

    net = argparse.Namespace(res=28, channels=1, in_chans=1)

    def flags(**kw):
        return argparse.Namespace(**{'res': None, 'channels': None, 'allow_upsample': False, **kw})
    assert utils.eval_input(flags(), net, [gray]) == (28, 1)
    assert 'the resolution the network was trained at, 28 is larger' in refused(utils.eval_input, flags(), net,
                                                                                [gray, small])
    assert utils.eval_input(flags(allow_upsample=True), net, [small]) == (28, 1)
    assert utils.eval_input(flags(res=16), net, [gray, small]) == (16, 1)
    assert utils.eval_input(flags(channels=1), net, [rgb]) == (28, 1)
    assert 'stores 3-channel images' in refused(utils.eval_input, flags(), net, [rgb])


def test_describe_resnet_names_the_weights():
    import utils
    from models import build_backbone
    assert utils.describe_resnet(build_backbone('resnet50', False, 8, 3).state_dict()) == \
        'resnet50, width 8, 3-channel input, ImageNet stem'
    assert utils.describe_resnet(build_backbone('resnet34', True, 4, 1).state_dict()) == \
        'resnet34, width 4, 1-channel input, CIFAR stem'
    assert utils.describe_resnet({'fc.weight': torch.zeros(2, 2)}) is None


def test_load_pretrained_names_what_is_wrong(tmp_path, capsys):
    """Files an evaluation stage cannot rebuild, in process: one line each, naming the problem."""
    import utils
    from models import build_model
    a = dict(arch='resnet18', cifar_stem=True, width=4, in_chans=1, res=28, channels=1, proj_dims='32-16',
             proj_bn=False, proj_bias=True, proj_last_bn=False, proj_out_act='none', pred_dims='')
    model = build_model(argparse.Namespace(**a))
    sd = {'model.' + k: v for k, v in model.state_dict().items()}  # as train_ssl's checkpoint['model']
    files = {
        'bare': (model.backbone.state_dict(), 'backbone',
                 "no 'args' entry); it looks like a bare state dict of a resnet18, width 4, 1-channel input"),
        'unknown_arch': ({'backbone': model.backbone.state_dict(), 'args': {**a, 'arch': 'vit_small'}}, 'backbone',
                         "declares --arch 'vit_small', which this code cannot build"),
        'old_args': ({'backbone': model.backbone.state_dict(), 'args': {k: v for k, v in a.items() if k != 'in_chans'}},
                     'backbone', 'does not record in_chans in its args'),
        'ckpt_other_stem': ({'model': sd, 'args': {**a, 'cifar_stem': False}}, 'projector',
                            'holds the weights of a resnet18, width 4, 1-channel input, CIFAR stem, but its saved '
                            'args declare a resnet18, width 4, 1-channel input, ImageNet stem'),
        'ckpt_other_projector': ({'model': sd, 'args': {**a, 'proj_dims': '64-16'}}, 'projector',
                                 'does not match the network its saved args declare (3 of another shape, e.g. '
                                 '1.0.weight is [32, 32] in the file and [64, 32] in the network)'),
    }
    for name, (obj, part, message) in files.items():
        torch.save(obj, tmp_path / f'{name}.pth')
        with pytest.raises(SystemExit) as e:
            utils.load_pretrained(str(tmp_path / f'{name}.pth'), part)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count('\n') == 1, (name, err)
    net, _ = utils.load_pretrained(str(tmp_path / 'ckpt_other_stem.pth'), 'projector', load_weights=False)
    assert net[0].conv1.kernel_size == (7, 7)  # --init random builds what the args declare, no weights read


# ---- --nan_policy skip ---------------------------------------------------------------------------

NAN_FLAGS = ['--knn_every', '0', '--diag_batch', '0']


def test_nan_skip_drops_the_step_exactly(betons, tmp_path):  # noqa: F811
    """A skipped step leaves model, BN statistics, probe, optimizer and scaler exactly as they were:
    stopping after step 1 skipped equals stopping after step 0. The count survives a resume."""
    one = tmp_path / 'one'
    p = run(ssl_cmd(betons, one, epochs=1, extra=NAN_FLAGS + ['--signal_at_step', '0']), check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    skip = tmp_path / 'skip'
    cmd = ssl_cmd(betons, skip, epochs=1, extra=NAN_FLAGS + ['--nan_policy', 'skip', '--nan_inject_step', '1'])
    p = run(cmd + ['--signal_at_step', '1'], check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    assert 'step 1: non-finite loss, update skipped (1 skipped so far' in p.stdout
    a = torch.load(one / 'checkpoint.pth', weights_only=False)
    b = torch.load(skip / 'checkpoint.pth', weights_only=False)
    assert (a['epoch'], a['batch'], b['epoch'], b['batch']) == (0, 1, 0, 2)
    assert (a['skipped_steps'], b['skipped_steps']) == (0, 1)
    assert_same_weights(a['model'], b['model'], 'after a skipped step')  # BN running stats included
    for part in ('optimizer', 'probe_opt'):
        sa, sb = a[part]['state'], b[part]['state']
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i]['momentum_buffer'], sb[i]['momentum_buffer'])
                                              for i in sa)
    assert a['scaler'] == b['scaler']
    p = run(cmd)  # resume to the end: the count comes from the checkpoint
    assert 'epoch 0, batch 2' in p.stdout
    log = read_log(skip)
    assert [r['train_skipped_steps'] for r in log] == [1] and np.isfinite(log[0]['train_loss'])


def test_nan_skip_stops_past_max_skipped_steps(betons, tmp_path):  # noqa: F811
    p = run(ssl_cmd(betons, tmp_path / 'ssl', epochs=1, extra=NAN_FLAGS + [
        '--nan_policy', 'skip', '--max_skipped_steps', '0', '--nan_inject_step', '1']), check=False)
    assert p.returncode == 4 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert 'non-finite loss at or before step 1' in p.stderr and 'more than --max_skipped_steps 0' in p.stderr


# ---- two ranks -----------------------------------------------------------------------------------

def test_two_ranks_preempted_and_resumed_bit_identical(betons, tmp_path):  # noqa: F811
    """torchrun with 2 gloo ranks (DDP, the sharded loader, the gathered loss, the stop flag every
    rank must agree on, per-rank RNG in the checkpoint): a run stopped by SIGTERM at step 5 (epoch 1,
    batch 1) and re-run ends with the weights of an uninterrupted 2-rank run."""
    torchrun = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
    flags = ['--knn_every', '0', '--diag_batch', '0']
    run(torchrun + ssl_cmd(betons, tmp_path / 'whole', epochs=2, extra=flags))
    out = tmp_path / 'stopped'
    p = run(torchrun + ssl_cmd(betons, out, epochs=2, extra=flags + ['--signal_at_step', '5']), check=False)
    assert p.returncode != 0 and 'preempt' in (p.stdout + p.stderr).lower(), (p.stdout + p.stderr)[-2000:]
    ck = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert (ck['epoch'], ck['batch']) == (1, 2) and len(ck['rng']) == 2
    p = run(torchrun + ssl_cmd(betons, out, epochs=2, extra=flags))
    assert 'epoch 1, batch 2' in p.stdout
    assert_same_weights(final_weights(tmp_path / 'whole'), final_weights(out), 'after a 2-rank preemption')
    log = read_log(out)
    assert [r['epoch'] for r in log] == [0, 1]
