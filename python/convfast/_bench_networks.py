"""Whole networks against PyTorch: ``python -m convfast bench --networks`` and the asv benchmarks
(``benchmarks/networks.py``).

Each network is built with ``torch.nn`` only (no torchvision). :func:`swap_convs` copies it and
replaces every ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` by the ``convfast.torch``
module of the same class with the same arguments and weights; everything else (batch norm,
activations, pooling, linear layers) stays PyTorch's. Both models then run in one process at the
same thread count, in three modes:

* ``forward_b1``: batch 1, ``eval()`` under ``torch.no_grad()``;
* ``forward_b8``: batch 8 (``--batch``), ``eval()`` under ``torch.no_grad()``;
* ``train_b8``: batch 8, ``train()``: forward, an MSE loss against a fixed target, ``backward()``
  and an SGD step (so the weights change on every step, as in training).

Before anything is timed, the convfast model's outputs (and, for the training step, the loss and
every parameter's gradient) are checked against the PyTorch model's. Then both are timed
interleaved: per round each runs once, the order alternating between rounds, until the time budget
is spent (at least ``min_rounds``); the minimum and the median are reported, and the ratio is
torch's minimum / convfast's minimum (above 1: convfast is faster).

The check and two instrumented runs of each model and mode (which give the conv share and the
per-layer-type breakdown) come before the timed rounds and serve as their warm-up. In the
instrumented runs, forward hooks time every convolution module's call, and hooks on the autograd
node of its output time its backward (the node that computes grad_input, grad_weight and
grad_bias). The per-layer times are the minimum over those runs; the share is their sum over the
run's total.

Importable without PyTorch: only the functions that build or run networks import it.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import convfast

MODES = ("forward_b1", "forward_b8", "train_b8")
MODE_LABELS = {"forward_b1": "forward b1", "forward_b8": "forward b{batch}", "train_b8": "train b{batch}"}
TOLERANCE = {"float32": 1e-3, "float64": 1e-9}  # max |a - b| / max |b| for outputs; gradients by norm
GRADIENT_FLOOR = 1e-4
GRADIENT_FAIL = 1e-2  # a gradient error above this (and above 4x torch's own) is a mismatch: not timed

_CONV_NAMES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")


# ----------------------------------------------------------------------------------------------
# Networks (torch.nn only)
# ----------------------------------------------------------------------------------------------

def _nn():
    import torch
    from torch import nn
    return torch, nn


def resnet18(width: int = 64, classes: int = 1000):
    """ResNet-18 (He et al.): 7x7/2 stem, max pool, 4 stages of 2 basic blocks, 1x1/2 shortcuts."""
    torch, nn = _nn()

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    widths = [width, 2 * width, 4 * width, 8 * width]
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    cin = width
    for i, w in enumerate(widths):
        layers += [Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)]
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def _round_channels(c: float, divisor: int = 8) -> int:
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * c else new


def mobilenet_v2(width: float = 1.0, classes: int = 1000):
    """MobileNetV2 (Sandler et al.): inverted residuals (1x1 expand, 3x3 depthwise, 1x1 project),
    ReLU6; the classifier's dropout is left out (it would draw different masks in the two models)."""
    torch, nn = _nn()

    def cbr(cin, cout, k, s, groups=1):
        return [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU6(inplace=True)]

    class Inverted(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = cbr(cin, hidden, 1, 1) if expand != 1 else []
            layers += cbr(hidden, hidden, 3, stride, groups=hidden)
            layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    config = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1)]
    cin = _round_channels(32 * width)
    last = _round_channels(1280 * max(1.0, width))
    layers = cbr(3, cin, 3, 2)
    for t, c, n, s in config:
        cout = _round_channels(c * width)
        for i in range(n):
            layers.append(Inverted(cin, cout, s if i == 0 else 1, t))
            cin = cout
    layers += cbr(cin, last, 1, 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, classes)]
    return nn.Sequential(*layers)


def efficientnet_b0(width: float = 1.0, classes: int = 1000):
    """EfficientNet-B0 (Tan & Le): MBConv blocks with 3x3 and 5x5 depthwise convolutions, SiLU and
    squeeze-and-excitation (1x1 convolutions on 1x1 maps); no stochastic depth or dropout."""
    torch, nn = _nn()

    class MBConv(nn.Module):
        def __init__(self, cin, cout, expand, k, stride):
            super().__init__()
            hidden = cin * expand
            layers = []
            if expand != 1:
                layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU(inplace=True)]
            layers += [nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=False),
                       nn.BatchNorm2d(hidden), nn.SiLU(inplace=True)]
            self.expand_dw = nn.Sequential(*layers)
            squeeze = max(1, cin // 4)
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, squeeze, 1), nn.SiLU(inplace=True),
                                    nn.Conv2d(squeeze, hidden, 1), nn.Sigmoid())
            self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            h = self.expand_dw(x)
            h = self.project(h * self.se(h))
            return x + h if self.residual else h

    stages = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
    cin = _round_channels(32 * width)
    layers = [nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.SiLU(inplace=True)]
    for expand, k, stride, c, n in stages:
        cout = _round_channels(c * width)
        for i in range(n):
            layers.append(MBConv(cin, cout, expand, k, stride if i == 0 else 1))
            cin = cout
    last = _round_channels(1280 * width)
    layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.SiLU(inplace=True),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, classes)]
    return nn.Sequential(*layers)


