"""Self-supervised pretraining: any objective of losses.LOSSES on one identical pipeline.

    python train_ssl.py --data_path data/fmnist_train.beton --loss clamp ...            # 1 process
    torchrun --nproc_per_node=8 train_ssl.py --data_path in1k_train.beton --loss clamp ...

Re-running the same command resumes from OUTPUT_DIR/checkpoint.pth. Every --flag is documented
in --help; recipes are the shell scripts in scripts/.
"""
import argparse
import contextlib
import copy
import inspect
import json
import os
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import losses
import utils
from models import build_model, parse_dims, ARCHS

# ---- flags -------------------------------------------------------------------------------------

# Help for the loss hyper-parameters that are generated from the signatures in losses.LOSSES.
LOSS_KW_HELP = {
    'r_s': 'CLAMP radius scale (SPEC: 7.0 CIFAR, 8.5 ImageNet)',
    'pot_pow': 'CLAMP potential exponent p',
    'max_range': 'CLAMP cap on the contact distance sigma_ij',
    'min_margin': 'CLAMP: pairs closer than this are not counted as contacts',
    'size_weight': 'CLAMP weight lw0 of the sum of radii (0 = off, as in every official config)',
    'log_energy': 'CLAMP: optimise log(E + 1e-6) (official) instead of E',
    'temperature': 'softmax temperature of contrastive losses (SimCLR 0.2; geometric configs use 0.05)',
    'geometric': 'use geodesic similarity 1 - arccos(u.v)/pi instead of cosine (SPEC 5)',
    'lmbda': 'MMCR weight of the local nuclear-norm term (0 = official default)',
    'eps': 'TCR/MCR2 distortion epsilon of the coding rate',
    'z_weight': 'TCR weight of the view-invariance term',
    'beta': 'CPLearn weight of the cross-entropy term',
}


def loss_kwargs_spec():
    """{keyword: {loss_name: default}} over every objective's float/int/bool keywords."""
    spec = {}
    for name, fn in losses.LOSSES.items():
        for p in inspect.signature(fn).parameters.values():
            if p.default is not inspect.Parameter.empty and isinstance(p.default, (bool, int, float)):
                spec.setdefault(p.name, {})[name] = p.default
    return spec


