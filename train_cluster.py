"""NMCE clustering stages (SPEC §3): MCR^2 subspace + cluster heads on a pretrained network.

    # stage 2: backbone frozen, fresh heads on a TCR run (NMCE: 100 epochs)
    python train_cluster.py --weights runs/tcr --stage frozen --output_dir runs/nmce_s2
    # stage 3: unfreeze the backbone, start from stage 2 (NMCE: lr 0.003, 100 epochs)
    python train_cluster.py --weights runs/nmce_s2 --stage finetune --lr 0.003 --output_dir runs/nmce_s3
    python eval_cluster.py --weights runs/nmce_s3 --assign head      # ACC / NMI / ARI of the head

The network is NMCE-release's SubspaceClusterNetwork: backbone -> "pre-feature" (the stage-1
projector without its last Linear: Linear+BN+ReLU for the TCR recipe, 4096 wide) -> two fresh
heads, subspace Linear(-> z_dim, then L2-normalised) and cluster Linear(-> K logits). Loss:
losses.mcr2 on the view-averaged features and view-averaged Gumbel-softmax(tau) memberships,
minus z_weight x the agreement of the views. As the official train_clustering.py, the pre-feature
block is never updated by the optimizer; the subspace head (+ backbone in stage 3) train with
SGD+LARS (eta 0.02, clipped) on a cosine schedule, the cluster head with plain SGD at lr 0.5.
Difference (documented): in stage 2 the frozen part runs in eval mode (BN running statistics),
where the official code leaves it in train mode under no_grad (batch statistics).
Every epoch the head's clusters on the un-augmented train set (--eval_samples, evenly spaced) are scored
(Hungarian ACC, NMI, ARI) into log.txt. Re-running the same command resumes.
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import losses
import utils
from eval_cluster import cluster_scores, embed

# ---- the network ---------------------------------------------------------------------------------


class ClusterNet(nn.Module):
    """backbone -> pre_feature -> (normalised subspace z, cluster logits). forward(x (N, C, H, W))
    -> (z (N, z_dim), logits (N, K)). `features(x)` is the pre-feature the heads read."""

    def __init__(self, backbone, pre_feature, feat_dim, z_dim, num_clusters):
        super().__init__()
        self.backbone, self.pre_feature = backbone, pre_feature
        self.subspace = _Normalised(nn.Linear(feat_dim, z_dim))
        self.cluster = nn.Linear(feat_dim, num_clusters)

    def features(self, x):
        return self.pre_feature(self.backbone(x))

    def forward(self, x):
        h = self.features(x)
        return self.subspace(h), self.cluster(h)


class _Normalised(nn.Module):
    """A layer followed by L2 normalisation (the subspace head)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return F.normalize(self.layer(x), dim=-1)


def pre_feature_of(projector):
    """The stage-1 projector without its last Linear (NMCE's pre_feature) and its width; the
    identity and the backbone width when the projector is a single layer or absent."""
    if isinstance(projector, nn.Sequential):
        linears = [i for i, m in enumerate(projector) if isinstance(m, nn.Linear)]
        if len(linears) >= 2:
            block = nn.Sequential(*list(projector)[:linears[-1]])  # same modules, same key suffixes
            return block, projector[linears[-1]].in_features
    return None, None


def build_cluster_net(source, z_dim, num_clusters, load_weights=True, seed=0):
    """ClusterNet on a train_ssl run (checkpoint.pth: backbone + projector) -> (net, source args)."""
    net, a = utils.load_pretrained(source, 'projector', load_weights=load_weights, seed=seed)
    backbone, projector = net[0], net[1]
    pre, width = pre_feature_of(projector)
    if pre is None:
        pre, width = nn.Identity(), backbone.num_features
    torch.manual_seed(seed)  # the fresh heads
    return ClusterNet(backbone, pre, width, z_dim, num_clusters), a


