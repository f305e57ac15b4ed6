"""The Tracker on a GPU agrees with the CPU (skipped without CUDA)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

pytestmark = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _loss(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _train(device: str, mode: str):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    ).double()
    x = torch.randn(24, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    rule = hg.optim.sgd(0.1, momentum=0.9, weight_decay=1e-3)
    tracker = hg.Tracker(
        model.to(device), _loss, rule, num_train=24, tracked=[1, 5, 9], mode=mode
    )
    for b in torch.arange(24).split(8):
        tracker.step(x[b], y[b], b)
    return tracker, x, y


@needs_cuda
@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_cuda_matches_cpu(mode):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, x, y = _train("cpu", mode)
    gpu, _, _ = _train("cuda", mode)
    for name, h in cpu.hypergradients().items():
        assert torch.allclose(
            gpu.hypergradients()[name].cpu(), h, rtol=1e-8, atol=1e-10
        )
    c_cpu = cpu.contributions(x, y)
    c_gpu = gpu.contributions(x, y).cpu()
    assert torch.allclose(c_gpu, c_cpu, rtol=1e-8, atol=1e-10)
