"""End-to-end CLI runs of train_ssl.py -> eval_knn.py on a tiny beton (CPU, narrow ResNet)."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

PY = sys.executable
TINY = ['--arch', 'resnet18', '--width', '4', '--proj_dims', '32-16', '--batch_size', '16', '--num_views', '2',
        '--recipe', 'crop', '--workers', '1', '--print_freq', '2', '--dtype', 'float32', '--optimizer', 'sgd',
        '--blr', '0.05', '--warmup_epochs', '0', '--knn_every', '1', '--knn_k', '5', '--diag_batch', '16']


def write_idx(path, arr, magic):
    with gzip.open(path, 'wb') as f:
        f.write(magic.to_bytes(4, 'big'))
        for s in arr.shape:
            f.write(int(s).to_bytes(4, 'big'))
        f.write(arr.astype(np.uint8).tobytes())


def make_idx_dataset(root, n_train=64, n_test=32, seed=0):
    """Two classes a kNN separates easily: bright top half vs bright bottom half, with noise."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('t10k', n_test)):
        y = np.arange(n) % 2
        x = rng.integers(0, 60, size=(n, 28, 28))
        for i in range(n):
            if y[i]:
                x[i, 14:] += 180
            else:
                x[i, :14] += 180
        write_idx(os.path.join(root, f'{split}-images-idx3-ubyte.gz'), x, 2051)
        write_idx(os.path.join(root, f'{split}-labels-idx1-ubyte.gz'), y, 2049)


# numba's first compile of the ffcv pipelines costs 15-120 s per process; tiny runs go faster as
# plain Python (results are identical: the augmentation RNG does not depend on the JIT)
ENV = {**os.environ, 'NUMBA_DISABLE_JIT': '1'}


def run(args, check=True, **kw):
    p = subprocess.run([PY] + args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope='module')
