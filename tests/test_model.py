"""The serial network is the paper's: parameter count, feature-map sizes, towers, init, layers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distalex.model import AlexNet, TowerLRN, count_parameters, feature_map_sizes


def test_paper_parameter_count():
    assert count_parameters(AlexNet(num_classes=1000, towers=2)) == 60_965_224


def test_paper_layer_shapes():
    """docs/paper.md's table: 55x55x96, 27x27x256, 13x13x384, 13x13x384, 13x13x256 -> 6x6x256, 4096, 4096, 1000."""
    model = AlexNet().eval()
    shapes = {}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
    for name in ("relu_lrn_pool1", "relu_lrn_pool2", "pool"):
        getattr(model, name).register_forward_hook(lambda m, i, o: shapes.setdefault("pools", []).append(tuple(o.shape[1:])))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    assert shapes["conv1"] == (96, 55, 55)
    assert shapes["conv2"] == (256, 27, 27)
    assert shapes["conv3"] == (384, 13, 13)
    assert shapes["conv4"] == (384, 13, 13)
    assert shapes["conv5"] == (256, 13, 13)
    assert shapes["pools"] == [(96, 27, 27), (256, 13, 13), (256, 6, 6)]
    assert shapes["fc6"] == (4096,) and shapes["fc7"] == (4096,) and shapes["fc8"] == (1000,)
    assert feature_map_sizes(224) == {"conv1": 55, "pool1": 27, "conv2": 27, "pool2": 13, "conv5": 13, "pool5": 6}


def test_towers_see_only_their_own_channels_where_the_paper_says():
    """conv2/4/5 are grouped per tower; conv3 and fc6 read both towers."""
    model = AlexNet()
    assert (model.conv2.groups, model.conv4.groups, model.conv5.groups) == (2, 2, 2)
    assert model.conv3.groups == 1 and model.conv3.in_channels == 256
    assert model.conv2.weight.shape == (256, 48, 5, 5)
    assert model.conv4.weight.shape == (384, 192, 3, 3)
    assert model.fc6.weight.shape == (4096, 9216)


def test_paper_initialisation():
    torch.manual_seed(0)
    model = AlexNet()
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        layer = getattr(model, name)
        assert abs(layer.weight.std().item() - 0.01) < 0.001, name
        assert abs(layer.weight.mean().item()) < 0.001, name
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(layer.bias == expected_bias), name


def test_lrn_stays_inside_each_tower():
    """Each tower normalised alone equals the per-tower LRN; a plain LRN over all channels differs."""
    x = torch.rand(2, 12, 5, 5) * 50
    per_tower = TowerLRN(channels_per_tower=6)(x)
    alone = torch.cat([F.local_response_norm(t, 5, 1e-4, 0.75, 2.0) for t in x.chunk(2, dim=1)], dim=1)
    torch.testing.assert_close(per_tower, alone)
    assert not torch.allclose(per_tower, nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)(x))


def test_lrn_formula():
    """b = a / (k + alpha/n * sum of a^2 over the 5-channel window)^beta (PyTorch's alpha convention)."""
    x = torch.rand(1, 8, 1, 1) * 30
    y = TowerLRN(channels_per_tower=8)(x)
    a = x.flatten()
    for i in range(8):
        window = a[max(0, i - 2) : i + 3]
        expect = a[i] / (2.0 + 1e-4 / 5 * (window**2).sum()) ** 0.75
        assert torch.isclose(y.flatten()[i], expect, rtol=1e-5)


def test_small_variants_for_cpu():
    model = AlexNet(num_classes=10, towers=2, width=1 / 16, image_size=64)
    assert model.conv1.out_channels == 6 and model.fc6.out_features == 256
    assert model(torch.zeros(3, 3, 64, 64)).shape == (3, 10)
    with pytest.raises(ValueError, match="image_size=32"):
        AlexNet(image_size=32)


def test_one_tower_is_the_half_size_ablation():
    model = AlexNet(towers=1)
    assert model.conv1.out_channels == 48 and model.conv3.out_channels == 192 and model.fc6.out_features == 2048
