"""fold-batchnorm: folded modules compute what the originals compute in eval mode."""

import copy

import pytest
import torch
import torch.nn as nn

import compressc
from compressc.passes.lowering.fold_batchnorm import fold_batchnorm

from .models import REFERENCE_MODELS


def _randomise_stats(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("name", ["vgg_bn", "resnet_basic", "resnet_bottleneck", "mobilenet_v2", "densenet", "conv1d_net"])
def test_folding_keeps_outputs_and_removes_batchnorms(name):
    model, inputs = REFERENCE_MODELS[name]()
    _randomise_stats(model)
    gm = compressc.trace(model, inputs).module
    folded = fold_batchnorm(gm)
    with torch.no_grad():
        torch.testing.assert_close(folded(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert before > 0 and after < before
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules()) == before  # input untouched


def test_batchnorm_after_a_layer_with_two_users_is_left_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    net = _randomise_stats(Net().eval())
    folded = fold_batchnorm(compressc.trace(net, (torch.randn(1, 2, 3, 3),)).module)
    assert any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_a_fold_cache_reuses_folds_of_the_same_tensors_only():
    """A ``FoldCache`` hands out a layer's folded tensors again only while the layer and its
    BatchNorm hold the very tensors it folded; a changed one (a pruned variant's) is folded anew."""
    from compressc.passes.lowering.fold_batchnorm import FoldCache

    model, inputs = REFERENCE_MODELS["resnet_basic"]()
    gm = compressc.trace(_randomise_stats(model), inputs).module
    cache = FoldCache()
    first, second = fold_batchnorm(gm, share_tensors=True, cache=cache), fold_batchnorm(gm, share_tensors=True, cache=cache)
    plain = dict(fold_batchnorm(gm).named_parameters())
    assert len(cache) > 0
    for name, p in first.named_parameters():
        assert second.get_parameter(name) is p  # reused, not recomputed
        assert torch.equal(p, plain[name])      # and what folding computes without the cache
    conv = next(n for n, m in gm.named_modules() if isinstance(m, nn.Conv2d))
    variant = copy.deepcopy(gm)
    variant.get_submodule(conv).weight = nn.Parameter(gm.get_submodule(conv).weight * 2)
    refolded = fold_batchnorm(variant, in_place=True, cache=cache)
    assert refolded is variant  # in place: no copy
    assert refolded.get_submodule(conv).weight is not first.get_submodule(conv).weight
    torch.testing.assert_close(refolded.get_submodule(conv).weight, 2 * first.get_submodule(conv).weight)