def get_args_parser():
    p = argparse.ArgumentParser('manifold-ssl pretraining', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--arch', default='resnet18', choices=sorted(ARCHS), help='Backbone. (default: %(default)s)')
    g.add_argument('--cifar_stem', type=utils.str2bool, default=True,
                   help='3x3 stride-1 first conv and no max-pool: use for inputs <= 64 px (CIFAR, '
                        'Fashion-MNIST); 0 for ImageNet-size inputs. (default: %(default)s)')
    g.add_argument('--width', type=int, default=64,
                   help='Base width of the ResNet (64 = torchvision; 8-16 trains on a CPU). (default: %(default)s)')
    g.add_argument('--proj_dims', default='2048-256',
                   help="Projector widths after the backbone, e.g. 2048-256 (CLAMP CIFAR), 8192-8192-512 "
                        "(ImageNet); '' for none. (default: %(default)s)")
    g.add_argument('--proj_bn', type=utils.str2bool, default=False,
                   help='BatchNorm in the projector\'s hidden layers (CLAMP: 0, MMCR/SimCLR/BYOL: 1). (default: %(default)s)')
    g.add_argument('--proj_bias', type=utils.str2bool, default=True, help='Bias in projector Linear layers '
                   '(MMCR: 0). (default: %(default)s)')
    g.add_argument('--proj_last_bn', type=utils.str2bool, default=False,
                   help='BatchNorm after the last projector layer (CPLearn, Barlow Twins, MoCo v3, SimSiam). '
                        '(default: %(default)s)')
    g.add_argument('--proj_last_bn_affine', type=utils.str2bool, default=True,
                   help='That last BatchNorm learns a scale and shift (0: affine-free, as solo-learn\'s MoCo v3 '
                        'and SimSiam projectors). (default: %(default)s)')
    g.add_argument('--proj_out_act', default='none', choices=['none', 'tanh'],
                   help='Activation after the projector (CPLearn: tanh). (default: %(default)s)')
    g.add_argument('--pred_dims', default='', help="Predictor widths after the projector (BYOL: 4096-256); '' for none.")
    g.add_argument('--forward_views', default='together', choices=['together', 'separately'],
                   help='together: all B*V views in one forward pass, BatchNorm statistics over every view '
                        '(the official CLAMP and MMCR code); separately: one pass per view, statistics per '
                        "view (solo-learn's habit, so its baselines' recipes set it). (default: %(default)s)")
    g.add_argument('--ema', type=utils.str2bool, default=False,
                   help='Keep an EMA (momentum) copy of backbone+projector as the target branch (BYOL, '
                        'MoCo v3, MMCR +ME). (default: %(default)s)')
    g.add_argument('--ema_momentum', type=float, default=0.99, help='EMA momentum at step 0. (default: %(default)s)')
    g.add_argument('--ema_final', type=float, default=1.0,
                   help='EMA momentum at the end, reached along a half-cosine (BYOL: 1.0; MMCR +ME uses a '
                        'constant 0.99: set it equal to --ema_momentum). (default: %(default)s)')

    g = p.add_argument_group('ssl')
    g.add_argument('--loss', default='clamp', help=f'Objective, one of: {", ".join(losses.LOSSES)}. (default: %(default)s)')
    g.add_argument('--num_views', type=int, default=2,
                   help='Views per image V (CLAMP CIFAR 16, MMCR 40, most baselines 2). (default: %(default)s)')
    g.add_argument('--recipe', default='cifar', choices=list(data.RECIPES),
                   help='Augmentation recipe of data.py (SPEC §7). (default: %(default)s)')
    g.add_argument('--colour_ops', default='auto', choices=['auto', 'decoder', 'torch'],
                   help='Where the per-view colour augmentations run: decoder = numba inside the ffcv decoder '
                        'threads (fastest on CPUs), torch = batched torch ops on the training device (fastest '
                        'with a GPU); auto picks by device. Same distribution either way. (default: %(default)s)')
    g.add_argument('--crop_min_scale', type=float, default=0.08,
                   help='Lower bound of RandomResizedCrop\'s area scale. (default: %(default)s)')
    g.add_argument('--interpolation', default='bilinear', choices=['bilinear', 'area'],
                   help='How crops are resized: bilinear = torchvision\'s RandomResizedCrop (antialiased; '
                        'SPEC §7); area = stock FFCV\'s INTER_AREA, whose upsampling (every CIFAR crop) '
                        'is a box filter, nearest neighbour at integer factors. (default: %(default)s)')
    g.add_argument('--num_small_views', type=int, default=0,
                   help='Multi-crop: K extra small views per image of side --small_res (SwAV/DINO ImageNet: '
                        '6 x 96 px with --crop_min_scale 0.14), cut from the same decode; the model sees '
                        'the --num_views large views first, then the small ones. (default: %(default)s)')
    g.add_argument('--small_res', type=int, default=96, help='Side of the small views. (default: %(default)s)')
    g.add_argument('--small_scale', type=float, nargs=2, default=[0.05, 0.14], metavar=('MIN', 'MAX'),
                   help='RandomResizedCrop area range of the small views. (default: 0.05 0.14)')
    g.add_argument('--swav_prototypes', type=int, default=3000,
                   help='SwAV: number K of prototypes (solo-learn CIFAR 3000). (default: %(default)s)')
    g.add_argument('--freeze_prototypes_epochs', type=float, default=1.0,
                   help='SwAV: prototypes get no update during the first N epochs (helps it start). (default: %(default)s)')
    g.add_argument('--swav_queue_size', type=int, default=0,
                   help='SwAV: queue of the last N embeddings (global, split over processes) of the assignment '
                        'views, scored against the current prototypes and added to the Sinkhorn batch; for small '
                        'batches (solo-learn CIFAR 3840). 0 = off. (default: %(default)s)')
    g.add_argument('--swav_queue_start_epoch', type=int, default=50,
                   help='SwAV: the queue is filled from the start and used from this epoch on, once full '
                        '(solo-learn CIFAR 50). (default: %(default)s)')
    g.add_argument('--cplearn_codes', type=int, default=16384,
                   help='CPLearn: number c of columns of the fixed random +-1 code matrix. (default: %(default)s)')
    for kw, per_loss in loss_kwargs_spec().items():
        d = ', '.join(f'{k} {v}' for k, v in per_loss.items())
        typ = utils.str2bool if isinstance(next(iter(per_loss.values())), bool) else type(next(iter(per_loss.values())))
        g.add_argument(f'--{kw}', type=typ if typ is not int else float, default=None,
                       help=f"{LOSS_KW_HELP.get(kw, 'keyword of the loss')}. Default: the loss's own ({d}).")

    g = p.add_argument_group('optim')
    g.add_argument('--epochs', type=int, default=100, help='(default: %(default)s)')
    g.add_argument('--warmup_epochs', type=float, default=10, help='Linear LR warm-up. (default: %(default)s)')
    g.add_argument('--batch_size', type=int, default=256,
                   help='GLOBAL batch size in images (each gives --num_views views); must divide by the '
                        'number of processes. (default: %(default)s)')
    g.add_argument('--optimizer', default='lars', choices=['lars', 'sgd', 'adamw', 'adam'], help='(default: %(default)s)')
    g.add_argument('--blr', type=float, default=0.3,
                   help='Base learning rate per 256 images: lr = blr * batch_size / 256 (CLAMP CIFAR 0.1, '
                        'SimCLR 0.4). (default: %(default)s)')
    g.add_argument('--lr', type=float, default=None, help='Absolute learning rate; overrides --blr.')
    g.add_argument('--min_lr', type=float, default=0.0, help='LR at the end of the cosine. (default: %(default)s)')
    g.add_argument('--weight_decay', type=float, default=1e-6,
                   help='Weight decay of >=2-D tensors (CLAMP 1e-6, solo-learn baselines 1e-4). (default: %(default)s)')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD/LARS momentum. (default: %(default)s)')
    g.add_argument('--lars_eta', type=float, default=1e-3, help='LARS trust coefficient (solo-learn 0.02). (default: %(default)s)')
    g.add_argument('--lars_clip', type=utils.str2bool, default=False, help="Clip the LARS trust ratio as solo-learn (Apex LARC): each tensor's step is "
                        "min(eta*||w||/(||g||+wd*||w||), lr); off: barlowtwins' lr*eta*||w||/||g+wd*w||. (default: %(default)s)")
    g.add_argument('--clip_grad', type=float, default=0.0, help='Max global grad norm, 0 = off. (default: %(default)s)')

    g = p.add_argument_group('eval')
    g.add_argument('--probe_lr', type=float, default=0.1,
                   help='LR of the online linear probe (SGD on detached backbone features, its own '
                        'optimizer; collapse shows within an epoch). (default: %(default)s)')
    g.add_argument('--knn_every', type=int, default=10,
                   help='kNN monitor (train bank -> --val_path) every N epochs and at the end; 0 = off. (default: %(default)s)')
    g.add_argument('--knn_k', type=int, default=20, help='(default: %(default)s)')
    g.add_argument('--knn_t', type=float, default=0.07, help='(default: %(default)s)')
    g.add_argument('--diag_batch', type=int, default=256,
                   help='Images of the held-out batch (from --val_path) on which packing diagnostics are '
                        'logged every epoch; 0 = off. (default: %(default)s)')

    utils.add_data_args(p)
    g = utils.add_run_args(p, default_output='runs/ssl')
    g.add_argument('--ckpt_every_steps', type=int, default=0,
                   help='Also checkpoint every N steps inside an epoch (resumes at that batch). 0 = only '
                        'at epoch ends. (default: %(default)s)')
    g.add_argument('--stop_at_epoch', type=int, default=None,
                   help='Checkpoint and exit before this epoch, leaving the schedule of --epochs intact: '
                        'splits a long run over several time-limited jobs (re-run to continue).')
    g.add_argument('--nan_policy', default='stop', choices=['stop', 'skip'],
                   help='On a non-finite loss: stop = exit 4 naming the last good checkpoint (no sync per '
                        'step); skip = drop that step (no optimizer/scaler/EMA update, BN statistics '
                        'restored), count it in log.txt (train_skipped_steps) and go on, stopping as '
                        '"stop" once more than --max_skipped_steps were skipped; costs one sync per step. '
                        'May change on resume: continue a stopped run with skip. (default: %(default)s)')
    g.add_argument('--max_skipped_steps', type=int, default=10,
                   help='--nan_policy skip: stop once more steps than this were skipped over the whole '
                        'run (a diverging run is not rescued by skipping). (default: %(default)s)')
    # test hooks: a NaN loss at this global step; SIGTERM to ourselves at this step; SIGKILL to
    # ourselves at this step unless this process resumed at or after it (a crash once, for
    # torchrun --max-restarts)
    g.add_argument('--nan_inject_step', type=int, default=-1, help=argparse.SUPPRESS)
    g.add_argument('--signal_at_step', type=int, default=-1, help=argparse.SUPPRESS)
    g.add_argument('--crash_at_step', type=int, default=-1, help=argparse.SUPPRESS)
    return p


# ---- set-up ------------------------------------------------------------------------------------

def check_args(args, world_size):
    if args.loss not in losses.LOSSES:
        utils.fail(f"unknown --loss {args.loss!r}; choose one of: {', '.join(losses.LOSSES)}")
    if args.batch_size % world_size:
        utils.fail(f"--batch_size {args.batch_size} does not divide by the {world_size} processes; "
                   f"use a multiple of {world_size}")
    if args.num_views < 2:
        utils.fail('--num_views must be >= 2 (each image needs at least two views)')
    for flag in ('proj_dims', 'pred_dims'):
        try:
            parse_dims(getattr(args, flag))
        except ValueError:
            utils.fail(f"--{flag} {getattr(args, flag)!r}: write layer widths joined by '-', e.g. 2048-256")
    if args.num_small_views < 0:
        utils.fail(f"--num_small_views must be >= 0, got {args.num_small_views}")
    if args.max_skipped_steps < 0:
        utils.fail(f"--max_skipped_steps must be >= 0, got {args.max_skipped_steps}")
    if args.swav_queue_size:
        if args.loss != 'swav':
            utils.fail(f"--swav_queue_size is a flag of --loss swav, not {args.loss}")
        per_rank = args.swav_queue_size // world_size
        if args.swav_queue_size % world_size or per_rank < args.batch_size // world_size:
            utils.fail(f"--swav_queue_size {args.swav_queue_size} must divide by the {world_size} processes "
                       f"and hold at least one per-process batch ({args.batch_size // world_size})")
    names = loss_inputs(args.loss)
    if 'pi' in names:
        utils.fail(f"--loss {args.loss} is the NMCE clustering-stage objective (it needs cluster "
                   f"probabilities): pretrain with --loss tcr, then run the clustering stage")
    if names[0] in ('p', 'q') and not args.pred_dims:
        utils.fail(f"--loss {args.loss} needs a predictor: pass --pred_dims (e.g. 4096-256)")
    if names[0] not in ('p', 'q') and args.pred_dims:  # DDP would stop at step 2 on its unused parameters
        utils.fail(f"--loss {args.loss} uses no predictor: drop --pred_dims")
    if ('k' in names or args.loss == 'byol') and not args.ema:  # byol's z_target: the EMA teacher's
        utils.fail(f"--loss {args.loss} compares with a momentum encoder: pass --ema 1"
                   + (" (without it the target is the online network, stop-gradient: --loss simsiam)"
                      if args.loss == 'byol' else ''))
    for kw, per_loss in loss_kwargs_spec().items():
        if getattr(args, kw) is not None and args.loss not in per_loss:
            utils.fail(f"--{kw} is not a hyper-parameter of --loss {args.loss} (it belongs to {', '.join(per_loss)})")


def loss_inputs(name):
    """The tensor arguments an objective takes, read off its signature: ('z',), ('z', 'codes'),
    ('p', 'z_target'), ... — so train_ssl needs no per-method branches."""
    params = inspect.signature(losses.LOSSES[name]).parameters.values()
    return tuple(p.name for p in params if p.default is inspect.Parameter.empty)


def loss_kwargs(args):
    """The loss keywords given on the command line, in the type of the loss's own default (int
    keywords such as sinkhorn_iters parse as float: '--pot_pow 2' must stay a float)."""
    out = {}
    for kw, per_loss in loss_kwargs_spec().items():
        v = getattr(args, kw)
        if args.loss in per_loss and v is not None:
            d = per_loss[args.loss]
            if isinstance(d, int) and not isinstance(d, bool):
                if float(v) != int(v):
                    utils.fail(f"--{kw} must be a whole number for --loss {args.loss}, got {v}")
                v = int(v)
            out[kw] = v
    return out


def wrap_ddp(net, device, local_rank):
    """DDP around the SSL model + probe. CPLearn's code matrix (f x c floats: 128 MiB at 2048 x 16384)
    is never trained and is the same on every rank (drawn from --seed, or loaded from the
    checkpoint), so DDP is told to leave it out of the buffers it broadcasts from rank 0 before every
    forward pass (the BN statistics still are)."""
    if isinstance(getattr(net.model, 'codes', None), torch.Tensor):
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, ['model.codes'])
    return nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if device.type == 'cuda' else None)