def unet(rank: int = 2, in_channels: int = 1, classes: int = 2, base: int = 32, levels: int = 3):
    """U-Net (Ronneberger et al.; 3-D: Cicek et al.) with ``levels`` resolution levels, the lowest being
    the bottleneck: per level two 3x3(x3) conv + batch norm + ReLU, max-pool down, 2x2(x2) stride-2
    transposed convolutions up, skip concatenations, a final 1x1(x1) convolution."""
    torch, nn = _nn()
    Conv = getattr(nn, f"Conv{rank}d")
    Up = getattr(nn, f"ConvTranspose{rank}d")
    Norm = getattr(nn, f"BatchNorm{rank}d")
    Pool = getattr(nn, f"MaxPool{rank}d")

    def double(cin, cout):
        return nn.Sequential(Conv(cin, cout, 3, padding=1, bias=False), Norm(cout), nn.ReLU(inplace=True),
                             Conv(cout, cout, 3, padding=1, bias=False), Norm(cout), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [base * 2 ** i for i in range(levels)]
            self.down = nn.ModuleList()
            cin = in_channels
            for w in widths[:-1]:
                self.down.append(double(cin, w))
                cin = w
            self.pool = Pool(2)
            self.bottom = double(cin, widths[-1])
            self.up = nn.ModuleList()
            self.merge = nn.ModuleList()
            for w_low, w in zip(widths[:0:-1], widths[-2::-1]):
                self.up.append(Up(w_low, w, 2, stride=2))
                self.merge.append(double(2 * w, w))
            self.head = Conv(widths[0], classes, 1)

        def forward(self, x):
            skips = []
            for block in self.down:
                x = block(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottom(x)
            for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
                x = merge(torch.cat([up(x), skip], 1))
            return self.head(x)

    return UNet()


def wavenet(channels: int = 32, layers: int = 10, classes: int = 256, in_channels: int = 1):
    """A WaveNet-style 1-D stack (van den Oord et al.; non-causal k3 as in vocoders): a k7 input
    convolution, then per layer a dilated (1, 2, 4, ... 512) k3 convolution to 2C channels, a
    tanh * sigmoid gate, 1x1 residual and skip convolutions; a ReLU-1x1-ReLU-1x1 head to ``classes``."""
    torch, nn = _nn()

    class Layer(nn.Module):
        def __init__(self, dilation):
            super().__init__()
            self.dilated = nn.Conv1d(channels, 2 * channels, 3, padding=dilation, dilation=dilation)
            self.residual = nn.Conv1d(channels, channels, 1)
            self.skip = nn.Conv1d(channels, channels, 1)

        def forward(self, x):
            a, b = self.dilated(x).chunk(2, 1)
            h = torch.tanh(a) * torch.sigmoid(b)
            return (x + self.residual(h)) * math.sqrt(0.5), self.skip(h)

    class WaveNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.input = nn.Conv1d(in_channels, channels, 7, padding=3)
            self.layers = nn.ModuleList(Layer(2 ** i) for i in range(layers))
            self.head = nn.Sequential(nn.ReLU(), nn.Conv1d(channels, channels, 1), nn.ReLU(),
                                      nn.Conv1d(channels, classes, 1))

        def forward(self, x):
            x = self.input(x)
            skips = 0
            for layer in self.layers:
                x, s = layer(x)
                skips = skips + s
            return self.head(skips)

    return WaveNet()


def dcgan_generator(latent: int = 100, width: int = 64, out_channels: int = 3):
    """The DCGAN generator (Radford et al.): a latent vector through k4 transposed convolutions
    (1 -> 4 -> 8 -> 16 -> 32 -> 64 pixels) with batch norm and ReLU, tanh at the end."""
    torch, nn = _nn()
    w = width
    return nn.Sequential(
        nn.ConvTranspose2d(latent, 8 * w, 4, 1, 0, bias=False), nn.BatchNorm2d(8 * w), nn.ReLU(True),
        nn.ConvTranspose2d(8 * w, 4 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(True),
        nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(True),
        nn.ConvTranspose2d(2 * w, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True),
        nn.ConvTranspose2d(w, out_channels, 4, 2, 1, bias=False), nn.Tanh())


@dataclass(frozen=True)
class Network:
    """A network of the benchmark: its builder and input shapes (without the batch axis) at batch 1
    and at the larger batch, full size and tiny (for tests)."""

    name: str
    title: str
    build: Callable[[bool], object]          # build(tiny) -> nn.Module
    shape_b1: Tuple[int, ...]
    shape_batched: Tuple[int, ...]
    tiny_shape: Tuple[int, ...]
    note: str = ""

    def input_shape(self, mode: str, batch: int = 8, tiny: bool = False) -> Tuple[int, ...]:
        if tiny:
            return (1 if mode == "forward_b1" else 2,) + self.tiny_shape
        if mode == "forward_b1":
            return (1,) + self.shape_b1
        return (batch,) + self.shape_batched


_NETWORKS: List[Network] = [
    Network("resnet18", "ResNet-18", lambda tiny: resnet18(8 if tiny else 64, 10 if tiny else 1000),
            (3, 224, 224), (3, 112, 112), (3, 32, 32), "224x224 at batch 1, 112x112 batched"),
    Network("mobilenet_v2", "MobileNetV2", lambda tiny: mobilenet_v2(0.25 if tiny else 1.0, 10 if tiny else 1000),
            (3, 224, 224), (3, 112, 112), (3, 32, 32), "224x224 at batch 1, 112x112 batched"),
    Network("efficientnet_b0", "EfficientNet-B0",
            lambda tiny: efficientnet_b0(0.25 if tiny else 1.0, 10 if tiny else 1000),
            (3, 224, 224), (3, 112, 112), (3, 32, 32), "224x224 at batch 1, 112x112 batched"),
    Network("unet2d", "2-D U-Net", lambda tiny: unet(2, 1, 2, 4 if tiny else 32, 3),
            (1, 128, 128), (1, 128, 128), (1, 16, 16), "3 levels, base 32, 128x128"),
    Network("unet3d", "3-D U-Net", lambda tiny: unet(3, 1, 2, 2 if tiny else 16, 3),
            (1, 32, 32, 32), (1, 32, 32, 32), (1, 8, 8, 8), "3 levels, base 16, 32x32x32"),
    Network("wavenet", "1-D WaveNet stack", lambda tiny: wavenet(4 if tiny else 32, 4 if tiny else 10,
                                                                    8 if tiny else 256),
            (1, 16000), (1, 16000), (1, 64), "32 channels, 10 dilated layers, 16000 samples"),
    Network("dcgan", "DCGAN generator", lambda tiny: dcgan_generator(8 if tiny else 100, 4 if tiny else 64),
            (100, 1, 1), (100, 1, 1), (8, 1, 1), "latent 100 -> 3x64x64, ConvTranspose2d"),
]

NETWORKS: Dict[str, Network] = {n.name: n for n in _NETWORKS}


def get_networks(names: Optional[str] = None) -> List[Network]:
    """All networks, or those of a comma-separated list of names."""
    if not names or names == "all":
        return list(_NETWORKS)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in NETWORKS]
    if unknown or not chosen:
        raise ValueError(f"unknown network {', '.join(unknown) or names!r}; networks: {', '.join(NETWORKS)}")
    return [NETWORKS[n] for n in chosen]


# ----------------------------------------------------------------------------------------------
# The swap
# ----------------------------------------------------------------------------------------------

def _conv_classes():
    """{torch.nn class: convfast.torch class} for the six convolution modules."""
    from torch import nn
    import convfast.torch as cft
    return {getattr(nn, name): getattr(cft, name) for name in _CONV_NAMES}


def convfast_module_like(conv):
    """The convfast.torch module of ``conv``'s class, with its arguments and a copy of its parameters
    (same dtype, device, requires_grad and training flag)."""
    cls = _conv_classes()[type(conv)]
    kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    if conv.transposed:
        kwargs["output_padding"] = conv.output_padding
    else:
        kwargs["padding_mode"] = conv.padding_mode
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, **kwargs)
    new.load_state_dict(conv.state_dict())
    for name, p in conv.named_parameters(recurse=False):
        getattr(new, name).requires_grad_(p.requires_grad)
    new.train(conv.training)
    return new


def swap_convs(model, inplace: bool = False):
    """A copy of ``model`` (or ``model`` itself with ``inplace``) whose every torch.nn convolution
    (exactly nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d) is the equivalent convfast.torch module with
    the same weights; module names, and so ``state_dict`` keys, are unchanged."""
    classes = _conv_classes()
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in classes:
                setattr(parent, name, convfast_module_like(child))
    return model


def conv_modules(model) -> List[Tuple[str, object]]:
    """(name, module) of every convolution module of either library in ``model``, in order."""
    import convfast.torch as cft
    kinds = tuple(_conv_classes()) + tuple(getattr(cft, name) for name in _CONV_NAMES)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def layer_type(conv, input_shape: Optional[Sequence[int]] = None) -> str:
    """The breakdown group of a convolution module: transposed, first layer (C_in <= 3), depthwise,
    grouped, 1x1, then by kernel and stride (dilated layers apart); 1-D and 3-D layers are prefixed."""
    rank = len(conv.kernel_size)
    prefix = {1: "1-D ", 2: "", 3: "3-D "}[rank]
    k = "x".join(map(str, conv.kernel_size)) if rank > 1 else f"k{conv.kernel_size[0]}"
    stride = max(conv.stride)
    s = f" s{stride}" if stride > 1 else ""
    if conv.transposed:
        return f"{prefix}transposed {k}{s}"
    if conv.in_channels <= 3 and conv.groups == 1:
        return f"{prefix}first layer (C_in<=3)"
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return f"{prefix}depthwise {k}{s}"
    if conv.groups > 1:
        return f"{prefix}grouped {k}{s}"
    if all(v == 1 for v in conv.kernel_size):
        spatial = input_shape[2:] if input_shape is not None else ()
        if spatial and all(v == 1 for v in spatial):
            return f"{prefix}1x1 on 1x1 maps"
        return f"{prefix}1x1{s}"
    d = " dilated" if max(conv.dilation) > 1 else ""
    return f"{prefix}{k}{s}{d}"


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------

class Runner:
    """One model in one mode: ``run()`` does one forward (or one training step) on fixed inputs."""

    def __init__(self, model, mode: str, x, target=None, lr: float = 1e-4):
        import torch
        self.torch = torch
        self.model = model
        self.mode = mode
        self.x = x
        self.target = target
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr) if mode == "train_b8" else None
        model.train(mode == "train_b8")

    def run(self):
        torch = self.torch
        if self.mode != "train_b8":
            with torch.no_grad():
                return self.model(self.x)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(self.x)
        loss = torch.nn.functional.mse_loss(out, self.target)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def _relative_error(a, b) -> float:
    a = a.detach().double()
    b = b.detach().double()
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) / scale


