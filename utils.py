"""Plumbing shared by every stage script: distributed set-up, common flags, optimisers and
schedules, the run folder (args.json, log.txt, atomic checkpoints), checkpoint loading with key
checks, and feature extraction + kNN (used by train_ssl's monitor and eval_knn.py)."""
import argparse
import builtins
import datetime
import json
import math
import os
import random
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ---- distributed -------------------------------------------------------------------------------

def init_distributed_mode():
    """Always create a process group: torchrun's env when present, else world size 1 (plain
    `python`). gloo on CPU, NCCL on GPU. Returns (rank, world_size, local_rank, device)."""
    if dist.is_initialized():
        return get_rank(), get_world_size(), int(os.environ.get('LOCAL_RANK', 0)), _device()
    cuda = torch.cuda.is_available()
    backend = 'nccl' if cuda else 'gloo'
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    else:
        local_rank = 0
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    _setup_print(get_rank() == 0)
    return get_rank(), get_world_size(), local_rank, _device()


def cpu_group():
    """A gloo group over all ranks for small control messages on CPU tensors (stop flags): on NCCL
    a CUDA flag's all-reduce and .item() would wait for every kernel queued so far, each step.
    Collective: every rank calls it, once. On gloo it is the default group."""
    return None if dist.get_backend() == 'gloo' else dist.new_group(backend='gloo')


def _device():
    return torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process():
    return get_rank() == 0


def _setup_print(is_master):
    """print() only on rank 0 (print(..., force=True) everywhere)."""
    builtin_print = builtins.print

    def print(*args, **kwargs):  # noqa: A001
        if is_master or kwargs.pop('force', False):
            kwargs.pop('force', None)
            builtin_print(*args, **kwargs)
    builtins.print = print


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(x):
    """Mean of a tensor over ranks (a no-op for world size 1)."""
    if get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= get_world_size()
    return x


def fail(msg, code=2):
    """One clear line on stderr and a non-zero exit: how every stage reports bad input."""
    sys.stderr.write(f"error: {msg}\n")
    raise SystemExit(code)


# ---- shared flags ------------------------------------------------------------------------------

def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ('1', 'true', 'yes', 'y', 'on'):
        return True
    if v.lower() in ('0', 'false', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean (1/0, true/false), got {v!r}')


def add_run_args(parser, default_output):
    """Flags every stage shares: output, seed, precision, compile, workers, logging."""
    g = parser.add_argument_group('run')
    g.add_argument('--output_dir', default=default_output,
                   help='Run folder: args.json, log.txt, checkpoint.pth live here. Re-running the same '
                        'command resumes from its checkpoint.pth. (default: %(default)s)')
    g.add_argument('--seed', type=int, default=0, help='Global seed; rank r seeds its RNGs with seed + r. '
                   '(default: %(default)s)')
    g.add_argument('--dtype', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
                   help='Autocast dtype for forward passes. auto = bfloat16 on GPUs (no loss scaling needed; '
                        'recommended on Ampere+), float32 on CPUs (most lack bf16 units: bf16 ran 2-3x slower '
                        'here); float16 adds a GradScaler. Losses always run in float32. (default: %(default)s)')
    g.add_argument('--compile', type=str2bool, default=False,
                   help='torch.compile the model before the DDP wrap (worth it for runs longer than a few '
                        'minutes on a GPU; compile time is 1-3 min). (default: %(default)s)')
    g.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                   help='Data-loading worker threads per process. (default: min(8, cores) = %(default)s)')
    g.add_argument('--print_freq', type=int, default=50,
                   help='Read metrics back from the device (a sync) every N steps. (default: %(default)s)')
    g.add_argument('--force_resume', type=str2bool, default=False,
                   help='Resume from --output_dir even if its args.json has different hyper-parameters. '
                        '(default: %(default)s)')
    return g