class SSLWithProbe(nn.Module):
    """The SSL model plus the online linear probe, one module so DDP averages both. The probe
    reads detached backbone features through an affine-free BN (scale-free, so its own LR works
    for any method)."""

    def __init__(self, model, num_features, num_classes):
        super().__init__()
        self.model = model
        self.probe = nn.Sequential(nn.BatchNorm1d(num_features, affine=False), nn.Linear(num_features, num_classes))

    def forward(self, views):
        out = self.model(views)
        n = (views[0] if isinstance(views, (list, tuple)) else views).shape[1]  # probe: large views only
        out['logits'] = self.probe(out['feats'][:, :n].detach().flatten(0, 1).float())
        return out


class EmbeddingQueue:
    """SwAV's queue on this process: the last `size` unit-norm embeddings (size, A, d) of the A
    assignment views. Filled every step; `active` (set per epoch by the loop) and full -> its
    scores against the current prototypes join the Sinkhorn batch (the loss gathers them over
    processes). Per-process state, saved per rank in the checkpoint."""

    def __init__(self, size, num_views, dim, device):
        self.q = torch.zeros(size, num_views, dim, device=device)
        self.count, self.active = 0, False

    @property
    def ready(self):
        return self.active and self.count >= len(self.q)

    @torch.no_grad()
    def push(self, z):
        z = z.detach().float()[-len(self.q):]
        self.q = torch.cat([z, self.q[:len(self.q) - len(z)]])
        self.count += len(z)

    def state_dict(self):
        return {'q': self.q.cpu(), 'count': self.count}

    def load_state_dict(self, state):
        self.q.copy_(state['q'])
        self.count = int(state['count'])


