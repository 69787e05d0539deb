"""Every recipe in scripts/ parses with train_ssl.py's flags and passes its checks."""
import glob
import importlib
import os
import subprocess
import sys

import pytest

from conftest import ROOT

RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, 'scripts', '*_*.sh'))
                 if not os.path.basename(p).startswith(('prepare_', 'setup', 'common')))


def test_there_are_recipes():
    assert len(RECIPES) >= 15


@pytest.mark.parametrize('path', RECIPES, ids=os.path.basename)
def test_recipe_flags_are_valid(path, tmp_path):
    """The recipe runs with $RUN set to a recorder of its command lines; each stage's parser and
    up-front checks then run on them here, in this process (a python per recipe cost ~7 s each)."""
    rec = tmp_path / 'calls'
    rec.mkdir()
    fake = tmp_path / 'run'
    fake.write_text(f'#!/bin/sh\nprintf \'%s\\0\' "$@" > "$(mktemp -p {rec})"\n')
    fake.chmod(0o755)
    env = {**os.environ, 'RUN': str(fake), 'PY': sys.executable}
    p = subprocess.run(['bash', path], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    calls = [f.read_bytes().split(b'\0')[:-1] for f in sorted(rec.iterdir())]
    assert calls, 'the recipe ran no stage through $RUN'
    for argv in calls:
        script, *flags = [a.decode() for a in argv]
        assert script.endswith('.py') and os.path.exists(os.path.join(ROOT, script)), script
        stage = importlib.import_module(os.path.basename(script)[:-3])
        args = stage.get_args_parser().parse_args(flags)
        if hasattr(stage, 'check_args'):
            stage.check_args(args, world_size=1)


def test_slurm_requeue_sbatch_stops_torchrun_recipe_saves_and_requeues(tmp_path):
    """scripts/slurm_requeue.sbatch around a real torchrun recipe: SIGUSR1 to the batch script (as
    SLURM's --signal=B:USR1) makes train_ssl.py save checkpoint.pth; the script calls
    `scontrol requeue $SLURM_JOB_ID`, exits 3 and leaves no training process running. (The old
    script sent SIGUSR1 to torchrun, which died of it: exit 138, no requeue, the worker orphaned.)"""
    import signal
    import time

    import torch
    from test_train import ENV, make_idx_dataset, run
    data, out = tmp_path / 'data', tmp_path / 'runs'
    data.mkdir()
    make_idx_dataset(str(data))
    for split, name in (('train', 'train'), ('test', 'test')):  # the recipe reads $DATA/cifar10_*.beton
        run(['data.py', 'write', '--dataset', 'fashion_mnist', '--root', str(data), '--split', split,
             '--out', str(data / f'cifar10_{name}.beton')])
    fake = tmp_path / 'bin'
    fake.mkdir()
    (fake / 'scontrol').write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.args\n')
    (fake / 'scontrol').chmod(0o755)
    env = {k: v for k, v in ENV.items() if k not in ('RUN', 'NPROC')}  # the recipe's own torchrun
    env.update(PY=sys.executable, DATA=str(data), OUT=str(out), SLURM_GPUS_ON_NODE='1', SLURM_JOB_ID='123',
               SCONTROL=str(fake / 'scontrol'), PATH=f"{fake}:{env['PATH']}")  # both: the old script ran `scontrol`
    flags = ['--width', '4', '--proj_dims', '32-16', '--batch_size', '16', '--num_views', '2', '--recipe', 'crop',
             '--workers', '1', '--print_freq', '2', '--dtype', 'float32', '--optimizer', 'sgd', '--blr', '0.05',
             '--warmup_epochs', '0', '--knn_every', '0', '--diag_batch', '0', '--epochs', '1000']
    run_dir = out / 'clamp_cifar10'

    def training_pids():  # every process whose command line names this run (torchrun and its workers)
        pids = []
        for d in os.listdir('/proc'):
            try:
                with open(f'/proc/{d}/cmdline', 'rb') as f:
                    if str(run_dir).encode() in f.read():
                        pids.append(int(d))
            except (OSError, ValueError):
                pass
        return pids

    log = tmp_path / 'slurm.out'
    with open(log, 'wb') as f:
        p = subprocess.Popen(['bash', 'scripts/slurm_requeue.sbatch', 'scripts/clamp_cifar10.sh'] + flags,
                             cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (run_dir / 'checkpoint.pth').exists():  # an epoch (4 steps) is done: training runs
            assert p.poll() is None and time.time() < deadline, log.read_text(errors='replace')[-3000:]
            time.sleep(0.2)
        os.kill(p.pid, signal.SIGUSR1)
        rc = p.wait(timeout=150)
        left = training_pids()
    finally:
        if p.poll() is None:
            p.kill()
        for pid in training_pids():  # only processes of this test's run folder
            os.kill(pid, signal.SIGKILL)
    text = log.read_text(errors='replace')
    assert not left, f'training processes still running after the job script ended (exit {rc}): {left}\n{text[-3000:]}'
    assert rc == 3, f'exit {rc}\n{text[-3000:]}'
    assert (tmp_path / 'scontrol.args').read_text().split() == ['requeue', '123'], text[-3000:]
    assert 'checkpoint saved to' in text and 'preempted' in text, text[-3000:]
    ck = torch.load(run_dir / 'checkpoint.pth', weights_only=False)
    assert ck['epoch'] >= 1