def add_data_args(parser, need_train=True):
    g = parser.add_argument_group('data')
    g.add_argument('--data_path', required=need_train, default=None,
                   help='Training .beton (write one with `python data.py write ...`).')
    g.add_argument('--val_path', default=None,
                   help='Held-out .beton (e.g. the test split) for kNN / probe evaluation.')
    g.add_argument('--res', type=int, default=None,
                   help='Input resolution to the model; default: the beton\'s stored resolution.')
    g.add_argument('--channels', type=int, default=None, choices=[1, 3],
                   help='Channels fed to the model (grayscale data can be fed as 1 or 3). '
                        'Default: the stored channels (evaluation stages: the channels the network was '
                        'trained on). A beton whose stored channels differ is refused unless this flag '
                        'asks for the conversion (gray replicated to 3, or RGB to luma).')
    g.add_argument('--allow_upsample', type=str2bool, default=False,
                   help='Accept a --res (or, in evaluation stages, the network\'s training resolution) '
                        'larger than the beton\'s stored images: every image is then upsampled, adding '
                        'compute but no detail. Refused by default. (default: %(default)s)')
    return g


def check_beton_input(info, res, channels, in_chans, channels_flag=None, allow_upsample=False,
                      res_from='--res'):
    """Refuse, with one line, a beton that cannot feed the network what the flags say.
    info: data.beton_info(path); res, channels: what the loader will produce; in_chans: the
    network's input channels; channels_flag: --channels as given on the command line (None =
    not given); res_from: where `res` came from, for the message. Rules:
    - channels must equal the network's in_chans (the first conv would fail, or worse);
    - a beton storing other channels than fed needs an explicit --channels (the conversion,
      gray -> 3 equal planes or RGB -> luma, is never silent);
    - res above the largest stored side upsamples every image: refused unless allow_upsample."""
    path, stored = info['path'], info['channels']
    if channels != in_chans:
        fail(f"--channels {channels} but the network takes {in_chans}-channel input; pass --channels "
             f"{in_chans} (or leave it out)")
    if channels != stored and channels_flag is None:
        how = 'replicated to 3 equal channels' if stored == 1 else 'converted to luma'
        fail(f"{path} stores {stored}-channel images but the network takes {channels}-channel input; "
             f"pass --channels {channels} to accept them {how}, or use a {channels}-channel beton")
    biggest = max(info['resolution'])
    if res > biggest and not allow_upsample:
        fail(f"{res_from} {res} is larger than the images stored in {path} (at most {biggest} px): "
             f"every image would be upsampled; pass --res {biggest} (or less), re-write the beton at a "
             f"larger --max_res, or --allow_upsample 1 if this is intended")


def eval_input(args, a, infos):
    """(res, channels) at which an evaluation stage feeds the pretrained network of saved args `a`
    the betons `infos` (data.beton_info dicts): --res / --channels when given, else what the
    network was trained at; every beton checked by check_beton_input. Call it before
    prepare_output_dir, so a refusal leaves nothing behind."""
    res, channels = args.res or a.res, args.channels or a.channels
    res_from = '--res' if args.res else 'the resolution the network was trained at,'
    for info in infos:
        check_beton_input(info, res, channels, a.in_chans, args.channels, args.allow_upsample, res_from)
    return res, channels


def train_norm_source(path):
    """The train beton whose mean/std normalise a test split, as in training (pass it as
    norm_from=); None, said in one line, when there is none at `path` (the split's own stats)."""
    if path and os.path.exists(path):
        return path
    print(f"| test split normalised with its own mean/std (no train beton at {path})")
    return None


def autocast_ctx(dtype, device):
    """One autocast context, built once (nanoGPT): a no-op for float32."""
    if dtype == 'auto':
        dtype = 'bfloat16' if device.type == 'cuda' else 'float32'
    if dtype == 'float32':
        return nullcontext()
    return torch.amp.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def make_scaler(dtype, device):
    return torch.amp.GradScaler(device.type, enabled=(dtype == 'float16'))


