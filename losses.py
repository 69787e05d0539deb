"""Every self-supervised objective of the project, as pure functions of tensors.

Contract (SPEC §0). Each objective takes ``z`` of shape (B, V, d): B images local to this
rank, V views of each, the projector output (predictor / prototype-score inputs are named
in each signature). Losses are computed in float32 even under autocast (float64 inputs stay
float64, which the tests use). ``LOSSES`` maps the ``--loss`` flag value to the function.

Distributed convention, one for every objective that sees the global batch (clamp, mmcr,
tcr, mcr2, simclr, mocov3, swav, barlow_twins, vicreg, align_uniform, byol, simsiam):
  * the returned value is, on every rank, the single-process value on the concatenated
    batch ``torch.cat([z_rank0, z_rank1, ...])``;
  * the gradient that reaches this rank's ``z`` is ``W`` times the single-process gradient
    of those rows, so that DDP's 1/W gradient averaging gives exactly the single-process
    parameter update. The learning rate then depends on the global batch only, not on W.
  These losses run collectives: call them on every rank, with the same B on every rank.
cplearn alone is local (SPEC §4: no gather, n = the rank's batch in its sqrt(n) scaling): each
rank optimises its own objective, DDP averages. The coding rates of tcr and mcr2 are of the global
batch, as NMCE's single-process (DataParallel) code computes them.
"""
import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


# ---- numerics: float32 at the loss boundary ----