def _gradients(model) -> Dict[str, object]:
    return {name: p.grad.detach().double() for name, p in model.named_parameters() if p.grad is not None}


def _gradient_error(grads, ref) -> float:
    """The largest over parameters of ||g - r|| / max(||r||, GRADIENT_FLOOR x the norm of all of ref)."""
    import torch
    if set(grads) != set(ref):
        return math.inf
    if not ref:
        return 0.0
    floor = GRADIENT_FLOOR * float(torch.stack([r.norm() for r in ref.values()]).norm())
    return max(float((grads[n] - r).norm()) / (max(float(r.norm()), floor) or 1.0) for n, r in ref.items())


def check_network(torch_model, cf_model, mode: str, x, target=None) -> dict:
    """Checks the convfast model against the torch model in ``mode``; both get deep copies of their
    state back afterwards, so the check leaves no trace.

    ``output_error`` is max |a - b| / max |b| of the outputs. For the training step the gradients
    of every parameter after one backward of the loss are compared with those of a float64 copy of
    the torch model: ``gradient_error`` (convfast's) and ``torch_gradient_error`` (torch's own, at the
    same dtype), each the largest over parameters of ||g - g64|| / max(||g64||, GRADIENT_FLOOR x the
    norm of all gradients). A network trained with batch norm on small maps amplifies rounding, so
    convfast's gradients pass when their error is within TOLERANCE or within 4x torch's own; an error
    above that but at most GRADIENT_FAIL is timed with a warning (``gradient_warning``), a larger
    one is a mismatch.
    """
    import torch
    dtype = str(x.dtype).replace("torch.", "")
    tol = TOLERANCE[dtype]
    states = [copy.deepcopy(m.state_dict()) for m in (torch_model, cf_model)]
    result = {"output_error": None, "gradient_error": None, "torch_gradient_error": None, "ok": False}
    try:
        outs, grads = [], []
        for m in (torch_model, cf_model):
            m.train(mode == "train_b8")
            for p in m.parameters():
                p.grad = None
            if mode == "train_b8":
                out = m(x)
                torch.nn.functional.mse_loss(out, target).backward()
                grads.append(_gradients(m))
            else:
                with torch.no_grad():
                    out = m(x)
            outs.append(out.detach())
        result["output_error"] = _relative_error(outs[1], outs[0])
        ok = result["output_error"] <= tol
        if mode == "train_b8":
            if x.dtype == torch.float64:
                ref = grads[0]
                result["torch_gradient_error"] = 0.0
            else:
                m64 = copy.deepcopy(torch_model).double()
                m64.load_state_dict(states[0])
                m64.train()
                torch.nn.functional.mse_loss(m64(x.double()), target.double()).backward()
                ref = _gradients(m64)
                del m64
                result["torch_gradient_error"] = _gradient_error(grads[0], ref)
            result["gradient_error"] = _gradient_error(grads[1], ref)
            allowed = max(tol, 4 * result["torch_gradient_error"])
            result["gradient_warning"] = result["gradient_error"] > allowed
            ok = ok and result["gradient_error"] <= max(allowed, GRADIENT_FAIL)
        result["ok"] = bool(ok)
        return result
    finally:
        for m, state in zip((torch_model, cf_model), states):
            m.load_state_dict(state)
            for p in m.parameters():
                p.grad = None


