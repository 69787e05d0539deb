"""Forward+backward time of every objective in losses.LOSSES, and of the exact alternatives for
the nuclear norm (MMCR) and the log-determinant (TCR / MCR^2).

    python bench/losses.py --quick                 # B in {256, 1024}, V in {2, 4}, d in {128, 2048}
    python bench/losses.py                         # B in {256, 1024, 4096}, V in {2, 4, 16}, d in {128, 2048, 8192}
    python bench/losses.py --threads 1             # on a shared machine: 2 OpenMP threads on 2 busy
                                                   # cores spin at barriers and time 10-100x worse

A combination is skipped, and the reason recorded, when its rough memory estimate exceeds
--max_gib or when its time, predicted from the costliest measured case of the same objective
that is no larger in any of B, V, d, scaled by the objective's cost model, exceeds
--max_seconds. Prints tables; writes JSON to --out. Not a test: numbers depend on the machine
(printed in the JSON).
"""
import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402

SWAV_PROTOTYPES = 3000   # SwAV CIFAR/ImageNet prototype count
CPLEARN_CODES = 16384    # SPEC §4 c
MCR2_CLUSTERS = 10


def get_args_parser():
    p = argparse.ArgumentParser("loss benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small grid (about a minute on 2 cores)")
    p.add_argument("--out", default="bench/out/losses.json", help="JSON output path (default: %(default)s)")
    p.add_argument("--max_seconds", type=float, default=10.0,
                   help="skip a case whose predicted fwd+bwd time exceeds this (default: %(default)s s)")
    p.add_argument("--max_gib", type=float, default=4.0,
                   help="skip a case whose estimated memory exceeds this (default: %(default)s GiB)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case, median reported (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--losses", default=",".join(losses.LOSSES), help="comma-separated subset (default: all)")
    p.add_argument("--skip_linalg", action="store_true", help="skip the nuclear-norm / logdet comparison")
    p.add_argument("--markdown", default=None, metavar="JSON",
                   help="print the grid of a saved JSON as a markdown table (BENCHMARKS.md) and exit")
    return p


# ---- inputs, cost and memory models per objective ----

def make_inputs(name, b, v, d, gen):
    """(callable running the loss from its leaf tensors, list of leaf tensors)."""
    z = torch.randn(b, v, d, generator=gen).requires_grad_(True)
    fn = losses.LOSSES[name]
    if name in ("byol", "simsiam", "mocov3"):
        t = torch.randn(b, v, d, generator=gen)
        return (lambda: fn(z, t)), [z]
    if name == "mcr2":
        pi = torch.softmax(torch.randn(b, v, MCR2_CLUSTERS, generator=gen), -1)
        return (lambda: fn(z, pi)), [z]
    if name == "cplearn":
        codes = losses.make_cplearn_codes(d, CPLEARN_CODES, gen)
        return (lambda: fn(torch.tanh(z), codes)), [z]
    if name == "swav":  # timed from z: includes the normalised-prototype scores
        protos = F.normalize(torch.randn(SWAV_PROTOTYPES, d, generator=gen), dim=-1)
        return (lambda: fn(F.normalize(z, dim=-1) @ protos.T)), [z]
    return (lambda: fn(z)), [z]


def cost(name, b, v, d):
    """Leading flop count (arbitrary units) used only to extrapolate time; the constants were
    fitted to a few measured cases on the dev CPU, so 'predicted' skips are estimates."""
    pairs = v * (v - 1) / 2
    m = min(b, d)
    # every objective makes ~20 elementwise passes over its (B, V, d) input (normalise, mask,
    # backward); that term dominates the small cases the extrapolation starts from
    return 20 * b * v * d + {
        "clamp": b * b * d + b * v * d,
        "mmcr": b * d * m + m ** 3 + b * v * d,
        "tcr": v * (b * d * m + m ** 3),
        "mcr2": MCR2_CLUSTERS * (b * d * d + d ** 3 / 4),
        # the elementwise passes over the (B, V, c) logits cost about as much as a d = 1024 matmul
        "cplearn": b * v * (d + 1024) * CPLEARN_CODES,
        "simclr": (b * v) ** 2 * d,
        "mocov3": v * v * b * b * d,
        "align_uniform": v * b * b * d,
        "swav": b * v * d * SWAV_PROTOTYPES,
        "barlow_twins": pairs * b * d * d,
        "vicreg": v * b * d * d + pairs * b * d,
        "byol": b * v * v * d,
        "simsiam": b * v * v * d,
    }[name]


