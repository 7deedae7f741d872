"""GPU benchmark: convfast's CUDA kernels against PyTorch (cuDNN) on layers of batch-32 networks.

    python -m convfast.cuda.bench                      # every case
    python -m convfast.cuda.bench --cases resnet,depthwise --repeat 50 --batch 16
    python -m convfast.cuda.bench --check-only         # correctness against torch only

Needs a CUDA GPU, PyTorch with CUDA and numba-cuda (pip install "convfast[cuda]"). Every case is
first checked against torch.nn.functional computed in float64 on the GPU; then convfast (a layer
object moved with .to("cuda"): weights packed once, torch tensors in and out, zero-copy, on torch's
current stream) and torch are timed with CUDA events, interleaved, median of the rounds:

* torch fp32: cuDNN with TF32 disabled (strict float32, the same arithmetic as convfast);
* torch tf32: cuDNN with TF32 allowed (tensor cores, 10-bit mantissa products; for reference only).

Printed per case: ms per call, TFLOP/s (2 x multiply-adds of the direct definition) and the ratio
torch ms / convfast ms (> 1: convfast faster). convfast's time includes its Python host overhead
(argument normalisation, launch), since that is what a caller pays.

``--pass backward`` times the gradients instead (grad_input + grad_weight: convfast.conv*_backward
on torch tensors against ``torch.ops.aten.convolution_backward`` with output_mask [True, True,
False]), after checking both against float64 on the GPU; TFLOP/s count 2x the forward's FLOPs.

NOT RUN YET: no GPU was available when this was written (see docs/gpu.md); it is checked for
importability and for its error message without a GPU only.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Case:
    name: str
    op: str                 # convfast / torch.nn.functional name
    in_shape: tuple         # x without the batch axis, channels first
    weight: tuple
    kwargs: dict = field(default_factory=dict)
    batch_div: int = 1      # 3-D cases use batch / batch_div
    channels_last: bool = False
    dtype: str = "float32"


CASES = [
    Case("resnet 3x3 64 56x56", "conv2d", (64, 56, 56), (64, 64, 3, 3), dict(padding=1)),
    Case("resnet 3x3 128 28x28", "conv2d", (128, 28, 28), (128, 128, 3, 3), dict(padding=1)),
    Case("resnet 3x3 256 14x14", "conv2d", (256, 14, 14), (256, 256, 3, 3), dict(padding=1)),
    Case("resnet 3x3 512 7x7", "conv2d", (512, 7, 7), (512, 512, 3, 3), dict(padding=1)),
    Case("resnet 3x3 s2 64->128 56x56", "conv2d", (64, 56, 56), (128, 64, 3, 3), dict(stride=2, padding=1)),
    Case("resnet 1x1 256->64 56x56", "conv2d", (256, 56, 56), (64, 256, 1, 1)),
    Case("resnet stem 7x7 s2 3->64 224", "conv2d", (3, 224, 224), (64, 3, 7, 7), dict(stride=2, padding=3)),
    Case("resnet 3x3 64 56x56 channels_last", "conv2d", (64, 56, 56), (64, 64, 3, 3), dict(padding=1),
         channels_last=True),
    Case("depthwise 3x3 144 56x56", "conv2d", (144, 56, 56), (144, 1, 3, 3), dict(padding=1, groups=144)),
    Case("depthwise 3x3 s2 576 14x14", "conv2d", (576, 14, 14), (576, 1, 3, 3),
         dict(stride=2, padding=1, groups=576)),
    Case("grouped 3x3 g32 256 28x28", "conv2d", (256, 28, 28), (256, 8, 3, 3), dict(padding=1, groups=32)),
    Case("conv1d k3 256 L2048", "conv1d", (256, 2048), (256, 256, 3), dict(padding=1)),
    Case("conv3d 3x3x3 32 32^3", "conv3d", (32, 32, 32, 32), (32, 32, 3, 3, 3), dict(padding=1), batch_div=4),
    Case("transposed 2-D k4s2p1 256->128 16x16", "conv_transpose2d", (256, 16, 16), (256, 128, 4, 4),
         dict(stride=2, padding=1)),
    Case("transposed 3-D k2s2 64->32 16^3", "conv_transpose3d", (64, 16, 16, 16), (64, 32, 2, 2, 2),
         dict(stride=2), batch_div=4),
    Case("resnet 3x3 64 28x28 float64", "conv2d", (64, 28, 28), (64, 64, 3, 3), dict(padding=1), dtype="float64"),
]

_LAYER = {"conv1d": "Conv1d", "conv2d": "Conv2d", "conv3d": "Conv3d", "conv_transpose1d": "ConvTranspose1d",
          "conv_transpose2d": "ConvTranspose2d", "conv_transpose3d": "ConvTranspose3d"}


def flops(case: Case, batch: int, out_spatial) -> float:
    groups = case.kwargs.get("groups", 1)
    taps = math.prod(case.weight[2:])
    if case.op.startswith("conv_transpose"):  # every input pixel x every kernel tap x C_out/G
        return 2.0 * batch * case.in_shape[0] * math.prod(case.in_shape[1:]) * case.weight[1] * taps
    return 2.0 * batch * case.weight[0] * math.prod(out_spatial) * case.weight[1] * taps


def _requirements():
    """(torch, convfast) or a message saying what is missing."""
    try:
        import torch
    except ImportError:
        return None, "convfast.cuda.bench: needs PyTorch with CUDA (pip install torch) to compare against cuDNN"
    if not torch.cuda.is_available():
        return None, ("convfast.cuda.bench: needs a CUDA GPU: torch.cuda.is_available() is False "
                      f"(torch {torch.__version__}); nothing was run")
    import convfast
    import convfast.cuda
    if not convfast.cuda.is_available():
        return None, ("convfast.cuda.bench: convfast's GPU backend is unavailable (numba-cuda missing or no "
                      "driver: pip install 'convfast[cuda]'); nothing was run")
    return (torch, convfast), None


def _time(torch, fn, repeat: int) -> float:
    """Milliseconds per call: ``repeat`` calls between two events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeat


def _compare(torch, ours, theirs, repeat: int, rounds: int, total_flops: float) -> dict:
    """{contender: (median ms, TFLOP/s)} for convfast and torch with TF32 off and on."""
    torch.backends.cudnn.benchmark = True
    samples = {"convfast": [], "torch fp32": [], "torch tf32": []}
    for tf32 in (False, True):  # warm-up: compilation, cuDNN autotuning, caches
        torch.backends.cudnn.allow_tf32 = tf32
        theirs()
    for _ in range(3):
        ours()
    torch.cuda.synchronize()
    for _ in range(rounds):  # interleaved, so that clock and thermal drift hit every contender alike
        samples["convfast"].append(_time(torch, ours, repeat))
        torch.backends.cudnn.allow_tf32 = False
        samples["torch fp32"].append(_time(torch, theirs, repeat))
        torch.backends.cudnn.allow_tf32 = True
        samples["torch tf32"].append(_time(torch, theirs, repeat))
    torch.backends.cudnn.allow_tf32 = False
    return {name: (statistics.median(v), total_flops / (statistics.median(v) * 1e-3) / 1e12)
            for name, v in samples.items()}


def _operands(torch, case: Case, batch: int):
    """(n, generator, x, w) of one case on the GPU: its batch, seeded normal input and weights
    scaled to unit-variance outputs."""
    dt = getattr(torch, case.dtype)
    n = max(1, batch // case.batch_div)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((n,) + case.in_shape, device="cuda", dtype=dt, generator=gen)
    w = torch.randn(case.weight, device="cuda", dtype=dt, generator=gen) / math.sqrt(math.prod(case.weight[1:]))
    return n, gen, x, w


def _relative_error(got, ref) -> float:
    """max |got - ref| over max(1, max |ref|), in float64."""
    return float((got.double() - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def _tolerance(case: Case, reduction: int) -> float:
    """The accepted relative error for a sum of ``reduction`` products in the case's dtype."""
    return (1e-5 if case.dtype == "float32" else 1e-12) * math.sqrt(reduction)


def _aten_args(case: Case):
    """(stride, padding, dilation, transposed, output_padding, groups) for aten.convolution_backward."""
    rank = len(case.weight) - 2
    kw = case.kwargs

    def per_axis(name, default):
        v = kw.get(name, default)
        return [v] * rank if isinstance(v, int) else list(v)

    return (per_axis("stride", 1), per_axis("padding", 0), per_axis("dilation", 1),
            case.op.startswith("conv_transpose"), per_axis("output_padding", 0), kw.get("groups", 1))


def run_backward_case(torch, convfast, case: Case, batch: int, repeat: int, rounds: int, check_only: bool):
    """The gradients (grad_input, grad_weight) of one case: convfast's GPU backward on torch CUDA
    tensors against aten.convolution_backward (cuDNN, TF32 off), both checked against float64."""
    n, gen, x, w = _operands(torch, case, batch)
    y = getattr(torch.nn.functional, case.op)(x, w, None, **case.kwargs)
    gy = torch.randn(y.shape, device="cuda", dtype=x.dtype, generator=gen)
    backward = getattr(convfast, case.op + "_backward")
    aten = _aten_args(case)
    layout = "channels_last" if case.channels_last else "channels_first"
    xc = x.movedim(1, -1).contiguous() if case.channels_last else x
    gyc = gy.movedim(1, -1).contiguous() if case.channels_last else gy
    mask = (True, True, False)

    def ours():
        return backward(gyc, xc, w, None, **case.kwargs, data_format=layout, needs=mask)

    def theirs(a=gy, b=x, c=w):
        return torch.ops.aten.convolution_backward(a, b, c, None, *aten, list(mask))

    torch.backends.cudnn.allow_tf32 = False
    gx, gw, _ = ours()
    if case.channels_last:
        gx = gx.movedim(-1, 1)
    ref_gx, ref_gw, _ = theirs(gy.double(), x.double(), w.double())
    err = max(_relative_error(gx, ref_gx), _relative_error(gw, ref_gw))
    # the longer of the two reductions
    tol = _tolerance(case, max(math.prod(case.weight[1:]), n * math.prod(y.shape[2:])))
    ok = tuple(gx.shape) == tuple(x.shape) and tuple(gw.shape) == tuple(w.shape) and err <= tol
    result = {"case": case.name, "n": n, "ok": ok, "err": err, "tol": tol}
    if not ok or check_only:
        return result
    total_flops = 2 * flops(case, n, tuple(y.shape[2:]))
    result.update(_compare(torch, ours, theirs, repeat, rounds, total_flops))
    return result


def run_case(torch, convfast, case: Case, batch: int, repeat: int, rounds: int, check_only: bool):
    F = torch.nn.functional
    n, gen, x, w = _operands(torch, case, batch)
    b = torch.randn(case.weight[0] if not case.op.startswith("conv_transpose") else
                    case.weight[1] * case.kwargs.get("groups", 1), device="cuda", dtype=x.dtype, generator=gen)
    torch_op = getattr(F, case.op)
    layer_cls = getattr(convfast, _LAYER[case.op])
    layout = "channels_last" if case.channels_last else "channels_first"
    layer = layer_cls.from_weights(w.cpu().numpy(), b.cpu().numpy(), data_format=layout,
                                   dtype=np.dtype(case.dtype), **case.kwargs).to("cuda")
    xc = x.movedim(1, -1).contiguous() if case.channels_last else x

    def ours():
        return layer(xc)

    if case.channels_last:  # cuDNN's NHWC kernels, the fair comparison for a channels-last layer
        xt, wt = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    else:
        xt, wt = x, w

    def theirs():
        return torch_op(xt, wt, b, **case.kwargs)

    # Correctness first: against float64 on the GPU.
    torch.backends.cudnn.allow_tf32 = False
    y = ours()
    if case.channels_last:
        y = y.movedim(-1, 1)
    ref = torch_op(x.double(), w.double(), b.double(), **case.kwargs)
    err = _relative_error(y, ref)
    k = math.prod(case.weight[1:]) if not case.op.startswith("conv_transpose") else \
        case.weight[0] // case.kwargs.get("groups", 1) * math.prod(case.weight[2:])
    tol = _tolerance(case, k)
    ok = tuple(y.shape) == tuple(ref.shape) and err <= tol
    result = {"case": case.name, "n": n, "ok": ok, "err": err, "tol": tol}
    if not ok or check_only:
        return result

    total_flops = flops(case, n, tuple(ref.shape[2:]))
    result.update(_compare(torch, ours, theirs, repeat, rounds, total_flops))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convfast.cuda.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="batch size (3-D cases use a quarter)")
    parser.add_argument("--repeat", type=int, default=20, help="calls per timed sample")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved samples per contender (median)")
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names")
    parser.add_argument("--check-only", action="store_true", help="check against torch, do not time")
    parser.add_argument("--pass", dest="which", choices=("forward", "backward"), default="forward",
                        help="time the forward convolution (default) or its gradients (grad_input + grad_weight)")
    args = parser.parse_args(argv)
    found, message = _requirements()
    if found is None:
        print(message, file=sys.stderr)
        return 2
    torch, convfast = found
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases = [c for c in CASES if not wanted or any(wd in c.name for wd in wanted)]
    print(f"convfast {convfast.__version__} | torch {torch.__version__} cuDNN {torch.backends.cudnn.version()} | "
          f"{torch.cuda.get_device_name()} | batch {args.batch} | pass {args.which}")
    run = run_backward_case if args.which == "backward" else run_case
    header = f"{'case':40s} {'N':>3s} {'check':>11s}"
    if not args.check_only:
        header += (f" {'convfast ms':>11s} {'TFLOP/s':>7s} {'fp32 ms':>8s} {'TFLOP/s':>7s} {'ratio':>6s}"
                   f" {'tf32 ms':>8s} {'TFLOP/s':>7s} {'ratio':>6s}")
    print(header)
    failures = 0
    ratios = {"torch fp32": [], "torch tf32": []}  # torch ms / convfast ms per timed case
    for case in cases:
        r = run(torch, convfast, case, args.batch, args.repeat, args.rounds, args.check_only)
        line = f"{case.name:40s} {r['n']:3d} {('ok' if r['ok'] else 'FAIL'):>4s} {r['err']:.0e}"
        if not r["ok"]:
            failures += 1
            line += f"  (tolerance {r['tol']:.0e}; not timed)"
        elif not args.check_only:
            ours_ms, ours_tf = r["convfast"]
            for name in ("convfast", "torch fp32", "torch tf32"):
                ms, tf = r[name]
                line += f" {ms:11.3f} {tf:7.2f}" if name == "convfast" else f" {ms:8.3f} {tf:7.2f} {ms / ours_ms:6.2f}"
                if name in ratios:
                    ratios[name].append(ms / ours_ms)
        print(line, flush=True)
    if ratios["torch fp32"]:
        geo = {name: math.exp(statistics.fmean(math.log(v) for v in vals)) for name, vals in ratios.items()}
        print(f"geometric mean of the ratios over {len(ratios['torch fp32'])} cases: {geo['torch fp32']:.3f} "
              f"against cuDNN strict fp32 (TF32 off), {geo['torch tf32']:.3f} against TF32")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