def _node_of(out):
    """The autograd node of a convolution's output (past view/alias nodes, if any)."""
    node = getattr(out, "grad_fn", None)
    for _ in range(3):
        if node is None or "conv" in node.name().lower():
            return node
        nxt = [f for f, _ in node.next_functions if f is not None]
        node = nxt[0] if nxt else None
    return getattr(out, "grad_fn", None)


class Instrument:
    """Times every convolution module of a model: forward by forward hooks, backward by a pre-hook
    and a hook on the autograd node of the module's output. ``reset()`` starts a run; ``times``
    maps module name -> [forward s, backward s] of the run."""

    def __init__(self, model):
        self.model = model
        self.handles = []
        self.times: Dict[str, List[float]] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.modules = conv_modules(model)
        for name, m in self.modules:
            self.handles.append(m.register_forward_pre_hook(self._pre(name)))
            self.handles.append(m.register_forward_hook(self._post(name)))

    def reset(self):
        self.times = {name: [0.0, 0.0] for name, _ in self.modules}

    def _pre(self, name):
        def hook(module, args):
            self.shapes[name] = tuple(args[0].shape)
            self._t0 = time.perf_counter()
        return hook

    def _post(self, name):
        def hook(module, args, out):
            self.times[name][0] += time.perf_counter() - self._t0
            node = _node_of(out)
            if node is not None:
                start = []
                node.register_prehook(lambda grads: start.append(time.perf_counter()))

                def done(grad_inputs, grad_outputs):
                    if start:
                        self.times[name][1] += time.perf_counter() - start.pop()
                node.register_hook(done)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _instrumented(model, runner: Runner, runs: int) -> dict:
    """Per-layer minimum forward/backward seconds and the minimum total over ``runs`` runs."""
    inst = Instrument(model)
    best: Dict[str, List[float]] = {}
    total = math.inf
    try:
        for _ in range(runs):
            inst.reset()
            t0 = time.perf_counter()
            runner.run()
            total = min(total, time.perf_counter() - t0)
            for name, (f, b) in inst.times.items():
                old = best.get(name)
                best[name] = [f, b] if old is None else [min(old[0], f), min(old[1], b)]
    finally:
        inst.remove()
    return {"total_s": total, "layers": best, "shapes": dict(inst.shapes)}


