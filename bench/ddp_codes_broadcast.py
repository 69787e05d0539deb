"""What DDP's per-forward buffer broadcast costs with CPLearn's code matrix in the module.

Two gloo ranks on this machine, a tiny Linear+BN model carrying a 2048 x 16384 float32 `codes`
buffer (the CPLearn recipe's f x c), forward + backward timed with plain DDP (which broadcasts
every buffer from rank 0 before each forward) and with train_ssl.wrap_ddp (codes left out).

    .venv/bin/python bench/ddp_codes_broadcast.py
"""
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import train_ssl  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self, f, c):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
        self.model.register_buffer('codes', torch.ones(f, c))

    def forward(self, x):
        return self.model(x)


def worker(rank, rdv, ours, steps, q):
    dist.init_process_group('gloo', init_method=f'file://{rdv}', rank=rank, world_size=2)
    torch.set_num_threads(1)
    net = Tiny(2048, 16384)
    ddp = train_ssl.wrap_ddp(net, torch.device('cpu'), 0) if ours else torch.nn.parallel.DistributedDataParallel(net)
    x = torch.randn(32, 64)
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        ddp(x).sum().backward()
    if rank == 0:
        q.put((time.perf_counter() - t0) / steps)
    dist.destroy_process_group()


def main():
    for ours, name in ((False, 'DDP default (codes broadcast every forward)'), (True, 'train_ssl.wrap_ddp')):
        with tempfile.TemporaryDirectory() as d:
            q = mp.get_context('spawn').SimpleQueue()
            mp.spawn(worker, args=(os.path.join(d, 'rdv'), ours, 10, q), nprocs=2)
            print(f'{name}: {q.get() * 1e3:.1f} ms per forward + backward (2 gloo ranks, codes 2048 x 16384)')


if __name__ == '__main__':
    main()
