"""Semi-supervised evaluation (SPEC §8): fine-tune backbone + a new linear head on a labelled
fraction of the train set, report top-1/top-5 on the test set after the last epoch.

    python train_semisl.py --weights runs/ssl --data_path train.beton --val_path test.beton --train_percent 10
    python train_semisl.py ... --subset_file 1percent.txt     # SimCLR's ImageNet list, or beton indices

The labelled subset is either a file (one image file name per line, as SimCLR's ImageNet 1% /
10% lists, or one beton index per line), or a class-balanced draw of floor(percent/100 * n_c)
images of every class c from --subset_seed. Either way its beton indices are saved to
OUTPUT_DIR/subset_indices.txt, so the run is reproducible from its folder alone.
Recipe: SGD with Nesterov momentum 0.9, cosine, 20 epochs, batch 256, backbone lr = 0.05 x head
lr; RandomResizedCrop(--crop_min_scale, 1) of the whole stored image + flip, streamed from the
beton over the subset's indices (data.build_ssl_loader(indices=): no image cache, so ImageNet's
10% works as well as Fashion-MNIST's). --backbone_weights freeze trains the head only (a linear probe on
the subset, backbone in eval mode and checked unchanged). Re-running the same command resumes.
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import utils

# ---- flags -------------------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser('manifold-ssl semi-supervised fine-tuning', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = utils.add_weights_args(p)
    g.add_argument('--backbone_weights', default='finetune', choices=['finetune', 'freeze'],
                   help='finetune: backbone and head train (SPEC §8); freeze: head only, backbone in eval '
                        'mode (barlowtwins\' --weights freeze). (default: %(default)s)')

    g = p.add_argument_group('semisl')
    g.add_argument('--train_percent', type=float, default=None,
                   help='Labelled percentage of each class: 1 or 10 (the ImageNet benchmarks) or 100. '
                        'Required unless --subset_file is given.')
    g.add_argument('--subset_file', default=None,
                   help='Text file of the labelled subset, one entry per line: image file names '
                        '(SimCLR lists, e.g. n01440764_10026.JPEG; needs a beton written with --dataset '
                        'imagefolder, whose FILE.beton.names.txt maps names to samples) or integer beton '
                        'indices.')
    g.add_argument('--subset_seed', type=int, default=0,
                   help='Seed of the class-balanced draw when no --subset_file is given (kept apart from '
                        '--seed so that training seeds vary over one fixed subset). (default: %(default)s)')
    g.add_argument('--crop_min_scale', type=float, default=0.08,
                   help='Lower bound of the RandomResizedCrop area (torchvision: 0.08). Harsh for 28-32 px '
                        'images: on the Fashion-MNIST demo (5 epochs, 10%%) 0.5 gave 52.5 top-1 vs 45.0 for '
                        '0.08. (default: %(default)s)')

    g = p.add_argument_group('optim')
    g.add_argument('--epochs', type=int, default=20, help='(default: %(default)s)')
    g.add_argument('--batch_size', type=int, default=256,
                   help='GLOBAL batch size; must divide by the number of processes. (default: %(default)s)')
    g.add_argument('--lr_head', type=float, default=0.1,
                   help='Absolute learning rate of the new head at --batch_size. (default: %(default)s)')
    g.add_argument('--lr_backbone', type=float, default=None,
                   help='Absolute learning rate of the backbone; default 0.05 x --lr_head (SPEC §8; the '
                        'pretrained features should move much less than the new head).')
    g.add_argument('--momentum', type=float, default=0.9, help='Nesterov momentum. (default: %(default)s)')
    g.add_argument('--weight_decay', type=float, default=0.0,
                   help='On >=2-D tensors (barlowtwins semi-supervised: 0). (default: %(default)s)')
    g.add_argument('--warmup_epochs', type=float, default=0,
                   help='Linear LR warm-up before the cosine. (default: %(default)s)')

    g = p.add_argument_group('eval')
    g.add_argument('--eval_every', type=int, default=0,
                   help='Also evaluate on the test set every N epochs (logged, never used to choose '
                        'anything); 0 = only after the last epoch, the reported number. (default: %(default)s)')
    g.add_argument('--eval_batch_size', type=int, default=512,
                   help='Per-process batch for evaluation. (default: %(default)s)')

    utils.add_data_args(p)
    g = utils.add_run_args(p, default_output='runs/semisl')
    g.add_argument('--stop_at_epoch', type=int, default=None,
                   help='Checkpoint and exit before this epoch (re-run without it to continue).')
    return p


def check_args(args, world_size):
    if args.val_path is None:
        utils.fail('--val_path (the test beton) is needed')
    if args.subset_file is None and args.train_percent is None:
        utils.fail('give --train_percent (1, 10 or 100) or a --subset_file')
    if args.train_percent is not None and not 0 < args.train_percent <= 100:
        utils.fail(f'--train_percent must be in (0, 100], got {args.train_percent}')
    if args.batch_size % world_size:
        utils.fail(f'--batch_size {args.batch_size} does not divide by the {world_size} processes')
    if args.epochs < 1:
        utils.fail(f'--epochs must be >= 1, got {args.epochs}')
    if not 0 < args.crop_min_scale <= 1:
        utils.fail(f'--crop_min_scale must be in (0, 1], got {args.crop_min_scale}')


# ---- the labelled subset -----------------------------------------------------------------------

def imagefolder_files(info):
    """(file names, labels or None) of every sample of an imagefolder beton, in beton order. From
    the beton's FILE.beton.names.txt (written by data.write_beton; labels None: they are the
    beton's own); for betons written before that file existed, the folder is walked again exactly
    as data.write_beton walked it, refused if it no longer has the number of images the beton was
    written from, and its labels returned for a cross-check."""
    src = info['source']
    if src['dataset'] != 'imagefolder':
        utils.fail(f"file names in --subset_file need an imagefolder beton; {info['path']} was written from "
                   f"{src['dataset']}: give one beton index per line instead")
    if info.get('names_file'):
        path = os.path.join(os.path.dirname(info['path']), info['names_file'])
        if not os.path.isfile(path):
            utils.fail(f"{path} (the file names of {info['path']}, named by its sidecar) is missing: copy it "
                       f"along with the beton, or write the beton again")
        with open(path) as f:
            names = f.read().splitlines()
        if len(names) != info['num_samples']:
            utils.fail(f"{path} lists {len(names)} files but {info['path']} holds {info['num_samples']} samples")
        return names, None
    print(f"| {info['path']} records no file names (written before FILE.beton.names.txt existed): walking "
          f"{src['root']}/{src['split']} again")
    s = data.open_source('imagefolder', src['root'], src['split'])
    if len(s.labels) != src['source_samples']:
        utils.fail(f"{src['root']}/{src['split']} holds {len(s.labels)} images but {info['path']} was written "
                   f"from {src['source_samples']}: the folder changed, file names cannot be mapped")
    keep = data.limit_indices(len(s.labels), src['limit'])
    return [s.paths[i] for i in keep], torch.as_tensor(s.labels[keep], dtype=torch.int64)


def read_subset_file(path, info, labels):
    """Sorted beton indices of a subset file: integer indices, or image file names (basenames)."""
    if not os.path.isfile(path):
        utils.fail(f'--subset_file {path} does not exist')
    with open(path) as f:
        entries = [line.strip() for line in f if line.strip()]
    if not entries:
        utils.fail(f'--subset_file {path} is empty')
    if all(e.isdigit() for e in entries):
        idx = torch.tensor([int(e) for e in entries])
        if idx.max() >= len(labels):
            utils.fail(f'--subset_file {path} has index {idx.max().item()} but the beton holds {len(labels)} samples')
    else:
        files, file_labels = imagefolder_files(info)
        where, seen_twice = {}, set()
        for i, name in enumerate(os.path.basename(f) for f in files):
            if name in where:
                seen_twice.add(name)
            where[name] = i
        missing = [e for e in entries if e not in where]
        ambiguous = [e for e in entries if e in seen_twice]
        if missing or ambiguous:
            utils.fail(f"--subset_file {path}: {len(missing)} names are not in the beton (e.g. {missing[:2]}), "
                       f"{len(ambiguous)} match several files (e.g. {ambiguous[:2]})")
        idx = torch.tensor([where[e] for e in entries])
        if file_labels is not None and not torch.equal(file_labels[idx], labels[idx]):
            utils.fail(f"the image folder and {info['path']} disagree on the labels of the subset: wrong folder?")
    if len(idx.unique()) != len(idx):
        utils.fail(f'--subset_file {path} lists {len(idx) - len(idx.unique())} samples twice')
    return idx.sort().values


def choose_subset(args, info):
    """-> (sorted beton indices, description); saved to subset_indices.txt on the first run and
    checked against it on a resume (a changed subset file must not mix two subsets in one run)."""
    labels = utils.beton_labels(args.data_path)
    if args.subset_file:
        idx, how = read_subset_file(args.subset_file, info, labels), f'file {args.subset_file}'
    else:
        idx = utils.balanced_subset(labels, args.train_percent, args.subset_seed)
        how = f'class-balanced draw of {args.train_percent:g}% per class, seed {args.subset_seed}'
    path = os.path.join(args.output_dir, 'subset_indices.txt')
    text = ''.join(f'{i}\n' for i in idx.tolist())
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != text:
                utils.fail(f'{path} differs from the subset chosen now: the subset changed since this run started')
    elif utils.is_main_process():
        utils.atomic_write_text(path, text)
    per_class = torch.bincount(labels[idx], minlength=info['num_classes'])
    return idx, how, per_class


# ---- model -------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """The pretrained backbone and a new linear head (MoCo v3 initialisation)."""

    def __init__(self, backbone, num_features, num_classes):
        super().__init__()
        self.backbone = backbone
        self.head = utils.linear_head(num_features, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def build_optimizer(args, model):
    """SGD with Nesterov momentum; the backbone's groups at --lr_backbone, the head's at --lr_head
    (each group keeps its base_lr; the cosine scales it every step). No decay on 1-D tensors."""
    groups = [{**g, 'base_lr': args.lr_head} for g in utils.param_groups(model.head, args.weight_decay)]
    if args.backbone_weights == 'finetune':
        groups += [{**g, 'base_lr': args.lr_backbone} for g in utils.param_groups(model.backbone, args.weight_decay)]
    opt = torch.optim.SGD(groups, lr=args.lr_head, momentum=args.momentum, nesterov=True)
    utils.assert_trains_only(opt, model if args.backbone_weights == 'finetune' else model.head)
    return opt


# ---- training ----------------------------------------------------------------------------------

def build_train_batches(args, subset, device, rank, world_size):
    """-> (batches, steps): batches(epoch) yields this rank's augmented (images, labels) on
    `device` for each of the epoch's `steps` steps: data.build_ssl_loader over the labelled
    subset's beton indices, one view of recipe 'crop' (each image decoded once, RandomResizedCrop
    (--crop_min_scale, 1) of the whole stored image + flip p 0.5, keyed on (seed + rank, epoch,
    sample)), normalised with the train beton's statistics like the test loader. The order and
    crops are a pure function of (seed, epoch), so a resumed run replays exactly. The last partial
    batch is dropped unless the subset is smaller than one batch."""
    loader = data.build_ssl_loader(args.data_path, args.batch_size // world_size, 1, args.res, recipe='crop',
                                   channels=args.channels, workers=args.workers, seed=args.seed,
                                   distributed=world_size > 1, rank=rank, world_size=world_size, device=device,
                                   drop_last=len(subset) >= args.batch_size, scale=(args.crop_min_scale, 1.0),
                                   indices=subset.numpy())

    def batches(epoch):
        loader.set_epoch(epoch)  # order and crops of `epoch`, also right after a resume
        for views, labels in loader:
            yield views[:, 0], labels
    return batches, len(loader)


def train_one_epoch(ddp_model, optimizer, scaler, batches, steps, epoch, args, ctx):
    """One pass over the labelled subset; the LR of each group follows its cosine from the global
    step. Metrics accumulate on the device and are read every --print_freq steps."""
    model = utils.unwrap(ddp_model)
    model.train()
    if args.backbone_weights == 'freeze':
        model.backbone.eval()  # BN statistics stay those of pretraining
    total, warm = args.epochs * steps, int(args.warmup_epochs * steps)
    sums = torch.zeros(3, device=ctx['device'])  # loss, correct, count
    t0 = time.time()
    for it, (x, y) in enumerate(batches(epoch)):
        step = epoch * steps + it
        for g in optimizer.param_groups:
            g['lr'] = utils.cosine_lr(step, total, warm, g['base_lr'])
        with ctx['amp']:
            logits = ddp_model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum().float(),
                                 torch.tensor(float(len(y)), device=y.device)])
        if (it % args.print_freq == 0 or it == steps - 1) and not torch.isfinite(sums[0]):
            utils.fail(f'non-finite loss at epoch {epoch}, step {it}: lower --lr_head / --lr_backbone', code=4)
    sums = utils.all_reduce_mean(sums)
    return {'loss': sums[0].item() / sums[2].item(), 'top1': 100 * sums[1].item() / sums[2].item(),
            'lr_head': optimizer.param_groups[0]['lr'], 'time_s': time.time() - t0}


@torch.no_grad()
def evaluate(model, loader, device, amp):
    """Top-1/top-5 on the test loader, every sample counted once (index-aware gather)."""
    model.eval()
    logits, labels = utils.extract_features(model, loader, device, amp)
    model.train()
    t1, t5 = utils.topk_accuracy(logits, labels)
    return t1.item(), t5.item(), len(labels)


def main(args):
    timer = utils.Timer()
    rank, world_size, local_rank, device = utils.init_distributed_mode()
    check_args(args, world_size)
    info = data.beton_info(args.data_path)
    val_info = data.beton_info(args.val_path)
    backbone, a = utils.load_pretrained(args.weights, 'backbone', load_weights=args.init == 'pretrained',
                                        seed=args.seed)
    args.res, args.channels = utils.eval_input(args, a, [info, val_info])
    args.lr_backbone = args.lr_backbone if args.lr_backbone is not None else 0.05 * args.lr_head
    utils.prepare_output_dir(args)
    utils.fix_random_seeds(args.seed + rank)
    amp = utils.autocast_ctx(args.dtype, device)

    subset, how, per_class = choose_subset(args, info)
    model = Classifier(backbone, backbone.num_features, info['num_classes']).to(device)
    frozen = None
    if args.backbone_weights == 'freeze':
        model.backbone.requires_grad_(False)
        frozen = utils.snapshot_state(model.backbone)
    elif world_size > 1 and device.type == 'cuda':  # BN statistics over the global batch (GPU-only in torch)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(args, model)
    scaler = utils.make_scaler(args.dtype, device)
    ckpt_path = os.path.join(args.output_dir, 'checkpoint.pth')
    start_epoch = 0
    if os.path.exists(ckpt_path):
        ck = utils.load_checkpoint_file(ckpt_path)
        model.load_state_dict(ck['model'])
        optimizer.load_state_dict(ck['optimizer'])
        scaler.load_state_dict(ck['scaler'])
        start_epoch = ck['epoch']
        utils.set_rng_state(ck['rng'])
        print(f"| resumed from {ckpt_path}: epoch {start_epoch}")
    ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == 'cuda' else None)

    batches, steps = build_train_batches(args, subset, device, rank, world_size)
    test_loader = data.build_eval_loader(args.val_path, args.eval_batch_size, args.res, channels=args.channels,
                                         workers=args.workers, device=device, rank=rank, world_size=world_size,
                                         norm_from=args.data_path)  # the train beton's mean/std: one input map
    print(f"| labelled subset: {len(subset)} of {info['num_samples']} images ({how}; per class min "
          f"{per_class[per_class > 0].min().item()}, max {per_class.max().item()}) | backbone "
          f"{args.backbone_weights} | lr head {args.lr_head:g}, backbone {args.lr_backbone:g} at global batch "
          f"{args.batch_size} "
          f"({args.batch_size // world_size} per process) | {timer():.0f} s to prepare")
    ctx = {'rank': rank, 'world_size': world_size, 'device': device, 'amp': amp}

    for epoch in range(start_epoch, args.epochs):
        if args.stop_at_epoch is not None and epoch >= args.stop_at_epoch:
            print(f"| --stop_at_epoch {args.stop_at_epoch}: stopping; re-run without it to continue")
            utils.cleanup_distributed()
            return None
        stats = train_one_epoch(ddp_model, optimizer, scaler, batches, steps, epoch, args, ctx)
        if frozen is not None:
            utils.assert_unchanged(model.backbone, frozen)
        row = {'epoch': epoch, **{f'train_{k}': v for k, v in stats.items()}}
        if epoch + 1 == args.epochs or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            final = evaluate(model, test_loader, device, amp)
            row['test_top1'], row['test_top5'], row['num_test'] = final
        row['elapsed_s'] = timer()
        # log before saving: a kill in between repeats this epoch's line rather than losing it
        utils.log_stats(args.output_dir, row)
        utils.save_on_master({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                              'scaler': scaler.state_dict(), 'epoch': epoch + 1, 'rng': utils.rng_state(),
                              'args': vars(args)}, ckpt_path)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))

    if start_epoch == args.epochs:  # a finished run, re-run: the same number again, not logged twice
        final = evaluate(model, test_loader, device, amp)
    top1, top5, n_test = final
    result = {'protocol': f'semi-supervised, backbone {args.backbone_weights}, rrc-flip',
              'train_augmentation': f'RandomResizedCrop(scale=({args.crop_min_scale:g}, 1), ratio=(3/4, 4/3)) of '
                                    f'the whole stored image + horizontal flip p 0.5, streamed from the beton',
              'weights': args.weights,
              'init': args.init, 'train_percent': args.train_percent, 'subset': how, 'num_labelled': len(subset),
              'labelled_fraction': len(subset) / info['num_samples'], 'num_test': n_test, 'epochs': args.epochs,
              'lr_head': args.lr_head, 'lr_backbone': args.lr_backbone, 'test_top1': top1, 'test_top5': top5,
              'backbone_unchanged': True if frozen is not None else None, 'wall_time_s': timer()}
    print(f"| semi-supervised ({len(subset)} labelled images, backbone {args.backbone_weights}): test top-1 "
          f"{top1:.2f}  top-5 {top5:.2f} on {n_test} test samples after {args.epochs} epochs")
    return utils.finish_run(args.output_dir, result)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