def load_cluster_net(ck, file, load_weights=True, seed=0):
    """Rebuild a train_cluster.py network from its checkpoint dict (eval_cluster --assign head).
    load_weights=False: the same architecture with the source run's weights replaced by a fresh
    init (the random baseline). -> (net, args of the source run, which evaluation stages read)."""
    a = argparse.Namespace(**ck['args'])
    src = argparse.Namespace(**ck['source_args'])
    from models import build_model
    model = build_model(argparse.Namespace(**{**vars(src), 'pred_dims': ''}))
    pre, width = pre_feature_of(model.projector)
    if pre is None:
        pre, width = nn.Identity(), model.backbone.num_features
    torch.manual_seed(seed)
    net = ClusterNet(model.backbone, pre, width, a.z_dim, a.num_clusters)
    if load_weights:
        utils.load_strict(net, ck['model'], file)
    return net, src


# ---- one epoch -----------------------------------------------------------------------------------


def gumbel_softmax(logits, tau):
    """softmax((log_softmax(logits) + Gumbel noise) / tau): NMCE's Gumble_Softmax (no straight-through)."""
    g = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-10, 1 - 1e-10)))
    return ((F.log_softmax(logits.float(), -1) + g) / tau).softmax(-1)


def train_one_epoch(net, loader, opt, opt_c, epoch, args, amp):
    """MCR^2 steps over one epoch -> stats dict. The frozen part (stage 2) runs in eval mode under
    no_grad; LR of the main group follows a per-step cosine, the cluster head's stays constant."""
    frozen = args.stage == 'frozen'
    net.train()
    if frozen:
        net.backbone.eval()
    net.pre_feature.eval() if frozen else net.pre_feature.train()
    n_iter, total = len(loader), args.epochs * len(loader)
    sums, t0 = torch.zeros(2), time.time()
    for it, (views, _) in enumerate(loader):
        step = epoch * n_iter + it
        for g in opt.param_groups:
            g['lr'] = utils.cosine_lr(step, total, 0, args.lr)
        b, v = views.shape[:2]
        with amp:
            x = views.flatten(0, 1)
            if frozen:
                with torch.no_grad():
                    h = net.features(x)
            else:
                h = net.features(x)
            z, logits = net.subspace(h), net.cluster(h)
        pi = gumbel_softmax(logits.view(b, v, -1), args.tau)
        loss = losses.mcr2(z.float().view(b, v, -1), pi, eps=args.eps, z_weight=args.z_weight)
        if not torch.isfinite(loss):
            utils.fail(f"non-finite MCR^2 loss at epoch {epoch}, batch {it}; lower --lr or --eps", code=4)
        opt.zero_grad(set_to_none=True)
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        opt_c.step()
        sums += torch.tensor([loss.item(), 1.0])
    return {'loss': sums[0].item() / max(1, sums[1].item()), 'lr': opt.param_groups[0]['lr'],
            'time_s': time.time() - t0}


@torch.no_grad()
def evaluate(net, args, res, channels, device, amp):
    """Cluster-head assignments on --eval_samples un-augmented train images, evenly spaced over the
    beton (the first N of a class-sorted beton would hold one or two classes) -> scores."""
    net.eval()
    n = data.beton_info(args.data_path)['num_samples']
    loader = data.build_eval_loader(args.data_path, 512, res, channels=channels, workers=args.workers, device=device,
                                    indices=data.limit_indices(n, args.eval_samples or None))
    nets = {'backbone': nn.Sequential(net.backbone, net.pre_feature), 'head': net.cluster}
    feats, y = embed(nets, ((x, y) for x, y, _ in loader), device, amp)
    return cluster_scores(y.numpy(), feats['head'].argmax(1).numpy())


