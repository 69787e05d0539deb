"""k-nearest-neighbour evaluation of frozen features (DINO protocol, SPEC §8).

    python eval_knn.py --weights runs/ssl --data_path train.beton --val_path test.beton
    torchrun --nproc_per_node=8 eval_knn.py --weights runs/ssl/backbone.pth ...

The bank is the un-augmented train set; every test image votes with its top-k neighbours
(weights exp(s/T) or uniform). Each sample is counted exactly once, whatever the world size.
Presets: --preset mmcr (k=200, T=0.5), --preset nmce (k=11, unweighted).
"""
import argparse
import os

import data
import utils

PRESETS = {'dino': dict(ks=[10, 20, 100, 200], temperature=0.07, weighting='exp'),
           'mmcr': dict(ks=[200], temperature=0.5, weighting='exp'),
           'nmce': dict(ks=[11], temperature=0.07, weighting='uniform')}


def get_args_parser():
    p = argparse.ArgumentParser('manifold-ssl kNN evaluation', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--weights', default=None,
                   help='A train_ssl run folder, its checkpoint.pth, or a backbone.pth. The architecture is '
                        'rebuilt from the flags saved with it.')
    g.add_argument('--init', default='pretrained', choices=['pretrained', 'random'],
                   help='random: same architecture as --weights, freshly initialised with --seed (the '
                        'baseline every table needs). (default: %(default)s)')
    g.add_argument('--features', default='backbone', choices=['backbone', 'projector'],
                   help='Which output to evaluate (projector needs a checkpoint.pth). (default: %(default)s)')
    g = p.add_argument_group('eval')
    g.add_argument('--preset', default='dino', choices=sorted(PRESETS),
                   help='Defaults for k/T/weighting: dino k=10,20,100,200 T=0.07; mmcr k=200 T=0.5; '
                        'nmce k=11 unweighted. Explicit flags override. (default: %(default)s)')
    g.add_argument('--ks', type=int, nargs='+', default=None, help='Numbers of neighbours, e.g. --ks 10 20 200.')
    g.add_argument('--temperature', type=float, default=None, help='T of the exp(s/T) vote weights.')
    g.add_argument('--weighting', default=None, choices=['exp', 'inverse', 'uniform'],
                   help='Vote weights: exp = exp(s/T) of the cosine s (DINO), or exp(-(d - d_nearest)/T) '
                        'of the euclidean distance d; inverse = 1/(d + 1e-5) (euclidean only, solo-learn); '
                        'uniform = 1 (NMCE). Default: the preset\'s, and inverse with --metric euclidean.')
    g.add_argument('--metric', default='cosine', choices=['cosine', 'euclidean'],
                   help='cosine: L2-normalised features, dot product (DINO); euclidean: raw features, '
                        'distances (solo-learn\'s option). (default: %(default)s)')
    g.add_argument('--batch_size', type=int, default=512, help='Per-process batch for feature extraction. (default: %(default)s)')
    g.add_argument('--dump_features', type=utils.str2bool, default=True,
                   help='Save features to OUTPUT_DIR/features.pth for reuse. (default: %(default)s)')
    g.add_argument('--load_features', default=None, help='Skip extraction: load a features.pth written by this script.')
    utils.add_data_args(p, need_train=False)
    utils.add_run_args(p, default_output='runs/knn')
    return p


def compute_features(args, net, res, ch, device):
    net = net.to(device).eval()
    amp = utils.autocast_ctx(args.dtype, device)
    out = {}
    for split, path in (('train', args.data_path), ('test', args.val_path)):
        loader = data.build_eval_loader(path, args.batch_size, res, channels=ch, workers=args.workers, device=device,
                                        rank=utils.get_rank(), world_size=utils.get_world_size(),
                                        norm_from=args.data_path)  # test set normalised with train statistics
        out[split] = utils.extract_features(net, loader, device, amp)
        print(f"| {split}: {len(out[split][0])} samples, feature dim {out[split][0].shape[1]}")
    return out


def main(args):
    rank, world_size, _, device = utils.init_distributed_mode()
    if args.weighting is None and args.metric == 'euclidean' and PRESETS[args.preset]['weighting'] == 'exp':
        args.weighting = 'inverse'  # exp(s/T) is defined on cosines; solo-learn weights distances so
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.weighting == 'inverse' and args.metric != 'euclidean':
        utils.fail('--weighting inverse weights euclidean distances: add --metric euclidean')
    if args.load_features is None:
        if not args.weights:
            utils.fail('--weights is needed (a run folder, checkpoint.pth or backbone.pth) unless --load_features is given')
        if not (args.data_path and args.val_path):
            utils.fail('--data_path (bank) and --val_path (queries) are needed unless --load_features is given')
        infos = [data.beton_info(args.data_path), data.beton_info(args.val_path)]
        # the network and its input checks before the run folder: a refusal leaves nothing behind
        net, a = utils.load_pretrained(args.weights, args.features, load_weights=args.init == 'pretrained',
                                       seed=args.seed)
        res, ch = utils.eval_input(args, a, infos)
    feats = None
    if args.load_features:  # checked before the run folder is written
        feats = utils.load_checkpoint_file(args.load_features)
        if not (isinstance(feats, dict) and all(isinstance(feats.get(s), (tuple, list)) and len(feats[s]) == 2
                                                for s in ('train', 'test'))):
            utils.fail(f"{args.load_features} is not a features file ({{'train': (f, y), 'test': (f, y)}}, "
                       f"as --dump_features 1 writes)")
    utils.prepare_output_dir(args)
    if feats is None:
        feats = compute_features(args, net, res, ch, device)
        if args.dump_features and utils.is_main_process():
            utils.save_on_master(feats, os.path.join(args.output_dir, 'features.pth'))
    (tr_f, tr_y), (te_f, te_y) = feats['train'], feats['test']
    res = utils.knn_classify(tr_f, tr_y, te_f, te_y, ks=args.ks, T=args.temperature, metric=args.metric,
                             weighting=args.weighting)
    result = {'weights': args.weights, 'init': args.init, 'features': args.features, 'metric': args.metric,
              'weighting': args.weighting, 'temperature': args.temperature, 'num_train': len(tr_f),
              'num_test': len(te_f), **{f'top1_k{k}': v[0] for k, v in res.items()},
              **{f'top5_k{k}': v[1] for k, v in res.items()}}
    for k, (t1, t5) in res.items():
        print(f"| kNN k={k:<4d} T={args.temperature} {args.metric}/{args.weighting}: top-1 {t1:.2f}  top-5 {t5:.2f}  "
              f"({len(te_f)} test samples, {len(tr_f)} in the bank)")
    return utils.finish_run(args.output_dir, result, log=True)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
