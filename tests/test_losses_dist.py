"""Distributed contract of losses.py on a real 2-process gloo group (SPEC §0).

For every objective that sees the global batch: the value on each rank equals the
single-process value on the concatenated batch, and the gradient reaching rank r's input is
W x the single-process gradient of those rows (so DDP's 1/W average gives the single-process
step; the convention in the losses.py module docstring). One spawn serves every case."""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import losses

WORLD = 2
B, V, D, K = 4, 3, 5, 6  # per-rank batch, views, dim, prototypes


def rand(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def build_cases():
    """{case id: (loss name, args, kwargs)}; every tensor is global (N = WORLD * B rows, or a
    queue split the same way); the first argument is the differentiated one."""
    n = WORLD * B
    z = rand(n, V, D, seed=0)
    clustered = rand(n, 1, D, seed=1) + 0.4 * rand(n, V, D, seed=2)
    other = rand(n, V, D, seed=3)
    protos = F.normalize(rand(K, D, seed=4), dim=-1)
    scores = F.normalize(z, dim=-1) @ protos.T
    queue = F.normalize(rand(WORLD * 3, 2, D, seed=5), dim=-1) @ protos.T
    pi = torch.softmax(rand(n, V, K, seed=6), dim=-1)
    return {
        "clamp": ("clamp", (clustered,), {}),
        "clamp_energy_size": ("clamp", (clustered,), dict(log_energy=False, size_weight=0.1)),
        "mmcr": ("mmcr", (z,), {}),
        "mmcr_lmbda_momentum": ("mmcr", (z,), dict(lmbda=0.5, z_momentum=other)),
        "simclr": ("simclr", (z,), {}),
        "simclr_geometric": ("simclr", (z,), dict(geometric=True, temperature=0.1)),
        "mocov3": ("mocov3", (z, other), {}),
        "swav": ("swav", (scores,), {}),
        "swav_queue": ("swav", (scores,), dict(queue_scores=queue)),
        "barlow_twins": ("barlow_twins", (z,), dict(lambd=0.1)),
        "vicreg": ("vicreg", (z,), {}),
        "align_uniform": ("align_uniform", (z,), {}),
        "tcr": ("tcr", (z,), {}),
        "mcr2": ("mcr2", (z, pi), dict(eps=0.5, z_weight=2.0)),
        "byol": ("byol", (z, other), {}),
        "simsiam": ("simsiam", (z, other), {}),
    }


def rank_slice(t, rank):
    rows = t.shape[0] // WORLD
    return t[rank * rows:(rank + 1) * rows].clone()


def run_case(name, args, kwargs, rank=None):
    """(loss value, gradient of the first argument) on the rank's slice or, rank=None, on
    the whole batch."""
    pick = (lambda t: t.clone()) if rank is None else (lambda t: rank_slice(t, rank))
    args = [pick(a) for a in args]
    kwargs = {k: pick(v) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    args[0].requires_grad_(True)
    loss = losses.LOSSES[name](*args, **kwargs)
    loss.backward()
    return loss.detach(), args[0].grad


def _worker(rank, tmpdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=WORLD)
    out = {cid: run_case(*case, rank=rank) for cid, case in build_cases().items()}
    # the gather helper itself: with grad the backward sums over ranks, without it only the
    # local slice carries a graph
    coef = rand(WORLD * B, V, D, seed=9)
    for grad in (True, False):
        x = rank_slice(rand(WORLD * B, V, D, seed=8), rank).requires_grad_(True)
        g = losses.gather_batch(x, grad=grad)
        (g * coef).sum().backward()
        out[f"gather_{grad}"] = (g.detach(), x.grad)
    torch.save(out, os.path.join(tmpdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    tmpdir = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.spawn(_worker, args=(tmpdir,), nprocs=WORLD, join=False)
    deadline = time.time() + 180
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process gloo workers did not finish in 180 s (collective deadlock?)")
    return [torch.load(os.path.join(tmpdir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("cid", sorted(build_cases()))
def test_value_and_gradient_match_single_process(dist_results, cid):
    value, grad = run_case(*build_cases()[cid])
    for rank, res in enumerate(dist_results):
        v_r, g_r = res[cid]
        torch.testing.assert_close(v_r, value, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_r, WORLD * rank_slice(grad, rank), rtol=1e-7, atol=1e-10)


def test_gather_batch_gradient_semantics(dist_results):
    full = rand(WORLD * B, V, D, seed=8)
    coef = rand(WORLD * B, V, D, seed=9)
    for rank, res in enumerate(dist_results):
        g_true, x_grad_true = res["gather_True"]
        g_false, x_grad_false = res["gather_False"]
        torch.testing.assert_close(g_true, full)
        torch.testing.assert_close(g_false, full)
        torch.testing.assert_close(x_grad_true, WORLD * rank_slice(coef, rank))
        torch.testing.assert_close(x_grad_false, rank_slice(coef, rank))