def fix_random_seeds(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- optimisation --------------------------------------------------------------------------------

def param_groups(model, weight_decay):
    """Two groups by tensor rank: ndim <= 1 (biases, norm weights) get no weight decay and no LARS
    adaptation. Rank, not names: name matching misses e.g. ResNet's downsample BN."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0, 'lars_exclude': True}]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017): SGD with momentum whose update for each weight tensor is scaled by a
    trust ratio. Groups with lars_exclude=True (1-D params) get plain SGD with momentum, no decay.

    clip=False: barlowtwins' main.py, ratio eta * ||w|| / ||g + wd*w||, step lr * ratio * (g + wd*w).
    clip=True: solo-learn's LARS (SPEC "LARS eta 0.02 with clip"; Apex LARC's clip): ratio
    eta * ||w|| / (||g|| + wd * ||w|| + 1e-8), clipped as min(ratio / lr, 1), so each tensor's step
    is min(eta * ||w|| / (...), lr) * (g + wd*w): the trust ratio *replaces* the lr wherever it is
    the smaller one (it does not multiply it)."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001, clip=False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      clip=clip, lars_exclude=False))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g['params']:
                if p.grad is None:
                    continue
                dp = p.grad
                if not g['lars_exclude']:
                    wd = g['weight_decay']
                    p_norm, decayed = torch.norm(p), dp.add(p, alpha=wd)
                    if g['clip']:  # the norm of the raw gradient, decay added to it as wd * ||w||
                        g_norm = torch.norm(dp)
                        q = g['eta'] * p_norm / (g_norm + wd * p_norm + 1e-8)
                        q = (q / g['lr']).clamp(max=1.0) if g['lr'] > 0 else torch.ones_like(q)
                    else:
                        g_norm = torch.norm(decayed)
                        q = g['eta'] * p_norm / g_norm
                    q = torch.where((p_norm > 0) & (g_norm > 0), q, torch.ones_like(p_norm))
                    dp = decayed.mul(q)
                state = self.state[p]
                if 'mu' not in state:
                    state['mu'] = torch.zeros_like(p)
                mu = state['mu']
                mu.mul_(g['momentum']).add_(dp)
                p.add_(mu, alpha=-g['lr'])


def build_optimizer(name, groups, lr, momentum=0.9, lars_eta=1e-3, lars_clip=False):
    if name == 'lars':
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta, clip=lars_clip)
    if name == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == 'adamw':
        return torch.optim.AdamW(groups, lr=lr)
    if name == 'adam':  # Adam with L2 (coupled) decay: what MMCR and CPLearn's code use
        return torch.optim.Adam(groups, lr=lr)
    fail(f"unknown --optimizer {name!r}; choose lars, sgd, adamw or adam")


def cosine_lr(step, total_steps, warmup_steps, base_lr, final_lr=0.0):
    """Linear warm-up from 0 then half-cosine to final_lr, as a pure function of the global step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def cosine_momentum(step, total_steps, base=0.99, final=1.0):
    """EMA momentum from base to final along a half-cosine (BYOL)."""
    return final - (final - base) * (math.cos(math.pi * min(1.0, step / max(1, total_steps))) + 1) / 2


# ---- run folder ---------------------------------------------------------------------------------

def git_info():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.check_output(['git', 'rev-parse', 'HEAD'], cwd=here, stderr=subprocess.DEVNULL).decode().strip()
        dirty = bool(subprocess.check_output(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                                             stderr=subprocess.DEVNULL).decode().strip())
    except Exception:
        sha, dirty = 'unknown', None
    return {'git_sha': sha, 'git_dirty': dirty}


# Flags that may differ between a run and its resumption without changing the experiment.
# --nan_policy / --max_skipped_steps are free so that a run stopped by a non-finite loss can be
# continued with --nan_policy skip.
RESUME_FREE = {'output_dir', 'workers', 'print_freq', 'force_resume', 'compile', 'knn_every',
               'ckpt_every_steps', 'stop_at_epoch', 'nan_inject_step', 'signal_at_step', 'crash_at_step',
               'nan_policy', 'max_skipped_steps', 'load_features', 'dump_features'}


def prepare_output_dir(args):
    """Create the run folder and record args.json, the command line and git state. If the folder
    holds a run with different hyper-parameters, refuse (unless --force_resume)."""
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, 'args.json')
    if os.path.exists(path) and not args.force_resume:
        with open(path) as f:
            old = json.load(f).get('args', {})
        diff = {k: (old.get(k), v) for k, v in vars(args).items()
                if k not in RESUME_FREE and k in old and old.get(k) != v}
        diff.update({k: (old[k], None) for k in old if k not in RESUME_FREE and k not in vars(args)})
        if diff:
            shown = ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in sorted(diff.items())[:6])
            fail(f"{args.output_dir} holds a run with different hyper-parameters ({shown}); "
                 f"use another --output_dir, or --force_resume 1 to continue it anyway")
    if is_main_process():
        record = {'args': vars(args), 'command': ' '.join(sys.argv), 'time': time.strftime('%Y-%m-%d %H:%M:%S'),
                  **git_info()}
        atomic_write_text(path, json.dumps(record, indent=2))