def betons(tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny')
    make_idx_dataset(str(d))
    out = {}
    for split in ('train', 'test'):
        out[split] = str(d / f'{split}.beton')
        run(['data.py', 'write', '--dataset', 'fashion_mnist', '--root', str(d), '--split', split, '--out', out[split]])
    return out


def ssl_cmd(betons, out_dir, epochs=2, extra=()):
    return ['train_ssl.py', '--data_path', betons['train'], '--val_path', betons['test'], '--output_dir', str(out_dir),
            '--epochs', str(epochs), '--loss', 'clamp'] + TINY + list(extra)


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def test_train_then_knn(betons, tmp_path):
    out = tmp_path / 'ssl'
    run(ssl_cmd(betons, out))
    log = read_log(out)
    assert [r['epoch'] for r in log] == [0, 1]
    assert all(np.isfinite(r['train_loss']) for r in log)
    assert 'test_knn_top1' in log[-1] and 'test_diag_nc_acc' in log[-1] and 'test_diag_contacts' in log[-1]
    ck = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert ck['epoch'] == 2 and ck['batch'] == 0 and isinstance(ck['args'], dict)
    torch.load(out / 'checkpoint.pth', weights_only=True)  # plain types only: loads under weights_only
    rec = json.load(open(out / 'args.json'))
    assert rec['args']['loss'] == 'clamp' and rec['git_sha']
    # eval_knn from the run folder and from backbone.pth agree
    r1 = run(['eval_knn.py', '--weights', str(out), '--data_path', betons['train'], '--val_path', betons['test'],
              '--output_dir', str(tmp_path / 'knn1'), '--ks', '1', '5', '--workers', '1'])
    r2 = run(['eval_knn.py', '--weights', str(out / 'backbone.pth'), '--data_path', betons['train'],
              '--val_path', betons['test'], '--output_dir', str(tmp_path / 'knn2'), '--ks', '1', '5', '--workers', '1'])
    a, b = (json.load(open(tmp_path / d / 'results.json')) for d in ('knn1', 'knn2'))
    assert a['top1_k5'] == b['top1_k5'] and a['num_test'] == 32 and a['num_train'] == 64
    assert '32 test samples' in r1.stdout
    # the kNN monitor inside training measures the same thing as eval_knn at k=5, T=0.07
    assert log[-1]['test_knn_top1'] == pytest.approx(a['top1_k5'], abs=1e-6)


def test_resume_continues_from_saved_epoch(betons, tmp_path):
    out = tmp_path / 'ssl'
    run(ssl_cmd(betons, out, epochs=3, extra=['--knn_every', '0']) + ['--stop_at_epoch', '1'], check=False)
    assert [r['epoch'] for r in read_log(out)] == [0]
    p = run(ssl_cmd(betons, out, epochs=3, extra=['--knn_every', '0']))
    assert 'resumed from' in p.stdout and 'epoch 1' in p.stdout
    assert [r['epoch'] for r in read_log(out)] == [0, 1, 2]


def test_sigterm_saves_and_resumes_mid_epoch(betons, tmp_path):
    out = tmp_path / 'ssl'
    cmd = ssl_cmd(betons, out, epochs=1, extra=['--knn_every', '0', '--diag_batch', '0'])
    p = run(cmd + ['--signal_at_step', '1'], check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    ck = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert (ck['epoch'], ck['batch']) == (0, 2)
    p = run(cmd)
    assert 'epoch 0, batch 2' in p.stdout


def test_sigterm_on_last_step_of_epoch_resumes(betons, tmp_path):
    """A signal on an epoch's last step ends the epoch as usual (log line, checkpoint at the next
    epoch) before stopping: the checkpoint it leaves resumes, and so does one saved at batch ==
    steps per epoch (as the code before 2026-12-02 wrote there: resuming it crashed)."""
    out = tmp_path / 'ssl'
    cmd = ssl_cmd(betons, out, epochs=2, extra=['--knn_every', '0', '--diag_batch', '0'])
    p = run(cmd + ['--signal_at_step', '3'], check=False)  # 64 images / batch 16: steps 0-3 in epoch 0
    assert p.returncode == 3, p.stderr[-2000:]
    ck = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert (ck['epoch'], ck['batch']) == (1, 0)
    assert [r['epoch'] for r in read_log(out)] == [0]
    ck['epoch'], ck['batch'] = 0, 4  # the old end-of-epoch checkpoint
    torch.save(ck, out / 'checkpoint.pth')
    p = run(cmd)
    assert 'epoch 0, batch 4' in p.stdout
    assert [r['epoch'] for r in read_log(out)][-2:] == [0, 1]


@pytest.fixture(scope='module')
def one_epoch_run(betons, tmp_path_factory):
    out = tmp_path_factory.mktemp('one_epoch') / 'ssl'
    run(ssl_cmd(betons, out, epochs=1, extra=['--knn_every', '0', '--diag_batch', '0']))
    return out


@pytest.mark.parametrize('flags,message', [
    (['--loss', 'nope'], 'unknown --loss'),
    (['--data_path', '/nonexistent/x.beton'], 'x.beton'),
    (['--blr', '0.3'], 'different hyper-parameters'),
])
def test_bad_input_is_one_clear_line(betons, one_epoch_run, tmp_path, flags, message):
    out = tmp_path / 'ssl'
    shutil.copytree(one_epoch_run, out)
    before = os.path.getmtime(out / 'checkpoint.pth')
    p = run(ssl_cmd(betons, out, epochs=1, extra=['--knn_every', '0', '--diag_batch', '0'] + flags), check=False)
    assert p.returncode != 0 and message in p.stderr
    assert 'Traceback' not in p.stderr
    assert os.path.getmtime(out / 'checkpoint.pth') == before


@pytest.mark.parametrize('flags,message', [
    (['--proj_dims', '32x16'], "--proj_dims '32x16'"),
    (['--recipe', 'nope'], 'invalid choice'),
    (['--loss', 'byol', '--pred_dims', '16'], 'pass --ema 1'),
    (['--pred_dims', '32-16'], 'uses no predictor'),  # clamp: DDP failed at step 2 on the unused predictor
])
def test_bad_flags_fail_before_the_run_folder_is_written(betons, tmp_path, flags, message):
    """Flags checked up front: one line, and no args.json recorded (a recorded bad value would make
    the corrected command a 'different hyper-parameters' run)."""
    out = tmp_path / 'ssl'
    p = run(ssl_cmd(betons, out, epochs=1, extra=['--knn_every', '0', '--diag_batch', '0'] + flags), check=False)
    assert p.returncode != 0 and message in p.stderr and 'Traceback' not in p.stderr
    assert not (out / 'args.json').exists()


@pytest.mark.parametrize('save_at', [[], ['--ckpt_every_steps', '3'], ['--signal_at_step', '2']],
                         ids=['epoch', 'ckpt_every_steps', 'preempted'])
def test_nonfinite_loss_stops_with_message(betons, tmp_path, save_at):
    """Step 1 is NaN (--nan_policy stop applies it and reads the flag only every --print_freq
    steps); a mid-epoch save at step 2 (periodic or on a signal) must not write those weights over
    the last good checkpoint: the run stops with exit 4 instead."""
    out = tmp_path / 'ssl'
    p = run(ssl_cmd(betons, out, epochs=1, extra=['--knn_every', '0', '--nan_inject_step', '1', '--print_freq', '50']
                    + save_at), check=False)
    assert p.returncode == 4 and 'non-finite loss' in p.stderr and 'Traceback' not in p.stderr
    assert not (out / 'checkpoint.pth').exists()  # no good state existed yet: none written


def test_eval_rejects_wrong_weights(betons, tmp_path):
    p = run(['eval_knn.py', '--weights', str(tmp_path / 'missing'), '--data_path', betons['train'],
             '--val_path', betons['test'], '--output_dir', str(tmp_path / 'k')], check=False)
    assert p.returncode != 0 and 'does not exist' in p.stderr and 'Traceback' not in p.stderr


def test_ddp_leaves_cplearn_codes_out_of_the_buffer_broadcast(tmp_path):
    """The fixed code matrix is not re-broadcast from rank 0 before every forward pass (128 MiB at
    the CPLearn recipe's 2048 x 16384); the BN statistics still are."""
    import torch.distributed as dist
    import train_ssl
    net = torch.nn.Module()
    net.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    net.model.register_buffer('codes', torch.ones(4, 8))
    dist.init_process_group('gloo', init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        ddp = train_ssl.wrap_ddp(net, torch.device('cpu'), 0)
        assert 'model.1.running_mean' in ddp.named_module_buffers
        assert 'model.codes' not in ddp.named_module_buffers
        assert 'model.codes' in ddp.module.state_dict()  # still saved with the checkpoint
    finally:
        dist.destroy_process_group()
