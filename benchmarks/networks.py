"""asv benchmarks: whole networks (torch.nn models with every convolution swapped for convfast.torch)
against the unmodified models, as ``python -m convfast bench --networks`` runs them.

Per network (ResNet-18, MobileNetV2, EfficientNet-B0, 2-D and 3-D U-Nets, a 1-D WaveNet stack, the
DCGAN generator) and mode (forward batch 1, forward batch 8, training step batch 8):
  time_convfast  - one forward / training step of the convfast model (asv's statistics),
  time_torch     - the same for the unmodified PyTorch model,
  track_ratio    - torch's minimum / convfast's minimum over a few interleaved rounds.

Skipped (NotImplementedError in setup) where PyTorch is not installed. The networks come from the
checkout's python/convfast/_bench_networks.py (uses only convfast's public API and convfast.torch),
else from the installed convfast. Threads: convfast's default (OMP_NUM_THREADS, else all cores),
and the same for torch.
Run here:  asv run --python=same --quick --show-stderr --bench networks
"""
import importlib.util
import os
import sys

_NAME = "convfast_bench_networks_checkout"
_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python", "convfast", "_bench_networks.py")

if _NAME in sys.modules:
    N = sys.modules[_NAME]
elif os.path.exists(_PATH):
    _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    N = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = N  # dataclasses resolve their module through sys.modules
    _spec.loader.exec_module(N)
else:
    from convfast import _bench_networks as N


def _torch():
    try:
        import torch
    except Exception:
        raise NotImplementedError("PyTorch is not installed")
    return torch


class Networks:
    params = [list(N.NETWORKS), list(N.MODES)]
    param_names = ["network", "mode"]
    timeout = 600
    repeat = (1, 5, 30.0)
    number = 1
    warmup_time = 0

    def setup(self, network, mode):
        torch = _torch()
        import convfast
        torch.set_num_threads(convfast.get_num_threads())
        model, cf_model, x, target = N.prepare(N.NETWORKS[network], mode)
        self.runners = {"torch": N.Runner(model, mode, x, target), "convfast": N.Runner(cf_model, mode, x, target)}
        for r in self.runners.values():
            r.run()  # warm-up: first touch, caches, thread pools

    def teardown(self, network, mode):
        self.runners = None

    def time_convfast(self, network, mode):
        self.runners["convfast"].run()

    def time_torch(self, network, mode):
        self.runners["torch"].run()

    def track_ratio(self, network, mode):
        t = N.time_interleaved({n: r.run for n, r in self.runners.items()}, budget_s=1.0, min_rounds=3)
        return t["torch"]["min_ms"] / t["convfast"]["min_ms"]

    track_ratio.unit = "torch / convfast"
