"""HostReadSpy counts the places code reads tensor values on the host (device syncs on a GPU)."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

import distalex
from distalex.model import AlexNet
from distalex.parallel.trace import HostReadSpy


def test_records_each_kind_of_read_with_its_line():
    t, v = torch.tensor([3.0]), torch.arange(4)
    before = {name: getattr(torch.Tensor, name) for name in HostReadSpy.METHODS}
    with HostReadSpy() as reads:
        line = inspect.currentframe().f_lineno
        _ = t.item(), int(t), float(t), bool(t), v.tolist(), v.numpy(), t.cpu(), [0, 1, 2, 3][v[1]]
        torch.zeros(3).add_(1)  # no read
    assert [c.kind for c in reads.calls] == ["item", "__int__", "__float__", "__bool__", "tolist", "numpy", "cpu", "__index__"]
    assert all(c.where == f"{__file__}:{line + 1}" for c in reads.calls)
    assert reads.calls[0].shape == (1,) and reads.calls[0].device == "cpu"
    assert {name: getattr(torch.Tensor, name) for name in HostReadSpy.METHODS} == before  # uninstalled


def test_a_training_step_reads_nothing_until_the_loss_is_logged():
    """The pattern the training loop follows: the loss stays on the device and is read every
    ``log_every`` steps; the model, its backward and SGD read nothing. 6 steps, read every 3: 2 reads."""
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, width=1 / 16, image_size=64).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    window = torch.zeros(())
    with HostReadSpy() as reads:
        for step in range(1, 7):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window += loss.detach()
            if step % 3 == 0:
                window.item()
                window.zero_()
    assert [c.kind for c in reads.calls_from(__file__)] == ["item", "item"]
    assert reads.reads_that_wait_from(distalex.__path__[0]) == []
    assert reads.calls_from(distalex.__path__[0]), "the LRN's compiled CPU loops take numpy views: seen, not counted"
