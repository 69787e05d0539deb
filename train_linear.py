"""Linear probe of a frozen backbone (SPEC §8): one linear head per learning rate, trained at once.

    python train_linear.py --weights runs/ssl --data_path train.beton --val_path test.beton
    torchrun --nproc_per_node=8 train_linear.py --weights runs/ssl/backbone.pth ...
    python train_linear.py ... --cache_features 1       # minutes on a CPU: centre-crop features once

Two protocols; results.json names the one used (and its train augmentation):
- cached-centre-crop (--cache_features 1): one pass of backbone features on centre
  crops, then the heads train on that cache. Minutes instead of hours, and typically a little
  lower than rrc-flip (no augmentation). The features can also come from --load_features.
- rrc-flip (--cache_features 0, default; the SPEC §8 protocol): every step a
  RandomResizedCrop(--crop_min_scale, 1) + flip of each WHOLE stored image goes through the
  frozen backbone (SPEC §8; MoCo v3's main_lincls),
  streamed from the beton by data.build_ssl_loader over the train split's indices: nothing of
  the train set is held in memory, so it works at ImageNet size.
A seeded, class-stratified --val_fraction of the train beton is held out of training; the
(lr, epoch) with the best validation top-1 is chosen before test is looked at, and its test
top-1/top-5 is the reported number. The best test number over all (lr, epoch), the papers'
habit, is reported too, marked as such. Re-running the same command resumes.
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import utils

# ---- flags -------------------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser('manifold-ssl linear probe', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = utils.add_weights_args(p, required=False)
    g.add_argument('--features', default='backbone', choices=['backbone', 'projector'],
                   help='Which output the heads read (projector needs a checkpoint.pth). (default: %(default)s)')
    g.add_argument('--head_bn', type=utils.str2bool, default=False,
                   help='An affine-free BatchNorm in front of the heads (MAE linprobe): makes one lr grid '
                        'fit features of any scale; still a linear map, foldable into the head. '
                        '(default: %(default)s)')

    g = p.add_argument_group('eval')
    g.add_argument('--cache_features', type=utils.str2bool, default=None,
                   help='0: protocol rrc-flip (augmented crops through the backbone every step; the SPEC '
                        'protocol, ~epochs x slower). 1: protocol cached-centre-crop (features computed '
                        'once; fast, slightly lower). (default: 0, or 1 with --load_features)')
    g.add_argument('--val_fraction', type=float, default=0.1,
                   help='Fraction of each class of the train beton held out (seeded by --seed) to choose '
                        'the lr and epoch; 0 = no selection: one --lr, last epoch. (default: %(default)s)')
    g.add_argument('--crop_min_scale', type=float, default=0.08,
                   help='rrc-flip: lower bound of the RandomResizedCrop area (torchvision and MoCo v3: '
                        '0.08). (default: %(default)s)')
    g.add_argument('--eval_batch_size', type=int, default=512,
                   help='Per-process batch for feature extraction. (default: %(default)s)')
    g.add_argument('--dump_features', type=utils.str2bool, default=False,
                   help='cached protocol: save the features to OUTPUT_DIR/features.pth (reuse with '
                        '--load_features). (default: %(default)s)')
    g.add_argument('--load_features', default=None,
                   help="Train on a features.pth ({'train': (feats, labels), 'test': (feats, labels)}, "
                        "optionally 'num_classes'; written by --dump_features or eval_knn.py) instead of "
                        "extracting; --weights and the betons are then not needed.")

    g = p.add_argument_group('optim')
    g.add_argument('--epochs', type=int, default=100, help='(default: %(default)s)')
    g.add_argument('--batch_size', type=int, default=256,
                   help='GLOBAL batch size; must divide by the number of processes. (default: %(default)s)')
    g.add_argument('--lr', type=float, nargs='+', default=[0.01, 0.03, 0.1, 0.3, 1.0],
                   help='Absolute learning rates at --batch_size, one head each, all trained on the same '
                        'batches (a grid costs almost nothing more than one head). (default: %(default)s)')
    g.add_argument('--optimizer', default='sgd', choices=['sgd', 'lars'],
                   help='SGD (MoCo v3, DINO) or LARS (MAE, for very large batches). (default: %(default)s)')
    g.add_argument('--momentum', type=float, default=0.9, help='(default: %(default)s)')
    g.add_argument('--weight_decay', type=float, default=0.0,
                   help='On the head weights, not biases (MoCo v3 and MAE: 0). (default: %(default)s)')
    g.add_argument('--warmup_epochs', type=float, default=0,
                   help='Linear LR warm-up before the cosine. (default: %(default)s)')

    utils.add_data_args(p, need_train=False)
    g = utils.add_run_args(p, default_output='runs/linear')
    g.add_argument('--stop_at_epoch', type=int, default=None,
                   help='Checkpoint and exit before this epoch (re-run without it to continue).')
    return p


def check_args(args, world_size):
    if args.load_features is None and None in (args.weights, args.data_path, args.val_path):
        utils.fail('--weights, --data_path and --val_path (the test beton) are needed unless --load_features '
                   'is given')
    if args.batch_size % world_size:
        utils.fail(f'--batch_size {args.batch_size} does not divide by the {world_size} processes')
    if len({f'{lr:g}' for lr in args.lr}) != len(args.lr) or min(args.lr) <= 0:
        utils.fail(f'--lr needs distinct positive values, got {args.lr}')
    if args.epochs < 1:
        utils.fail(f'--epochs must be >= 1, got {args.epochs}')
    if not 0 <= args.val_fraction < 1:
        utils.fail(f'--val_fraction must be in [0, 1), got {args.val_fraction}')
    if args.val_fraction == 0 and len(args.lr) > 1:
        utils.fail('choosing among several --lr needs a validation split: set --val_fraction > 0 '
                   '(choosing on test is the habit this script exists to avoid)')
    if args.cache_features is None:
        args.cache_features = bool(args.load_features)
    if args.load_features and not args.cache_features:
        utils.fail('--load_features trains on cached features: it needs --cache_features 1')
    if not 0 < args.crop_min_scale <= 1:
        utils.fail(f'--crop_min_scale must be in (0, 1], got {args.crop_min_scale}')


# ---- features ----------------------------------------------------------------------------------

def data_fingerprint(d, with_features):
    """What a run trains and is scored on, checked when it resumes: per split the size and the label
    sum, and with --load_features the float64 sum of the features too (--load_features may name
    another file on a re-run: without this, epochs of two feature sets would mix in one run)."""
    out = []
    for split in ('train', 'val', 'test'):
        x, y = d[split]
        out += [len(y), int(torch.as_tensor(y).long().sum())]
        if with_features:
            out.append(float(torch.as_tensor(x).double().sum()))
    return out


def prepare_data(args, info, net, device, amp):
    """-> dict: the train source (cached: features and labels; rrc-flip: the train split's beton
    indices and labels, images are streamed later), the fixed val/test features, the held-out
    indices, and the number of classes (from the beton's sidecar, so a class absent from a small
    split still gets its logit; a features file may carry it too)."""
    if args.load_features:
        ck = utils.load_checkpoint_file(args.load_features)
        if not (isinstance(ck, dict) and 'train' in ck and 'test' in ck):
            utils.fail(f"{args.load_features} is not a features file ({{'train': (f, y), 'test': (f, y)}})")
        (tr_f, tr_y), test = ck['train'], ck['test']
        train_idx, val_idx = utils.stratified_split(tr_y, args.val_fraction, args.seed)
        return {'train': (tr_f[train_idx], tr_y[train_idx]), 'val': (tr_f[val_idx], tr_y[val_idx]),
                'test': tuple(test), 'val_idx': val_idx, 'num_classes': ck.get('num_classes')}
    rank, ws = utils.get_rank(), utils.get_world_size()

    def features(path, indices=None):  # the train beton's mean/std normalise every split: one input map
        loader = data.build_eval_loader(path, args.eval_batch_size, args.res, channels=args.channels,
                                        workers=args.workers, device=device, rank=rank, world_size=ws,
                                        norm_from=args.data_path, indices=indices)
        return utils.extract_features(net, loader, device, amp, indices=indices)
    labels = utils.beton_labels(args.data_path)
    train_idx, val_idx = utils.stratified_split(labels, args.val_fraction, args.seed)
    test = features(args.val_path)
    if args.cache_features:
        tr_f, tr_y = features(args.data_path)
        if args.dump_features:
            utils.save_on_master({'train': (tr_f, tr_y), 'test': test, 'num_classes': info['num_classes']},
                                 os.path.join(args.output_dir, 'features.pth'))
        return {'train': (tr_f[train_idx], tr_y[train_idx]), 'val': (tr_f[val_idx], tr_y[val_idx]), 'test': test,
                'val_idx': val_idx, 'num_classes': info['num_classes']}
    val = features(args.data_path, val_idx) if len(val_idx) else (torch.empty(0, test[0].shape[1]), labels[:0])
    return {'train': (train_idx, labels[train_idx]), 'val': val, 'test': test, 'val_idx': val_idx,
            'num_classes': info['num_classes']}


def build_train_source(args, net, train, device, amp, rank, world_size):
    """-> (batches, steps): batches(epoch) yields this rank's (features, labels) on `device` for
    each of the epoch's `steps` steps; a pure function of (seed, epoch), so a resumed run replays.
    cached-centre-crop: `train` = (features, labels), a seeded order over the cache
    (utils.epoch_batches). rrc-flip: `train` = (beton indices, labels) of the train split, read by
    data.build_ssl_loader(indices=) with one view of recipe 'crop': each image decoded once, a
    RandomResizedCrop(scale (--crop_min_scale, 1)) of the whole stored image + flip p 0.5 (crops
    keyed on (seed + rank, epoch, sample)), normalised with the train beton's statistics like the
    val/test features, then the frozen backbone. The last partial batch is dropped (unless the
    split is smaller than one batch), as in the cached protocol."""
    x, y = train
    if args.cache_features:
        steps = len(utils.epoch_batches(len(y), args.batch_size, args.seed, 0, rank, world_size))

        def cached(epoch):
            for pos in utils.epoch_batches(len(y), args.batch_size, args.seed, epoch, rank, world_size):
                yield x[pos].to(device), y[pos].to(device)
        return cached, steps
    loader = data.build_ssl_loader(args.data_path, args.batch_size // world_size, 1, args.res, recipe='crop',
                                   channels=args.channels, workers=args.workers, seed=args.seed,
                                   distributed=world_size > 1, rank=rank, world_size=world_size, device=device,
                                   drop_last=len(x) >= args.batch_size, scale=(args.crop_min_scale, 1.0),
                                   indices=x.numpy())

    @torch.no_grad()
    def streamed(epoch):
        loader.set_epoch(epoch)  # order and crops of `epoch`, also right after a resume
        for views, labels in loader:
            with amp:
                f = net(views[:, 0]).float()
            yield f, labels
    return streamed, len(loader)


# ---- heads -------------------------------------------------------------------------------------

class LinearHeads(nn.Module):
    """One linear classifier per learning rate behind an optional shared affine-free BatchNorm.
    forward: features (B, D) -> logits (L, B, C) for the L heads."""

    def __init__(self, dim, num_classes, num_heads, bn):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if bn else nn.Identity()
        self.heads = nn.ModuleList(utils.linear_head(dim, num_classes) for _ in range(num_heads))

    def forward(self, f):
        f = self.bn(f)
        return torch.stack([h(f) for h in self.heads])


def build_optimizer(args, heads):
    """Each head its own parameter groups (base_lr = its --lr), one optimizer for all of them:
    the heads never interact because the loss is a sum of per-head losses."""
    groups = []
    for head, lr in zip(heads.heads, args.lr):
        for g in utils.param_groups(head, args.weight_decay):
            groups.append({**g, 'base_lr': lr})
    return utils.build_optimizer(args.optimizer, groups, args.lr[0], args.momentum)


# ---- training ----------------------------------------------------------------------------------

def train_one_epoch(ddp_heads, optimizer, batches, steps, epoch, args, ctx):
    """One pass over the train split; the LR of every head follows its cosine from the global
    step. Per-head losses accumulate on the device and are read every --print_freq steps."""
    ddp_heads.train()
    total, warm = args.epochs * steps, int(args.warmup_epochs * steps)
    sums = torch.zeros(len(args.lr), device=ctx['device'])
    t0 = time.time()
    for it, (f, y) in enumerate(batches(epoch)):
        step = epoch * steps + it
        for g in optimizer.param_groups:
            g['lr'] = utils.cosine_lr(step, total, warm, g['base_lr'])
        logits = ddp_heads(f).float()
        losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(args.lr)), reduction='none')
        losses = losses.view(len(args.lr), -1).mean(1)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        sums += losses.detach()
        if (it % args.print_freq == 0 or it == steps - 1) and not torch.isfinite(sums).all():
            bad = [lr for lr, s in zip(args.lr, sums.tolist()) if not np.isfinite(s)]
            utils.fail(f'non-finite loss for --lr {bad} at epoch {epoch}, step {it}: drop those learning rates',
                       code=4)
    sums = utils.all_reduce_mean(sums) / steps
    return {'loss': dict(zip(ctx['keys'], sums.tolist())), 'time_s': time.time() - t0}


@torch.no_grad()
def evaluate(heads, feats, labels, batch_size, device):
    """(top-1, top-5) of every head on fixed features, as {lr: value} dicts; every rank computes
    the same numbers on the full set (the heads are identical across ranks)."""
    if len(labels) == 0:
        return {}, {}
    heads.eval()
    logits = torch.cat([heads(feats[s:s + batch_size].to(device)).float().cpu()
                        for s in range(0, len(feats), batch_size)], dim=1)
    heads.train()
    t1, t5 = utils.topk_accuracy(logits, labels)
    return t1.tolist(), t5.tolist()


def select(history, lrs, has_val):
    """The reported choice: the (lr, epoch) of the best validation top-1 (ties: the earlier epoch,
    then the earlier --lr); without a validation split, the last epoch of the single lr. And the
    papers' habit: the (lr, epoch) of the best TEST top-1, for comparison only."""
    keys = list(lrs)

    def pick(metric):
        best = None
        for h in history:
            for k in keys:
                if best is None or h[metric][k] > best[0]:
                    best = (h[metric][k], k, h)
        return best[1], best[2]
    k, h = pick('val_top1') if has_val else (keys[0], history[-1])
    chosen = {'lr': lrs[k], 'epoch': h['epoch'], 'val_top1': h['val_top1'].get(k), 'val_top5': h['val_top5'].get(k),
              'test_top1': h['test_top1'][k], 'test_top5': h['test_top5'][k]}
    k, h = pick('test_top1')
    papers = {'lr': lrs[k], 'epoch': h['epoch'], 'test_top1': h['test_top1'][k], 'test_top5': h['test_top5'][k],
              'note': 'chosen by looking at the test set: optimistic, for comparison with papers only'}
    return chosen, papers


