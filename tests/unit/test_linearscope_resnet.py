"""LinearScope on a small ResNet: BatchNorm (eval) with non-trivial running statistics, residual adds (identity and
projection shortcuts, written as torchvision writes them: ``out += identity``, in-place ReLU), average pooling and a
linear head. The net is ReLU + affine, so A(x⁰) is its autograd Jacobian exactly and b = f(x⁰) − J·x⁰."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probekit.probes.linearscope import LinearScope

pytestmark = pytest.mark.usefixtures("one_thread")


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), the torchvision BasicBlock shape."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, n_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = BasicBlock(4, 4)
        self.layer2 = BasicBlock(4, 6, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.pool2 = nn.AvgPool2d(2)  # a second, non-adaptive average pool on a side branch
        self.fc = nn.Linear(6 + 4 * 4 * 4, n_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        side = torch.flatten(self.pool2(x), 1)
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(torch.cat([x, side], dim=1))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    net = TinyResNet().double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # running statistics and affine parameters far from 0/1
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.2)
                m.weight.copy_(torch.randn(n, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def x0():
    return torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def test_resnet_reproduced_and_matrix_is_the_jacobian(resnet, x0):
    scope = LinearScope(resnet, dtype=torch.float64)
    f = resnet(x0[None])[0].detach()
    torch.testing.assert_close(scope.output(x0), f, rtol=1e-12, atol=1e-12)  # y¹(x⁰) = f(x⁰)
    A = scope.matrix(x0)  # (5, 64)
    J = torch.autograd.functional.jacobian(lambda x: resnet(x[None])[0], x0).reshape(A.shape)
    assert J.abs().max() > 0.01
    torch.testing.assert_close(A, J, rtol=1e-10, atol=1e-12)  # ReLU + affine: A is the Jacobian
    b = scope.bias(x0)
    torch.testing.assert_close(b, f - J @ x0.reshape(-1), rtol=1e-10, atol=1e-10)  # b = y¹(0), by autograd
    assert b.abs().max() > 0.1  # the BN shifts make a real bias term
    # the skip connections carry signal: A differs from the same net with both residual adds cut
    cut = TinyResNet().double()
    cut.load_state_dict(resnet.state_dict())
    cut.eval()
    for blk in (cut.layer1, cut.layer2):
        blk.forward = lambda x, blk=blk: blk.relu(blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(x))))))
    J_cut = torch.autograd.functional.jacobian(lambda x: cut(x[None])[0], x0).reshape(A.shape)
    assert not torch.allclose(A, J_cut, rtol=1e-3, atol=1e-6)


def test_resnet_linear_with_biases_zeroed_and_batched(resnet, x0):
    net = TinyResNet().double()
    net.load_state_dict(resnet.state_dict())
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.bias.zero_()
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.zero_()
    scope = LinearScope(net.eval(), dtype=torch.float64)
    assert scope.bias(x0).abs().max() == 0
    g = torch.Generator().manual_seed(3)
    u, v = (torch.randn(x0.shape, generator=g, dtype=torch.float64) for _ in range(2))
    Au, Av, Aw = scope.apply(x0, torch.stack([u, v, 2 * u - 3 * v]))
    torch.testing.assert_close(Aw, 2 * Au - 3 * Av, rtol=1e-10, atol=1e-10)
    # rows by the transposed interpreter agree with the columns
    A = scope.matrix(x0)
    w = torch.randn(A.shape[0], generator=g, dtype=torch.float64)
    torch.testing.assert_close(scope.apply_transpose(x0, w).reshape(-1), w @ A, rtol=1e-10, atol=1e-10)
