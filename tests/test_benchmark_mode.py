"""convfast.set_benchmark(True): the layer objects time every algorithm that can run a new input
signature on its first call and keep the fastest, fixed for later calls (as cuDNN's benchmark mode)."""
import numpy as np
import pytest

import convfast
from convfast import _core, reference


@pytest.fixture
def benchmark_on():
    convfast.set_benchmark(True)
    try:
        yield
    finally:
        convfast.set_benchmark(False)


LAYERS = [
    # class, input shape, weight shape, params
    ("Conv2d", (4, 32, 20, 20), (32, 32, 3, 3), dict(padding=1)),        # Winograd, GEMM, direct all run
    ("Conv2d", (2, 16, 15, 15), (16, 1, 3, 3), dict(padding=1, groups=16)),  # depthwise: lanes or direct
    ("Conv1d", (2, 8, 50), (12, 8, 5), dict(stride=2, padding="same", padding_mode="reflect")),
    ("Conv3d", (1, 4, 6, 7, 8), (6, 4, 3, 3, 3), dict(padding=1)),
    ("ConvTranspose2d", (1, 64, 4, 4), (64, 16, 4, 4), dict(stride=2, padding=1)),  # scatter or phases
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", LAYERS)
def test_kept_choice_is_correct_and_fixed(benchmark_on, case, dtype):
    cls, xshape, wshape, params = case
    rng = np.random.default_rng(len(xshape) + sum(wshape))
    x = rng.standard_normal(xshape).astype(dtype)
    w = rng.standard_normal(wshape).astype(dtype)
    b = rng.standard_normal(wshape[1] * params.get("groups", 1) if cls.startswith("ConvT") else wshape[0]).astype(dtype)
    layer = getattr(convfast, cls).from_weights(w, b, **params)
    first = layer(x)
    kept = layer.algorithm(x)
    assert kept
    for _ in range(2):
        assert np.array_equal(layer(x), first)  # the same algorithm, the same bits
        assert layer.algorithm(x) == kept
    rank = len(xshape) - 2
    op = getattr(reference, f"conv_transpose{rank}d" if cls.startswith("ConvT") else f"conv{rank}d")
    expected = op(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **params)
    scale = max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(first, expected, rtol=0, atol=(2e-5 if dtype == np.float32 else 1e-12) * scale)


def test_kept_choice_is_one_of_the_candidates(benchmark_on, monkeypatch):
    """The kept plan is the fastest of the distinct candidates; with every candidate timed equal
    but one, that one is kept."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 16, 16)).astype(np.float32)
    layer = convfast.Conv2d.from_weights(rng.standard_normal((32, 32, 3, 3)).astype(np.float32), padding=1)
    made = []
    real_call = _core.Call

    def recording_call(*args):
        call = real_call(*args)
        made.append((args[-1], call.describe()))
        return call

    monkeypatch.setattr(_core, "Call", recording_call)
    layer(x)
    forced = {algorithm: description for algorithm, description in made if isinstance(algorithm, str)}
    assert set(forced) == set(convfast.Conv2d._BENCHMARK_ALGORITHMS)
    assert layer.algorithm(x) in set(forced.values())
    assert len(set(forced.values())) >= 2  # this layer has a real choice (Winograd, GEMM, direct)


def test_off_by_default_and_validated():
    assert convfast.get_benchmark() is False
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 8, 9, 9)).astype(np.float32)
    layer = convfast.Conv2d.from_weights(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), padding=1)
    assert layer.algorithm(x) == ""  # no call with this signature yet
    layer(x)
    convfast.conv2d(x, layer.weight, padding=1)
    assert layer.algorithm(x) and layer.algorithm(x).split(" threads")[0] == _core.last_algorithm().split(" threads")[0]
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match=r"set_benchmark: enabled must be True or False, got"):
            convfast.set_benchmark(bad)
    assert convfast.get_benchmark() is False