def memory_bytes(name, b, v, d):
    """Rough peak (float32, tensors kept for backward), for skipping only."""
    x = b * v * d * 4 * 6
    pairs = v * (v - 1) / 2
    return x + {
        "clamp": 8 * b * b * 4,
        "mmcr": 6 * min(b, d) ** 2 * 8,
        "tcr": 4 * v * min(b, d) ** 2 * 4,
        "mcr2": 4 * MCR2_CLUSTERS * d * d * 4,
        "cplearn": 5 * b * v * CPLEARN_CODES * 4 + d * CPLEARN_CODES * 4,
        "simclr": 6 * (b * v) ** 2 * 4,
        "mocov3": 4 * v * v * b * b * 4,
        "align_uniform": 5 * v * b * b * 4,
        "swav": 6 * b * v * SWAV_PROTOTYPES * 4,
        "barlow_twins": 3 * pairs * d * d * 4,
        "vicreg": 3 * v * d * d * 4,
        "byol": 0, "simsiam": 0,
    }[name]


# ---- timing ----

def time_fwd_bwd(run, leaves, repeats):
    """Median seconds of forward + backward (one warm-up run first; a single timed run when
    the warm-up alone took over 2 s)."""
    def once():
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        run().backward()
        return time.perf_counter() - t0

    first = once()
    if first > 2.0:
        return first
    return statistics.median(once() for _ in range(repeats))


def bench_grid(args, names, grid):
    rows = []
    measured = {}  # name -> list of ((B, V, d), cost, seconds)
    gen = torch.Generator().manual_seed(0)
    for name in names:
        for b, v, d in sorted(grid, key=lambda c: cost(name, *c)):
            row = {"loss": name, "B": b, "V": v, "d": d, "ms": None, "skipped": None}
            gib = memory_bytes(name, b, v, d) / 2 ** 30
            c = cost(name, b, v, d)
            # extrapolate from the costliest measured case no larger in any of B, V, d: it
            # shares the new case's structure, unlike a costlier case of another shape
            below = [(ci, ti) for shape, ci, ti in measured.get(name, [])
                     if all(s <= t for s, t in zip(shape, (b, v, d)))]
            pred = max(below)[1] * c / max(below)[0] if below else 0.0
            if gib > args.max_gib:
                row["skipped"] = f"memory ~{gib:.1f} GiB > {args.max_gib:g}"
            elif pred > args.max_seconds:
                row["skipped"] = f"predicted {pred:.0f} s > {args.max_seconds:g}"
            else:
                run, leaves = make_inputs(name, b, v, d, gen)
                sec = time_fwd_bwd(run, leaves, args.repeats)
                measured.setdefault(name, []).append(((b, v, d), c, sec))
                row["ms"] = round(1e3 * sec, 2)
                del run, leaves
            rows.append(row)
            print(f"{name:14s} B={b:5d} V={v:3d} d={d:5d}  "
                  + (f"{row['ms']:10.2f} ms" if row["ms"] is not None else f"   skipped: {row['skipped']}"),
                  flush=True)
    return rows


# ---- exact alternatives for the nuclear norm and the log-determinant ----

def nuc_svdvals(a):
    return torch.linalg.svdvals(a).sum(-1)


def nuc_gram_eigvalsh32(a):
    """sqrt(eigvalsh) of the float32 Gram: fastest, but NOT exact (float32 squares the
    condition number; gradient 1/(2 sqrt(lambda)) is infinite at zero singular values)."""
    tall = a.shape[-2] >= a.shape[-1]
    g = a.mT @ a if tall else a @ a.mT
    return torch.linalg.eigvalsh(g).clamp_min(0).sqrt().sum(-1)


def logdet_slogdet(w, alpha):
    eye = torch.eye(w.shape[-1], dtype=w.dtype)
    return torch.linalg.slogdet(eye + alpha * w.mT @ w)[1]