def make_loss_fn(args, teacher, queue=None, amp=None):
    """Return f(out, views) -> loss, dispatching tensors by the objective's parameter names.
    amp: the autocast context the teacher's forward runs in (the student's too)."""
    amp = amp if amp is not None else contextlib.nullcontext()
    fn, kw, names = losses.LOSSES[args.loss], loss_kwargs(args), loss_inputs(args.loss)
    params = inspect.signature(fn).parameters
    num_assign = int(kw.get('num_assign_views', params['num_assign_views'].default)) if queue is not None else 0

    def target_z(out, views):
        if teacher is None:
            return out['z'].detach()
        with torch.no_grad(), amp:
            return teacher(views)['z']

    def compute(out, views, model):
        tensors, extra = [], {}
        for n in names:
            if n in ('z', 'h'):
                tensors.append(out['z'])
            elif n in ('p', 'q'):
                tensors.append(out['p'])
            elif n in ('z_target', 'k'):
                tensors.append(target_z(out, views))
            elif n == 'codes':
                tensors.append(model.codes)
            elif n == 'scores':  # SwAV: cosine of each view to the (unit-norm) prototypes
                zn, protos = F.normalize(out['z'].float(), dim=-1), model.prototypes.weight.float()
                tensors.append(zn @ protos.T)
                if queue is not None:  # scores of the queued embeddings, then this batch joins the queue
                    if queue.ready:
                        extra['queue_scores'] = queue.q @ protos.detach().T
                    queue.push(zn[:, :num_assign])
            else:
                raise RuntimeError(f'train_ssl: no rule to feed argument {n!r} of losses.{args.loss}')
        if args.loss == 'mmcr' and teacher is not None:
            extra['z_momentum'] = target_z(out, views)
        # losses are computed in float32 outside autocast (SVD/logdet/arccos are not bf16-safe)
        with torch.autocast(device_type=tensors[0].device.type, enabled=False):
            return fn(*[t.float() if t.is_floating_point() else t for t in tensors], **kw, **extra)
    return compute