def time_interleaved(fns: Dict[str, Callable[[], object]], budget_s: float, min_rounds: int = 3,
                     max_rounds: int = 200) -> Dict[str, dict]:
    """Rounds of one call each, the order alternating, until ``budget_s`` is spent (at least
    ``min_rounds``); min, median and samples in ms per name."""
    names = list(fns)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while r < max_rounds and (r < min_rounds or time.perf_counter() - start < budget_s):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        r += 1
    return {n: {"min_ms": min(s), "median_ms": statistics.median(s), "rounds": len(s), "samples_ms": s}
            for n, s in samples.items()}


def _breakdown(torch_model, cf_model, inst_torch: dict, inst_cf: dict) -> dict:
    """Per layer type: count, torch and convfast ms (forward + backward), ratio; plus conv shares."""
    types: Dict[str, dict] = {}
    layers = []
    cf_modules = dict(conv_modules(cf_model))
    for name, m in conv_modules(torch_model):
        shape = inst_torch["shapes"].get(name)
        kind = layer_type(m, shape)
        t = sum(inst_torch["layers"].get(name, [0.0, 0.0])) * 1e3
        c = sum(inst_cf["layers"].get(name, [0.0, 0.0])) * 1e3 if name in cf_modules else math.nan
        entry = types.setdefault(kind, {"count": 0, "torch_ms": 0.0, "convfast_ms": 0.0})
        entry["count"] += 1
        entry["torch_ms"] += t
        entry["convfast_ms"] += c
        layers.append({"name": name, "type": kind, "input_shape": list(shape) if shape else None,
                       "torch_ms": t, "convfast_ms": c,
                       "torch_forward_ms": inst_torch["layers"].get(name, [0.0, 0.0])[0] * 1e3,
                       "convfast_forward_ms": inst_cf["layers"].get(name, [0.0, 0.0])[0] * 1e3})
    for entry in types.values():
        entry["ratio"] = entry["torch_ms"] / entry["convfast_ms"] if entry["convfast_ms"] > 0 else math.nan
    conv_t = sum(e["torch_ms"] for e in types.values())
    conv_c = sum(e["convfast_ms"] for e in types.values())
    return {"types": types, "layers": layers, "conv_torch_ms": conv_t, "conv_convfast_ms": conv_c,
            "total_torch_ms": inst_torch["total_s"] * 1e3, "total_convfast_ms": inst_cf["total_s"] * 1e3,
            "conv_share_torch": conv_t / (inst_torch["total_s"] * 1e3),
            "conv_share_convfast": conv_c / (inst_cf["total_s"] * 1e3)}


def prepare(net: Network, mode: str, dtype: str = "float32", batch: int = 8, tiny: bool = False, seed: int = 0):
    """(torch model, convfast model, x, target) for one network and mode: the same weights (the torch
    model built under ``torch.manual_seed(seed)``, then swapped), the same random input; the target
    (training only) is a fixed random tensor of the output's shape."""
    import torch
    tdtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    model = net.build(tiny).to(tdtype)
    cf_model = swap_convs(model)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(net.input_shape(mode, batch, tiny), generator=gen, dtype=tdtype)
    target = None
    if mode == "train_b8":
        with torch.no_grad():
            model.eval()
            shape = model(x).shape
        target = torch.randn(shape, generator=gen, dtype=tdtype)
    return model, cf_model, x, target