def atomic_write_text(path, text):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finish_run(output_dir, result, log=False):
    """End of an evaluation stage: `result` as results.json in the run folder (rank 0, atomic),
    also appended to log.txt when `log`, then the process group torn down. Returns `result`."""
    if is_main_process():
        atomic_write_text(os.path.join(output_dir, 'results.json'), json.dumps(result, indent=2))
    if log:
        log_stats(output_dir, result)
    cleanup_distributed()
    return result


def log_stats(output_dir, stats):
    """Append one JSON object per line to log.txt (rank 0). stdout is for people; this is for scripts."""
    if is_main_process():
        with open(os.path.join(output_dir, 'log.txt'), 'a') as f:
            f.write(json.dumps(stats) + '\n')


def save_on_master(state, path):
    """torch.save to path.tmp, fsync, then os.replace: a kill mid-save never destroys the last
    good checkpoint (the rename is atomic on POSIX)."""
    if not is_main_process():
        return
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # e.g. disk full: keep the previous checkpoint and say so
        if os.path.exists(tmp):
            os.remove(tmp)
        fail(f"could not write {path} ({e.strerror}); the previous checkpoint is intact")


def rng_state():
    """All RNG states as tensors and plain types, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'numpy': [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s['torch'])
    name, keys, pos, has_gauss, gauss = s['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s['python'])
    if s.get('cuda') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s['cuda'])


def load_checkpoint_file(path):
    """torch.load with clear errors for missing or corrupt files."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        fail(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {str(e)[:120]})")


# ---- loading backbones for evaluation ------------------------------------------------------------

def resolve_weights(path):
    """A run folder, a checkpoint.pth or a backbone.pth -> (file, kind). Missing: an error, never a
    silent fallback to random or downloaded weights."""
    if os.path.isdir(path):
        for name, kind in (('checkpoint.pth', 'checkpoint'), ('backbone.pth', 'backbone')):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name), kind
        fail(f"{path} holds neither checkpoint.pth nor backbone.pth")
    if not os.path.isfile(path):
        fail(f"--weights {path} does not exist")
    return path, 'backbone' if os.path.basename(path).startswith('backbone') else 'checkpoint'