# ---- training ----------------------------------------------------------------------------------

class Preempted(Exception):
    pass


STOP = {'signal': None}


def _on_signal(signum, frame):
    STOP['signal'] = signum  # handled at the next step boundary: save, then exit 3


def train_one_epoch(ddp_model, teacher, loss_fn, optimizer, probe_opt, scaler, loader, epoch, args, ctx):
    """One pass over the loader; LR/EMA set per step from the global step. Metrics accumulate on
    the device and are read every --print_freq steps (no sync per step). Returns a stats dict."""
    model = utils.unwrap(ddp_model)
    ddp_model.train()
    n_iter = len(loader)
    total = args.epochs * n_iter
    warm = int(args.warmup_epochs * n_iter)
    start_it = ctx['start_batch']
    ctx.setdefault('first_step', epoch * n_iter + start_it)  # where this process started (--crash_at_step)
    sums = torch.zeros(3, device=ctx['device'])  # loss, probe correct, probe count
    nonfinite = torch.zeros((), dtype=torch.bool, device=ctx['device'])
    t0, seen, counted, n_img = time.time(), 0, 0, 0  # counted: steps in sums (skipped ones are not)
    lr = utils.cosine_lr(epoch * n_iter + start_it, total, warm, args.lr, args.min_lr)  # if no step runs
    skip_mode = args.nan_policy == 'skip'

    def stop_nonfinite(step, it, why=''):
        utils.fail(f"non-finite loss at or before step {step} (epoch {epoch}, batch {it}){why}; weights "
                   f"since the last checkpoint are discarded; the last good checkpoint is "
                   f"{ctx['ckpt_path']} ({'present' if os.path.exists(ctx['ckpt_path']) else 'none yet'}). "
                   f"Lower --blr, use --dtype float32, or --clip_grad", code=4)
    bar = tqdm(total=n_iter, initial=start_it, desc=f'epoch {epoch}', disable=not utils.is_main_process(),
               dynamic_ncols=True, leave=False)
    for it, (views, labels) in enumerate(loader.iter_from(start_it) if start_it else loader, start=start_it):
        step = epoch * n_iter + it
        lr = utils.cosine_lr(step, total, warm, args.lr, args.min_lr)
        for gr in optimizer.param_groups:
            gr['lr'] = lr
        if model.model.prototypes is not None:
            with torch.no_grad():  # SwAV keeps prototypes on the unit sphere
                w = model.model.prototypes.weight
                w.copy_(F.normalize(w, dim=1))
        if skip_mode:  # the forward pass changes state too: BN statistics, SwAV's queue
            kept = snapshot_step_state(model, teacher, ctx.get('queue'))
        with ctx['amp']:
            out = ddp_model(views)
        loss = loss_fn(out, views, model.model)
        if step == args.nan_inject_step:
            loss = loss * float('nan')
        if step == args.signal_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == args.crash_at_step and ctx['first_step'] < step:
            os.kill(os.getpid(), signal.SIGKILL)  # a node failure mid-step, once: a restart resumes here
        probe_loss = F.cross_entropy(out['logits'].float(), labels.repeat_interleave(out['logits'].shape[0] // labels.shape[0]))
        optimizer.zero_grad(set_to_none=True)
        probe_opt.zero_grad(set_to_none=True)
        # backward even on a step that will be skipped: DDP's gradient all-reduce expects one per forward
        scaler.scale(loss + probe_loss).backward()
        apply = True
        if skip_mode:  # one sync per step; every rank must agree to skip the same step
            bad = (~torch.isfinite(loss.detach() + probe_loss.detach())).float().reshape(1)
            if ctx['world_size'] > 1:
                torch.distributed.all_reduce(bad)
            apply = bad.item() == 0
        if apply:
            if model.model.prototypes is not None and epoch < args.freeze_prototypes_epochs:
                model.model.prototypes.weight.grad = None
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.step(probe_opt)
            scaler.update()
            if teacher is not None:
                ema_update(teacher, model.model, utils.cosine_momentum(step, total, args.ema_momentum, args.ema_final))
            with torch.no_grad():
                nonfinite |= ~torch.isfinite(loss.detach())
                sums[0] += loss.detach().float()
                sums[1] += (out['logits'].argmax(1) == labels.repeat_interleave(out['logits'].shape[0] // labels.shape[0])).sum()
                sums[2] += out['logits'].shape[0]
            counted += 1
        else:  # --nan_policy skip: no update at all; the optimizer, scaler and EMA never see this step
            optimizer.zero_grad(set_to_none=True)
            probe_opt.zero_grad(set_to_none=True)
            restore_step_state(kept)
            ctx['skipped'] += 1
            print(f"| step {step}: non-finite loss, update skipped ({ctx['skipped']} skipped so far, "
                  f"--max_skipped_steps {args.max_skipped_steps})")
            if ctx['skipped'] > args.max_skipped_steps:
                stop_nonfinite(step, it, f" and {ctx['skipped']} steps skipped, more than --max_skipped_steps "
                                         f"{args.max_skipped_steps}")
        seen += 1
        n_img += labels.shape[0] * ctx['world_size']
        bar.update(1)
        last = it == n_iter - 1
        if it % args.print_freq == 0 or last:
            if nonfinite.item():
                stop_nonfinite(step, it)
            bar.set_postfix(loss=f'{sums[0].item() / max(1, counted):.4f}', probe=f'{100 * sums[1].item() / max(1, sums[2].item()):.1f}',
                            lr=f'{lr:.2e}')
        stop_now = STOP['signal'] is not None
        if ctx['world_size'] > 1:  # every rank must agree to stop at the same step: a CPU flag over
            flag = torch.tensor([float(stop_now)])  # gloo, so no wait for the GPU's queued kernels
            torch.distributed.all_reduce(flag, group=ctx['ctrl_group'])
            stop_now = flag.item() > 0
        if stop_now and last:  # the epoch is complete: end it as usual (eval, log, save), then stop
            ctx['stop_after_epoch'] = True
        elif stop_now or (args.ckpt_every_steps and (step + 1) % args.ckpt_every_steps == 0 and not last):
            # never overwrite the last good checkpoint with weights a non-finite step has reached
            # (with --nan_policy stop the step was applied; it is read only every --print_freq)
            if utils.all_reduce_mean(nonfinite.float().reshape(1)).item() > 0:
                stop_nonfinite(step, it)
            ctx['save'](epoch, it + 1)
            if stop_now:
                bar.close()
                raise Preempted()
    bar.close()
    sums = utils.all_reduce_mean(sums)
    dt = time.time() - t0
    return {'loss': sums[0].item() / counted if counted else float('nan'), 'probe_acc': 100 * sums[1].item() / max(1, sums[2].item()),
            'lr': lr, 'images_per_s': n_img / max(dt, 1e-9), 'time_s': dt, 'skipped_steps': ctx['skipped']}


def _bn_buffers(*modules):
    return [b for mod in modules if mod is not None for m in mod.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers()]


def snapshot_step_state(net, teacher, queue):
    """What a forward pass changes besides activations (BN running statistics of the model, the
    probe and the teacher; SwAV's queue), kept so that a skipped step leaves no trace."""
    bufs = _bn_buffers(net, teacher)
    return bufs, [b.clone() for b in bufs], queue, (queue.q.clone(), queue.count) if queue is not None else None


@torch.no_grad()
def restore_step_state(kept):
    bufs, copies, queue, q = kept
    for b, c in zip(bufs, copies):
        b.copy_(c)
    if queue is not None:
        queue.q, queue.count = q


@torch.no_grad()
def ema_update(teacher, student, m):
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(m).add_(ps.detach(), alpha=1 - m)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        bt.copy_(bs)


@torch.no_grad()
def evaluate(model, args, ctx, epoch, knn):
    """Packing diagnostics on a fixed held-out batch (V augmented views), and the kNN monitor."""
    model.eval()
    stats = {}
    if ctx['diag_views'] is not None:
        with ctx['amp']:
            z = model(ctx['diag_views'])['z'].float()
        geo = {k: getattr(args, k) for k in ('r_s', 'pot_pow', 'max_range', 'min_margin')
               if getattr(args, k, None) is not None}  # the CLAMP flags given; defaults otherwise
        stats.update({f'diag_{k}': v for k, v in losses.clamp_diagnostics(z, **geo).items()})
    if knn and args.val_path:
        bank = utils.extract_features(model.backbone, ctx['knn_train'], ctx['device'], ctx['amp'])
        test = utils.extract_features(model.backbone, ctx['knn_val'], ctx['device'], ctx['amp'])
        res = utils.knn_classify(*bank, *test, ks=(args.knn_k,), T=args.knn_t, num_classes=ctx['num_classes'])
        stats['knn_top1'], stats['knn_top5'] = res[args.knn_k]
    model.train()
    return stats


def main(args):
    rank, world_size, local_rank, device = utils.init_distributed_mode()
    check_args(args, world_size)
    info = data.beton_info(args.data_path)
    infos = [info] + ([data.beton_info(args.val_path)] if args.val_path else [])
    channels_flag = args.channels
    args.res = args.res or max(info['resolution'])
    args.channels = args.channels or info['channels']
    args.in_chans = args.channels
    for inf in infos:  # no silent upsampling or channel conversion, before anything is written
        utils.check_beton_input(inf, args.res, args.channels, args.in_chans, channels_flag, args.allow_upsample)
    args.lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    if args.num_small_views and not 1 <= args.small_res <= args.res:
        utils.fail(f"--small_res {args.small_res} must be in [1, --res {args.res}]")
    utils.prepare_output_dir(args)
    utils.fix_random_seeds(args.seed + rank)
    per_rank = args.batch_size // world_size
    print(f"| world size {world_size} | per-process batch {per_rank} images x {args.num_views} views | "
          f"global batch {args.batch_size} | base lr {args.blr} per 256 -> lr {args.lr:.4g} | device {device}")

    # model, teacher, probe
    model = build_model(args)
    if loss_inputs(args.loss)[1:2] == ('codes',):
        g = torch.Generator().manual_seed(args.seed)
        model.register_buffer('codes', losses.make_cplearn_codes(model.projector.out_dim, args.cplearn_codes, g))
    if 'scores' in loss_inputs(args.loss):
        model.prototypes = nn.Linear(model.projector.out_dim, args.swav_prototypes, bias=False)
    num_classes = info['num_classes']
    net = SSLWithProbe(model, model.backbone.num_features, num_classes).to(device)
    if device.type == 'cuda':  # on CPU, channels_last corrupted the heap in torch 2.14 (oneDNN, narrow nets)
        net = net.to(memory_format=torch.channels_last)
    if world_size > 1 and device.type == 'cuda':  # SyncBN is GPU-only; gloo/CPU runs keep per-rank BN
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    teacher = None
    if args.ema:
        teacher = copy.deepcopy(net.model)
        teacher.predictor = None
        for q in teacher.parameters():
            q.requires_grad_(False)
    groups = utils.param_groups(net.model, args.weight_decay)
    print(f"| params: {utils.count_params(net.model) / 1e6:.2f}M | decayed tensors {len(groups[0]['params'])}, "
          f"no-decay (ndim<=1) tensors {len(groups[1]['params'])} | optimizer {args.optimizer}")
    optimizer = utils.build_optimizer(args.optimizer, groups, args.lr, args.momentum, args.lars_eta, args.lars_clip)
    probe_opt = torch.optim.SGD(net.probe.parameters(), lr=args.probe_lr, momentum=0.9)
    scaler = utils.make_scaler(args.dtype, device)

    queue = None
    if args.swav_queue_size:
        n_assign = loss_kwargs(args).get('num_assign_views',
                                         inspect.signature(losses.swav).parameters['num_assign_views'].default)
        queue = EmbeddingQueue(args.swav_queue_size // world_size, n_assign, model.projector.out_dim, device)

    # resume
    ckpt_path = os.path.join(args.output_dir, 'checkpoint.pth')
    start_epoch, start_batch, skipped = 0, 0, 0
    if os.path.exists(ckpt_path):
        ck = utils.load_checkpoint_file(ckpt_path)
        net.load_state_dict(ck['model'])
        if teacher is not None:
            teacher.load_state_dict(ck['teacher'])
        optimizer.load_state_dict(ck['optimizer'])
        probe_opt.load_state_dict(ck['probe_opt'])
        scaler.load_state_dict(ck['scaler'])
        start_epoch, start_batch = ck['epoch'], ck['batch']
        skipped = int(ck.get('skipped_steps', 0))  # --nan_policy skip's count runs over the whole run
        if ck.get('rng') and rank < len(ck['rng']):
            utils.set_rng_state(ck['rng'][rank])
        if queue is not None and ck.get('swav_queue') and rank < len(ck['swav_queue']):
            queue.load_state_dict(ck['swav_queue'][rank])
        print(f"| resumed from {ckpt_path}: epoch {start_epoch}, batch {start_batch}")

    if args.compile:
        net.compile()
    ddp_model = wrap_ddp(net, device, local_rank)

    loader = data.build_ssl_loader(args.data_path, per_rank, args.num_views, args.res, recipe=args.recipe,
                                   channels=args.channels, workers=args.workers, seed=args.seed,
                                   distributed=world_size > 1, rank=rank, world_size=world_size, device=device,
                                   scale=(args.crop_min_scale, 1.0), small_views=args.num_small_views,
                                   small_res=args.small_res, small_scale=tuple(args.small_scale),
                                   colour=args.colour_ops, interpolation=args.interpolation)
    ctx = {'device': device, 'world_size': world_size, 'amp': utils.autocast_ctx(args.dtype, device),
           'num_classes': num_classes, 'ckpt_path': ckpt_path, 'start_batch': start_batch, 'diag_views': None,
           'ctrl_group': utils.cpu_group() if world_size > 1 else None}
    if args.val_path and args.diag_batch:
        diag = data.build_ssl_loader(args.val_path, args.diag_batch, args.num_views, args.res, recipe=args.recipe,
                                     channels=args.channels, workers=args.workers, seed=args.seed + 12345,
                                     device=device, drop_last=False, scale=(args.crop_min_scale, 1.0),
                                     order='sequential', colour=args.colour_ops, interpolation=args.interpolation)
        ctx['diag_views'] = next(iter(diag))[0]
    if args.val_path and args.knn_every:
        ctx['knn_train'] = data.build_eval_loader(args.data_path, 512, args.res, channels=args.channels,
                                                  workers=args.workers, device=device, rank=rank, world_size=world_size)
        ctx['knn_val'] = data.build_eval_loader(args.val_path, 512, args.res, channels=args.channels,
                                                workers=args.workers, device=device, rank=rank, world_size=world_size,
                                                norm_from=args.data_path)
    loss_fn = make_loss_fn(args, teacher, queue, ctx['amp'])

    def save(epoch, batch):
        rngs, queues = [None] * world_size, [None] * world_size
        torch.distributed.all_gather_object(rngs, utils.rng_state())
        if queue is not None:
            torch.distributed.all_gather_object(queues, queue.state_dict())
        state = {'model': utils.unwrap(ddp_model).state_dict(), 'teacher': teacher.state_dict() if teacher else None,
                 'optimizer': optimizer.state_dict(), 'probe_opt': probe_opt.state_dict(),
                 'scaler': scaler.state_dict(), 'epoch': epoch, 'batch': batch, 'rng': rngs, 'args': vars(args),
                 'swav_queue': queues if queue is not None else None, 'skipped_steps': ctx['skipped']}
        utils.save_on_master(state, ckpt_path)
    ctx['save'] = save
    ctx['skipped'], ctx['queue'] = skipped, queue

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, _on_signal)

    timer = utils.Timer()
    for epoch in range(start_epoch, args.epochs):
        if args.stop_at_epoch is not None and epoch >= args.stop_at_epoch:
            print(f"| --stop_at_epoch {args.stop_at_epoch}: stopping; re-run without it to continue")
            utils.cleanup_distributed()
            return
        loader.set_epoch(epoch)
        if queue is not None:
            queue.active = epoch >= args.swav_queue_start_epoch
        try:
            train_stats = train_one_epoch(ddp_model, teacher, loss_fn, optimizer, probe_opt, scaler, loader,
                                          epoch, args, ctx)
        except Preempted:
            print(f"| signal {STOP['signal']}: checkpoint saved to {ckpt_path}; re-run the same command to resume")
            utils.cleanup_distributed()
            sys.exit(3)
        ctx['start_batch'] = 0
        last = epoch == args.epochs - 1
        knn = bool(args.knn_every) and ((epoch + 1) % args.knn_every == 0 or last)
        test_stats = evaluate(utils.unwrap(ddp_model).model, args, ctx, epoch, knn)
        stats = {'epoch': epoch, **{f'train_{k}': v for k, v in train_stats.items()},
                 **{f'test_{k}': v for k, v in test_stats.items()}, 'elapsed_s': timer()}
        # log before saving: a kill in between repeats this epoch's line (same epoch key) rather
        # than losing it
        utils.log_stats(args.output_dir, stats)
        save(epoch + 1, 0)
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()
                 if k in ('epoch', 'train_loss', 'train_probe_acc', 'train_images_per_s', 'test_knn_top1',
                          'test_diag_nc_acc', 'test_diag_radius', 'test_diag_contacts')}
        print(json.dumps(shown))
        if ctx.get('stop_after_epoch') and not last:  # after the last epoch: just finish
            print(f"| signal {STOP['signal']} at the end of epoch {epoch}: checkpoint saved to {ckpt_path}; "
                  f"re-run the same command to resume")
            utils.cleanup_distributed()
            sys.exit(3)

    export_backbone(utils.unwrap(ddp_model).model, args)
    print(f"| done in {timer() / 60:.1f} min; backbone exported to {os.path.join(args.output_dir, 'backbone.pth')}")
    utils.cleanup_distributed()


def export_backbone(model, args):
    """backbone.pth: torchvision key names (loads into torchvision.models.resnetXX() with only
    fc.* missing when the stem is standard) plus the args that rebuild it."""
    sd = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    utils.save_on_master({'backbone': sd, 'args': vars(args)}, os.path.join(args.output_dir, 'backbone.pth'))


if __name__ == '__main__':
    main(get_args_parser().parse_args())