def ort_network(model, x, threads: int):
    """(run, relative error against the model) of the unmodified torch model exported to ONNX and
    run by onnxruntime in the layer suite's session (_bench_suite.ort_cpu_session: all graph
    optimisations, which fold batch norms into the convolutions and fuse activations), or (None,
    reason) where it cannot run (onnx or onnxruntime missing, export failed)."""
    import io
    import warnings
    import torch
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime  # noqa: F401
    except Exception:
        return None, "needs the onnx and onnxruntime packages (pip install onnx onnxruntime)"
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17)
    except Exception as exc:  # an exporter limitation, not convfast's
        return None, f"torch.onnx.export failed: {type(exc).__name__}: {exc}"[:200]
    from convfast._bench_suite import ort_cpu_session
    session = ort_cpu_session(buffer.getvalue(), threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    out = session.run(None, feed)[0]
    with torch.no_grad():
        ref = model(x).numpy()
    return (lambda: session.run(None, feed)), _relative_error(torch.from_numpy(out), torch.from_numpy(ref))


def run_network(net: Network, dtype: str = "float32", batch: int = 8, budget_s: float = 2.0, min_rounds: int = 3,
                instrumented_runs: int = 2, modes: Sequence[str] = MODES, progress=None,
                peers: Sequence[str] = ("ort",), threads: Optional[int] = None) -> dict:
    """Checks and times one network in each mode; returns a JSON-serialisable dict. ``peers``
    containing "ort" adds onnxruntime to the forward modes (float32; the training step has no
    onnxruntime counterpart)."""
    import torch
    from convfast.bench import ContentionMeter
    result = {"network": net.name, "title": net.title, "note": net.note, "dtype": dtype, "modes": {}}
    for mode in modes:
        model, cf_model, x, target = prepare(net, mode, dtype, batch)
        if "params" not in result:
            result["params"] = sum(p.numel() for p in model.parameters())
            result["convs"] = len(conv_modules(model))
        entry = {"input_shape": list(x.shape)}
        result["modes"][mode] = entry
        entry.update(check_network(model, cf_model, mode, x, target))
        if not entry["ok"]:
            if progress:
                progress(f"    {mode}: MISMATCH (output error {entry['output_error']:.3g}, gradient error "
                         f"{_f(entry['gradient_error'], '.3g')}, "
                         f"torch's own {_f(entry['torch_gradient_error'], '.3g')})")
            continue
        runners = {"torch": Runner(model, mode, x, target), "convfast": Runner(cf_model, mode, x, target)}
        # No separate warm-up: the check above and the instrumented runs (per-layer minimum) come first.
        meter = ContentionMeter()
        meter.start()
        inst = {name: None for name in runners}
        for i in range(instrumented_runs):  # interleaved, one run at a time
            for name in (list(runners) if i % 2 == 0 else list(runners)[::-1]):
                one = _instrumented(runners[name].model, runners[name], 1)
                if inst[name] is None:
                    inst[name] = one
                else:
                    old = inst[name]
                    old["total_s"] = min(old["total_s"], one["total_s"])
                    for k, (f, b) in one["layers"].items():
                        of, ob = old["layers"][k]
                        old["layers"][k] = [min(of, f), min(ob, b)]
        fns = {n: r.run for n, r in runners.items()}
        if "ort" in peers and mode != "train_b8" and dtype == "float32":
            run_ort, err = ort_network(model, x, threads or convfast.get_num_threads())
            if run_ort is None:
                entry["onnxruntime_note"] = err
            elif err > 1e-3:
                entry["onnxruntime_note"] = f"onnxruntime's output differs from torch's by {err:.2g}: not timed"
            else:
                fns["onnxruntime"] = run_ort
                entry["onnxruntime_error"] = err
        timings = time_interleaved(fns, budget_s, min_rounds)
        entry["others_cpu_share"] = meter.stop()
        for name, t in timings.items():
            entry[f"{name}_min_ms"] = t["min_ms"]
            entry[f"{name}_median_ms"] = t["median_ms"]
            entry[f"{name}_samples_ms"] = t["samples_ms"]
        entry["rounds"] = timings["torch"]["rounds"]
        entry["ratio"] = entry["torch_min_ms"] / entry["convfast_min_ms"]
        entry["ratio_median"] = entry["torch_median_ms"] / entry["convfast_median_ms"]
        if "onnxruntime_min_ms" in entry:
            entry["ratio_best_peer"] = min(entry["torch_min_ms"], entry["onnxruntime_min_ms"]) / entry["convfast_min_ms"]
        entry["breakdown"] = _breakdown(model, cf_model, inst["torch"], inst["convfast"])
        if progress:
            ort_text = (f", onnxruntime {entry['onnxruntime_min_ms']:.1f} ms" if "onnxruntime_min_ms" in entry else "")
            progress(f"    {mode}: torch {entry['torch_min_ms']:.1f} ms, convfast {entry['convfast_min_ms']:.1f} ms"
                     f"{ort_text} (min of {entry['rounds']}), ratio {entry['ratio']:.2f}")
        del runners, model, cf_model
    return result


def run_networks(names: Optional[str] = None, dtypes: Sequence[str] = ("float32",), threads: Optional[int] = None,
                 batch: int = 8, quick: bool = False, budget_s: Optional[float] = None, progress=None,
                 peers: Sequence[str] = ("ort",)) -> dict:
    """The whole benchmark: every network (or those named) and dtype, every mode."""
    import torch
    from convfast import _bench_suite as suite
    from convfast.bench import default_threads, machine_info
    threads = threads or default_threads()
    budget = budget_s if budget_s is not None else (0.5 if quick else 2.0)
    min_rounds, inst_runs = (2, 1) if quick else (3, 2)
    nets = get_networks(names)
    previous = (convfast.get_num_threads(), torch.get_num_threads())
    suite.set_threads(threads)
    report = {"kind": "networks", "threads": threads, "batch": batch, "quick": quick, "budget_s_per_mode": budget,
              "min_rounds": min_rounds, "instrumented_runs": inst_runs, "machine": machine_info(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "results": [], "notes": []}
    try:
        report["load_average_at_start"] = __import__("os").getloadavg()[0]
    except (AttributeError, OSError):
        report["load_average_at_start"] = None
    t0 = time.perf_counter()
    try:
        for dtype in dtypes:
            for net in nets:
                if progress:
                    progress(f"{net.title} ({dtype}) ... [{time.perf_counter() - t0:.0f} s]")
                report["results"].append(run_network(net, dtype, batch, budget, min_rounds, inst_runs,
                                                     progress=progress, peers=peers, threads=threads))
    finally:
        convfast.set_num_threads(previous[0])
        torch.set_num_threads(previous[1])
    report["seconds"] = time.perf_counter() - t0
    report["summary"] = summarise(report["results"])
    report["peers"] = list(peers)
    if "ort" not in peers:
        report["notes"].append("onnxruntime not timed (--compare without ort)")
    else:
        reasons = sorted({e["onnxruntime_note"] for r in report["results"] for e in r["modes"].values()
                          if e.get("onnxruntime_note")})
        report["notes"] += [f"onnxruntime: {why}" for why in reasons]
    return report


def summarise(results: List[dict]) -> dict:
    summary = {}
    for dtype in dict.fromkeys(r["dtype"] for r in results):
        ratios = [e["ratio"] for r in results if r["dtype"] == dtype for e in r["modes"].values() if "ratio" in e]
        per_mode = {m: suite_geomean([r["modes"][m]["ratio"] for r in results
                                      if r["dtype"] == dtype and "ratio" in r["modes"].get(m, {})]) for m in MODES}
        best = {m: suite_geomean([r["modes"][m]["ratio_best_peer"] for r in results if r["dtype"] == dtype and
                                  "ratio_best_peer" in r["modes"].get(m, {})]) for m in MODES}
        summary[dtype] = {"geomean": suite_geomean(ratios), "min": min(ratios) if ratios else math.nan,
                          "count": len(ratios), "geomean_per_mode": per_mode, "geomean_best_peer_per_mode": best}
    summary["mismatches"] = [f"{r['network']} {m} {r['dtype']}" for r in results for m, e in r["modes"].items()
                             if not e.get("ok", True)]
    return summary


def suite_geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _f(v, spec=".1f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _table(header: List[str], rows: List[List[str]], left: int = 1, indent: str = "  ") -> List[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return indent + "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), indent + "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def format_report(report: dict) -> str:
    batch = report["batch"]
    labels = {m: MODE_LABELS[m].format(batch=batch) for m in MODES}
    out = []
    busy_limit = 0.05
    for r in report["results"]:
        out.append(f"{r['title']} [{r['network']}, {r['dtype']}]: {r['note']}; "
                   f"{r.get('params', 0) / 1e6:.2f}M parameters, {r.get('convs', 0)} convolutions")
        rows = []
        for m, e in r["modes"].items():
            if not e.get("ok", True):
                rows.append([labels[m], "x".join(map(str, e["input_shape"])),
                             f"MISMATCH: output error {e['output_error']:.2g}, gradient error "
                             f"{_f(e['gradient_error'], '.2g')} (torch's own {_f(e['torch_gradient_error'], '.2g')})",
                             "", "", "", "", ""])
                continue
            b = e["breakdown"]
            busy = " *" if (e.get("others_cpu_share") or 0) > busy_limit else ""
            ort_ms = f"{e['onnxruntime_min_ms']:.1f}" if "onnxruntime_min_ms" in e else "-"
            best = f"{e['ratio_best_peer']:.2f}x" if "ratio_best_peer" in e else "-"
            rows.append([labels[m] + busy, "x".join(map(str, e["input_shape"])),
                         f"{e['torch_min_ms']:.1f} / {e['torch_median_ms']:.1f}",
                         f"{e['convfast_min_ms']:.1f} / {e['convfast_median_ms']:.1f}",
                         f"{e['ratio']:.2f}x", ort_ms, best, f"{b['conv_share_torch']:.0%}",
                         f"{b['conv_share_convfast']:.0%}", str(e["rounds"])])
        out += _table(["mode", "input", "torch ms min/med", "convfast ms min/med", "ratio", "ort ms min",
                       "vs best", "conv% torch", "conv% cf", "rounds"], rows, left=2)
        timed = [m for m, e in r["modes"].items() if "breakdown" in e]
        if timed:
            kinds: Dict[str, int] = {}
            for m in timed:
                for k, v in r["modes"][m]["breakdown"]["types"].items():
                    kinds[k] = v["count"]
            header = ["convolutions by type (ms: torch / convfast = ratio)", "n"] + [labels[m] for m in timed]
            rows = []
            order = sorted(kinds, key=lambda k: -max(r["modes"][m]["breakdown"]["types"].get(k, {}).get("torch_ms", 0)
                                                    for m in timed))
            for k in order:
                row = [k, str(kinds[k])]
                for m in timed:
                    v = r["modes"][m]["breakdown"]["types"].get(k)
                    row.append("-" if v is None else
                               f"{v['torch_ms']:.2f} / {v['convfast_ms']:.2f} = {_f(v['ratio'], '.2f')}")
                rows.append(row)
            row = ["all convolutions", str(sum(kinds.values()))]
            for m in timed:
                b = r["modes"][m]["breakdown"]
                ratio = b["conv_torch_ms"] / b["conv_convfast_ms"] if b["conv_convfast_ms"] else None
                row.append(f"{b['conv_torch_ms']:.2f} / {b['conv_convfast_ms']:.2f} = {_f(ratio, '.2f')}")
            rows.append(row)
            out += _table(header, rows, left=1)
        out.append("")
    # Summary
    out.append("summary: ratio = torch min / convfast min (above 1: convfast faster)")
    rows = []
    for r in report["results"]:
        row = [f"{r['title']} ({r['dtype']})" if len(report["summary"]) > 2 else r["title"]]
        for m in MODES:
            e = r["modes"].get(m, {})
            row.append(f"{e['ratio']:.2f}x" if "ratio" in e else ("MISMATCH" if e and not e.get("ok", True) else "-"))
        rows.append(row)
    for dtype, s in report["summary"].items():
        if dtype == "mismatches":
            continue
        rows.append([f"geometric mean {dtype}"] + [_f(s["geomean_per_mode"][m], ".2f") + "x" for m in MODES])
    out += _table(["network"] + [labels[m] for m in MODES], rows, left=1)
    forward = [m for m in MODES if m != "train_b8"]
    if any("ratio_best_peer" in e for r in report["results"] for e in r["modes"].values()):
        out.append("forward against the faster of PyTorch and onnxruntime (the whole torch model exported to "
                   "ONNX: batch norms folded, activations fused; convfast runs the convolutions only): "
                   "faster peer min / convfast min")
        rows = []
        for r in report["results"]:
            rows.append([r["title"]] + [f"{r['modes'][m]['ratio_best_peer']:.2f}x"
                                        if "ratio_best_peer" in r["modes"].get(m, {}) else "-" for m in forward])
        for dtype, s in report["summary"].items():
            if dtype != "mismatches" and any(math.isfinite(v) for v in s["geomean_best_peer_per_mode"].values()):
                rows.append([f"geometric mean {dtype}"] +
                            [_f(s["geomean_best_peer_per_mode"][m], ".2f") + "x" for m in forward])
        out += _table(["network"] + [labels[m] for m in forward], rows, left=1)
    for dtype, s in report["summary"].items():
        if dtype != "mismatches":
            out.append(f"geometric mean over all networks and modes ({dtype}): {_f(s['geomean'], '.2f')}x "
                       f"(min {_f(s['min'], '.2f')}x, {s['count']} timings)")
    m = report["machine"]
    out.append(f"machine: {m['cpu']} ({m['cores']} logical cores), ISA {m['isa']}, {report['threads']} threads for "
               f"convfast and torch alike, convfast {m['version']}, torch {m['torch']}; load average at start "
               f"{_f(report.get('load_average_at_start'), '.2f')}; {report['seconds']:.0f} s")
    out.append(f"timing: one process, torch, convfast (and onnxruntime) alternating per round, after the check and "
               f"the instrumented "
               f"runs; at least "
               f"{report['min_rounds']} rounds and {report['budget_s_per_mode']:g} s per mode; conv share and types "
               f"from {report['instrumented_runs']} instrumented run(s) (hooks; forward + backward of each "
               f"convolution module), per-layer minimum")
    shares = [(f"{r['network']} {mname}", e["others_cpu_share"]) for r in report["results"]
              for mname, e in r["modes"].items() if e.get("others_cpu_share") is not None]
    busy = [name for name, share in shares if share > busy_limit]
    if busy:
        which = "all timings" if len(busy) == len(shares) else ", ".join(busy)
        out.append(f"* other processes used more than {busy_limit:.0%} of the CPU while these were timed, so their "
                   f"ratios are unreliable (on average {statistics.mean(v for _, v in shares):.0%} of the machine): "
                   f"{which}")
    if report["summary"]["mismatches"]:
        out.append("MISMATCHES (not timed): " + ", ".join(report["summary"]["mismatches"]))
    for r in report["results"]:
        for mname, e in r["modes"].items():
            if e.get("ok") and e.get("gradient_warning"):
                out.append(f"warning: {r['network']} {mname} {r['dtype']}: convfast's gradients differ from a float64 "
                           f"torch model's by {e['gradient_error']:.2g} (torch's own: "
                           f"{e['torch_gradient_error']:.2g}); timed all the same")
    for note in report["notes"]:
        out.append(f"note: {note}")
    return "\n".join(out)


__all__ = ["Network", "NETWORKS", "MODES", "get_networks", "swap_convs", "convfast_module_like", "conv_modules",
           "layer_type", "prepare", "check_network", "Runner", "Instrument", "time_interleaved", "run_network",
           "run_networks", "format_report", "resnet18", "mobilenet_v2", "efficientnet_b0", "unet", "wavenet",
           "dcgan_generator"]
