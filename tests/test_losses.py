"""Tests of losses.py: every objective against a loop-based float64 reference written here from
the formula (SPEC §0-§6), finite gradients, invariance to image (and view) order, descent on a
toy embedding, CLAMP geometry on hand-placed sub-manifolds, and the fast linear-algebra paths."""
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses

RTOL = 1e-6


def close(a, b, rtol=RTOL, atol=1e-10):
    a, b = (float(t.detach()) if torch.is_tensor(t) else float(t) for t in (a, b))
    assert abs(a - b) <= rtol * abs(b) + atol, f"{a!r} != {b!r}"


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- loop-based references (numpy, float64) ----

def unit(u):
    return u / np.linalg.norm(u)


def ref_clamp_geometry(z, r_s):
    n, v, d = z.shape
    mean = sum(z[i, w] for i in range(n) for w in range(v)) / (n * v)
    x = np.array([[unit(z[i, w] - mean) for w in range(v)] for i in range(n)])
    c = np.array([sum(x[i, w] for w in range(v)) / v for i in range(n)])
    r = np.array([r_s * math.sqrt(sum(np.sum((x[i, w] - c[i]) ** 2) for w in range(v)) / (v - 1) / min(d, v) + 1e-12)
                  for i in range(n)])
    return x, c, r


def ref_clamp(z, r_s=7.0, pot_pow=2.0, max_range=1.5, min_margin=1e-3, size_weight=0.0, log_energy=True):
    z = z.numpy()
    n = z.shape[0]
    _, c, r = ref_clamp_geometry(z, r_s)
    energy = 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            dij = math.sqrt(np.sum((c[i] - c[j]) ** 2) + 1e-12)
            sigma = min(r[i] + r[j] + 1e-6, max_range)
            if min_margin < dij < sigma:
                energy += 0.5 * (1 - dij / sigma) ** pot_pow
    energy += size_weight * sum(r)
    return math.log(energy + 1e-6) if log_energy else energy


def ref_mmcr(z, lmbda=0.0, z_momentum=None):
    z = z.numpy()
    n, v, _ = z.shape
    x = np.array([[unit(z[i, w]) for w in range(v)] for i in range(n)])
    c = np.array([sum(x[i, w] for w in range(v)) / v for i in range(n)])
    if z_momentum is not None:
        zm = z_momentum.numpy()
        cm = np.array([sum(unit(zm[i, w]) for w in range(v)) / v for i in range(n)])
        c = 0.5 * (c + cm)
    loss = -np.linalg.svd(c, compute_uv=False).sum()
    if lmbda:
        loss += lmbda * sum(np.linalg.svd(x[i], compute_uv=False).sum() for i in range(n)) / n
    return loss


def ref_rate(rows, eps):
    n, d = rows.shape
    m = np.eye(d) + d / (n * eps) * sum(np.outer(rows[i], rows[i]) for i in range(n))
    return 0.5 * np.linalg.slogdet(m)[1]


def ref_invariance(x):
    n, v, _ = x.shape
    if v == 2:
        return sum(x[i, 0] @ x[i, 1] for i in range(n)) / n
    total = 0.0
    for i in range(n):
        m = sum(x[i, w] for w in range(v)) / v
        for w in range(v):
            total += x[i, w] @ m / np.linalg.norm(m)
    return total / (n * v)


def ref_tcr(z, eps=0.2, z_weight=30.0):
    z = z.numpy()
    n, v, _ = z.shape
    x = np.array([[unit(z[i, w]) for w in range(v)] for i in range(n)])
    rate = sum(ref_rate(x[:, w], eps) for w in range(v)) / v
    return -rate - z_weight * ref_invariance(x)


def ref_mcr2(z, pi, eps=0.2, z_weight=0.0):
    z, pi = z.numpy(), pi.numpy()
    n, v, d = z.shape
    k = pi.shape[2]
    x = np.array([[unit(z[i, w]) for w in range(v)] for i in range(n)])
    zbar = np.array([unit(sum(x[i, w] for w in range(v)) / v) for i in range(n)])
    probs = np.array([[sum(pi[i, w, j] for w in range(v)) / v for j in range(k)] for i in range(n)])
    compress = 0.0
    for j in range(k):
        tr = sum(probs[i, j] for i in range(n)) + 1e-8
        m = np.eye(d) + d / (tr * eps) * sum(probs[i, j] * np.outer(zbar[i], zbar[i]) for i in range(n))
        compress += tr / (2 * n) * np.linalg.slogdet(m)[1]
    return -ref_rate(zbar, eps) + compress - z_weight * ref_invariance(x)


