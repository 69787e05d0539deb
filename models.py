"""Backbones, projector / predictor heads and the SSL model wrapper.

Backbones are torchvision's ResNets (same module names, so `backbone.pth` loads into
`torchvision.models.resnet50()` with only `fc.*` missing) with two research knobs: a CIFAR stem
(3x3 stride-1 conv, no max-pool; what every CIFAR SSL recipe uses) and a base width (64 =
torchvision; 8 or 16 gives the narrow nets that train on a CPU in tests and the demo).
"""
import torch
import torch.nn as nn

# ---- backbones ---------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """torchvision's BasicBlock (same names and init order): two 3x3 convs, stride on the first."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def residual_bn(self):
        return self.bn2

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride on the 3x3 conv), same names."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def residual_bn(self):
        return self.bn3

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


ARCHS = {
    'resnet18': (BasicBlock, [2, 2, 2, 2]),
    'resnet34': (BasicBlock, [3, 4, 6, 3]),
    'resnet50': (Bottleneck, [3, 4, 6, 3]),
}


class ResNet(nn.Module):
    """torchvision's ResNet (module names, init, and so the weights of a seed, are the same) with a
    configurable stem, width and input channels; `fc` is Identity, so forward() returns the pooled
    features of size `num_features`. Written out here rather than imported: `import torchvision`
    pulls in torch._dynamo and costs every stage ~2.5 s of start-up on a 2-core machine."""

    def __init__(self, arch='resnet18', cifar_stem=False, width=64, in_chans=3, zero_init_residual=True):
        if arch not in ARCHS:
            raise ValueError(f"models: unknown --arch {arch!r}; choose one of {sorted(ARCHS)}")
        super().__init__()
        block, layers = ARCHS[arch]
        self.inplanes = width
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        self.num_features = width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as identity: the usual SSL/ImageNet default
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.residual_bn().weight)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_backbone(arch='resnet18', cifar_stem=False, width=64, in_chans=3):
    return ResNet(arch, cifar_stem=cifar_stem, width=width, in_chans=in_chans)


# ---- heads -------------------------------------------------------------------------------------

def parse_dims(spec):
    """'2048-2048-256' -> [2048, 2048, 256]; '' -> []."""
    try:
        return [int(s) for s in spec.split('-')] if spec else []
    except ValueError:
        raise ValueError(f"models: bad layer spec {spec!r}; write widths joined by '-', e.g. 2048-256")


class MLP(nn.Sequential):
    """Linear layers of the widths in `spec` after `in_dim`. Hidden layers: Linear(+BN)+ReLU.
    `last_bn` puts a BatchNorm (affine-free if `last_bn_affine` is False) after the last Linear;
    `out_act` 'tanh' ends with tanh (CPLearn's projector: tanh(BN(Linear)))."""

    def __init__(self, in_dim, spec, bn=True, bias=True, last_bn=False, out_act='none', last_bn_affine=True):
        dims = parse_dims(spec)
        if not dims:
            raise ValueError('models: an MLP needs at least one width')
        layers, d = [], in_dim
        for i, h in enumerate(dims):
            last = i == len(dims) - 1
            use_bn = (bn and not last) or (last and last_bn)
            layers.append(nn.Linear(d, h, bias=bias and not use_bn))
            if use_bn:
                layers.append(nn.BatchNorm1d(h, affine=last_bn_affine or not last))
            if not last:
                layers.append(nn.ReLU(inplace=True))
            d = h
        if out_act == 'tanh':
            layers.append(nn.Tanh())
        elif out_act != 'none':
            raise ValueError(f"models: unknown out_act {out_act!r} (none|tanh)")
        super().__init__(*layers)
        self.out_dim = d


# ---- the SSL model -----------------------------------------------------------------------------

class SSLModel(nn.Module):
    """backbone -> projector (-> predictor). forward takes views (B, V, C, H, W) and returns a dict
    of (B, V, ·) tensors: 'feats' (backbone), 'z' (projector), and 'p' (predictor) when present.
    All B*V views go through the network as one batch (BN statistics over all views), or, with
    per_view=True, one forward pass per view (BN statistics per view, as solo-learn does)."""

    def __init__(self, backbone, projector=None, predictor=None, per_view=False):
        super().__init__()
        self.backbone = backbone
        self.projector = projector if projector is not None else nn.Identity()
        self.predictor = predictor
        self.per_view = per_view
        self.prototypes = None  # SwAV sets an nn.Linear(d, K, bias=False) here

    def forward(self, views):
        """views: (B, V, C, H, W), or a list of such groups of different resolutions (multi-crop:
        [large, small]); each group is one forward pass (its own BN statistics, as SwAV and
        solo-learn do) and the outputs are concatenated along V in the group order."""
        if isinstance(views, (list, tuple)):
            outs = [self(v) for v in views]
            return {k: torch.cat([o[k] for o in outs], 1) for k in outs[0]}
        B, V = views.shape[:2]
        if self.per_view and V > 1:
            return self([views[:, v:v + 1] for v in range(V)])
        feats = self.backbone(views.flatten(0, 1))
        z = self.projector(feats)
        out = {'feats': feats.view(B, V, -1), 'z': z.view(B, V, -1)}
        if self.predictor is not None:
            out['p'] = self.predictor(z).view(B, V, -1)
        return out


def build_model(args):
    """Build the SSL model from the flags of train_ssl.py (also used by the evaluation stages to
    rebuild a checkpoint's architecture from its saved args)."""
    backbone = build_backbone(args.arch, args.cifar_stem, args.width, args.in_chans)
    projector = None
    if args.proj_dims:
        projector = MLP(backbone.num_features, args.proj_dims, bn=args.proj_bn, bias=args.proj_bias,
                        last_bn=args.proj_last_bn, out_act=args.proj_out_act,
                        last_bn_affine=getattr(args, 'proj_last_bn_affine', True))
    predictor = None
    if getattr(args, 'pred_dims', ''):
        out_dim = projector.out_dim if projector is not None else backbone.num_features
        predictor = MLP(out_dim, args.pred_dims, bn=True)
    return SSLModel(backbone, projector, predictor,
                    per_view=getattr(args, 'forward_views', 'together') == 'separately')
