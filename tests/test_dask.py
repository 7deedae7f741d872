"""convfast.dask: chunked convolutions of Dask arrays equal one in-memory convfast call.

float64 results are compared bit for bit with the in-memory call (the engine computes each output
element as the same FMA sequence whatever the output blocking, see docs/dask.md); float32 within
the documented bound (conftest.tolerance). The sweeps run on the synchronous scheduler (fast, same
block functions); a module-scoped LocalCluster (2 worker processes, 1 thread each) runs a subset
on a real dask.distributed cluster.
"""
import subprocess
import sys
import warnings

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
from dask.array.core import PerformanceWarning  # noqa: E402

import convfast  # noqa: E402
import convfast.dask as cfd  # noqa: E402
from conftest import assert_close  # noqa: E402

MODES = ["zeros", "reflect", "replicate", "circular", "symmetric"]


# ----------------------------------------------------------------------------------------------
# Random cases
# ----------------------------------------------------------------------------------------------

def _random_chunks(rng, shape, spatial_axes, channel_axis):
    """Random (often tiny: smaller than the halo) spatial chunks, random batch chunks, whole
    channels. One-element chunks on one spatial axis at most, to bound the number of blocks (and
    the test time)."""
    chunks = []
    tiny_axis = int(rng.choice(spatial_axes))
    for ax, n in enumerate(shape):
        if ax == channel_axis:
            chunks.append(n)
        elif ax in spatial_axes:
            style = rng.integers(4) if ax == tiny_axis else rng.integers(1, 4)
            if style == 0:
                chunks.append(1)                           # every chunk smaller than the halo
            elif style == 1:
                chunks.append(n)                           # one chunk
            else:
                cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(1, 4))),
                                          replace=False)) if n > 1 else []
                chunks.append(tuple(np.diff(np.concatenate([[0], cuts, [n]])).astype(int).tolist()))
        else:
            chunks.append(int(rng.integers(1, n + 1)))
    return tuple(chunks)


