"""models.py: shapes, torchvision key compatibility, heads."""
import argparse
import subprocess
import sys

import pytest
import torch
import torchvision

from conftest import ROOT
from models import MLP, ResNet, SSLModel, build_model, parse_dims


@pytest.mark.parametrize('arch,feat', [('resnet18', 512), ('resnet50', 2048)])
def test_backbone_keys_load_into_torchvision(arch, feat):
    """backbone.pth contract: a standard-stem backbone loads into torchvision with only fc.* missing."""
    net = ResNet(arch, cifar_stem=False, width=64)
    assert net.num_features == feat
    tv = getattr(torchvision.models, arch)()
    res = tv.load_state_dict(net.state_dict(), strict=False)
    assert sorted(res.missing_keys) == ['fc.bias', 'fc.weight']
    assert res.unexpected_keys == []
    x = torch.randn(2, 3, 64, 64)
    tv.fc = torch.nn.Identity()
    net.eval(), tv.eval()
    torch.testing.assert_close(net(x), tv(x))


def test_narrow_cifar_stem_shapes():
    net = ResNet('resnet18', cifar_stem=True, width=8, in_chans=1)
    assert net.num_features == 64
    assert isinstance(net.maxpool, torch.nn.Identity) and net.conv1.kernel_size == (3, 3)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 64)


def test_zero_init_residual_makes_blocks_identity():
    net = ResNet('resnet18', width=8)
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in net.layer1)


def test_parse_dims_and_mlp():
    assert parse_dims('2048-2048-256') == [2048, 2048, 256]
    with pytest.raises(ValueError, match='bad layer spec'):
        parse_dims('2048x256')
    m = MLP(16, '32-8', bn=True)
    kinds = [type(x).__name__ for x in m]
    assert kinds == ['Linear', 'BatchNorm1d', 'ReLU', 'Linear'] and m.out_dim == 8
    cp = MLP(16, '32', bn=False, last_bn=True, out_act='tanh')  # CPLearn: tanh(BN(Linear))
    assert [type(x).__name__ for x in cp] == ['Linear', 'BatchNorm1d', 'Tanh']
    assert cp(torch.randn(4, 16)).abs().max() <= 1


def test_ssl_model_views_layout():
    args = argparse.Namespace(arch='resnet18', cifar_stem=True, width=8, in_chans=3, proj_dims='32-16',
                              proj_bn=False, proj_bias=True, proj_last_bn=False, proj_out_act='none',
                              pred_dims='8-16')
    model = build_model(args).eval()
    x = torch.randn(2, 3, 3, 16, 16)  # B=2 images, V=3 views
    out = model(x)
    assert out['feats'].shape == (2, 3, 64) and out['z'].shape == (2, 3, 16) and out['p'].shape == (2, 3, 16)
    # view (b, v) of the output is the network applied to image b, view v
    single = model.projector(model.backbone(x[1, 2:3]))
    torch.testing.assert_close(out['z'][1, 2], single[0])


def test_forward_views_separately_keeps_bn_statistics_per_view():
    """--forward_views separately (solo-learn): in train mode each view is its own BN batch; the
    default puts all B*V views in one batch. Eval mode: the two agree."""
    args = argparse.Namespace(arch='resnet18', cifar_stem=True, width=8, in_chans=3, proj_dims='32-16',
                              proj_bn=True, proj_bias=True, proj_last_bn=False, proj_out_act='none',
                              pred_dims='', forward_views='separately')
    sep = build_model(args).train()
    together = build_model(argparse.Namespace(**{**vars(args), 'forward_views': 'together'})).train()
    together.load_state_dict(sep.state_dict())
    assert sep.per_view and not together.per_view
    x = torch.randn(4, 3, 3, 16, 16)
    x[:, 1] += 2.0  # views with other statistics: a shared BN batch mixes them
    out = sep(x)
    for v in range(3):  # view v alone through the network, as its own batch
        alone = together(x[:, v:v + 1])
        torch.testing.assert_close(out['z'][:, v], alone['z'][:, 0])
    assert not torch.allclose(together(x)['z'], out['z'], atol=1e-3)
    together.load_state_dict(sep.state_dict())  # same running statistics
    sep.eval(), together.eval()
    torch.testing.assert_close(sep(x)['z'], together(x)['z'])


def test_mlp_affine_free_last_bn():
    """--proj_last_bn_affine 0 (solo-learn's MoCo v3 and SimSiam projectors): the last BatchNorm has
    no scale or shift, the hidden ones keep theirs; in train mode the output is standardised."""
    from models import MLP
    m = MLP(8, '16-4', bn=True, last_bn=True, last_bn_affine=False).train()
    bns = [x for x in m if isinstance(x, torch.nn.BatchNorm1d)]
    assert [b.affine for b in bns] == [True, False]
    y = m(torch.randn(64, 8) * 3 + 1)
    torch.testing.assert_close(y.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    assert 'bias' not in dict(bns[1].named_parameters())


def test_stages_start_without_torchvision():
    """models.py writes torchvision's ResNet out: `import torchvision` pulls in torch._dynamo and
    cost every stage (and every CLI test) ~2.5 s of start-up here. Same weights for a seed as the
    torchvision subclass it replaces (checked when it was written); the key test above holds."""
    code = ("import sys, train_ssl, train_linear, train_semisl, eval_knn, train_cluster, eval_cluster, "
            "eval_geometry; print([m for m in ('torchvision', 'torch._dynamo') if m in sys.modules])")
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == '[]', p.stdout + p.stderr[-2000:]
