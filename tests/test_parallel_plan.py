"""After ``parallelize`` at tp=2 the model says where ranks talk, in either layout, and keeps the
serial model's names (2 gloo processes)."""

import re

import pytest

from distalex.model import AlexNet
from distalex.parallel.dims import init_parallel
from distalex.parallel.plan import full_state_dict, local_state_dict, parallelize
from tests.distributed import run_workers


def tiny() -> AlexNet:
    return AlexNet(num_classes=10, towers=2, width=1 / 16, image_size=64, dropout=0.5)


def repr_worker():
    dims = init_parallel(tp=2, towers=2, device="cpu")
    out = {}
    for layout in ("towers", "hybrid"):
        model = parallelize(tiny(), dims.tp_group, layout)
        lines = {m.group(1): m.group(2) for m in re.finditer(r"^  \((\w+)\): (.*)$", str(model), re.M)}
        out[layout] = {
            "lines": lines,
            "keys": list(model.state_dict()),
            "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()},
            "towers": model.towers,
            "lrn": (model.relu_lrn_pool1.channels_per_tower, model.relu_lrn_pool2.channels_per_tower),
            # a checkpoint resumed at another tp is cut as parallelize cuts the serial model
            "recut": all(t.equal(p) for t, p in zip(
                local_state_dict(full_state_dict(model, dims.tp_group), model, dims.tp_group).values(), model.parameters())),
        }
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_workers(repr_worker, 2)


def test_print_of_a_tp_rank_names_each_exchange(ranks):
    serial = tiny()
    for tp_rank, both in enumerate(ranks):
        run = both["towers"]
        lines = run["lines"]
        # conv3: rank-local kernels over all towers' channels, gathered from 8 per rank (16 in all)
        assert lines["conv3"].startswith("GatherChannelsConv2d(16, 12,"), lines["conv3"]
        assert "tp=2: input channels all-gathered from 8 per rank (backward: reduce-scatter)" in lines["conv3"]
        # fc6 and fc8 reduce their partial sums; fc7 keeps a slice of the outputs
        assert lines["fc6"] == ("RowParallelLinear(in_features=16 (this rank: 8), out_features=256, tp=2, "
                                "output all-reduced (reduce_from_tp))")
        assert lines["fc7"] == ("ColumnParallelLinear(in_features=256, out_features=256 (this rank: 128), tp=2, "
                                "input grad all-reduced (copy_to_tp))")
        assert lines["fc8"].startswith("RowParallelLinear(in_features=256 (this rank: 128), out_features=10, tp=2")
        # dropout on the replicated fc6 output keeps the whole mask; on fc7's slice, this rank's slice of it
        assert lines["drop6"] == "SharedDropout(p=0.5, features=256)"
        start, stop = 128 * tp_rank, 128 * (tp_rank + 1)
        assert lines["drop7"] == f"ShardedDropout(p=0.5, features=256, tp=2: this rank keeps [{start}:{stop}] of the shared mask)"
        # the towers' own layers hold their block and talk to nobody
        assert lines["conv2"].startswith("Conv2d(3, 8,"), lines["conv2"]
        # the serial model's names; model.towers and each LRN's tower width mean what they mean serially
        assert run["keys"] == list(serial.state_dict())
        assert run["towers"] == serial.towers == 2
        assert run["lrn"] == (serial.relu_lrn_pool1.channels_per_tower, serial.relu_lrn_pool2.channels_per_tower)
        assert run["recut"]


def test_print_of_a_hybrid_rank_names_each_exchange(ranks):
    serial = tiny()
    shapes = {k: tuple(v.shape) for k, v in serial.state_dict().items()}
    for tp_rank, both in enumerate(ranks):
        run = both["hybrid"]
        lines = run["lines"]
        # conv1 keeps this rank's samples of the group batch; every conv holds all its kernels and
        # sums its weight and bias gradients over the tp group
        assert lines["conv1"].startswith("SampleShardConv2d(3, 6, kernel_size=(11, 11)"), lines["conv1"]
        assert f"input: the group batch, it keeps part {tp_rank} of 2 (contiguous samples, in rank order)" in lines["conv1"]
        for name, head in (("conv2", "(6, 16,"), ("conv3", "(16, 24,"), ("conv4", "(24, 24,"), ("conv5", "(24, 16,")):
            assert lines[name].startswith(f"SampleShardConv2d{head}"), lines[name]
            assert lines[name].endswith("tp=2: every kernel, this rank's samples; weight and bias grads all-reduced (copy_to_tp))")
            assert "input: the group batch" not in lines[name]
        # fc6 regroups the samples into its feature block, then is row-parallel as in towers
        assert lines["fc6"] == ("AllToAllRowParallelLinear(in_features=16 (this rank: 8), out_features=256, tp=2, "
                                "output all-reduced (reduce_from_tp); input regrouped all-to-all from this rank's "
                                "samples x all features to all samples x its features (backward: the inverse all-to-all))")
        for name in ("fc7", "fc8", "drop6", "drop7"):
            assert lines[name] == ranks[tp_rank]["towers"]["lines"][name]
        # LRN sees every tower's channels, one tower at a time, as serially
        assert lines["relu_lrn_pool1"] == f"TowerLRN(relu_first=True, channels_per_tower={serial.relu_lrn_pool1.channels_per_tower}, size=5, alpha=0.0001, beta=0.75, k=2.0, then max pool 3/2)"
        # serial names; the convs' shapes are the serial ones (replicated), the fc layers' are slices
        assert run["keys"] == list(serial.state_dict())
        assert all(run["shapes"][k] == shapes[k] for k in shapes if k.startswith("conv"))
        assert run["shapes"]["fc6.weight"] == (256, 8) and run["shapes"]["fc7.weight"] == (128, 256)
        assert run["recut"]