def load_pretrained(path, part='backbone', load_weights=True, seed=0):
    """Rebuild and load a pretrained network from a run folder, checkpoint.pth or backbone.pth,
    using the architecture flags saved with it. part='backbone' returns the ResNet (features of
    size num_features); part='projector' returns backbone+projector (needs a checkpoint.pth).
    load_weights=False builds the same architecture freshly initialised from `seed` (the
    random-init baseline). Returns (module, saved_args as a Namespace). Key sets are asserted,
    never silently ignored."""
    from models import build_backbone, build_model  # utils stays importable without models
    file, _ = resolve_weights(path)
    ck = load_checkpoint_file(file)
    if not isinstance(ck, dict) or 'args' not in ck:
        held = describe_resnet(ck) if isinstance(ck, dict) else None
        fail(f"{file} is not a manifold-ssl checkpoint or backbone file (no 'args' entry)"
             + (f"; it looks like a bare state dict of a {held}: save it as {{'backbone': state_dict, "
                f"'args': {{...the train_ssl flags that build it...}}}}" if held else ''))
    a = argparse.Namespace(**ck['args'])
    _check_declared_arch(a, file, part)
    torch.manual_seed(seed)
    if part == 'backbone':
        if 'backbone' in ck:
            sd = ck['backbone']
        elif 'model' in ck:
            sd = {k[len('model.backbone.'):]: v for k, v in ck['model'].items() if k.startswith('model.backbone.')}
        else:
            fail(f"{file} holds no model weights")
        if load_weights:  # name both architectures, not a list of mismatched tensors
            _check_resnet_weights(sd, a, file)
        net = build_backbone(a.arch, a.cifar_stem, a.width, a.in_chans)
    elif part == 'projector':
        if 'model' not in ck:
            fail(f"projector features need a checkpoint.pth (full model); {file} holds only a backbone")
        sd = {k[len('model.'):]: v for k, v in ck['model'].items()
              if k.startswith('model.') and not k.startswith(('model.predictor.', 'model.prototypes.'))
              and k != 'model.codes'}
        if load_weights:
            _check_resnet_weights({k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')},
                                  a, file)
        model = build_model(argparse.Namespace(**{**vars(a), 'pred_dims': ''}))
        net = nn.Sequential(model.backbone, model.projector)
        sd = {k.replace('backbone.', '0.', 1).replace('projector.', '1.', 1): v for k, v in sd.items()}
    else:
        raise ValueError(part)
    if load_weights:
        load_strict(net, sd, file)
    return net, a


def load_strict(net, sd, source):
    """Load and assert the key sets: nothing missing, nothing unexpected, shapes equal."""
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        parts = [f"{len(missing)} tensors missing, e.g. {missing[:3]}"] if missing else []
        parts += [f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}"] if unexpected else []
        parts += [f"{len(bad)} of another shape, e.g. {bad[0]} is {list(sd[bad[0]].shape)} in the file and "
                  f"{list(own[bad[0]].shape)} in the network"] if bad else []
        fail(f"{source} does not match the network its saved args declare ({'; '.join(parts)})")
    net.load_state_dict(sd, strict=True)


# The saved flags every consumer rebuilds a network from (train_ssl.py's names).
ARCH_KEYS = {'backbone': ('arch', 'cifar_stem', 'width', 'in_chans', 'res', 'channels'),
             'projector': ('arch', 'cifar_stem', 'width', 'in_chans', 'res', 'channels', 'proj_dims', 'proj_bn',
                           'proj_bias', 'proj_last_bn', 'proj_out_act')}


def _check_declared_arch(a, file, part):
    """The saved args name a buildable network: every flag present, a known --arch."""
    from models import ARCHS
    lacking = [k for k in ARCH_KEYS.get(part, ()) if not hasattr(a, k)]
    if lacking:
        fail(f"{file} does not record {', '.join(lacking)} in its args: it was not written by this "
             f"version of train_ssl.py, so its network cannot be rebuilt")
    if a.arch not in ARCHS:
        fail(f"{file} declares --arch {a.arch!r}, which this code cannot build (known: {', '.join(sorted(ARCHS))})")


def describe_resnet(sd):
    """'resnet18, width 4, 1-channel input, CIFAR stem' read off a backbone state dict (torchvision
    key names), or None when it is not one of models.ARCHS' ResNets."""
    from models import ARCHS
    w = sd.get('conv1.weight')
    if not isinstance(w, torch.Tensor) or w.dim() != 4:
        return None
    keys = [k for k in sd if isinstance(k, str)]
    bottleneck = any(k.startswith('layer1.0.conv3.') for k in keys)
    blocks = [len({k.split('.')[1] for k in keys if k.startswith(f'layer{i}.')}) for i in range(1, 5)]
    names = [n for n, (block, layers) in ARCHS.items()
             if layers == blocks and (block.expansion == 4) == bottleneck]
    arch = names[0] if names else f"a ResNet of {blocks} {'bottleneck' if bottleneck else 'basic'} blocks"
    stem = 'CIFAR' if w.shape[-1] == 3 else 'ImageNet'
    return f"{arch}, width {w.shape[0]}, {w.shape[1]}-channel input, {stem} stem"


def _check_resnet_weights(sd, a, file):
    """The weights are of the network the saved args declare; else one line naming both."""
    held = describe_resnet(sd)
    declared = (f"{a.arch}, width {a.width}, {a.in_chans}-channel input, "
                f"{'CIFAR' if a.cifar_stem else 'ImageNet'} stem")
    if held is not None and held != declared:
        fail(f"{file} holds the weights of a {held}, but its saved args declare a {declared}: the file's "
             f"weights and args disagree (was it edited or assembled by hand?); re-export it from its "
             f"train_ssl.py run")


# ---- features and kNN -------------------------------------------------------------------------

@torch.no_grad()
def extract_features(net, loader, device, amp, indices=None):
    """Features of every sample once, gathered from all ranks in sample-index order (DINO's
    eval_knn habit). `loader` yields (images, labels, indices); returns (feats, labels) on CPU,
    identical on every rank. indices: the sorted sample indices a subset loader covers over all
    ranks (build_eval_loader(indices=)); default every sample of the beton."""
    feats, labels, idxs = [], [], []
    for x, y, idx in loader:
        with amp:
            f = net(x.to(device, non_blocking=True))
        feats.append(f.float().cpu())
        labels.append(y.cpu())
        idxs.append(idx.cpu())
    feats, labels, idxs = torch.cat(feats), torch.cat(labels), torch.cat(idxs)
    if get_world_size() > 1:
        parts = [None] * get_world_size()
        dist.all_gather_object(parts, (feats, labels, idxs))
        feats, labels, idxs = (torch.cat([p[i] for p in parts]) for i in range(3))
    order = torch.argsort(idxs)
    expect = torch.arange(len(idxs)) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
    if not torch.equal(idxs[order], expect):
        raise RuntimeError('feature extraction did not see every sample exactly once')
    return feats[order], labels[order]


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, ks=(20,), T=0.07, metric='cosine', weighting='exp',
                 num_classes=None, chunk=512):
    """DINO's weighted kNN: top-k neighbours by cosine similarity s (or euclidean distance d) vote
    with weight exp(s/T) ('exp'; for euclidean exp(-(d - d_1)/T), d_1 the query's nearest distance:
    the same ranking as exp(-d/T), which underflows to 0 for every neighbour once d > ~7 T in
    float32 and then silently predicts class 0), 1 / (d + 1e-5) ('inverse', euclidean only:
    solo-learn's WeightedKNNClassifier) or 1 ('uniform'). Returns {k: (top1, top5)} in percent;
    top-5 counts the first min(5, k) classes by votes (DINO: with k < 5, classes no neighbour
    voted for would otherwise fill the list). Vote ties go to the lower class index; similarity
    ties inside the top-k are ordered by train index (an exact tie straddling the k-th place is
    broken by torch.topk)."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    if metric == 'cosine':
        train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    elif metric != 'euclidean':
        raise ValueError(f'unknown metric {metric!r}')
    if weighting not in ('exp', 'inverse', 'uniform') or (weighting == 'inverse' and metric != 'euclidean'):
        raise ValueError(f"weighting is 'exp', 'uniform' or (euclidean only) 'inverse', not {weighting!r} "
                         f"with metric {metric!r}")
    kmax = min(max(ks), len(train_f))
    correct = {k: torch.zeros(2) for k in ks}
    for s in range(0, len(test_f), chunk):
        q = test_f[s:s + chunk]
        sim = q @ train_f.T if metric == 'cosine' else -torch.cdist(q, train_f)
        sim_top, nn_idx = sim.topk(kmax, dim=1)  # a full sort of the bank costs ~50x more
        by_index = nn_idx.argsort(dim=1)
        sim_top, nn_idx = sim_top.gather(1, by_index), nn_idx.gather(1, by_index)
        order = torch.sort(sim_top, dim=1, descending=True, stable=True).indices
        sim_sorted, nn_idx = sim_top.gather(1, order), nn_idx.gather(1, order)
        nn_y = train_y[nn_idx]
        for k in ks:
            kk = min(k, kmax)
            s_k = sim_sorted[:, :kk]
            if weighting == 'uniform':
                w = torch.ones_like(s_k)
            elif weighting == 'inverse':
                w = 1.0 / (-s_k + 1e-5)
            elif metric == 'cosine':
                w = (s_k / T).exp()
            else:  # exp(-d/T) scaled by exp(d_1/T) per query: same votes' order, no underflow
                w = ((s_k - s_k[:, :1]) / T).exp()
            votes = torch.zeros(len(q), num_classes).scatter_add_(1, nn_y[:, :kk], w)
            # vote ties -> the lower class index (a stable sort; topk's tie order is unspecified)
            top = torch.sort(votes, dim=1, descending=True, stable=True).indices[:, :min(5, kk, num_classes)]
            yt = test_y[s:s + chunk, None]
            correct[k][0] += (top[:, :1] == yt).any(1).sum()
            correct[k][1] += (top == yt).any(1).sum()
    n = len(test_f)
    return {k: (100.0 * c[0].item() / n, 100.0 * c[1].item() / n) for k, c in correct.items()}


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self):
        return time.time() - self.t0


def count_params(m):
    return sum(p.numel() for p in m.parameters())


def unwrap(model):
    """The plain module under DDP and torch.compile (state-dict keys without module./_orig_mod.)."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, '_orig_mod', model)