def ref_cplearn(z, codes, beta=1.0):
    z, codes = z.numpy(), codes.numpy().astype(np.float64)
    n, v, f = z.shape
    c = codes.shape[1]
    scale = math.sqrt(n) * math.log((1 - 1e-8 * (c - 1)) / 1e-8) / f
    p = np.zeros((n, v, c))
    for i in range(n):
        for w in range(v):
            logit = z[i, w] @ codes * scale
            e = np.exp(logit - logit.max())
            p[i, w] = e / e.sum()
    total, count = 0.0, 0
    for a in range(v):
        for b in range(v):
            if a == b:
                continue
            pbar = sum(p[i, a] for i in range(n)) / n
            kl = sum(pbar[j] * math.log(c * pbar[j]) for j in range(c))
            ce = -sum(p[i, a, j] * math.log(p[i, b, j]) for i in range(n) for j in range(c)) / n
            total += kl + beta * ce
            count += 1
    return total / count


def ref_sim(u, w, geometric):
    s = float(unit(u) @ unit(w))
    if geometric:
        s = 1 - math.acos(min(max(s, -1 + 1e-7), 1 - 1e-7)) / math.pi
    return s


def ref_simclr(z, temperature=0.2, geometric=False):
    z = z.numpy()
    n, v, _ = z.shape
    total = 0.0
    for i in range(n):
        for a in range(v):
            num = den = 0.0
            for j in range(n):
                for b in range(v):
                    if (i, a) == (j, b):
                        continue
                    e = math.exp(ref_sim(z[i, a], z[j, b], geometric) / temperature)
                    den += e
                    if i == j:
                        num += e
            total += -math.log(num / den)
    return total / (n * v)


def ref_mocov3(q, k, temperature=0.2, geometric=False):
    q, k = q.numpy(), k.numpy()
    n, v, _ = q.shape
    total = 0.0
    for a in range(v):
        for b in range(v):
            if a == b:
                continue
            ce = 0.0
            for i in range(n):
                logits = [ref_sim(q[i, a], k[j, b], geometric) / temperature for j in range(n)]
                ce += -(logits[i] - math.log(sum(math.exp(t) for t in logits)))
            total += ce / n
    return 2 * temperature * total * 2 / (v * (v - 1))


def ref_align_uniform(z, align_alpha=2.0, unif_t=2.0, unif_weight=1.0):
    z = z.numpy()
    n, v, _ = z.shape
    x = np.array([[unit(z[i, w]) for w in range(v)] for i in range(n)])
    align = [np.linalg.norm(x[i, a] - x[i, b]) ** align_alpha
             for a in range(v) for b in range(a + 1, v) for i in range(n)]
    unif = []
    for w in range(v):
        vals = [math.exp(-unif_t * np.sum((x[i, w] - x[j, w]) ** 2)) for i in range(n) for j in range(i + 1, n)]
        unif.append(math.log(sum(vals) / len(vals)))
    return sum(align) / len(align) + unif_weight * sum(unif) / v


def ref_sinkhorn(s, epsilon, iters):
    m, k = s.shape
    q = np.exp(s / epsilon)
    q = q / q.sum()
    for _ in range(iters):
        for j in range(k):
            q[:, j] = q[:, j] / q[:, j].sum() / k
        for i in range(m):
            q[i] = q[i] / q[i].sum() / m
    return q * m


