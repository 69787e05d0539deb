"""Exact resume: a run SIGKILLed at random moments (including during checkpoint writes) and
restarted with the same command ends bit-identical to an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT
from test_train import ENV, betons, run, ssl_cmd  # noqa: F401  (betons is a fixture)

FLAGS = ['--knn_every', '0', '--diag_batch', '0', '--ckpt_every_steps', '1']


def final_weights(out):
    return torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)['model']


def test_sigkill_loop_resumes_bit_identical(betons, tmp_path):  # noqa: F811
    ref = tmp_path / 'ref'
    run(ssl_cmd(betons, ref, epochs=3, extra=FLAGS))
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
    a, b = final_weights(ref), final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f'{k} differs after {kills} kills'