# ---- evaluation stages --------------------------------------------------------------------------
# Shared by train_linear.py and train_semisl.py: the flags naming the weights to evaluate, beton
# labels without decoding, seeded class-stratified splits and class-balanced subsets, seeded epoch
# batches over a feature cache, top-k accuracy, freeze checks. (Their augmented training images
# stream from the beton: data.build_ssl_loader(indices=).)


def add_weights_args(parser, required=True):
    """--weights / --init, as in eval_knn.py."""
    g = parser.add_argument_group('model')
    g.add_argument('--weights', required=required, default=None,
                   help='A train_ssl run folder, its checkpoint.pth, or a backbone.pth. The architecture is '
                        'rebuilt from the flags saved with it and the loaded key sets are asserted.')
    g.add_argument('--init', default='pretrained', choices=['pretrained', 'random'],
                   help='random: same architecture as --weights, freshly initialised with --seed (the '
                        'baseline every table needs). (default: %(default)s)')
    return g


def beton_labels(path):
    """Every label of a beton (int64 tensor), read from its metadata table: no image is decoded, so
    a seeded split or subset of ImageNet costs milliseconds."""
    from ffcv.reader import Reader  # utils stays importable without ffcv
    r = Reader(str(path))
    if 'label' not in r.field_names:
        fail(f"{path} has no 'label' field (fields: {r.field_names})")
    return torch.from_numpy(r.metadata[f"f{r.field_names.index('label')}"].astype(np.int64))


