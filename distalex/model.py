"""The paper's AlexNet (Krizhevsky, Sutskever, Hinton 2012), written once, as a single-device model.

The facts it follows are in docs/paper.md ("Architecture").

Two (``towers``) columns of kernels that meet only at conv3 and the fully connected layers:

    layer  kernels per tower  kernel/stride/pad  sees          output (224 input)
    conv1  48                 11/4/2             image         55x55, ReLU, LRN, maxpool 3/2 -> 27
    conv2  128                5/1/2              own tower     27x27, ReLU, LRN, maxpool 3/2 -> 13
    conv3  192                3/1/1              all towers    13x13, ReLU
    conv4  192                3/1/1              own tower     13x13, ReLU
    conv5  128                3/1/1              own tower     13x13, ReLU, maxpool 3/2 -> 6
    fc6    2048 (of 4096)     9216 -> 4096       all towers    ReLU, dropout
    fc7    2048 (of 4096)     4096 -> 4096       all towers    ReLU, dropout
    fc8    -                  4096 -> classes    all towers

Choices the paper leaves open, stated:
- Padding: conv1 pads by 2 (torchvision's choice), so a 224 input gives the paper's 55x55 map.
- LRN: ``F.local_response_norm(size=5, alpha=1e-4, beta=0.75, k=2)`` (computed by
  ``distalex.lrn.local_response_norm``, the same function made fast). PyTorch divides alpha by
  size, as the authors' cuda-convnet code does; the paper's formula with alpha=1e-4 taken
  literally would be alpha=5e-4 here. The window never crosses into the other tower.
- Channels of tower t are the t-th contiguous block of every layer's channels, as in a grouped
  convolution. With ``towers=1`` this is the paper's "one half-size tower" ablation.

Tensor parallelism is applied afterwards, in one place: ``distalex.parallel.plan.parallelize``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distalex.lrn import local_response_norm
from distalex.lrn_pool import local_response_norm_max_pool
from distalex.memory_format import flatten_channel_major
from distalex.pool import MaxPool2d
from distalex.rng import RandomStream

# Kernels (or fc units) per tower at width 1.0: the paper's numbers.
PER_TOWER = {"conv1": 48, "conv2": 128, "conv3": 192, "conv4": 192, "conv5": 128, "fc": 2048}
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0
POOL = (3, 2)  # every max pool: 3x3 windows at stride 2, overlapping (docs/paper.md)
BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")  # the layers whose biases the paper sets to 1
INITS = {  # model.init -> (the bias of BIAS_ONE_LAYERS, weight std per layer where not 0.01); kaiming: its own
    "paper": (1.0, {}),
    "caffe": (0.1, {"fc6": 0.005, "fc7": 0.005}),
    "kaiming": None,
}


def conv_out(size: int, kernel: int, stride: int = 1, pad: int = 0) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def feature_map_sizes(image_size: int) -> dict[str, int]:
    """Spatial side after each stage for a square input: 224 -> conv1 55, pool1 27, pool2 13, pool5 6."""
    c1 = conv_out(image_size, 11, 4, 2)
    p1 = conv_out(c1, 3, 2)
    p2 = conv_out(p1, 3, 2)  # conv2 keeps the size (5/1/2)
    p5 = conv_out(p2, 3, 2)  # conv3-5 keep the size (3/1/1)
    return {"conv1": c1, "pool1": p1, "conv2": p1, "pool2": p2, "conv5": p2, "pool5": p5}


class TowerLRN(nn.Module):
    """Local response normalisation across channels, with the window inside each tower.

    b = a / (k + alpha/n * sum_{j in window} a_j^2)^beta over n=5 neighbouring channels; with
    ``relu_first``, of a = ReLU(input), and with ``pool`` = (kernel, stride), followed by that max
    pooling, each computed in the same pass (``distalex.lrn_pool``).

    Towers are counted from the input: every ``channels_per_tower`` consecutive channels are one
    tower, so a rank holding some of the towers (tensor parallelism) needs no other setting.
    """

    def __init__(self, channels_per_tower: int, relu_first: bool = False, pool: tuple[int, int] | None = None):
        super().__init__()
        self.channels_per_tower, self.relu_first, self.pool = channels_per_tower, relu_first, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        towers = x.shape[1] // self.channels_per_tower  # each normalised on its own
        lrn = (LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K, self.relu_first, towers)
        return local_response_norm(x, *lrn) if self.pool is None else local_response_norm_max_pool(x, *lrn, *self.pool)

    def extra_repr(self) -> str:
        relu = "relu_first=True, " if self.relu_first else ""
        pool = f", then max pool {self.pool[0]}/{self.pool[1]}" if self.pool else ""
        return f"{relu}channels_per_tower={self.channels_per_tower}, size={LRN_SIZE}, alpha={LRN_ALPHA}, beta={LRN_BETA}, k={LRN_K}{pool}"


class SharedDropout(nn.Module):
    """Inverted dropout whose mask comes from the module's own seeded random stream.

    The noise is drawn for all ``features`` from a stream that every tensor-parallel rank
    advances identically, so a replicated activation gets the same mask on every rank (and a
    sharded one can keep its slice of the serial model's mask: ``parallel.layers.ShardedDropout``).
    tp runs then equal the serial run with dropout on. The stream (``distalex.rng``) is one that
    torch.compile traces: a compiled step draws the eager step's masks, inside its one graph.
    """

    def __init__(self, p: float, features: int, seed: int = 0):
        super().__init__()
        self.p, self.features = p, features
        self.seed = seed
        self.stream = RandomStream(seed)  # on the CPU until the module moves

    def reseed(self, seed: int) -> None:
        self.seed, self.stream = seed, RandomStream(seed, self.stream.device)

    def stream_on(self, device: torch.device) -> RandomStream:
        """The layer's stream on ``device``; moving to another device starts it again from the seed."""
        if self.stream.device != RandomStream.resolve(device):
            self.stream = RandomStream(self.seed, device)
        return self.stream

    def _apply(self, fn, recurse=True):
        # Module.to() and friends: the stream follows the module (it is no parameter or buffer), so
        # that it already lives on the input's device when torch.compile first traces forward.
        self.stream_on(fn(torch.empty(0)).device)
        return super()._apply(fn, recurse)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform noise for ``x``'s units: (B, features), drawn for the full width on every rank."""
        return self.stream_on(x.device).uniform((x.shape[0], self.features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        mask = (self.noise(x) < keep).to(x.dtype)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}, features={self.features}"


class AlexNet(nn.Module):
    """The two-tower AlexNet. ``width`` scales every channel count (1.0 is the paper's net)."""

    def __init__(
        self,
        num_classes: int = 1000,
        towers: int = 2,
        width: float = 1.0,
        image_size: int = 224,
        dropout: float = 0.5,
        lrn: bool = True,
        init: str = "paper",
    ):
        super().__init__()
        self.init = init
        self.towers, self.image_size = towers, image_size
        ch = {k: towers * max(1, round(v * width)) for k, v in PER_TOWER.items()}
        side = feature_map_sizes(image_size)["pool5"]
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small: pool5 would be empty (need >= 63)")

        self.conv1 = nn.Conv2d(3, ch["conv1"], 11, stride=4, padding=2)
        # ReLU, LRN and max pool after conv1 and conv2, one op (on the CPU one pass over the map)
        self.relu_lrn_pool1 = TowerLRN(ch["conv1"] // towers, relu_first=True, pool=POOL) if lrn else relu_pool()
        self.conv2 = nn.Conv2d(ch["conv1"], ch["conv2"], 5, padding=2, groups=towers)
        self.relu_lrn_pool2 = TowerLRN(ch["conv2"] // towers, relu_first=True, pool=POOL) if lrn else relu_pool()
        self.conv3 = nn.Conv2d(ch["conv2"], ch["conv3"], 3, padding=1)  # reads both towers
        self.conv4 = nn.Conv2d(ch["conv3"], ch["conv4"], 3, padding=1, groups=towers)
        self.conv5 = nn.Conv2d(ch["conv4"], ch["conv5"], 3, padding=1, groups=towers)
        self.pool = MaxPool2d(*POOL)  # after conv5; nn.MaxPool2d's function, faster on the CPU
        self.fc6 = nn.Linear(ch["conv5"] * side * side, ch["fc"])
        self.drop6 = SharedDropout(dropout, ch["fc"], seed=6)
        self.fc7 = nn.Linear(ch["fc"], ch["fc"])
        self.drop7 = SharedDropout(dropout, ch["fc"], seed=7)
        self.fc8 = nn.Linear(ch["fc"], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``paper``: weights N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0.

        ``caffe`` (Caffe's bvlc_alexnet): as ``paper`` but fc6 and fc7 weights N(0, 0.005) and the
        biases 0.1 where the paper has 1. Caffe's maintainers changed the paper's 1 because the loss
        stayed flat at ln(classes); bench/learnability.py compares the three inits (docs/paper.md).

        ``kaiming``: weights N(0, 2 / fan_in), biases 0. For narrow variants (width < 1), where a
        fixed std of 0.01 shrinks the signal layer after layer until the constant biases decide
        every output and the loss sits at ln(classes).
        """
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        for name, m in self.named_children():
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            if self.init == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
                continue
            bias, std = INITS[self.init]
            nn.init.normal_(m.weight, mean=0.0, std=std.get(name, 0.01))
            nn.init.constant_(m.bias, bias if name in BIAS_ONE_LAYERS else 0.0)

    def dropouts(self) -> list[SharedDropout]:
        """The dropout layers, in forward order (their random streams are part of a checkpoint)."""
        return [m for m in self.modules() if isinstance(m, SharedDropout)]

    def reseed_dropout(self, seed: int) -> None:
        """Seed the dropout masks (the same seed on every tp rank of a data-parallel group)."""
        for i, m in enumerate(self.dropouts()):
            m.reseed(seed * 1000 + i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        # ReLU in place after conv3-5 (their backward does not need the outputs): no new map to allocate.
        x = self.relu_lrn_pool1(self.conv1(x))  # (B, 96, 27, 27) at 224
        x = self.relu_lrn_pool2(self.conv2(x))  # (B, 256, 13, 13)
        x = F.relu_(self.conv3(x))  # (B, 384, 13, 13)
        x = F.relu_(self.conv4(x))
        x = self.pool(F.relu_(self.conv5(x)))  # (B, 256, 6, 6)
        # Channel-major flatten: tower t's features are one contiguous block of fc6's inputs
        # (because tp shards fc6 by that block). A channels-last map is copied into that order here.
        x = flatten_channel_major(x)  # (B, 9216)
        # because tp (hybrid layout): the convolutions may each have kept a share of the batch, which
        # fc6 regroups; it is handed the batch's size rather than finding it in state set on the way
        x = self.fc6(x, batch) if getattr(self.fc6, "takes_group_batch", False) else self.fc6(x)
        x = self.drop6(F.relu(x))
        x = self.drop7(F.relu(self.fc7(x)))
        return self.fc8(x)  # (B, classes) logits


def relu_pool() -> nn.Sequential:
    """What follows conv1 and conv2 without the LRN (``model.lrn: false``)."""
    return nn.Sequential(nn.ReLU(inplace=True), MaxPool2d(*POOL))


def build_model(model_cfg) -> AlexNet:
    """AlexNet from a ``ModelConfig``: the one place a config becomes a model."""
    return AlexNet(
        num_classes=model_cfg.num_classes,
        towers=model_cfg.towers,
        width=model_cfg.width,
        image_size=model_cfg.image_size,
        dropout=model_cfg.dropout,
        lrn=model_cfg.lrn,
        init=model_cfg.init,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