# ---- flags ---------------------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser('manifold-ssl NMCE clustering stages', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--weights', required=True,
                   help='stage frozen: a train_ssl run folder / checkpoint.pth (NMCE: the TCR run); stage '
                        'finetune: a train_cluster.py run (its heads and backbone are the start).')
    g.add_argument('--stage', default='frozen', choices=['frozen', 'finetune'],
                   help='frozen = NMCE stage 2 (only the heads train); finetune = stage 3 (backbone too). '
                        '(default: %(default)s)')
    g.add_argument('--z_dim', type=int, default=128, help='Subspace feature dimension (NMCE CIFAR: 128). (default: %(default)s)')
    g.add_argument('--num_clusters', type=int, default=None, help='Clusters K. Default: classes in the beton.')
    g = p.add_argument_group('ssl')
    g.add_argument('--eps', type=float, default=0.5,
                   help='MCR^2 distortion eps (NMCE train_clustering.py default: 0.5). (default: %(default)s)')
    g.add_argument('--z_weight', type=float, default=100.0,
                   help='Weight of the view agreement (official code: 100; SPEC §3 says 0 for these '
                        'stages: pass 0 for that). (default: %(default)s)')
    g.add_argument('--tau', type=float, default=1.0, help='Gumbel-softmax temperature (NMCE: 1). (default: %(default)s)')
    g.add_argument('--num_views', type=int, default=2, help='Views per image (NMCE: 2). (default: %(default)s)')
    g.add_argument('--recipe', default=None, choices=list(data.RECIPES),
                   help='Augmentation. Default: the source run\'s recipe.')
    g.add_argument('--crop_min_scale', type=float, default=0.08, help='(default: %(default)s)')
    g = p.add_argument_group('optim')
    g.add_argument('--epochs', type=int, default=100, help='(NMCE: 100 per stage). (default: %(default)s)')
    g.add_argument('--batch_size', type=int, default=512, help='Images per step (NMCE: 512). (default: %(default)s)')
    g.add_argument('--lr', type=float, default=5e-4,
                   help='LR of the subspace head (+ backbone), SGD+LARS, cosine to 0 (NMCE stage 2: 5e-4; '
                        'stage 3: 0.003). (default: %(default)s)')
    g.add_argument('--weight_decay', type=float, default=1e-4, help='(default: %(default)s)')
    g.add_argument('--cluster_lr', type=float, default=0.5, help='Constant SGD LR of the cluster head (NMCE: 0.5). (default: %(default)s)')
    g.add_argument('--cluster_weight_decay', type=float, default=5e-3, help='(NMCE: 5e-3). (default: %(default)s)')
    g = p.add_argument_group('eval')
    g.add_argument('--eval_samples', type=int, default=10000,
                   help='Train images (un-augmented, evenly spaced over the beton) the head is scored on each epoch; '
                        '0 = all. (default: %(default)s)')
    g = utils.add_data_args(p, need_train=False)
    g.description = '--data_path defaults to the source run\'s training beton.'
    g = utils.add_run_args(p, default_output='runs/nmce_cluster')
    g.add_argument('--stop_at_epoch', type=int, default=None,
                   help='Checkpoint and exit before this epoch (re-run without it to continue).')
    return p


# ---- main ----------------------------------------------------------------------------------------