def _per_class_pick(labels, count, seed):
    """Sorted indices of count(n_c) samples of every class c, drawn without replacement by one
    generator seeded with `seed`, classes in increasing order: the pick depends on the labels and
    the seed only, not on the world size."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(int(seed))
    picked = [torch.empty(0, dtype=torch.int64)]
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:count(len(idx))]])
    return torch.cat(picked).sort().values


def stratified_split(labels, fraction, seed):
    """(train, val) sorted index tensors: round(fraction * n_c) samples of each class c held out,
    at least 1 and at most n_c - 1 when fraction > 0 (every class stays in both halves)."""
    if fraction <= 0:
        return torch.arange(len(labels)), torch.empty(0, dtype=torch.int64)
    val = _per_class_pick(labels, lambda n: min(max(1, int(fraction * n + 0.5)), n - 1), seed)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten(), val


def balanced_subset(labels, percent, seed):
    """Sorted indices of floor(percent / 100 * n_c) samples of each class c (at least one): a
    class-balanced labelled fraction like SimCLR's ImageNet 1% / 10% lists (~13 / ~128 per class)."""
    return _per_class_pick(labels, lambda n: max(1, math.floor(n * percent / 100 + 1e-9)), seed)


def epoch_batches(n, batch_size, seed, epoch, rank=0, world_size=1):
    """This rank's positions in range(n) for every step of an epoch: one permutation seeded by
    (seed, epoch), identical on every rank (ffcv's RANDOM order habit), cut into global batches
    of batch_size (the last partial one dropped, unless n < batch_size: then one batch of all),
    each shared out rank::world_size. A pure function, so a resumed epoch replays exactly."""
    perm = torch.from_numpy(np.random.default_rng(seed + epoch).permutation(n))
    steps = max(1, n // batch_size)
    return [perm[s * batch_size:(s + 1) * batch_size][rank::world_size] for s in range(steps)]


def linear_head(in_dim, num_classes):
    """A classifier layer initialised as MoCo v3's main_lincls: weights N(0, 0.01), bias 0."""
    head = nn.Linear(in_dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def topk_accuracy(logits, targets, ks=(1, 5)):
    """Top-k accuracies in percent over the last-but-one axis: logits (..., N, C), targets (N,) ->
    one tensor of shape (...) per k. k is capped at C (top-5 of 2 classes is top-2 = 100%)."""
    kmax = min(max(ks), logits.shape[-1])
    hit = logits.topk(kmax, dim=-1).indices == targets.to(logits.device).unsqueeze(-1)
    return [100.0 * hit[..., :min(k, kmax)].any(-1).double().mean(-1) for k in ks]  # 72.55, not 72.5499954


def snapshot_state(module):
    """A CPU copy of every parameter and buffer (BN running statistics included)."""
    return {k: v.detach().to('cpu', copy=True) for k, v in module.state_dict().items()}


def assert_unchanged(module, snapshot, what='backbone'):
    """Fail loudly if any parameter or buffer of a frozen module moved (MoCo v3's sanity_check)."""
    moved = [k for k, v in module.state_dict().items() if not torch.equal(v.detach().cpu(), snapshot[k])]
    if moved:
        fail(f"the frozen {what} moved during training ({len(moved)} tensors, e.g. {moved[:3]}): the "
             f"freeze is broken and this run's numbers are invalid", code=5)


def assert_trains_only(optimizer, module, what='head'):
    """The optimizer holds exactly the parameters of `module`: nothing of the frozen part."""
    opt = {id(p) for g in optimizer.param_groups for p in g['params']}
    own = {id(p) for p in module.parameters() if p.requires_grad}
    if opt != own:
        raise RuntimeError(f'the optimizer holds {len(opt - own)} tensors outside the {what} and misses '
                           f'{len(own - opt)} of its own')
