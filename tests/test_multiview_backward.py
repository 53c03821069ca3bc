"""The cut-graph train step gives exactly the gradient of the summed loss, with the shared part run once."""

import pytest
import torch
from torch import nn

from evolsplat_ns.pipeline.multiview_backward import multiview_backward


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared_net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
        self.offset = nn.Linear(6, 3)
        self.view_head = nn.Linear(6 + 3, 2)
        self.calls = 0

    def extract(self, x):
        self.calls += 1
        f = self.shared_net(x)
        return {"feat": f, "offset": self.offset(f), "const": x * 2}

    def view_loss(self, s, v, targets):
        w = torch.tensor([1.0 + v, -0.5 * v, 0.3])
        inp = torch.cat([s["feat"], s["offset"] * w + s["const"][:, :3]], -1)
        return ((self.view_head(inp) - targets[v]) ** 2).mean() + (s["offset"] ** 2).sum() * 0.01 * (v + 1)


@pytest.mark.parametrize("T", [1, 3, 6])
def test_gradient_equals_joint_backward(T):
    torch.manual_seed(1)
    x = torch.randn(7, 5, dtype=torch.float64)
    targets = torch.randn(T, 7, 2, dtype=torch.float64)
    m = Toy().double()
    # reference: one joint backward of the summed loss, divided by T
    s = m.extract(x)
    joint = sum(m.view_loss(s, v, targets) for v in range(T)) / T
    joint.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    m.calls = 0
    losses = multiview_backward(m.extract(x), lambda leaves, v: m.view_loss(leaves, v, targets), T)
    assert m.calls == 1  # the shared extraction ran once
    assert len(losses) == T and sum(losses) / T == pytest.approx(float(joint))
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-12, atol=1e-12)


def _reference_gradients():
    """A toy model, its inputs, and the gradients of a plain 3-view ``multiview_backward`` (then zeroed)."""
    x = torch.randn(4, 5, dtype=torch.float64)
    targets = torch.randn(3, 4, 2, dtype=torch.float64)
    m = Toy().double()
    multiview_backward(m.extract(x), lambda s, v: m.view_loss(s, v, targets), 3)
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return m, x, targets, ref


def test_scaled_backward_scales_every_gradient():
    m, x, targets, ref = _reference_gradients()
    multiview_backward(m.extract(x), lambda s, v: m.view_loss(s, v, targets), 3, scale=lambda l: l * 8.0)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, 8.0 * ref[n])


def test_no_retained_graph_needed():
    # Each view's backward frees its own graph; a second backward through a view graph would raise.
    m = Toy().double()
    x = torch.randn(3, 5, dtype=torch.float64)
    targets = torch.randn(2, 3, 2, dtype=torch.float64)
    multiview_backward(m.extract(x), lambda s, v: m.view_loss(s, v, targets), 2)
    assert all(p.grad is not None for p in m.parameters())


def test_custom_final_backward_gets_the_shared_outputs_once():
    # multi-GPU: the final backward goes through DDP (evolsplat_ns.pipeline.distributed.final_backward)
    m, x, targets, ref = _reference_gradients()
    calls = []

    def final(outs, grads):
        calls.append(len(outs))
        torch.autograd.backward(outs, grads)

    multiview_backward(m.extract(x), lambda s, v: m.view_loss(s, v, targets), 3, final_backward=final)
    assert calls == [2]  # feat and offset carry gradient; const does not
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=0, atol=0)
    # called even when no shared output carries gradient (DDP still has to synchronise)
    calls.clear()
    with torch.no_grad():
        frozen = m.extract(x)
    multiview_backward(frozen, lambda s, v: m.view_loss(s, v, targets), 2, final_backward=final)
    assert calls == [0]