def random_case(rng, transposed, dtype=np.float64):
    """(in-memory function, dask function, x, chunks, weight, bias, kwargs) or None when the
    drawn parameters are invalid (the in-memory call raises)."""
    rank = int(rng.integers(1, 4))
    g = int(rng.choice([1, 1, 2, 3]))
    cin, cout = g * int(rng.integers(1, 3)), g * int(rng.integers(1, 3))
    n = [int(v) for v in rng.integers(1, 12 if rank < 3 else 8, rank)]
    k = [int(v) for v in rng.integers(1, 5 if rank < 3 else 4, rank)]
    s = [int(v) for v in rng.integers(1, 4, rank)]
    d = [int(v) for v in rng.integers(1, 3, rank)]
    channels_last, batched = bool(rng.integers(2)), bool(rng.integers(4))
    shape = ([int(rng.integers(1, 4))] if batched else []) + (n + [cin] if channels_last else [cin] + n)
    lead = 1 if batched else 0
    channel_axis = len(shape) - 1 if channels_last else lead
    first = lead if channels_last else lead + 1
    spatial_axes = tuple(range(first, first + rank))
    x = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(cout).astype(dtype) if rng.integers(2) else None
    kw = dict(stride=s, dilation=d, groups=g, data_format="channels_last" if channels_last else "channels_first")
    style = rng.integers(4)
    if transposed:
        w = rng.standard_normal([cin, cout // g] + k).astype(dtype)
        if style == 0:
            kw["padding"] = str(rng.choice(["same", "same_lower", "valid"]))
        else:
            kw["padding"] = [tuple(int(v) for v in rng.integers(0, 3, 2)) for _ in range(rank)]
            kw["output_padding"] = [int(rng.integers(0, max(a, b))) for a, b in zip(s, d)]
        name = f"conv_transpose{rank}d"
    else:
        w = rng.standard_normal([cout, cin // g] + k).astype(dtype)
        if style == 0:
            kw["padding"] = str(rng.choice(["same", "same_lower", "valid"]))
        else:  # explicit, sometimes larger than the input (every mode but reflect allows it)
            kw["padding"] = [tuple(int(v) for v in rng.integers(0, 2 * ni + 1 if style == 3 else 4, 2))
                             for ni in n]
        kw["padding_mode"] = str(rng.choice(MODES))
        name = f"conv{rank}d"
    try:
        expected = getattr(convfast, name)(x, w, bias, **kw)
    except ValueError:
        return None
    return name, x, _random_chunks(rng, shape, spatial_axes, channel_axis), w, bias, kw, expected


def _cases(seed, count, transposed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        case = random_case(rng, transposed, dtype)
        if case is not None:
            out.append(case)
    return out


def _run(case, scheduler="sync"):
    name, x, chunks, w, bias, kw, expected = case
    y = getattr(cfd, name)(da.from_array(x, chunks=chunks), w, bias, **kw)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    got = y.compute(scheduler=scheduler) if scheduler else y.compute()
    return got, expected


def _describe(case):
    name, x, chunks, w, bias, kw, _ = case
    return f"{name} x{x.shape} chunks={chunks} w{w.shape} bias={bias is not None} {kw}"


# ----------------------------------------------------------------------------------------------
# Equality with the in-memory call
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
@pytest.mark.parametrize("seed", range(4))
def test_random_sweep_float64_bitwise(seed, transposed):
    for case in _cases(seed, 30, transposed):
        got, expected = _run(case)
        assert np.array_equal(got, expected), _describe(case)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
def test_random_sweep_float32_within_bound(transposed):
    for case in _cases(100, 30, transposed, np.float32):
        got, expected = _run(case)
        k = int(np.prod(case[3].shape[1:])) if not transposed else int(np.prod(case[3].shape[2:])) * case[3].shape[0]
        assert got.dtype == np.float32
        assert_close(got, expected, np.float32, reduction_size=k)


def test_threaded_scheduler():
    for case in _cases(7, 10, False) + _cases(8, 10, True):
        got, expected = _run(case, scheduler="threads")
        assert np.array_equal(got, expected), _describe(case)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunks_smaller_than_halo(mode, chunk):
    """Kernel 5 at dilation 3 reads 6 rows on each side; chunks of 1-3 rows make every block
    gather from several neighbour chunks (and, at the border, from wrapped/reflected chunks)."""
    rng = np.random.default_rng(chunk)
    x = rng.standard_normal((2, 3, 13, 11))
    w = rng.standard_normal((4, 3, 5, 5))
    b = rng.standard_normal(4)
    kw = dict(padding="same", dilation=(3, 2), stride=(1, 2), padding_mode=mode)
    y = cfd.conv2d(da.from_array(x, chunks=(1, 3, chunk, chunk)), w, b, **kw)
    assert np.array_equal(y.compute(scheduler="sync"), convfast.conv2d(x, w, b, **kw))


@pytest.mark.parametrize("mode", ["zeros", "replicate", "circular", "symmetric"])
def test_padding_larger_than_input(mode):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 5, 4, 3))
    w = rng.standard_normal((3, 2, 3, 2, 3))
    kw = dict(padding=((9, 2), (1, 7), (4, 4)), stride=(2, 1, 3), padding_mode=mode)
    y = cfd.conv3d(da.from_array(x, chunks=(1, 2, 2, 1, 2)), w, None, **kw)
    assert np.array_equal(y.compute(scheduler="sync"), convfast.conv3d(x, w, None, **kw))


def test_zeros_blocks_wholly_in_the_padding():
    """Output blocks that read nothing but zero padding are bias only, as in the big call."""
    x = np.arange(6.0).reshape(1, 1, 6)
    w = np.array([[[1.0, -2.0, 0.5]]])
    b = np.array([0.25])
    kw = dict(padding=[(12, 10)], stride=2)
    y = cfd.conv1d(da.from_array(x, chunks=(1, 1, 1)), w, b, **kw)
    assert len(y.chunks[2]) > 3
    assert np.array_equal(y.compute(scheduler="sync"), convfast.conv1d(x, w, b, **kw))


def test_transposed_blocks_reached_by_no_input():
    """A kernel shorter than the stride leaves gaps, output_padding a tail: bias only there."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 7))
    w = rng.standard_normal((2, 3, 2))
    b = rng.standard_normal(3)
    kw = dict(stride=5, output_padding=3, padding=[(1, 0)])
    y = cfd.conv_transpose1d(da.from_array(x, chunks=(1, 2, 1)), w, b, **kw)
    assert np.array_equal(y.compute(scheduler="sync"), convfast.conv_transpose1d(x, w, b, **kw))


def test_output_size_and_unbatched_channels_last():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 6, 4))  # unbatched (H, W, C)
    w = rng.standard_normal((4, 2, 3, 3))
    kw = dict(stride=2, padding=1, output_size=(10, 12), data_format="channels_last")
    y = cfd.conv_transpose2d(da.from_array(x, chunks=(2, 3, 4)), w, None, **kw)
    expected = convfast.conv_transpose2d(x, w, None, **kw)
    assert y.shape == expected.shape == (10, 12, 2)
    assert np.array_equal(y.compute(scheduler="sync"), expected)


def test_float16_and_integer_inputs_promote_like_the_in_memory_call():
    x = np.arange(2 * 3 * 10, dtype=np.int16).reshape(2, 3, 10)
    w = np.ones((2, 3, 3), dtype=np.float32)
    y = cfd.conv1d(da.from_array(x, chunks=(1, 3, 4)), w, padding="same", padding_mode="reflect")
    assert y.dtype == np.float64
    assert np.array_equal(y.compute(scheduler="sync"), convfast.conv1d(x, w, padding="same", padding_mode="reflect"))
    x16 = x.astype(np.float16)
    y16 = cfd.conv1d(da.from_array(x16, chunks=(1, 3, 4)), w, padding=2)
    assert y16.dtype == np.float32
    assert np.array_equal(y16.compute(scheduler="sync"), convfast.conv1d(x16, w, padding=2))


# ----------------------------------------------------------------------------------------------
# Chunks, graph, laziness
# ----------------------------------------------------------------------------------------------

def test_output_chunks_follow_the_input_through_the_stride():
    x = da.zeros((4, 2, 64, 48), chunks=(3, 2, 16, 24))
    w = np.ones((5, 2, 3, 3))
    assert cfd.conv2d(x, w, padding="same").chunks == ((3, 1), (5,), (16,) * 4, (24, 24))
    assert cfd.conv2d(x, w, padding="same", stride=2).chunks == ((3, 1), (5,), (8,) * 4, (12, 12))
    wt = np.ones((2, 5, 3, 3))
    assert cfd.conv_transpose2d(x, wt, stride=2, padding="same").chunks == ((3, 1), (5,), (32,) * 4, (48, 48))
    # chunks smaller than the stride merge into their neighbours instead of giving empty blocks
    assert cfd.conv2d(da.zeros((1, 2, 9, 9), chunks=(1, 2, 1, 1)), w, stride=4).chunks[2:] == ((1, 1),) * 2


def test_channel_axis_is_rechunked_with_a_warning():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 5, 4, 9))  # channels last
    w = rng.standard_normal((6, 3, 2, 2, 2))
    kw = dict(groups=3, padding="same", padding_mode="circular", data_format="channels_last")
    with pytest.warns(PerformanceWarning, match="channel axis"):
        y = cfd.conv3d(da.from_array(x, chunks=(1, 3, 2, 5, 4)), w, None, **kw)
    assert y.chunks[1:4] == ((3, 3), (2, 2, 1), (4,))  # spatial chunks kept ("same", stride 1)
    assert y.chunks[-1] == (6,)
    assert np.array_equal(y.compute(scheduler="sync"), convfast.conv3d(x, w, None, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfd.conv3d(da.from_array(x, chunks=(1, 3, 2, 5, 9)), w, None, **kw)  # whole channels: no warning


def test_weight_is_one_graph_key():
    """The weight (and bias) are single keys that every block task references: serialise each
    task on its own and only one holds the weight's bytes."""
    cloudpickle = pytest.importorskip("cloudpickle")
    rng = np.random.default_rng(5)
    x = da.from_array(rng.standard_normal((2, 8, 20, 20)), chunks=(1, 8, 5, 5))
    w = rng.standard_normal((16, 8, 5, 5))  # 25.6 kB
    b = rng.standard_normal(16)
    y = cfd.conv2d(x, w, b, padding="same", padding_mode="reflect")
    graph = dict(y.__dask_graph__())
    blocks = [k for k in graph if isinstance(k, tuple) and k[0] == y.name]
    assert len(blocks) == 32
    sizes = {k: len(cloudpickle.dumps(v)) for k, v in graph.items()}
    holding = [k for k, size in sizes.items() if size >= w.nbytes]
    assert len(holding) == 1 and graph[holding[0]] is not None
    assert np.array_equal(np.asarray(graph[holding[0]]), w)
    weight_key = holding[0]
    bias_key = next(k for k, v in graph.items() if isinstance(v, np.ndarray) and v.shape == (16,))
    for k in blocks:  # every block task names the weight and bias keys
        assert weight_key in graph[k] and bias_key in graph[k]
    assert max(size for k, size in sizes.items() if k != weight_key) < w.nbytes // 4  # no task carries it


def test_dask_weight_and_bias_are_one_chunk_each():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 4, 12, 12))
    w = rng.standard_normal((6, 4, 3, 3))
    b = rng.standard_normal(6)
    y = cfd.conv2d(da.from_array(x, chunks=(1, 4, 5, 5)), da.from_array(w, chunks=(2, 2, 3, 3)),
                   da.from_array(b, chunks=2), padding=1, padding_mode="replicate")
    assert np.array_equal(y.compute(scheduler="sync"), convfast.conv2d(x, w, b, padding=1, padding_mode="replicate"))


def test_building_the_graph_computes_nothing():
    def explode(block):
        raise AssertionError("computed while building the graph")

    x = da.zeros((1, 2, 30, 30), chunks=(1, 2, 10, 10)).map_blocks(explode, dtype=float)
    y = cfd.conv2d(x, np.ones((3, 2, 3, 3)), padding="same", padding_mode="reflect")
    assert y.shape == (1, 3, 30, 30)


def test_import_convfast_does_not_import_dask():
    code = "import sys, convfast; assert 'dask' not in sys.modules, 'dask imported'; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ----------------------------------------------------------------------------------------------
# Errors: those of the in-memory API, naming convfast.dask.<function>
# ----------------------------------------------------------------------------------------------

def _in_memory_error(fn, *args, **kwargs):
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return info.type, str(info.value).split(": ", 1)[1]


@pytest.mark.parametrize("kwargs", [
    dict(padding=9, padding_mode="reflect"), dict(stride=0), dict(padding="full"), dict(groups=2),
    dict(padding_mode="mirror"), dict(dilation=(1, 2, 3)), dict(data_format="nchwc"), dict(stride=1.5),
])
def test_errors_match_the_in_memory_api(kwargs):
    x = np.zeros((1, 3, 8, 8))
    w = np.zeros((4, 3, 3, 3))
    kind, message = _in_memory_error(convfast.conv2d, x, w, **kwargs)
    with pytest.raises(kind) as info:
        cfd.conv2d(da.from_array(x, chunks=4), w, **kwargs)
    assert str(info.value) == f"convfast.dask.conv2d: {message}"


def test_transposed_errors_match_the_in_memory_api():
    x = np.zeros((1, 3, 8, 8))
    w = np.zeros((3, 2, 3, 3))
    for kwargs in (dict(output_padding=2, stride=2), dict(output_size=(40, 40), stride=2), dict(padding=9)):
        kind, message = _in_memory_error(convfast.conv_transpose2d, x, w, **kwargs)
        with pytest.raises(kind) as info:
            cfd.conv_transpose2d(da.from_array(x, chunks=4), w, **kwargs)
        assert str(info.value) == f"convfast.dask.conv_transpose2d: {message}"


def test_non_dask_input_and_unknown_chunks():
    w = np.zeros((4, 3, 3))
    with pytest.raises(TypeError, match=r"convfast.dask.conv1d: x must be a dask.array.Array"):
        cfd.conv1d(np.zeros((1, 3, 8)), w)
    x = da.zeros((1, 3, 8), chunks=(1, 3, 4))
    unknown = x[:, :, da.arange(8) >= 0]  # boolean dask indexing: chunk sizes unknown until computed
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        cfd.conv1d(unknown, w)
    with pytest.raises(TypeError, match="convfast.dask.conv1d: weight"):
        cfd.conv1d(x, np.zeros((4, 3, 3), dtype=complex))


# ----------------------------------------------------------------------------------------------
# Bitwise whatever algorithm the engine picks for the blocks and the whole call (docs/dask.md)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["auto", "gemm", "direct"])
def test_bitwise_whatever_algorithm_the_blocks_get(algo, monkeypatch):
    """26^3 with 10 input channels: the whole call (26^3 >= 16384-element planes) takes the direct
    path, 13^3 blocks the GEMM, whose K = 10 * 27 = 270 exceeds the K blocking (256 on AVX2). Both
    compute each output as one chain over k in the same order, so the results agree bit for bit."""
    if algo != "auto":
        monkeypatch.setenv("CONVFAST_ALGO", algo)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 10, 26, 26, 26))
    w = rng.standard_normal((12, 10, 3, 3, 3))
    expected = convfast.conv3d(x, w, padding="same")
    got = cfd.conv3d(da.from_array(x, chunks=(1, 10, 13, 13, 13)), w, padding="same").compute(scheduler="sync")
    assert np.array_equal(got, expected)


