"""Each autograd collective does what its docstring says, forward and backward, on any dim,
and each tensor-parallel layer equals the serial nn layer it replaces (2 gloo processes)."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distalex.parallel.collectives import copy_to_tp, gather_from_tp, reduce_from_tp, samples_to_features
from distalex.parallel.dims import init_parallel
from distalex.parallel.layers import ColumnParallelLinear, GatherChannelsConv2d, RowParallelLinear, shard_conv_out_channels
from distalex.parallel.plan import full_grads, share_images
from distalex.parallel.trace import CollectiveSpy
from tests.distributed import run_workers


def rank_tensor(rank: int, shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 100 * rank))


def collectives_worker():
    dims = init_parallel(tp=2, towers=2, device="cpu")
    g, r = dims.tp_group, dims.tp_rank
    out = {}
    for dim in (0, 1, 2):
        x = rank_tensor(r, (4, 6, 2), seed=dim).requires_grad_()
        up = rank_tensor(r, (4, 6, 2), seed=10 + dim)
        # copy: forward identity, backward all-reduce
        y = copy_to_tp(x, g)
        (y * up).sum().backward()
        out[f"copy_fwd_{dim}"], out[f"copy_bwd_{dim}"] = y.detach(), x.grad.clone()
        x.grad = None
        # reduce: forward all-reduce, backward identity
        y = reduce_from_tp(x, g)
        (y * up).sum().backward()
        out[f"reduce_fwd_{dim}"], out[f"reduce_bwd_{dim}"] = y.detach(), x.grad.clone()
        x.grad = None
        # gather: forward all-gather along dim, backward reduce-scatter along dim
        y = gather_from_tp(x, dim, g)
        up_full = rank_tensor(r, y.shape, seed=20 + dim)
        (y * up_full).sum().backward()
        out[f"gather_fwd_{dim}"], out[f"gather_bwd_{dim}"], out[f"gather_up_{dim}"] = y.detach(), x.grad.clone(), up_full
        x.grad = None
        out[f"x_{dim}"], out[f"up_{dim}"] = x.detach(), up
    # samples_to_features: (my samples, all features) -> (all samples, my block), uneven counts
    counts = [3, 2]
    x = rank_tensor(r, (counts[r], 6), seed=30).requires_grad_()
    y = samples_to_features(x, counts, g)
    up = rank_tensor(r, y.shape, seed=31)
    (y * up).sum().backward()
    out.update(a2a_x=x.detach(), a2a_fwd=y.detach(), a2a_up=up, a2a_bwd=x.grad.clone())
    # share_images: what each layout's peers receive of tp rank 0's batch, and what it costs
    for layout in ("towers", "hybrid"):
        for batch in (4, 5):
            images = torch.arange(batch * 3, dtype=torch.uint8).view(batch, 3) if r == 0 else torch.full((batch, 3), 255, dtype=torch.uint8)
            with CollectiveSpy() as spy:
                share_images(images, dataclasses.replace(dims, layout=layout))
            out[f"share_{layout}_{batch}"] = (images, [(c.kind, c.sent_bytes) for c in spy.calls])
    return out


@pytest.fixture(scope="module")
def collectives_runs():
    return run_workers(collectives_worker, 2)


def test_collectives_match_their_docstrings(collectives_runs):
    r0, r1 = collectives_runs
    for dim in (0, 1, 2):
        x0, x1, u0, u1 = r0[f"x_{dim}"], r1[f"x_{dim}"], r0[f"up_{dim}"], r1[f"up_{dim}"]
        # copy_to_tp
        assert torch.equal(r0[f"copy_fwd_{dim}"], x0)
        torch.testing.assert_close(r0[f"copy_bwd_{dim}"], u0 + u1)
        torch.testing.assert_close(r1[f"copy_bwd_{dim}"], u0 + u1)
        # reduce_from_tp
        torch.testing.assert_close(r0[f"reduce_fwd_{dim}"], x0 + x1)
        assert torch.equal(r0[f"reduce_bwd_{dim}"], u0) and torch.equal(r1[f"reduce_bwd_{dim}"], u1)
        # gather_from_tp: concatenation in rank order; backward = my chunk of the summed grads
        torch.testing.assert_close(r0[f"gather_fwd_{dim}"], torch.cat([x0, x1], dim))
        summed = r0[f"gather_up_{dim}"] + r1[f"gather_up_{dim}"]
        torch.testing.assert_close(r0[f"gather_bwd_{dim}"], summed.chunk(2, dim)[0])
        torch.testing.assert_close(r1[f"gather_bwd_{dim}"], summed.chunk(2, dim)[1])
    # samples_to_features: rank q's block of every sample, samples in rank order; backward: the
    # gradient of each element comes back from its one owner, unsummed
    x_all = torch.cat([r0["a2a_x"], r1["a2a_x"]])  # (5, 6): the group's samples
    assert torch.equal(r0["a2a_fwd"], x_all[:, :3]) and torch.equal(r1["a2a_fwd"], x_all[:, 3:])
    up_all = torch.cat([r0["a2a_up"], r1["a2a_up"]], dim=1)  # (5, 6): the gradient by feature block
    assert torch.equal(r0["a2a_bwd"], up_all[:3]) and torch.equal(r1["a2a_bwd"], up_all[3:])


def test_share_images_sends_each_layout_what_it_convolves(collectives_runs):
    r0, r1 = collectives_runs
    for batch in (4, 5):
        sent = r0[f"share_towers_{batch}"][0]
        assert torch.equal(r1[f"share_towers_{batch}"][0], sent)  # towers: every image everywhere
        assert r0[f"share_towers_{batch}"][1] == [("broadcast", batch * 3)]
    # hybrid, 4 = 2 x 2 samples: rank 1 gets its 2 samples (the rest zero), rank 0 sends only those
    images, calls = r1["share_hybrid_4"]
    assert torch.equal(images[2:], r0["share_hybrid_4"][0][2:]) and not images[:2].any()
    assert r0["share_hybrid_4"][1] == [("scatter", 2 * 3)]
    assert torch.equal(r0["share_hybrid_4"][0], torch.arange(12, dtype=torch.uint8).view(4, 3))  # the root's batch intact
    # hybrid, 5 samples do not split evenly: broadcast
    assert torch.equal(r1["share_hybrid_5"][0], r0["share_hybrid_5"][0]) and r0["share_hybrid_5"][1] == [("broadcast", 15)]


def layers_worker():
    dims = init_parallel(tp=2, towers=2, device="cpu")
    g = dims.tp_group
    torch.manual_seed(0)
    serial = {
        "col": nn.Linear(6, 8), "row": nn.Linear(8, 5),
        "grouped": nn.Conv2d(4, 6, 3, padding=1, groups=2), "gathered": nn.Conv2d(6, 4, 3, padding=1),
    }
    x = torch.randn(3, 6)
    img = torch.randn(2, 4, 5, 5)
    ref = {}
    # serial forward/backward
    h = serial["row"](torch.relu(serial["col"](x)))
    c = serial["gathered"](serial["grouped"](img))
    (h.square().sum() + c.square().sum()).backward()
    ref["h"], ref["c"] = h.detach(), c.detach()
    ref["grads"] = {f"{k}.{n}": p.grad.clone() for k, m in serial.items() for n, p in m.named_parameters()}
    # parallel: column then row linear; grouped conv sharded by towers then conv reading all channels
    par = nn.ModuleDict({"col": ColumnParallelLinear(serial["col"], g), "row": RowParallelLinear(serial["row"], g)})
    conv_a = serial["grouped"]
    conv_a.zero_grad(set_to_none=True)
    shard_conv_out_channels(conv_a, g)
    conv_b = GatherChannelsConv2d(serial["gathered"], g)
    par["grouped"], par["gathered"] = conv_a, conv_b
    h = par["row"](torch.relu(par["col"](x)))
    local_img = img.chunk(2, dim=1)[dims.tp_rank]  # each rank holds its tower's input channels
    c_local = par["gathered"](par["grouped"](local_img))
    c_full = torch.cat([torch.empty_like(c_local) for _ in range(2)], 1)
    dist.all_gather_into_tensor(c_full.movedim(1, 0), c_local.movedim(1, 0).contiguous(), group=g)
    # loss counted once: h is replicated (count it on every rank: each rank's own backward),
    # c is sharded (each rank's part)
    (h.square().sum() + c_local.square().sum()).backward()
    return {"h": h.detach(), "c": c_full, "ref": ref, "grads": full_grads(par, g)}


def test_parallel_layers_equal_serial_layers():
    for run in run_workers(layers_worker, 2):
        torch.testing.assert_close(run["h"], run["ref"]["h"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(run["c"], run["ref"]["c"], rtol=1e-5, atol=1e-6)
        for name, grad in run["ref"]["grads"].items():
            torch.testing.assert_close(run["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)