def main(args):
    timer = utils.Timer()
    rank, world_size, local_rank, device = utils.init_distributed_mode()
    check_args(args, world_size)
    net, info = None, None
    if args.load_features is None:
        info = data.beton_info(args.data_path)
        val_info = data.beton_info(args.val_path)
        net, a = utils.load_pretrained(args.weights, args.features, load_weights=args.init == 'pretrained',
                                       seed=args.seed)
        args.res, args.channels = utils.eval_input(args, a, [info, val_info])
    args.protocol = 'cached-centre-crop' if args.cache_features else 'rrc-flip'
    args.train_augmentation = (
        'none: features of the centre crop (build_eval_loader), computed once' if args.cache_features else
        f'RandomResizedCrop(scale=({args.crop_min_scale:g}, 1), ratio=(3/4, 4/3)) of the whole stored image + '
        f'horizontal flip p 0.5, streamed from the beton every step')
    utils.prepare_output_dir(args)
    utils.fix_random_seeds(args.seed + rank)
    amp = utils.autocast_ctx(args.dtype, device)
    frozen = None
    if net is not None:  # freeze discipline: eval mode (BN statistics fixed), no grads, a reference copy
        net = net.to(device).eval().requires_grad_(False)
        frozen = utils.snapshot_state(net)

    d = prepare_data(args, info, net, device, amp)
    (tr_x, tr_y), (va_f, va_y), (te_f, te_y) = d['train'], d['val'], d['test']
    num_classes = d['num_classes'] or int(max(tr_y.max(), te_y.max())) + 1
    dim = te_f.shape[1]
    fingerprint = data_fingerprint(d, with_features=bool(args.load_features))
    if utils.is_main_process():
        utils.atomic_write_text(os.path.join(args.output_dir, 'val_indices.txt'),
                                ''.join(f'{i}\n' for i in d['val_idx'].tolist()))
    print(f"| protocol {args.protocol} | train {len(tr_y)} / val {len(va_y)} (held out of train, seed "
          f"{args.seed}) / test {len(te_y)} samples | feature dim {dim} | {num_classes} classes | "
          f"{len(args.lr)} heads, lr {args.lr} at global batch {args.batch_size} "
          f"({args.batch_size // world_size} per process) | {timer():.0f} s to prepare")

    heads = LinearHeads(dim, num_classes, len(args.lr), args.head_bn).to(device)
    optimizer = build_optimizer(args, heads)
    utils.assert_trains_only(optimizer, heads)
    keys = [f'{lr:g}' for lr in args.lr]
    ckpt_path = os.path.join(args.output_dir, 'checkpoint.pth')
    start_epoch, history = 0, []
    if os.path.exists(ckpt_path):
        ck = utils.load_checkpoint_file(ckpt_path)
        heads.load_state_dict(ck['heads'])
        optimizer.load_state_dict(ck['optimizer'])
        start_epoch, history = ck['epoch'], ck['history']
        if ck.get('data', fingerprint) != fingerprint:
            utils.fail(f"{ckpt_path} was trained on other data than this run's (size, label sum[, feature sum] "
                       f"of train/val/test: {ck['data']} vs {fingerprint}; another --load_features file?): use "
                       f"another --output_dir")
        utils.set_rng_state(ck['rng'])
        print(f"| resumed from {ckpt_path}: epoch {start_epoch}")
    ddp_heads = nn.parallel.DistributedDataParallel(heads, device_ids=[local_rank] if device.type == 'cuda' else None)
    batches, steps = build_train_source(args, net, (tr_x, tr_y), device, amp, rank, world_size)
    ctx = {'rank': rank, 'world_size': world_size, 'device': device, 'keys': keys}

    for epoch in range(start_epoch, args.epochs):
        if args.stop_at_epoch is not None and epoch >= args.stop_at_epoch:
            print(f"| --stop_at_epoch {args.stop_at_epoch}: stopping; re-run without it to continue")
            utils.cleanup_distributed()
            return None
        stats = train_one_epoch(ddp_heads, optimizer, batches, steps, epoch, args, ctx)
        if frozen is not None:
            utils.assert_unchanged(net, frozen)
        (v1, v5), (t1, t5) = (evaluate(heads, f, y, args.eval_batch_size, device)
                              for f, y in ((va_f, va_y), (te_f, te_y)))
        row = {'epoch': epoch, 'train_loss': stats['loss'], 'val_top1': dict(zip(keys, v1)),
               'val_top5': dict(zip(keys, v5)), 'test_top1': dict(zip(keys, t1)), 'test_top5': dict(zip(keys, t5)),
               'num_val': len(va_y), 'num_test': len(te_y), 'train_time_s': stats['time_s'], 'elapsed_s': timer()}
        history.append(row)
        # log before saving: a kill in between repeats this epoch's line rather than losing it
        utils.log_stats(args.output_dir, row)
        utils.save_on_master({'heads': heads.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch + 1,
                              'history': history, 'rng': utils.rng_state(), 'data': fingerprint,
                              'args': vars(args)}, ckpt_path)
        best_val = max(v1) if v1 else float('nan')
        print(f"epoch {epoch}: loss {min(stats['loss'].values()):.4f} | best val top-1 over lrs {best_val:.2f} | "
              f"test top-1 "
              + ' '.join(f'{k}:{v:.2f}' for k, v in zip(keys, t1)) + f" | {stats['time_s']:.1f} s")

    chosen, papers = select(history, dict(zip(keys, args.lr)), len(va_y) > 0)
    result = {'protocol': args.protocol, 'train_augmentation': args.train_augmentation, 'weights': args.weights,
              'init': args.init, 'features': args.features,
              'load_features': args.load_features, 'num_train': len(tr_y), 'num_val': len(va_y),
              'num_test': len(te_y), 'epochs': args.epochs, 'lrs': args.lr,
              'selected_by': 'val_top1' if len(va_y) else 'last epoch (no validation split)',
              **chosen, 'best_test_epoch_lr_(papers_habit)': papers,
              'final_test_top1': history[-1]['test_top1'],
              'backbone_unchanged': None if frozen is None else True, 'wall_time_s': timer()}
    if len(args.lr) > 1 and chosen['lr'] in (min(args.lr), max(args.lr)):
        result['note'] = f"the chosen lr {chosen['lr']:g} is at the edge of the --lr grid: widen it (or --head_bn 1)"
        print(f"| note: {result['note']}")
    print(f"| {args.protocol}: lr {chosen['lr']:g}, epoch {chosen['epoch']} chosen on {len(va_y)} validation "
          f"samples -> test top-1 {chosen['test_top1']:.2f}  top-5 {chosen['test_top5']:.2f} on {len(te_y)} test "
          f"samples | papers' habit (best test over lr/epoch): {papers['test_top1']:.2f}")
    return utils.finish_run(args.output_dir, result)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