def test_depthwise_long_signal_bitwise():
    """A depthwise 1-D signal long enough that the whole call and its chunks may take different
    algorithms (row buffers over their cap): still one chain per output in both."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 2, 600_000))
    w = rng.standard_normal((2, 1, 5))
    expected = convfast.conv1d(x, w, padding="same", groups=2)
    got = cfd.conv1d(da.from_array(x, chunks=(1, 2, 100_000)), w, padding="same", groups=2).compute(scheduler="sync")
    assert np.array_equal(got, expected)


def test_transposed_slices_never_one_input_long(monkeypatch):
    """Kernel 3 at stride 3 with one-element chunks: every output block is reached by one input.
    The engine treats a one-input axis as stride 1, merging the three stride phases (K = 100 each)
    into one with K = 300 > 256, which the GEMM sums in two K blocks: without the plan's widening of
    such slices to two inputs this differs from the big call in the last bits (checked: 7e-15)."""
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 100, 7))
    w = rng.standard_normal((100, 12, 3))
    got = cfd.conv_transpose1d(da.from_array(x, chunks=(1, 100, 1)), w, stride=3).compute(scheduler="sync")
    assert np.array_equal(got, convfast.conv_transpose1d(x, w, stride=3))


# ----------------------------------------------------------------------------------------------
# A real dask.distributed cluster
# ----------------------------------------------------------------------------------------------

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  memory_limit="1GiB") as cluster, distributed.Client(cluster) as c:
        yield c


def test_distributed_cluster_random_cases(client):
    cases = _cases(11, 6, False) + _cases(12, 6, True)
    ys = [getattr(cfd, name)(da.from_array(x, chunks=chunks), w, bias, **kw)
          for name, x, chunks, w, bias, kw, _ in cases]
    results = client.gather(client.compute(ys))
    for case, got in zip(cases, results):
        assert np.array_equal(got, case[-1]), _describe(case)


def test_distributed_volume_every_mode(client):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 3, 16, 10, 14))
    w = rng.standard_normal((4, 3, 3, 5, 3))
    b = rng.standard_normal(4)
    xd = da.from_array(x, chunks=(1, 3, 8, 5, 7))  # interior, border and smaller-than-halo (5 < 2 * 4) chunks
    futures = {}
    with distributed.get_task_stream(client) as stream:
        for mode in MODES:
            kw = dict(padding="same", padding_mode=mode, stride=(2, 1, 1), dilation=(1, 2, 1))
            futures[mode] = (client.compute(cfd.conv3d(xd, w, b, **kw)), convfast.conv3d(x, w, b, **kw))
        wt = rng.standard_normal((3, 2, 3, 3, 3))
        futures["transposed"] = (client.compute(cfd.conv_transpose3d(xd, wt, None, stride=2, padding="same")),
                                 convfast.conv_transpose3d(x, wt, None, stride=2, padding="same"))
        for name, (future, expected) in futures.items():
            assert np.array_equal(future.result(), expected), name
    # the block tasks ran in both worker processes, not in this one
    workers = {t["worker"] for t in stream.data if "convfast-dask-conv" in str(t["key"])}
    assert len(workers) == 2, workers


def test_winograd_layer_within_rounding_or_bitwise(monkeypatch):
    """A 3x3 stride-1 layer with 64 channels runs Winograd F(2, 3), whose tiles start at each
    block's origin: chunked results agree with the in-memory call within rounding. With
    CONVFAST_ALGO=gemm both take the exact-chain GEMM and agree bit for bit (docs/dask.md)."""
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64, 23, 21))
    w = rng.standard_normal((64, 64, 3, 3))
    chunks = (1, 64, 9, 8)
    expected = convfast.conv2d(x, w, padding=1)
    assert convfast._core.last_algorithm().startswith("winograd")
    got = cfd.conv2d(da.from_array(x, chunks=chunks), w, padding=1).compute(scheduler="sync")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    expected = convfast.conv2d(x, w, padding=1)
    got = cfd.conv2d(da.from_array(x, chunks=chunks), w, padding=1).compute(scheduler="sync")
    assert np.array_equal(got, expected)