def logdet_cholesky_dxd(w, alpha):
    eye = torch.eye(w.shape[-1], dtype=w.dtype)
    chol = torch.linalg.cholesky(eye + alpha * w.mT @ w)
    return 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def bench_linalg(args):
    gen = torch.Generator().manual_seed(1)
    out = {"nuclear_norm": [], "logdet": []}
    print("\nnuclear norm, fwd+bwd ms (max |error| vs float64 svdvals, relative to the value)")
    shapes = [(256, 128), (1024, 128), (4096, 128), (1024, 512), (4096, 512), (256, 2048),
              (1024, 4, 128), (256, 16, 2048)]
    if args.quick:
        shapes = [(256, 128), (1024, 128), (1024, 512), (256, 2048), (1024, 4, 128)]
    methods = {"svdvals": nuc_svdvals, "gram_eigh_f64 (losses.nuclear_norm)": losses.nuclear_norm,
               "gram_eigvalsh_f32 (inexact)": nuc_gram_eigvalsh32}
    for shape in shapes:
        a = torch.randn(shape, generator=gen)
        # centroid-like spectrum: a few strong directions plus a tail
        a = a * torch.logspace(0, -3, shape[-1])
        exact = torch.linalg.svdvals(a.double()).sum(-1)
        row = {"shape": list(shape)}
        for label, fn in methods.items():
            leaf = a.clone().requires_grad_(True)
            ms = 1e3 * time_fwd_bwd(lambda: fn(leaf).sum(), [leaf], args.repeats)
            err = ((fn(a).double() - exact).abs() / exact).max().item()
            row[label] = {"ms": round(ms, 2), "rel_err": err}
        out["nuclear_norm"].append(row)
        print(f"  {str(tuple(shape)):18s} " + "  ".join(f"{k.split()[0]} {v['ms']:8.2f} ({v['rel_err']:.1e})"
                                                       for k, v in row.items() if k != "shape"))
    print("\nlogdet(I + a W^T W), W (n, d), fwd+bwd ms")
    cases = [(1024, 64), (1024, 128), (1024, 512), (4096, 2048), (256, 2048)]
    if args.quick:
        cases = [(1024, 128), (1024, 512), (256, 2048)]
    for n, d in cases:
        w = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
        alpha = d / (n * 0.2)
        exact = logdet_slogdet(w.double(), alpha)
        row = {"n": n, "d": d}
        for label, fn in {"slogdet_dxd": logdet_slogdet, "cholesky_dxd": logdet_cholesky_dxd,
                          "cholesky_smaller_side (losses)": losses.logdet_identity_plus}.items():
            leaf = w.clone().requires_grad_(True)
            ms = 1e3 * time_fwd_bwd(lambda: fn(leaf, alpha), [leaf], args.repeats)
            err = abs(fn(w, alpha).double().item() - exact.item()) / abs(exact.item())
            row[label] = {"ms": round(ms, 2), "rel_err": err}
        out["logdet"].append(row)
        print(f"  n={n:5d} d={d:5d}  " + "  ".join(f"{k.split()[0]} {v['ms']:8.2f} ({v['rel_err']:.1e})"
                                                   for k, v in row.items() if k not in ("n", "d")))
    return out


def print_table(rows, names):
    combos = sorted({(r["B"], r["V"], r["d"]) for r in rows})
    print("\nfwd+bwd ms per objective ('-' = skipped, reason in the JSON)")
    header = f"{'B':>5} {'V':>3} {'d':>5} | " + " ".join(f"{n[:12]:>12}" for n in names)
    print(header)
    print("-" * len(header))
    by_key = {(r["loss"], r["B"], r["V"], r["d"]): r for r in rows}
    for b, v, d in combos:
        cells = []
        for n in names:
            r = by_key.get((n, b, v, d))
            cells.append(f"{r['ms']:12.2f}" if r and r["ms"] is not None else f"{'-':>12}")
        print(f"{b:5d} {v:3d} {d:5d} | " + " ".join(cells))


def markdown_table(path):
    """The fwd+bwd grid of a JSON written by this script, as the markdown table of BENCHMARKS.md."""
    with open(path) as f:
        rows = json.load(f)["grid"]
    names = list(dict.fromkeys(r["loss"] for r in rows))
    by_key = {(r["loss"], r["B"], r["V"], r["d"]): r for r in rows}
    print("| B | V | d | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for b, v, d in sorted({(r["B"], r["V"], r["d"]) for r in rows}):
        cells = [by_key.get((n, b, v, d)) for n in names]
        print(f"| {b} | {v} | {d} | " + " | ".join(
            "–" if c is None or c["ms"] is None else (f"{c['ms']:.0f}" if c["ms"] >= 100 else f"{c['ms']:.3g}")
            for c in cells) + " |")


def main(args):
    if args.markdown:
        return markdown_table(args.markdown)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.losses.split(",") if n]
    unknown = [n for n in names if n not in losses.LOSSES]
    if unknown:
        raise SystemExit(f"bench/losses.py: unknown loss(es) {unknown}; choose from {list(losses.LOSSES)}")
    if args.quick:
        grid = list(itertools.product([256, 1024], [2, 4], [128, 2048]))
    else:
        grid = list(itertools.product([256, 1024, 4096], [2, 4, 16], [128, 2048, 8192]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    t0 = time.time()
    rows = bench_grid(args, names, grid)
    print_table(rows, names)
    linalg = None if args.skip_linalg else bench_linalg(args)
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "args": vars(args), "grid": rows, "linalg": linalg, "seconds": round(time.time() - t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
