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
    run(ssl_cmd(betons, ref, epochs=2, extra=FLAGS))
    out = tmp_path / 'killed'
    cmd = [sys.executable] + ssl_cmd(betons, out, epochs=2, extra=FLAGS)
    rng = random.Random(0)
    kills, ckpt = 0, out / 'checkpoint.pth'
    t0 = time.time()
    while True:
        p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 4:
            # wait for this process to write (or start writing) one more checkpoint, then kill it a
            # random moment later: sometimes mid-step, sometimes inside torch.save
            before = os.path.getmtime(ckpt) if ckpt.exists() else 0
            while p.poll() is None and not (ckpt.exists() and os.path.getmtime(ckpt) > before) \
                    and not (out / 'checkpoint.pth.tmp').exists():
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
                continue
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
        break
    assert kills >= 3, f'only {kills} kills landed'
    a, b = final_weights(ref), final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f'{k} differs after {kills} kills'
    assert time.time() - t0 < 240