def ref_swav(scores, queue_scores=None, temperature=0.1, epsilon=0.05, sinkhorn_iters=3, num_assign_views=2):
    s = scores.numpy()
    n, v, k = s.shape
    total, count = 0.0, 0
    for a in range(num_assign_views):
        rows = s[:, a]
        if queue_scores is not None:
            rows = np.concatenate([rows, queue_scores.numpy()[:, a]])
        codes = ref_sinkhorn(rows.copy(), epsilon, sinkhorn_iters)[:n]
        for w in range(v):
            if w == a:
                continue
            ce = 0.0
            for i in range(n):
                logit = s[i, w] / temperature
                logp = logit - logit.max() - math.log(np.exp(logit - logit.max()).sum())
                ce += -sum(codes[i, j] * logp[j] for j in range(k))
            total += ce / n
            count += 1
    return total / count


def ref_mean_var(col, biased):
    n = len(col)
    mu = sum(col) / n
    var = sum((t - mu) ** 2 for t in col) / (n if biased else n - 1)
    return mu, var


def ref_barlow(z, lambd=0.0051, scale_loss=0.1):
    z = z.numpy()
    n, v, d = z.shape
    xs = np.zeros_like(z)
    for w in range(v):
        for j in range(d):
            mu, var = ref_mean_var(z[:, w, j], True)
            xs[:, w, j] = (z[:, w, j] - mu) / math.sqrt(var + 1e-5)
    total, count = 0.0, 0
    for a in range(v):
        for b in range(a + 1, v):
            loss = 0.0
            for j in range(d):
                for l in range(d):
                    cjl = sum(xs[i, a, j] * xs[i, b, l] for i in range(n)) / n
                    loss += (1 - cjl) ** 2 if j == l else lambd * cjl ** 2
            total += scale_loss * loss
            count += 1
    return total / count