def _loss_dtype(fn):
    """Run ``fn`` with autocast off and its floating tensor arguments cast to float32.

    SVD, logdet, arccos and pairwise distances are not bf16-safe (SPEC §0), and autocast
    would silently re-cast matmuls inside the loss, so casting the input alone is not
    enough. If any floating input is float64 everything runs in float64 (tests compare
    against float64 references)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values())
                   if torch.is_tensor(a) and a.is_floating_point()]
        if not tensors:
            return fn(*args, **kwargs)
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32

        def cast(a):
            return a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a

        with torch.autocast(device_type=tensors[0].device.type, enabled=False):
            return fn(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})
    return wrapper


def _check_bvd(z, name="z", min_views=2):
    """One-line shape check for the standard (B, V, d) layout."""
    if z.ndim != 3:
        raise ValueError(f"{name} must be (B, V, d), got shape {tuple(z.shape)}")
    if z.shape[1] < min_views:
        raise ValueError(f"{name} needs at least {min_views} views, got V={z.shape[1]}")


# ---- distributed: one gather helper and the gradient-scale convention ----

def _dist_info():
    """(world size, rank); (1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gathered gradient over ranks and
    returns this rank's slice (as solo-learn's GatherLayer / VICReg's FullGatherLayer).
    Uses all_reduce rather than reduce_scatter so it also runs on gloo."""

    @staticmethod
    def forward(ctx, x):
        world, rank = _dist_info()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_batch(z, grad):
    """Global batch (N = W*B, ...) from every rank's (B, ...) tensor, rank-major along dim 0.

    grad=False: the other ranks' rows carry no graph; this rank's slice is ``z`` itself, so
        its graph survives (CLAMP / MMCR official code: ``outputs[rank] = preds_local``).
    grad=True: differentiable; the backward sums gradients over ranks (see _GatherWithGrad).
    A no-op when torch.distributed is not initialised or W = 1. Needs the same shape on
    every rank (use drop_last)."""
    world, rank = _dist_info()
    if world == 1:
        return z
    z = z.contiguous()
    if grad:
        return _GatherWithGrad.apply(z)
    parts = [torch.empty_like(z) for _ in range(world)]
    dist.all_gather(parts, z.detach())
    parts[rank] = z
    return torch.cat(parts, 0)


def _scale_grad_for_ddp(loss):
    """Same value, gradient x W. For losses every rank computes identically on a batch
    gathered WITHOUT gradient: each rank's local rows get the exact single-process
    gradient, which DDP would divide by W."""
    world, _ = _dist_info()
    if world == 1:
        return loss
    return loss + (world - 1) * (loss - loss.detach())


def _global_mean_value(loss):
    """Value -> mean over ranks (= the single-process value for a mean over local
    anchors with equal B per rank); gradient unchanged. One scalar all_reduce."""
    world, _ = _dist_info()
    if world == 1:
        return loss
    total = loss.detach().clone()
    dist.all_reduce(total)
    return loss + (total / world - loss.detach())


# ---- linear algebra: nuclear norm and log-determinant ----

class _NuclearNormGram(torch.autograd.Function):
    """Sum of singular values from the eigenvalues of the smaller Gram matrix.

    The Gram is formed and diagonalised in float64. Eigenvalues below the float64 noise
    floor of the Gram (lambda_max * max(m, n) * eps64, numpy's matrix_rank rule) count as 0:
    singular values under sqrt(max(m, n) * eps64) sigma_max (1e-6 sigma_max at 4096 rows,
    near float32 resolution) are dropped rather than reported as sqrt(rounding noise). Backward: d||A||_*/dA = U V^T = A (A^T A)^{-1/2} (tall case), with
    the subgradient 0 on the dropped directions (rank-deficient or collapsed inputs keep
    finite gradients, unlike sqrt(eigvalsh) under autograd)."""

    @staticmethod
    def forward(ctx, a):
        m, n = a.shape[-2:]
        tall = m >= n
        a64 = a.double()
        gram = a64.mT @ a64 if tall else a64 @ a64.mT
        evals, evecs = torch.linalg.eigh(gram)
        keep = evals > evals[..., -1:] * max(m, n) * torch.finfo(torch.float64).eps
        s = torch.where(keep, evals.clamp_min(0).sqrt(), 0.0)
        ctx.save_for_backward(a, s, keep, evecs)
        ctx.tall = tall
        return s.sum(-1).to(a.dtype)

    @staticmethod
    def backward(ctx, grad):
        a, s, keep, v = ctx.saved_tensors
        inv = torch.where(keep, 1.0 / torch.where(keep, s, 1.0), 0.0)
        proj = (v * inv[..., None, :]) @ v.mT
        a64 = a.double()
        ga = a64 @ proj if ctx.tall else proj @ a64
        return (grad.double()[..., None, None] * ga).to(a.dtype)


def nuclear_norm(a):
    """||A||_* = sum of singular values, batched over leading dims. a: (..., m, n) -> (...).

    Exact (matches torch.linalg.svdvals(a).sum(-1); see tests) and the fastest of the exact
    paths timed by bench/losses.py: eigenvalues of the min(m, n)^2 Gram in float64
    (SPEC §2: for N >> d use the d x d Gram). No double backward."""
    return _NuclearNormGram.apply(a)


def logdet_identity_plus(w, alpha):
    """logdet(I_d + alpha * W^T W) for w (..., n, d), alpha a float or (...) tensor -> (...).

    Uses the smaller side (Sylvester: det(I_d + a W^T W) = det(I_n + a W W^T)) and a
    Cholesky factor (2 * sum log diag L), the fastest exact path in bench/losses.py; the
    matrix is I + PSD so the factorisation always exists."""
    n, d = w.shape[-2:]
    gram = w.mT @ w if d <= n else w @ w.mT
    alpha = torch.as_tensor(alpha, dtype=w.dtype, device=w.device)
    eye = torch.eye(gram.shape[-1], dtype=w.dtype, device=w.device)
    chol = torch.linalg.cholesky(eye + alpha[..., None, None] * gram)
    return 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


# ---- shared pieces ----

def _pairwise_sqdist(c):
    """(N, d) -> (N, N) squared distances via the Gram form (no N*N*d intermediate), taken in
    float64: in float32, |c_i|^2 + |c_j|^2 - 2 c_i.c_j of centres of norm ~1 keeps only ~2 digits
    of a distance of 1e-3 (CLAMP's min_margin), where the official direct difference keeps ~6
    (near-duplicate images: float32 loss 2.95 vs 3.15, gradient off by 54 %; test_losses)."""
    c64 = c.double()
    sq = (c64 * c64).sum(-1)
    return (sq[:, None] + sq[None, :] - 2.0 * (c64 @ c64.mT)).clamp_min(0).to(c.dtype)


def _geodesic_from_cos(cos, eps=1e-7):
    """1 - arccos(clamp(cos, -1+eps, 1-eps)) / pi, the geodesic similarity in [0, 1]."""
    return 1.0 - torch.arccos(cos.clamp(-1.0 + eps, 1.0 - eps)) / math.pi


def geodesic_sim(u, v, eps=1e-7):
    """Geodesic similarity of unit vectors, s = 1 - arccos(clamp(u.v, -1+eps, 1-eps)) / pi.

    u, v: (..., d) unit vectors -> (...). 1 for equal, 0.5 orthogonal, 0 antipodal.
    Source: YeskendirK/geometric-contrastive-learning, solo/losses/simclr.py (SPEC §5)."""
    return _geodesic_from_cos((u * v).sum(-1), eps)


def _view_invariance(x):
    """Mean cosine agreement of unit-norm views x (B, V, d): cos(z1, z2) for V = 2 (NMCE
    Z_loss), cos(z_v, mean_v z_v) for V > 2 (EMP-SSL's view-mean form, SPEC §3)."""
    if x.shape[1] == 2:
        return (x[:, 0] * x[:, 1]).sum(-1).mean()
    return F.cosine_similarity(x, x.mean(1, keepdim=True), dim=-1).mean()


def _off_diagonal_mask(v, device):
    return ~torch.eye(v, dtype=torch.bool, device=device)


# ---- CLAMP: manifold packing ----

def _clamp_geometry(x, r_s):
    """Centre, L2-normalise, sub-manifold centres and scaled radii (SPEC §1 steps 1-4).
    x: (N, V, d) -> (unit views (N, V, d), centres (N, d), radii (N,))."""
    n, v, d = x.shape
    x = F.normalize(x - x.mean(dim=(0, 1)), dim=-1)
    c = x.mean(1)
    trace = ((x - c[:, None]) ** 2).sum(dim=(1, 2)) / (v - 1)
    r = r_s * torch.sqrt(trace / min(d, v) + 1e-12)
    return x, c, r


def _clamp_energy(c, r, pot_pow, max_range, min_margin):
    """E = 1/2 sum over ordered contacts (1 - D/sigma)^p and the contact mask (SPEC §1 5-7).
    c: (N, d), r: (N,) -> (E scalar, distances (N, N), contact mask (N, N))."""
    dist_c = torch.sqrt(_pairwise_sqdist(c) + 1e-12)
    sigma = (r[:, None] + r[None, :] + 1e-6).clamp_max(max_range)
    mask = (dist_c < sigma) & (dist_c > min_margin) & _off_diagonal_mask(len(c), c.device)
    # boolean indexing, not torch.where: the non-contact branch of pow can be NaN for
    # fractional powers and would poison the gradient through where()
    energy = 0.5 * ((1.0 - dist_c[mask] / sigma[mask]) ** pot_pow).sum()
    return energy, dist_c, mask


def _principal_axes(x, c):
    """Unit principal axis of each sub-manifold: top right-singular vector of the centred
    views, from the V x V Gram (exact, instead of the official 20-step power iteration).
    x: (N, V, d), c: (N, d) -> (N, d). Sign is arbitrary; only squared overlaps are used."""
    y = x - c[:, None]
    _, evecs = torch.linalg.eigh(y @ y.mT)
    return F.normalize((evecs[..., -1:].mT @ y).squeeze(-2), dim=-1)


@_loss_dtype
def clamp(z, r_s=7.0, pot_pow=2.0, max_range=1.5, min_margin=1e-3, size_weight=0.0,
          log_energy=True, orient_weight=0.0):
    """CLAMP manifold-packing loss. z: (B, V, d) projector outputs -> scalar.

    Over the gathered batch of N images: centre globally, L2-normalise views, centre
    c_i = mean_v x_vi, radius r_i = r_s sqrt(sum_v |x_vi - c_i|^2 / (V-1) / min(d, V)),
    D_ij = |c_i - c_j|, sigma_ij = min(r_i + r_j, max_range); contacts are i != j with
    min_margin < D_ij < sigma_ij; E = 1/2 sum_contacts (1 - D/sigma)^pot_pow
    + size_weight * sum_i r_i; loss = log(E + 1e-6) (E itself if log_energy=False).
    orient_weight > 0 adds the official (off in every config) ellipsoid-orientation term
    1/2 orient_weight * sum_contacts (1 - (e_i.e_j)^4), e_i the principal axis (exact
    eigenvector of the V x V Gram, not the official power iteration; like any principal-axis
    term its gradient is ill-conditioned when a sub-manifold's two largest axes are equal).
    Source: Zhang et al., CLAMP; guanming-zhang/clamp model/loss_module.py,
    LogRepulsiveEllipsoidPackingLossUnitNorm (views-major there; (B, V, d) here).
    Distributed: gathered WITHOUT gradient, local slice keeps its graph; every rank computes
    the full global loss, and the gradient is scaled x W so DDP's average equals the
    single-process step (the official code leaves it at 1/W; LARS hides most of that)."""
    _check_bvd(z)
    x = gather_batch(z, grad=False)
    if x.shape[0] < 2:
        raise ValueError("clamp needs at least 2 images in the (global) batch")
    x, c, r = _clamp_geometry(x, r_s)
    energy, _, mask = _clamp_energy(c, r, pot_pow, max_range, min_margin)
    energy = energy + size_weight * r.sum()
    if orient_weight:
        axes = _principal_axes(x, c)
        overlap = (axes @ axes.mT) ** 2
        energy = energy + 0.5 * orient_weight * (1.0 - overlap[mask] ** 2).sum()
    loss = torch.log(energy + 1e-6) if log_energy else energy
    return _scale_grad_for_ddp(loss)


@_loss_dtype
@torch.no_grad()
def clamp_diagnostics(z, r_s=7.0, pot_pow=2.0, max_range=1.5, min_margin=1e-3):
    """Packing diagnostics of a (B, V, d) batch (pass gather_batch(z, grad=False) first for
    global numbers) -> dict of python floats:

    nc_acc       fraction of views whose nearest centre is their own image's;
    radius       mean unscaled radius sqrt(sum_v |x_vi - c_i|^2 / (V-1) / min(d, V)) (the
                 loss's radius / r_s; the official validation divides by V, not V-1);
    contacts     mean number of j != i with D_ij < 0.99 r_s (r_i + r_j) (the official code
                 also counts i itself; we exclude it, SPEC §1);
    frac_contact fraction of sub-manifolds with >= 1 contact (1 - rattler fraction);
    center_dist  mean D_ij over i != j;   center_std  mean over dims of the std of centres;
    sv_ratio     std / mean of the singular values of the centre matrix (collapse);
    energy_pp    the loss's E (size/orientation terms off) divided by N;
    overlap_frac fraction of pairs i != j in contact by the loss's criterion;
    pr           participation ratio (sum lambda)^2 / sum lambda^2 of the covariance of
                 the centred, normalised views the loss acts on (effective dimension).
    Source: guanming-zhang/clamp model/lightning_models.py validation_step (first seven)."""
    _check_bvd(z)
    n, v, d = z.shape
    if n < 2:
        raise ValueError("clamp_diagnostics needs at least 2 images")
    x, c, r = _clamp_geometry(z, r_s)
    c_sq = (c * c).sum(-1)
    own = torch.arange(n, device=z.device)
    hits = 0
    for view in range(v):  # one (N, N) block per view keeps memory at N^2, not V N^2
        d2 = (x[:, view] ** 2).sum(-1)[:, None] + c_sq[None, :] - 2.0 * x[:, view] @ c.mT
        hits += (d2.argmin(-1) == own).sum().item()
    energy, dist_c, mask = _clamp_energy(c, r, pot_pow, max_range, min_margin)
    off = _off_diagonal_mask(n, z.device)
    unscaled = r / r_s
    near = (dist_c < 0.99 * r_s * (unscaled[:, None] + unscaled[None, :])) & off
    n_contacts = near.sum(1)
    sv = torch.linalg.svdvals(c)
    feats = x.reshape(n * v, d)
    feats = feats - feats.mean(0)
    gram = feats.mT @ feats if d <= n * v else feats @ feats.mT
    return {
        "nc_acc": hits / (n * v),
        "radius": unscaled.mean().item(),
        "contacts": n_contacts.double().mean().item(),
        "frac_contact": (n_contacts > 0).double().mean().item(),
        "center_dist": dist_c[off].mean().item(),
        "center_std": c.std(0).mean().item(),
        "sv_ratio": (sv.std() / (sv.mean() + 1e-6)).item(),
        "energy_pp": energy.item() / n,
        "overlap_frac": mask.sum().item() / (n * (n - 1)),
        "pr": (gram.diagonal().sum() ** 2 / (gram ** 2).sum()).item(),
    }


# ---- MMCR: maximum manifold capacity ----

@_loss_dtype
def mmcr(z, lmbda=0.0, z_momentum=None):
    """MMCR loss: lmbda * mean_i ||Z_i||_* - ||C||_*. z: (B, V, d) -> scalar.

    Views L2-normalised; C (N, d) = centroids, the view means (not re-normalised); Z_i the
    V x d matrix of image i's views. z_momentum (B, V, d), the momentum (EMA) branch's
    projections of the same views (MMCR "+ME"), is treated as a constant: then
    C = 1/2 (online centroids + momentum centroids).
    Source: Yerxa et al. 2023; ThomasYerxa/mmcr mmcr/cifar_stl/loss_mmcr.py and
    mmcr/imagenet/loss_mmcr_momentum.py ((B N) C layout there; (B, V, d) here).
    Distributed: gathered WITHOUT gradient (momentum branch too), local slice keeps its
    graph; gradient scaled x W so DDP's average equals the single-process step."""
    _check_bvd(z, min_views=1)
    x = F.normalize(gather_batch(z, grad=False), dim=-1)
    centroids = x.mean(1)
    if z_momentum is not None:
        if z_momentum.shape != z.shape:
            raise ValueError(f"z_momentum shape {tuple(z_momentum.shape)} != z shape {tuple(z.shape)}")
        xm = F.normalize(gather_batch(z_momentum.detach(), grad=False), dim=-1)
        centroids = 0.5 * (centroids + xm.mean(1))
    loss = -nuclear_norm(centroids)
    if lmbda != 0.0:
        loss = loss + lmbda * nuclear_norm(x).mean()
    return _scale_grad_for_ddp(loss)


# ---- NMCE: total coding rate (TCR) and MCR^2 ----

def _coding_rate(x, eps):
    """R(Z) = 1/2 logdet(I + d/(n eps) Z^T Z) for rows of x (..., n, d) -> (...)."""
    n, d = x.shape[-2:]
    return 0.5 * logdet_identity_plus(x, d / (n * eps))


@_loss_dtype
def tcr(z, eps=0.2, z_weight=30.0):
    """NMCE stage-1 loss: -mean_v R(Z_v) - z_weight * invariance. z: (B, V, d) -> scalar.

    Views L2-normalised (NMCE normalises in the network); R as _coding_rate with n = B;
    invariance = mean_i cos(z_1i, z_2i) for V = 2, mean cos to the view mean for V > 2.
    For V = 2: L = 1/2[-R(Z_1) - R(Z_2)] - z_weight * mean cos (SPEC §3).
    Source: Li et al., NMCE; zengyi-li/NMCE-release NMCE/loss.py (TotalCodingRate, Z_loss)
    and NMCE/train_selfsup.py. Distributed: z gathered WITH gradient (n = the global batch);
    every rank computes the same value; the gradient reaching this rank's z is W x single-process."""
    _check_bvd(z)
    x = gather_batch(F.normalize(z, dim=-1), grad=True)
    rate = _coding_rate(x.transpose(0, 1), eps).mean()
    return -rate - z_weight * _view_invariance(x)


@_loss_dtype
def mcr2(z, pi, eps=0.2, z_weight=0.0):
    """NMCE stages 2-3 (clustering) MCR^2 loss. z: (B, V, d), pi: (B, V, K) -> scalar.

    zbar = normalise(mean_v normalise(z)), Pi = mean_v pi (B, K) (e.g. Gumbel-softmax
    probabilities of a cluster head), n = B:
    L = -R(zbar) + sum_k tr(Pi_k)/(2n) logdet(I + d/(tr(Pi_k) eps) zbar^T diag(Pi_k) zbar)
        - z_weight * invariance, with tr(Pi_k) = sum_i Pi_ik + 1e-8.
    Source: zengyi-li/NMCE-release NMCE/loss.py (MaximalCodingRateReduction, gamma = 1) and
    NMCE/train_clustering.py (chunk_avg with normalise). Distributed: z and pi gathered WITH
    gradient (n = the global batch), the same value on every rank, gradients W x single-process."""
    _check_bvd(z)
    if pi.ndim != 3 or pi.shape[:2] != z.shape[:2]:
        raise ValueError(f"pi must be (B, V, K) with z's B, V; got {tuple(pi.shape)} for z {tuple(z.shape)}")
    z, pi = gather_batch(z, grad=True), gather_batch(pi, grad=True)
    n, _, d = z.shape
    x = F.normalize(z, dim=-1)
    zbar = F.normalize(x.mean(1), dim=-1)
    probs = pi.mean(1)
    tr_pi = probs.sum(0) + 1e-8
    alpha = d / (tr_pi * eps)  # (K,)
    if d <= n:  # Z^T diag(Pi_k) Z for every cluster, d x d, by Cholesky
        weighted = torch.einsum("nk,nd,ne->kde", probs, zbar, zbar)
        eye = torch.eye(d, dtype=z.dtype, device=z.device)
        chol = torch.linalg.cholesky(eye + alpha[:, None, None] * weighted)
        logdets = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    else:  # the n x n side: det(I_d + a Z^T P Z) = det(I_n + a (Z Z^T) P) (Sylvester); not
        # symmetric, so LU (slogdet), but its eigenvalues are real and >= 1. The symmetric form
        # P^1/2 Z Z^T P^1/2 would need sqrt(Pi), whose gradient is infinite at Pi = 0.
        gram = zbar @ zbar.mT
        eye = torch.eye(n, dtype=z.dtype, device=z.device)
        logdets = torch.linalg.slogdet(eye + alpha[:, None, None] * gram * probs.mT[:, None, :]).logabsdet
    compress = (tr_pi * logdets / (2 * n)).sum()
    return -_coding_rate(zbar, eps) + compress - z_weight * _view_invariance(x)


# ---- CPLearn: clustering via fixed codes ----

def make_cplearn_codes(f, c, generator=None):
    """Fixed random code matrix W in {-1, +1}^{f x c} (float32), never trained; keep it as
    a buffer so it is saved in checkpoints. Source: emsansone/CPLearn
    solo/methods/cplearn.py (2 * randint(2) - 1)."""
    bits = torch.randint(0, 2, (f, c), generator=generator)
    return (2 * bits - 1).to(torch.float32)


def cplearn_logits(z, codes, eps=1e-8):
    """CPLearn logits z W sqrt(n) log((1 - eps (c-1)) / eps) / f.

    z: (n, ..., f) tanh projector outputs with the LOCAL batch n first ((B, V, f) or
    (n, f)); codes: (f, c) -> (n, ..., c). Source: emsansone/CPLearn solo/methods/cplearn.py
    (z / temp with temp = f / (sqrt(n) log((1 - eps (c-1)) / eps)))."""
    f, c = codes.shape
    if z.shape[-1] != f:
        raise ValueError(f"z last dim {z.shape[-1]} != codes rows {f}")
    if eps * (c - 1) >= 1:
        raise ValueError(f"eps * (c - 1) must be < 1, got eps={eps}, c={c}")
    scale = math.sqrt(z.shape[0]) * math.log((1.0 - eps * (c - 1)) / eps) / f
    return (z @ codes) * scale


@_loss_dtype
def cplearn(z, codes, beta=1.0):
    """CPLearn loss. z: (B, V, f) tanh projector outputs, codes: (f, c) fixed +-1 -> scalar.

    p_v = softmax(logits_v), pbar_v = batch mean of p_v; for ordered view pairs (a, b):
    KL(pbar_a || U) + beta * CE(p_a, p_b), CE(a, b) = -mean_i sum_j a_ij log b_ij,
    averaged over pairs; V = 2 gives 1/2[KL(pbar_2) + beta CE(p_2, p_1)] +
    1/2[KL(pbar_1) + beta CE(p_1, p_2)] (SPEC §4). No stop-gradient.
    log pbar is a logsumexp of log-probabilities, so a code no sample uses contributes 0
    instead of the official 0 * log 0 = NaN.
    Source: Sansone et al., CPLearn; emsansone/CPLearn solo/losses/cplearn.py.
    Local: no gather; n in the logit scale is the local batch size."""
    _check_bvd(z)
    n, v, _ = z.shape
    c = codes.shape[1]
    logp = F.log_softmax(cplearn_logits(z, codes), dim=-1)
    p = logp.exp()
    log_pbar = torch.logsumexp(logp, dim=0) - math.log(n)
    kl = (log_pbar.exp() * (log_pbar + math.log(c))).sum(-1)
    # sum over ordered pairs a != b of sum_ij p_a log p_b = (sum_a p_a).(sum_b log p_b)
    # - sum_a p_a.log p_a: O(n V c) instead of the O(n V^2 c) pairwise contraction
    cross = (p.sum(1) * logp.sum(1)).sum() - (p * logp).sum()
    return kl.mean() - beta * cross / (n * v * (v - 1))


# ---- contrastive: SimCLR, MoCo v3, alignment-uniformity ----

@_loss_dtype
def simclr(z, temperature=0.2, geometric=False):
    """Multi-positive NT-Xent over all V views. z: (B, V, d) -> scalar.

    Anchor (i, v); positives: the other V-1 views of image i; denominator: every gathered
    view except the anchor itself. loss_a = -log(sum_pos e^{s/t} / sum_{all != a} e^{s/t}),
    mean over local anchors; s = cosine, or geodesic_sim if geometric (SPEC §5).
    Source: Chen et al. 2020; vturrisi/solo-learn solo/losses/simclr.py;
    YeskendirK/geometric-contrastive-learning solo/losses/simclr.py (geometric).
    Distributed: keys gathered WITH gradient (backward sums over ranks), anchors local;
    value averaged over ranks; the gradient reaching this rank's z is W x single-process."""
    _check_bvd(z)
    b, v, d = z.shape
    _, rank = _dist_info()
    x = F.normalize(z, dim=-1)
    keys = gather_batch(x, grad=True)
    n = keys.shape[0]
    cos = x.reshape(b * v, d) @ keys.reshape(n * v, d).mT
    logits = (_geodesic_from_cos(cos) if geometric else cos) / temperature
    dev = z.device
    img_a = (rank * b + torch.arange(b, device=dev)).repeat_interleave(v)
    img_k = torch.arange(n, device=dev).repeat_interleave(v)
    view_a = torch.arange(v, device=dev).repeat(b)
    view_k = torch.arange(v, device=dev).repeat(n)
    same = img_a[:, None] == img_k[None, :]
    self_ = same & (view_a[:, None] == view_k[None, :])
    lse_all = logits.masked_fill(self_, float("-inf")).logsumexp(-1)
    lse_pos = logits.masked_fill(~(same & ~self_), float("-inf")).logsumexp(-1)
    return _global_mean_value((lse_all - lse_pos).mean())


@_loss_dtype
def mocov3(q, k, temperature=0.2, geometric=False):
    """MoCo v3 loss. q: (B, V, d) online predictor outputs, k: (B, V, d) momentum-encoder
    projections (treated as sg) -> scalar.

    For ordered view pairs (a, b), a != b: cross-entropy of q_a against all gathered k_b
    (positive: the same image), x 2 temperature; V = 2 gives the official
    ctr(q1, k2) + ctr(q2, k1); V > 2 averages pairs with the same scale (x 2/(V(V-1))).
    geometric: logits from geodesic_sim instead of cosine (SPEC §5).
    Source: Chen, Xie, He 2021; facebookresearch/moco-v3 moco/builder.py;
    vturrisi/solo-learn solo/losses/mocov3.py.
    Distributed: keys gathered without gradient (they are constants), queries local; value
    averaged over ranks; gradient reaching this rank's q is W x single-process."""
    _check_bvd(q, "q")
    if k.shape != q.shape:
        raise ValueError(f"k shape {tuple(k.shape)} != q shape {tuple(q.shape)}")
    b, v, _ = q.shape
    _, rank = _dist_info()
    qn = F.normalize(q, dim=-1)
    keys = gather_batch(F.normalize(k.detach(), dim=-1), grad=False)
    labels = rank * b + torch.arange(b, device=q.device)
    total = 0.0
    for a in range(v):
        cos = torch.einsum("id,nwd->win", qn[:, a], keys)  # (V, B, N)
        logits = (_geodesic_from_cos(cos) if geometric else cos) / temperature
        for w in range(v):
            if w != a:
                total = total + F.cross_entropy(logits[w], labels)
    loss = 2.0 * temperature * total * 2.0 / (v * (v - 1))
    return _global_mean_value(loss)


@_loss_dtype
def align_uniform(z, align_alpha=2.0, unif_t=2.0, unif_weight=1.0):
    """Alignment + uniformity on the hypersphere. z: (B, V, d) -> scalar.

    x = normalise(z); align = mean over view pairs a < b and images of |x_a - x_b|^alpha;
    unif = mean over views of log mean_{i<j} exp(-t |x_i - x_j|^2) over the global batch;
    loss = align + unif_weight * unif (V = 2: uniformity averaged over the two views, as
    in the paper's training code).
    Source: Wang & Isola 2020; SsnL/align_uniform (align_loss, uniform_loss).
    Distributed: uniformity on the batch gathered WITH gradient (every rank computes the
    same global value; backward sums -> W x); alignment over local rows, value averaged
    over ranks (its gradient is W x single-process too)."""
    _check_bvd(z)
    v = z.shape[1]
    x = F.normalize(z, dim=-1)
    pairs = torch.triu_indices(v, v, 1, device=z.device)
    sq = ((x[:, pairs[0]] - x[:, pairs[1]]) ** 2).sum(-1)
    align = _global_mean_value((sq ** (align_alpha / 2)).mean())
    g = gather_batch(x, grad=True).transpose(0, 1)  # (V, N, d)
    n = g.shape[1]
    if n < 2:
        raise ValueError("align_uniform: the uniformity term needs at least 2 images in the (global) batch")
    # unit vectors: |x_i - x_j|^2 = 2 - 2 x_i.x_j; no sqrt, so no NaN gradient at x_i = x_j
    d2 = (2.0 - 2.0 * g @ g.mT).clamp_min(0)
    iu = torch.triu_indices(n, n, 1, device=z.device)
    unif = (torch.logsumexp(-unif_t * d2[:, iu[0], iu[1]], dim=-1) - math.log(iu.shape[1])).mean()
    return align + unif_weight * unif


# ---- SwAV: swapped prediction with Sinkhorn codes ----

@torch.no_grad()
def sinkhorn_knopp(scores, epsilon=0.05, iters=3):
    """Equipartitioned soft codes. scores: (..., M, K) -> codes (..., M, K), rows sum to 1.

    Q = exp(scores / epsilon), then alternately every prototype gets mass 1/K and every
    sample 1/M; returned x M. The global max is subtracted first (cancels in the
    normalisation, avoids overflow). Source: facebookresearch/swav main_swav.py
    distributed_sinkhorn; solo-learn solo/utils/sinkhorn_knopp.py."""
    m, k = scores.shape[-2:]
    q = torch.exp((scores - scores.amax(dim=(-2, -1), keepdim=True)) / epsilon)
    q = q / q.sum(dim=(-2, -1), keepdim=True)
    for _ in range(iters):
        q = q / q.sum(-2, keepdim=True) / k
        q = q / q.sum(-1, keepdim=True) / m
    return q * m


@_loss_dtype
def swav(scores, queue_scores=None, temperature=0.1, epsilon=0.05, sinkhorn_iters=3,
         num_assign_views=2):
    """SwAV swapped-prediction loss. scores: (B, V, K) = normalised z . normalised
    prototypes; queue_scores: optional (Q, num_assign_views, K) scores of queued
    embeddings of the assignment views -> scalar.

    Codes q_a (a < num_assign_views) by Sinkhorn-Knopp on the global batch (+ queue) of
    view a, no gradient; loss = mean over a and v != a (all V views, small crops included)
    of -mean_i sum_k q_a,ik log softmax(scores_v,i / temperature)_k.
    Source: Caron et al. 2020; facebookresearch/swav main_swav.py train();
    vturrisi/solo-learn solo/losses/swav.py, solo/methods/swav.py.
    Distributed: scores (and queue) gathered without gradient for the codes; the
    prediction side is local; value averaged over ranks; gradient reaching this rank's
    scores is W x single-process."""
    _check_bvd(scores, "scores")
    b, v, k = scores.shape
    if not 1 <= num_assign_views <= v:
        raise ValueError(f"num_assign_views must be in [1, V={v}], got {num_assign_views}")
    _, rank = _dist_info()
    s = gather_batch(scores.detach()[:, :num_assign_views].contiguous(), grad=False)
    if queue_scores is not None:
        if queue_scores.ndim != 3 or queue_scores.shape[1:] != (num_assign_views, k):
            raise ValueError(f"queue_scores must be (Q, {num_assign_views}, {k}), got {tuple(queue_scores.shape)}")
        s = torch.cat([s, gather_batch(queue_scores.detach().contiguous(), grad=False)], 0)
    codes = sinkhorn_knopp(s.transpose(0, 1), epsilon, sinkhorn_iters)  # (A, M, K)
    codes = codes[:, rank * b:(rank + 1) * b]
    logp = F.log_softmax(scores / temperature, dim=-1)
    total = 0.0
    for a in range(num_assign_views):
        others = [w for w in range(v) if w != a]
        total = total - (codes[a][:, None] * logp[:, others]).sum(-1).mean()
    return _global_mean_value(total / num_assign_views)


# ---- redundancy reduction: Barlow Twins, VICReg ----

@_loss_dtype
def barlow_twins(z, lambd=0.0051, scale_loss=0.1):
    """Barlow Twins loss. z: (B, V, d) -> scalar.

    Each view standardised over the batch (BatchNorm1d(affine=False) in train mode: biased
    variance, eps 1e-5); C = x_a^T x_b / N; loss = scale_loss [sum_i (1 - C_ii)^2 +
    lambd sum_{i != j} C_ij^2], averaged over view pairs a < b.
    Source: Zbontar et al. 2021; facebookresearch/barlowtwins main.py;
    vturrisi/solo-learn solo/losses/barlow.py (scale_loss 0.1 in its CIFAR recipe).
    Distributed: statistics and C over the batch gathered WITHOUT gradient (local slice
    keeps its graph); gradient scaled x W so DDP's average equals the single-process step."""
    _check_bvd(z)
    x = gather_batch(z, grad=False)
    n, v, _ = x.shape
    if n < 2:
        raise ValueError("barlow_twins needs at least 2 images in the (global) batch")
    x = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    total = 0.0
    for a in range(v):
        for b in range(a + 1, v):
            corr = x[:, a].mT @ x[:, b] / n
            diag = corr.diagonal()
            off = (corr ** 2).sum() - (diag ** 2).sum()
            total = total + scale_loss * (((1.0 - diag) ** 2).sum() + lambd * off)
    return _scale_grad_for_ddp(total / (v * (v - 1) / 2))


@_loss_dtype
def vicreg(z, sim_weight=25.0, var_weight=25.0, cov_weight=1.0):
    """VICReg loss. z: (B, V, d) -> scalar.

    Two-view loss sim_weight * mse(z_a, z_b) + var_weight * (v(z_a) + v(z_b)) +
    cov_weight * (c(z_a) + c(z_b)), v = mean_j relu(1 - sqrt(Var_j + 1e-4)) (unbiased
    variance), c = sum_{i != j} Cov_ij^2 / d (Cov with N - 1); averaged over view pairs
    a < b. The variance term is the SUM over the two views as in solo-learn (the official
    facebookresearch/vicreg averages it, i.e. half of it).
    Source: Bardes et al. 2022; vturrisi/solo-learn solo/losses/vicreg.py.
    Distributed: statistics over the batch gathered WITHOUT gradient (local slice keeps
    its graph); gradient scaled x W so DDP's average equals the single-process step."""
    _check_bvd(z)
    x = gather_batch(z, grad=False)
    n, v, d = x.shape
    if n < 2:
        raise ValueError("vicreg needs at least 2 images in the (global) batch")
    pairs = torch.triu_indices(v, v, 1, device=z.device)
    inv = ((x[:, pairs[0]] - x[:, pairs[1]]) ** 2).mean()
    std = torch.sqrt(x.var(0) + 1e-4)
    var = F.relu(1.0 - std).mean(-1)  # (V,)
    cov = []
    for view in range(v):  # one d x d matrix at a time
        xc = x[:, view] - x[:, view].mean(0)
        m = xc.mT @ xc / (n - 1)
        cov.append(((m ** 2).sum() - (m.diagonal() ** 2).sum()) / d)
    cov = torch.stack(cov)
    # mean over pairs of (f_a + f_b) = 2 mean_v f_v
    loss = sim_weight * inv + 2.0 * var_weight * var.mean() + 2.0 * cov_weight * cov.mean()
    return _scale_grad_for_ddp(loss)


# ---- predictive: BYOL, SimSiam ----

def _pair_cosines(p, z_target):
    """Per-image cosine of every prediction view with every target view: (B, V, V), target
    detached (sg)."""
    pn = F.normalize(p, dim=-1)
    tn = F.normalize(z_target.detach(), dim=-1)
    return torch.einsum("iad,ibd->iab", pn, tn)


def _check_pred_target(p, z_target):
    _check_bvd(p, "p")
    if z_target.shape != p.shape:
        raise ValueError(f"z_target shape {tuple(z_target.shape)} != p shape {tuple(p.shape)}")


@_loss_dtype
def byol(p, z_target, geometric=False):
    """BYOL loss. p: (B, V, d) online predictor outputs, z_target: (B, V, d) target
    (momentum) projections, treated as sg -> scalar.

    Each view's prediction regresses every OTHER view's target: per pair 2 - 2 cos(p_a, z_b)
    (geometric: arccos(p^.z^)/pi, the intended form; the geometric repo's BYOL branch
    minimises a clamped per-coordinate similarity instead); V = 2 gives the usual
    symmetrised sum of the two directions, V > 2 averages pairs at that scale
    (2 x mean over ordered pairs).
    Source: Grill et al. 2020; vturrisi/solo-learn solo/losses/byol.py, solo/methods/byol.py;
    YeskendirK/geometric-contrastive-learning solo/losses/byol.py (SPEC §5).
    Distributed: per-image terms, no gather; value averaged over ranks (gradient W x
    single-process, the same convention as the gathered losses)."""
    _check_pred_target(p, z_target)
    cos = _pair_cosines(p, z_target)
    term = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7)) / math.pi if geometric else 2.0 - 2.0 * cos
    off = _off_diagonal_mask(p.shape[1], p.device)
    return _global_mean_value(2.0 * term[:, off].mean())


@_loss_dtype
def simsiam(p, z_target, geometric=False):
    """SimSiam loss. p: (B, V, d) predictor outputs, z_target: (B, V, d) projections,
    treated as sg -> scalar.

    Mean over ordered view pairs a != b of -cos(p_a, sg(z_b)) (V = 2: the official
    D(p1, z2)/2 + D(p2, z1)/2); geometric: arccos(p^.z^)/pi, the intended form (the
    geometric repo's branch takes arccos per coordinate).
    Source: Chen & He 2021; facebookresearch/simsiam; vturrisi/solo-learn
    solo/losses/simsiam.py; YeskendirK/geometric-contrastive-learning (SPEC §5).
    Distributed: per-image terms, no gather; value averaged over ranks."""
    _check_pred_target(p, z_target)
    cos = _pair_cosines(p, z_target)
    term = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7)) / math.pi if geometric else -cos
    off = _off_diagonal_mask(p.shape[1], p.device)
    return _global_mean_value(term[:, off].mean())


# ---- registry: --loss flag value -> function ----

LOSSES = {
    "clamp": clamp,
    "mmcr": mmcr,
    "tcr": tcr,
    "mcr2": mcr2,
    "cplearn": cplearn,
    "simclr": simclr,
    "mocov3": mocov3,
    "align_uniform": align_uniform,
    "swav": swav,
    "barlow_twins": barlow_twins,
    "vicreg": vicreg,
    "byol": byol,
    "simsiam": simsiam,
}