def main(args):
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        utils.fail('train_cluster.py runs as one process; launch it with plain python, not torchrun')
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    file, _ = utils.resolve_weights(args.weights)
    ck = utils.load_checkpoint_file(file)
    is_cluster_run = isinstance(ck, dict) and 'cluster_head' in ck
    if not (isinstance(ck, dict) and isinstance(ck.get('args'), dict)):
        utils.fail(f"{file} holds no saved run args: pass a train_ssl.py run folder (or its checkpoint.pth / "
                   f"backbone.pth) or a train_cluster.py run")
    if args.stage == 'finetune' and not is_cluster_run:
        utils.fail(f"--stage finetune starts from a train_cluster.py run; {args.weights} is not one "
                   f"(run --stage frozen on it first)")
    if args.stage == 'frozen' and is_cluster_run:
        utils.fail(f"--stage frozen starts from a train_ssl run; {args.weights} is already a train_cluster.py run")
    if is_cluster_run:
        prev = ck['args']
        args.z_dim, args.num_clusters = prev['z_dim'], prev['num_clusters']
        net, src = load_cluster_net(ck, file, seed=args.seed)
    else:
        src = argparse.Namespace(**ck['args'])
    args.data_path = args.data_path or src.data_path
    info = data.beton_info(args.data_path)
    args.num_clusters = args.num_clusters or info['num_classes']
    args.recipe = args.recipe or src.recipe
    res, channels = utils.eval_input(args, src, [info])
    if not is_cluster_run:
        net, _ = build_cluster_net(file, args.z_dim, args.num_clusters, seed=args.seed)
    utils.prepare_output_dir(args)
    utils.fix_random_seeds(args.seed)
    net = net.to(device)

    frozen = args.stage == 'frozen'
    for prm in net.backbone.parameters():
        prm.requires_grad_(not frozen)
    for prm in net.pre_feature.parameters():  # as the official code: never stepped (gradients still
        prm.requires_grad_(False)              # flow through it to the backbone in stage 3)
    main_params = list(net.subspace.parameters()) + ([] if frozen else list(net.backbone.parameters()))
    groups = utils.param_groups(nn.ParameterList(main_params), args.weight_decay)
    opt = utils.build_optimizer('lars', groups, args.lr, momentum=0.9, lars_eta=0.02, lars_clip=True)
    opt_c = torch.optim.SGD(net.cluster.parameters(), lr=args.cluster_lr, momentum=0.9,
                            weight_decay=args.cluster_weight_decay)
    ckpt_path = os.path.join(args.output_dir, 'checkpoint.pth')
    start = 0
    if os.path.exists(ckpt_path):
        state = utils.load_checkpoint_file(ckpt_path)
        net.load_state_dict(state['model'])
        opt.load_state_dict(state['optimizer'])
        opt_c.load_state_dict(state['optimizer_c'])
        start = state['epoch']
        if 'rng' in state:  # the Gumbel noise and the loader seeds continue as in an unbroken run
            utils.set_rng_state(state['rng'])
        print(f"| resumed from {ckpt_path}: epoch {start}")
    snapshot = utils.snapshot_state(nn.ModuleList([net.backbone, net.pre_feature])) if frozen else None
    print(f"| stage {args.stage}: {sum(p.numel() for g in groups for p in g['params'])} parameters with lr "
          f"{args.lr} (LARS), cluster head lr {args.cluster_lr}; K = {args.num_clusters}, z_dim {args.z_dim}, "
          f"{args.num_views} views of recipe {args.recipe}, batch {args.batch_size}")

    amp = utils.autocast_ctx(args.dtype, device)
    loader = data.build_ssl_loader(args.data_path, args.batch_size, args.num_views, res, recipe=args.recipe,
                                   channels=channels, workers=args.workers, seed=args.seed, device=device,
                                   scale=(args.crop_min_scale, 1.0))
    timer = utils.Timer()
    for epoch in range(start, args.epochs):
        if args.stop_at_epoch is not None and epoch >= args.stop_at_epoch:
            print(f"| --stop_at_epoch {args.stop_at_epoch}: stopping; re-run without it to continue")
            return
        loader.set_epoch(epoch)
        train = train_one_epoch(net, loader, opt, opt_c, epoch, args, amp)
        if frozen:
            utils.assert_unchanged(nn.ModuleList([net.backbone, net.pre_feature]), snapshot)
        scores = evaluate(net, args, res, channels, device, amp)
        state = {'model': net.state_dict(), 'optimizer': opt.state_dict(), 'optimizer_c': opt_c.state_dict(),
                 'epoch': epoch + 1, 'cluster_head': True, 'rng': utils.rng_state(), 'args': vars(args),
                 'source_args': vars(src)}
        stats = {'epoch': epoch, **{f'train_{k}': v for k, v in train.items()},
                 **{f'train_cluster_{k}': v for k, v in scores.items()}, 'elapsed_s': timer()}
        # log before saving: a kill in between repeats this epoch's line rather than losing it
        utils.log_stats(args.output_dir, stats)
        utils.save_on_master(state, ckpt_path)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}))
    print(f"| done; score the head with: python eval_cluster.py --weights {args.output_dir} --assign head")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