def ref_vicreg(z, sim_weight=25.0, var_weight=25.0, cov_weight=1.0):
    z = z.numpy()
    n, v, d = z.shape

    def var_term(w):
        return sum(max(0.0, 1 - math.sqrt(ref_mean_var(z[:, w, j], False)[1] + 1e-4)) for j in range(d)) / d

    def cov_term(w):
        mu = [sum(z[i, w, j] for i in range(n)) / n for j in range(d)]
        total = 0.0
        for j in range(d):
            for l in range(d):
                if j != l:
                    cjl = sum((z[i, w, j] - mu[j]) * (z[i, w, l] - mu[l]) for i in range(n)) / (n - 1)
                    total += cjl ** 2
        return total / d

    total, count = 0.0, 0
    for a in range(v):
        for b in range(a + 1, v):
            inv = sum((z[i, a, j] - z[i, b, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)
            total += sim_weight * inv + var_weight * (var_term(a) + var_term(b)) + cov_weight * (cov_term(a) + cov_term(b))
            count += 1
    return total / count


def ref_predictive(p, t, pair_term, scale):
    p, t = p.numpy(), t.numpy()
    n, v, _ = p.shape
    vals = [pair_term(float(unit(p[i, a]) @ unit(t[i, b]))) for a in range(v) for b in range(v) if a != b
            for i in range(n)]
    return scale * sum(vals) / len(vals)


def ref_byol(p, t, geometric=False):
    term = (lambda c: math.acos(min(max(c, -1 + 1e-7), 1 - 1e-7)) / math.pi) if geometric else (lambda c: 2 - 2 * c)
    return ref_predictive(p, t, term, 2.0)


def ref_simsiam(p, t, geometric=False):
    term = (lambda c: math.acos(min(max(c, -1 + 1e-7), 1 - 1e-7)) / math.pi) if geometric else (lambda c: -c)
    return ref_predictive(p, t, term, 1.0)


# ---- inputs for every objective: (B, V, d) tensors + references ----

def clustered(b, v, d, spread, seed):
    """b clusters of v views around random centres: contacts for some pairs, not all."""
    return rand(b, 1, d, seed=seed) + spread * rand(b, v, d, seed=seed + 1)


def make_case(name, b=6, v=3, d=5, seed=0):
    """(args tuple, kwargs, index of the differentiated argument) for objective `name`."""
    z = rand(b, v, d, seed=seed)
    if name == "clamp":
        return (clustered(b, v, d, 0.4, seed),), {}, 0
    if name == "mcr2":
        return (z, torch.softmax(rand(b, v, 4, seed=seed + 7), -1)), {}, 0
    if name == "cplearn":
        codes = losses.make_cplearn_codes(d, 9, torch.Generator().manual_seed(seed))
        return (torch.tanh(z), codes), {}, 0
    if name in ("byol", "simsiam", "mocov3"):
        return (z, rand(b, v, d, seed=seed + 3)), {}, 0
    if name == "swav":
        protos = F.normalize(rand(7, d, seed=seed + 5), dim=-1)
        return (F.normalize(z, dim=-1) @ protos.T,), {}, 0
    return (z,), {}, 0


REFS = {
    "clamp": ref_clamp, "mmcr": ref_mmcr, "tcr": ref_tcr, "mcr2": ref_mcr2, "cplearn": ref_cplearn,
    "simclr": ref_simclr, "mocov3": ref_mocov3, "align_uniform": ref_align_uniform, "swav": ref_swav,
    "barlow_twins": ref_barlow, "vicreg": ref_vicreg, "byol": ref_byol, "simsiam": ref_simsiam,
}

# extra keyword settings checked against the reference, beyond the defaults
VARIANTS = {
    "clamp": [dict(log_energy=False, size_weight=0.05), dict(pot_pow=2.5, r_s=3.0, max_range=1.2, min_margin=0.05)],
    "mmcr": [dict(lmbda=0.3)],
    "tcr": [dict(eps=0.5, z_weight=2.0)],
    "mcr2": [dict(eps=0.1, z_weight=3.0)],
    "cplearn": [dict(beta=0.3)],
    "simclr": [dict(temperature=0.5, geometric=True)],
    "mocov3": [dict(temperature=0.5, geometric=True)],
    "align_uniform": [dict(align_alpha=1.5, unif_t=3.0, unif_weight=0.5)],
    "swav": [dict(temperature=0.2, epsilon=0.1, sinkhorn_iters=5, num_assign_views=1)],
    "barlow_twins": [dict(lambd=0.1, scale_loss=1.0)],
    "vicreg": [dict(sim_weight=1.0, var_weight=2.0, cov_weight=3.0)],
    "byol": [dict(geometric=True)],
    "simsiam": [dict(geometric=True)],
}


def test_registry_keys_and_spec_signatures():
    assert set(losses.LOSSES) == set(REFS)
    expected = {
        "clamp": dict(r_s=7.0, pot_pow=2.0, max_range=1.5, min_margin=1e-3, size_weight=0.0, log_energy=True),
        "mmcr": dict(lmbda=0.0, z_momentum=None),
        "tcr": dict(eps=0.2, z_weight=30.0),
        "mcr2": dict(eps=0.2, z_weight=0.0),
        "cplearn": dict(beta=1.0),
        "simclr": dict(temperature=0.2, geometric=False),
        "barlow_twins": dict(lambd=0.0051, scale_loss=0.1),
        "vicreg": dict(sim_weight=25.0, var_weight=25.0, cov_weight=1.0),
        "mocov3": dict(temperature=0.2, geometric=False),
        "swav": dict(queue_scores=None, temperature=0.1, epsilon=0.05, sinkhorn_iters=3, num_assign_views=2),
        "align_uniform": dict(align_alpha=2.0, unif_t=2.0, unif_weight=1.0),
        "byol": dict(geometric=False), "simsiam": dict(geometric=False),
    }
    for name, kw in expected.items():
        params = inspect.signature(losses.LOSSES[name]).parameters
        for k, default in kw.items():
            assert params[k].default == default, (name, k)


@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize("v", [2, 3])
def test_value_matches_loop_reference(name, v):
    for kw in [{}] + VARIANTS[name]:
        args, _, _ = make_case(name, v=v, seed=v)
        if name == "swav" and v == 2 and kw.get("num_assign_views", 2) > v:
            continue
        close(losses.LOSSES[name](*args, **kw), REFS[name](*args, **kw))


def test_clamp_reference_case_has_mixed_contacts():
    """The clamp reference input must exercise both branches of the contact test."""
    z = make_case("clamp", v=3, seed=3)[0][0].numpy()
    _, c, r = ref_clamp_geometry(z, 7.0)
    n = len(c)
    flags = {(min(r[i] + r[j], 1.5) > np.linalg.norm(c[i] - c[j])) for i in range(n) for j in range(n) if i != j}
    assert flags == {True, False}


def test_mmcr_momentum_matches_reference():
    z, zm = rand(7, 3, 4, seed=1), rand(7, 3, 4, seed=2)
    close(losses.mmcr(z, lmbda=0.2, z_momentum=zm), ref_mmcr(z, lmbda=0.2, z_momentum=zm))
    # the momentum branch is a constant: no gradient reaches it
    zm.requires_grad_(True)
    losses.mmcr(z.requires_grad_(True), z_momentum=zm).backward()
    assert zm.grad is None and z.grad is not None


def test_swav_queue_matches_reference():
    (scores,), _, _ = make_case("swav", b=5, v=4, seed=4)
    queue = F.normalize(rand(6, 2, 5, seed=9), dim=-1) @ F.normalize(rand(7, 5, seed=9), dim=-1).T
    close(losses.swav(scores, queue_scores=queue), ref_swav(scores, queue_scores=queue))


def test_tcr_two_views_is_nmce_formula():
    """V = 2: 1/2[-R(Z1) - R(Z2)] - z_weight mean cos(z1, z2), written out once more."""
    z = rand(9, 2, 4, seed=5)
    x = F.normalize(z, dim=-1)
    r = [0.5 * torch.logdet(torch.eye(4, dtype=z.dtype) + 4 / (9 * 0.2) * x[:, w].T @ x[:, w]) for w in range(2)]
    expected = 0.5 * (-r[0] - r[1]) - 30.0 * F.cosine_similarity(z[:, 0], z[:, 1]).mean()
    close(losses.tcr(z), expected)


# ---- gradients and invariances ----

@pytest.mark.parametrize("name", sorted(REFS))
def test_gradients_finite_in_float32(name):
    args, kw, gi = make_case(name, b=16, v=4, d=8, seed=11)
    args = [a.float() for a in args]
    args[gi].requires_grad_(True)
    out = losses.LOSSES[name](*args, **kw)
    assert out.dtype == torch.float32 and out.ndim == 0
    out.backward()
    assert torch.isfinite(args[gi].grad).all() and args[gi].grad.abs().sum() > 0


SYMMETRIC_IN_VIEWS = set(REFS) - {"swav"}


@pytest.mark.parametrize("name", sorted(REFS))
def test_invariant_to_image_and_view_order(name):
    args, kw, _ = make_case(name, b=7, v=4, d=5, seed=12)
    base = losses.LOSSES[name](*args, **kw)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    # codes (cplearn) are not per-image; every other tensor argument is (B, V, ...)
    permuted = [a[perm] if a.shape[0] == 7 and a.ndim == 3 else a for a in args]
    close(losses.LOSSES[name](*permuted, **kw), base, rtol=1e-10)
    # swav: assignment views are special; permute inside {0, 1} and inside the rest
    vperm = torch.tensor([2, 0, 3, 1]) if name in SYMMETRIC_IN_VIEWS else torch.tensor([1, 0, 3, 2])
    vpermuted = [a[:, vperm] if a.ndim == 3 else a for a in args]
    close(losses.LOSSES[name](*vpermuted, **kw), base, rtol=1e-10)


@pytest.mark.parametrize("name", sorted(REFS))
def test_few_adam_steps_lower_the_loss(name):
    """A learnable (B, V, d) tensor (the first argument) goes downhill."""
    args, kw, gi = make_case(name, b=16, v=4, d=8, seed=13)
    args = [a.float().clone() for a in args]
    param = args[gi].clone().requires_grad_(True)
    fn = losses.LOSSES[name]
    if name == "swav":  # learn embeddings against fixed prototypes, as in training
        protos = F.normalize(rand(7, 8, seed=14).float(), dim=-1)
        param = rand(16, 4, 8, seed=15).float().requires_grad_(True)

    def loss_now():
        a = list(args)
        if name == "swav":
            a[0] = F.normalize(param, dim=-1) @ protos.T
        elif name == "cplearn":
            a[0] = torch.tanh(param)
        else:
            a[gi] = param
        return fn(*a, **kw)

    opt = torch.optim.Adam([param], lr=0.05)
    first = loss_now().item()
    for _ in range(30):
        opt.zero_grad()
        loss_now().backward()
        opt.step()
    assert loss_now().item() < first - 1e-3 * abs(first)


# ---- CLAMP on hand-placed sub-manifolds ----

def placed(directions, spread, views=4):
    """Views u + spread * (+-w1, +-w2) around each unit direction u (d = 3)."""
    out = []
    for u in directions:
        u = unit(np.asarray(u, dtype=np.float64))
        w1 = unit(np.cross(u, [0.0, 0.0, 1.0]) if abs(u[2]) < 0.9 else np.cross(u, [1.0, 0.0, 0.0]))
        w2 = np.cross(u, w1)
        out.append([u + spread * s * w for w in (w1, w2) for s in (1, -1)][:views])
    return torch.tensor(np.array(out))


def test_clamp_gradient_separates_overlapping_pair_and_shrinks_radii():
    a = 0.15
    z = placed([[math.cos(a), math.sin(a), 0], [math.cos(a), -math.sin(a), 0],
                [-1, 0, 0.8], [-1, 0, -0.8]], spread=0.05)
    _, c, r = ref_clamp_geometry(z.numpy(), 7.0)
    dist = lambda c, i, j: np.linalg.norm(c[i] - c[j])
    # set-up: only the pair (0, 1) is in contact, below the max_range cap
    assert dist(c, 0, 1) < r[0] + r[1] < 1.5
    assert all(dist(c, i, j) > min(r[i] + r[j], 1.5) for i, j in [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])
    z.requires_grad_(True)
    losses.clamp(z).backward()
    _, c1, r1 = ref_clamp_geometry((z - 1e-3 * z.grad).detach().numpy(), 7.0)
    assert dist(c1, 0, 1) > dist(c, 0, 1)
    assert r1[0] < r[0] and r1[1] < r[1]


def test_clamp_float32_is_exact_for_near_duplicate_images():
    """Pairs of centres ~1e-3 apart (near-duplicate images, CLAMP's min_margin): the float32 loss
    and gradient agree with float64 as the official direct-difference distances do (the Gram form
    in float32 gave 2.95 for 3.15 and a gradient 54 % off)."""
    g = torch.Generator().manual_seed(0)
    n, v, d = 64, 4, 256
    base = torch.randn(n // 2, 1, d, generator=g, dtype=torch.float64)
    near = base + 3e-4 * torch.randn(n // 2, 1, d, generator=g, dtype=torch.float64) / d ** 0.5
    z64 = torch.cat([base, near]) + 0.0015 * torch.randn(n, v, d, generator=g, dtype=torch.float64)
    _, c, _ = ref_clamp_geometry(z64.numpy(), 7.0)
    sep = np.linalg.norm(c[:n // 2] - c[n // 2:], axis=-1)
    assert 5e-4 < np.median(sep) < 2e-3  # the case is the one it claims to be
    grads = []
    for z in (z64, z64.float()):
        z = z.clone().requires_grad_(True)
        val = losses.clamp(z)
        val.backward()
        grads.append(z.grad.double())
        assert abs(val.item() - ref_clamp(z64)) < 1e-5
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-3


def test_align_uniform_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        losses.align_uniform(torch.randn(1, 2, 8))


def test_clamp_without_contacts_is_log_of_floor():
    z = placed([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]], spread=0.01)
    close(losses.clamp(z), math.log(1e-6))


def test_clamp_orientation_term_penalises_crossed_axes_only():
    """Contacting ellipses with parallel principal axes pay no orientation cost; crossed do."""
    def pair(axis_b):
        u = np.array([1.0, 0, 0])
        e_a = np.array([0, 1.0, 0])
        views = []
        for centre, axis in ((u + np.array([0, 0, 0.05]), e_a), (u - np.array([0, 0, 0.05]), axis_b)):
            views.append([centre + s * 0.08 * axis for s in (1, -1)])
        far = [[-u + s * 0.08 * e_a for s in (1, -1)], [-u + np.array([0, 0, 0.6]) + s * 0.08 * e_a for s in (1, -1)]]
        return torch.tensor(np.array(views + far))

    for axis_b, crossed in ((np.array([0, 1.0, 0]), False), (np.array([0, 0.6, 0.8]), True)):
        z = pair(axis_b)
        plain = losses.clamp(z, log_energy=False)
        with_orient = losses.clamp(z, log_energy=False, orient_weight=1.0)
        assert plain > 0
        assert (with_orient - plain > 1e-3) == crossed


# ---- diagnostics on hand-placed spheres ----

def octahedron(theta):
    """6 sub-manifolds at +-e1, +-e2, +-e3, V = 2 views cos(theta) u +- sin(theta) w: global mean 0,
    unit views, radius sin(theta), centres cos(theta) u, isotropic feature covariance."""
    eye = np.eye(3)
    rows = []
    for k in range(3):
        for s in (1, -1):
            u, w = s * eye[k], eye[(k + 1) % 3]
            rows.append([math.cos(theta) * u + math.sin(theta) * w, math.cos(theta) * u - math.sin(theta) * w])
    return torch.tensor(np.array(rows))


@pytest.mark.parametrize("r_s,contacts", [(2.0, 0), (4.0, 4), (6.0, 5)])
def test_clamp_diagnostics_known_contacts_no_self(r_s, contacts):
    theta = 0.2
    dg = losses.clamp_diagnostics(octahedron(theta), r_s=r_s)
    c = math.cos(theta)
    assert dg["contacts"] == contacts  # 6.0 would mean the self-pair was counted
    assert dg["frac_contact"] == (1.0 if contacts else 0.0)
    close(dg["nc_acc"], 1.0)
    close(dg["radius"], math.sin(theta))
    close(dg["center_dist"], (4 * math.sqrt(2) * c + 2 * c) / 5)
    close(dg["center_std"], c * math.sqrt(2 / 5))
    close(dg["pr"], 3.0)
    assert dg["sv_ratio"] < 1e-6
    if r_s == 4.0:  # sigma = min(2 * 4 sin(theta), 1.5) = 1.5; the 4 non-antipodal pairs touch
        close(dg["overlap_frac"], 24 / 30)
        close(dg["energy_pp"], 0.5 * 24 * (1 - math.sqrt(2) * c / 1.5) ** 2 / 6)
    assert set(dg) == {"nc_acc", "radius", "contacts", "frac_contact", "center_dist", "center_std",
                       "sv_ratio", "energy_pp", "overlap_frac", "pr"}


def test_clamp_diagnostics_nearest_centre_fails_for_wide_manifolds():
    z = octahedron(1.2)  # views swing past 45 degrees: nearer to another centre than their own
    assert losses.clamp_diagnostics(z)["nc_acc"] < 1.0


# ---- linear algebra fast paths ----

@pytest.mark.parametrize("shape", [(40, 6), (6, 40), (3, 5, 9), (4, 9, 5)])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_nuclear_norm_fast_path_equals_svdvals(shape, dtype, rtol):
    a = rand(*shape, seed=21, dtype=dtype).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    fast, slow = losses.nuclear_norm(a), torch.linalg.svdvals(b).sum(-1)
    torch.testing.assert_close(fast, slow, rtol=rtol, atol=0)
    g = rand(*fast.shape, seed=22, dtype=dtype)
    (fast * g).sum().backward()
    (slow * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=100 * rtol, atol=100 * rtol)


def test_nuclear_norm_rank_deficient_gradient_is_finite_subgradient():
    u, w = rand(30, seed=23), rand(8, seed=24)
    a = torch.outer(u, w).requires_grad_(True)  # rank 1: ||A||_* = |u| |w|, gradient u^ w^T
    out = losses.nuclear_norm(a)
    close(out, u.norm() * w.norm(), rtol=1e-10)
    out.backward()
    torch.testing.assert_close(a.grad, torch.outer(u / u.norm(), w / w.norm()))


@pytest.mark.parametrize("n,d", [(12, 5), (5, 12)])
def test_logdet_identity_plus_matches_slogdet(n, d):
    w = rand(n, d, seed=25)
    expected = torch.linalg.slogdet(torch.eye(d, dtype=w.dtype) + 0.7 * w.T @ w)[1]
    close(losses.logdet_identity_plus(w, 0.7), expected, rtol=1e-10)


def test_sinkhorn_marginals():
    s = F.normalize(rand(12, 4, seed=26), dim=-1) @ F.normalize(rand(5, 4, seed=27), dim=-1).T
    q = losses.sinkhorn_knopp(s, epsilon=0.5, iters=200)
    torch.testing.assert_close(q.sum(-1), torch.ones(12, dtype=q.dtype))
    torch.testing.assert_close(q.sum(0), torch.full((5,), 12 / 5, dtype=q.dtype))


# ---- small pieces and guards ----

def test_cplearn_codes_and_logit_scale():
    codes = losses.make_cplearn_codes(6, 10, torch.Generator().manual_seed(3))
    again = losses.make_cplearn_codes(6, 10, torch.Generator().manual_seed(3))
    assert codes.shape == (6, 10) and codes.dtype == torch.float32 and torch.equal(codes, again)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    h = torch.tanh(rand(5, 2, 6, seed=4))
    expected = h @ codes.double() * math.sqrt(5) * math.log((1 - 1e-8 * 9) / 1e-8) / 6
    torch.testing.assert_close(losses.cplearn_logits(h, codes.double()), expected)
    with pytest.raises(ValueError, match="eps"):
        losses.cplearn_logits(h, codes, eps=0.2)


def test_geodesic_sim_values():
    e = torch.eye(3, dtype=torch.float64)
    close(losses.geodesic_sim(e[0], e[0]), 1.0, atol=1e-3)
    close(losses.geodesic_sim(e[0], -e[0]), 0.0, atol=1e-3)
    close(losses.geodesic_sim(e[0], e[1]), 0.5)


@pytest.mark.parametrize("name", ["clamp", "mmcr", "simclr", "tcr", "barlow_twins"])
def test_float32_under_bf16_autocast(name):
    args, kw, _ = make_case(name, b=16, v=4, d=8, seed=31)
    args = [a.float() for a in args]
    ref = losses.LOSSES[name](*args, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = losses.LOSSES[name](*args, **kw)
        out_bf16_in = losses.LOSSES[name](*[a.bfloat16() for a in args], **kw)
    assert out.dtype == torch.float32 and out_bf16_in.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_gather_batch_is_identity_without_process_group():
    z = rand(3, 2, 4)
    assert losses.gather_batch(z, grad=True) is z and losses.gather_batch(z, grad=False) is z


@pytest.mark.parametrize("call", [
    lambda: losses.clamp(rand(4, 8)),
    lambda: losses.simclr(rand(4, 1, 8)),
    lambda: losses.byol(rand(4, 2, 8), rand(4, 3, 8)),
    lambda: losses.mcr2(rand(4, 2, 8), rand(4, 3, 2)),
    lambda: losses.swav(rand(4, 2, 8), num_assign_views=3),
])
def test_bad_shapes_raise_one_line_errors(call):
    with pytest.raises(ValueError) as err:
        call()
    assert "\n" not in str(err.value)


def test_mcr2_wide_features_use_the_smaller_side_exactly():
    """d > n: mcr2 takes the n x n determinant (Sylvester); same value as the d x d reference,
    finite gradients even where a cluster's probability is exactly 0."""
    z = rand(4, 2, 9, seed=11)
    pi = torch.softmax(rand(4, 2, 3, seed=12), -1)
    for kw in ({}, dict(eps=0.1, z_weight=3.0)):
        close(losses.mcr2(z, pi, **kw), ref_mcr2(z, pi, **kw))
    hard = pi.clone()
    hard[:, :, 0] = 0.0  # one empty cluster
    hard = hard / hard.sum(-1, keepdim=True)
    zz = z.clone().requires_grad_(True)
    pp = hard.clone().requires_grad_(True)
    val = losses.mcr2(zz, pp)
    close(val, ref_mcr2(z, hard))
    val.backward()
    assert torch.isfinite(zz.grad).all() and torch.isfinite(pp.grad).all()
    assert torch.autograd.gradcheck(lambda a, b: losses.mcr2(a, b), (z.clone().requires_grad_(True),
                                                                     pi.clone().requires_grad_(True)))
