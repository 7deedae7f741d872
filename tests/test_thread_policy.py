"""How many threads each call uses: the work threshold, other calls in flight, OpenMP's own setting
(threadpoolctl), calls from inside an OpenMP parallel region, and fork. Results are compared with
the serial results bitwise and with the NumPy reference."""
import concurrent.futures
import ctypes
import ctypes.util
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import convfast
from convfast import _core, reference

from conftest import assert_close

CORES = os.cpu_count() or 1
needs_two_cores = pytest.mark.skipif(CORES < 2, reason="needs at least 2 CPUs")


@pytest.fixture(autouse=True)
def restore_settings():
    n, work = convfast.get_num_threads(), _core.min_work_per_thread()
    try:
        yield
    finally:
        convfast.set_num_threads(n)
        _core.set_min_work_per_thread(work)


def _operands(c=16, size=24, groups=1, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, c, size, size)).astype(dtype)
    w = rng.standard_normal((c, c // groups, 3, 3)).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    return x, w, b


# ------------------------------------------------------------------------------------------------
# the work threshold
# ------------------------------------------------------------------------------------------------
@needs_two_cores
def test_small_work_runs_on_one_thread_and_large_on_all():
    convfast.set_num_threads(2)
    per_thread = _core.min_work_per_thread()
    assert per_thread > 0
    x, w, b = _operands(c=8, size=8)          # 8 * 8 * 9 * 64 = 36864 multiply-adds
    assert 8 * 8 * 9 * 64 < 2 * per_thread
    y = convfast.conv2d(x, w, b, padding=1)
    assert _core.last_call_threads() == 1 and "threads=1" in _core.last_algorithm()
    assert_close(y, reference.conv2d(x, w, b, padding=1), dtype=np.float32, reduction_size=72)
    x, w, b = _operands(c=64, size=56)        # 116 M multiply-adds
    assert 64 * 64 * 9 * 56 * 56 >= 2 * per_thread
    convfast.conv2d(x, w, b, padding=1)
    assert _core.last_call_threads() == 2
    # the gradients are calls of their own, with their own work
    gy = np.ones((1, 64, 56, 56), np.float32)
    convfast.conv2d_backward(gy, x, w, padding=1, needs=(False, True, False))
    assert _core.last_call_threads() == 2 and _core.last_algorithm().startswith("weight_grad")
    # the threshold is a setting: at 0 every call may use every thread
    _core.set_min_work_per_thread(0)
    x, w, b = _operands(c=8, size=8)
    assert convfast.conv2d(x, w, b, padding=1).tobytes() == y.tobytes()
    assert _core.last_call_threads() == 2


# ------------------------------------------------------------------------------------------------
# other calls in flight: the cores as tokens
# ------------------------------------------------------------------------------------------------
def _start(fn, *args):
    """fn(*args) on a new Python thread; returns the thread and a list that receives the result or
    the exception."""
    box = []

    def body():
        try:
            box.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - checked by the caller
            box.append(e)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, box


def _conv_and_threads(x, w, b):
    y = convfast.conv2d(x, w, b, padding=1)
    return y, _core.last_call_threads()


@needs_two_cores
def test_call_waits_while_every_core_is_held():
    """With every token held (as if other calls ran on every core) a call waits, its GIL released,
    instead of adding a thread; once they are given back it runs with all of them and computes the
    same bits."""
    convfast.set_num_threads(CORES)
    _core.set_min_work_per_thread(0)
    x, w, b = _operands()
    free = convfast.conv2d(x, w, b, padding=1)
    assert _core.last_call_threads() == CORES
    assert _core.threads_in_flight() == 0
    _core.hold_threads(CORES)
    try:
        t, box = _start(_conv_and_threads, x, w, b)
        t.join(0.2)
        assert t.is_alive() and not box, "the call ran while every core was held"
        # the waiting call holds no token, and this thread keeps running (the GIL is free)
        assert _core.threads_in_flight() == CORES
    finally:
        _core.hold_threads(-CORES)
    t.join(60)
    assert not t.is_alive()
    y, threads = box[0]
    assert threads == CORES
    assert y.tobytes() == free.tobytes()
    assert_close(y, reference.conv2d(x, w, b, padding=1), dtype=np.float32, reduction_size=16 * 9)
    assert _core.threads_in_flight() == 0


@needs_two_cores
def test_calls_take_only_the_cores_other_calls_leave():
    """With some cores held a call runs at once with the rest (it does not wait for more): the
    forward and transposed convolutions, both gradients and pad, whose entries nest guards (none of
    the inner ones may wait for the token the outer one holds)."""
    convfast.set_num_threads(CORES)
    _core.set_min_work_per_thread(0)
    x, w, b = _operands(c=16, size=40, seed=1)
    gy = np.cos(np.arange(x.size, dtype=np.float32)).reshape(x.shape)
    a = np.random.default_rng(2).standard_normal((40, 60, 50)).astype(np.float32)  # a threaded pad

    def workload():
        out = {}
        out["forward"] = convfast.conv2d(x, w, b, padding=1).tobytes()
        out["transposed"] = convfast.conv_transpose2d(x, w, b, padding=1).tobytes()
        gx, gw, gb = convfast.conv2d_backward(gy, x, w, b, padding=1)
        out["backward"] = gx.tobytes() + gw.tobytes() + gb.tobytes()
        out["pad"] = convfast.pad(a, ((3, 4), (20, 70), (9, 1)), mode="reflect").tobytes()
        return out, _core.last_call_threads()

    free, threads = workload()
    assert threads == CORES
    _core.hold_threads(CORES - 1)  # one core left
    try:
        t, box = _start(workload)
        t.join(60)
        hung = t.is_alive()
        in_flight = _core.threads_in_flight()
    finally:
        _core.hold_threads(-(CORES - 1))
    t.join(60)
    assert not hung, "a call waited for a token with one free"
    assert in_flight == CORES - 1  # its token was given back
    busy, threads = box[0]
    assert threads == 1
    assert busy == free
    assert _core.threads_in_flight() == 0


@needs_two_cores
def test_waiting_calls_are_served_in_arrival_order():
    """Calls queued while every core is held are served in the order they came (none is overtaken
    indefinitely): with one core given back they run one after another, in order, each on it.
    (Calls of tens of milliseconds, so that a thread slow to record its turn is not overtaken.)"""
    convfast.set_num_threads(CORES)
    _core.set_min_work_per_thread(0)
    x, w, b = _operands(c=64, size=96, dtype=np.float64, seed=5)
    expected = convfast.conv2d(x, w, b, padding=1).tobytes()
    order, lock = [], threading.Lock()

    def call(i):
        y, threads = _conv_and_threads(x, w, b)
        with lock:
            order.append(i)
        return y.tobytes(), threads

    _core.hold_threads(CORES)
    held, started = CORES, []
    try:
        for i in range(4):
            started.append(_start(call, i))
            time.sleep(0.1)  # queued in this order
        assert all(t.is_alive() for t, _ in started)
        _core.hold_threads(-1)  # one core: the calls pass it on in turn
        held -= 1
        for t, _ in started:
            t.join(60)
            assert not t.is_alive()
    finally:
        _core.hold_threads(-held)
    assert order == [0, 1, 2, 3]
    for _, box in started:
        assert box[0] == (expected, 1)
    assert _core.threads_in_flight() == 0


@needs_two_cores
def test_waiting_calls_share_the_cores_given_back():
    """Cores given back while several calls wait go one to each of the first ones (so that calls run
    side by side rather than one after another on every core), and a call waiting alone gets all."""
    convfast.set_num_threads(CORES)
    _core.set_min_work_per_thread(0)
    x, w, b = _operands(c=32, size=40, seed=5)
    expected = convfast.conv2d(x, w, b, padding=1).tobytes()
    for waiting in (1, 2):
        _core.hold_threads(CORES)
        try:
            started = [_start(_conv_and_threads, x, w, b) for _ in range(waiting)]
            time.sleep(0.2)
            assert all(t.is_alive() for t, _ in started)
        finally:
            _core.hold_threads(-CORES)
        for t, box in started:
            t.join(60)
            assert not t.is_alive()
            y, threads = box[0]
            assert y.tobytes() == expected
            assert threads == (CORES if waiting == 1 else max(1, CORES - 1) if box is started[0][1] else 1)
    assert _core.threads_in_flight() == 0


@needs_two_cores
def test_tokens_given_back_when_a_call_raises():
    """An error raised by the engine while the call holds its tokens gives them back."""
    convfast.set_num_threads(CORES)
    _core.set_min_work_per_thread(0)
    x5 = np.zeros((1, 4, 1, 8, 8), np.float32)
    w6 = np.zeros((1, 4, 4, 1, 3, 3), np.float32)
    y5 = np.zeros((1, 4, 1, 6, 6), np.float32)
    for _ in range(3):
        with pytest.raises(ValueError, match="stride"):  # checked inside run_convolution's guard
            _core.conv(x5, w6, None, y5, 0, (1, 0, 1), (1, 1, 1), (0, 0, 0), 0)
        assert _core.threads_in_flight() == 0
    x, w, b = _operands()
    t, box = _start(_conv_and_threads, x, w, b)
    t.join(60)
    assert not t.is_alive() and box[0][1] == CORES


@needs_two_cores
@pytest.mark.parametrize("algo, groups, dtype", [("winograd", 1, np.float32), ("winograd", 1, np.float64),
                                                 ("gemm", 1, np.float32), ("direct", 1, np.float64),
                                                 ("lanes", 16, np.float32)])
def test_plan_made_under_contention_executes_with_more_threads(algo, groups, dtype, monkeypatch):
    """A layer's plan made while all cores but one were held (one thread) and executed with all of them."""
    monkeypatch.setenv("CONVFAST_ALGO", algo)
    convfast.set_num_threads(2)
    _core.set_min_work_per_thread(0)
    x, w, b = _operands(c=16, size=30, groups=groups, dtype=dtype, seed=3)
    layer = convfast.Conv2d.from_weights(w, b, padding=1, groups=groups)
    _core.hold_threads(CORES - 1)  # one core left
    try:
        first = layer(x)  # plans (one thread) and executes
        assert _core.last_call_threads() == 1
    finally:
        _core.hold_threads(-(CORES - 1))
    for _ in range(3):
        again = layer(x)
        assert _core.last_call_threads() == 2
        assert again.tobytes() == first.tobytes()
    expected_algo = {"winograd": "winograd", "gemm": "gemm", "direct": "direct", "lanes": "channel_lanes"}[algo]
    convfast.conv2d(x, w, b, padding=1, groups=groups)
    assert expected_algo in _core.last_algorithm()
    assert convfast.conv2d(x, w, b, padding=1, groups=groups).tobytes() == first.tobytes()
    assert_close(first, reference.conv2d(x, w, b, padding=1, groups=groups), dtype=dtype,
                 reduction_size=9 * 16 // groups)


@needs_two_cores
def test_python_threads_share_the_cores():
    """Four Python threads calling at once: results identical to serial ones, the cores held never
    exceed the cores (a call waits for a free one), and all are given back."""
    convfast.set_num_threads(CORES)
    _core.set_min_work_per_thread(0)
    jobs = [_operands(c=32, size=40, seed=s) for s in range(4)]
    serial = [convfast.conv2d(x, w, b, padding=1).tobytes() for x, w, b in jobs]
    peak, stop = [0], threading.Event()

    def monitor():
        while not stop.is_set():
            peak[0] = max(peak[0], _core.threads_in_flight())

    counts = []

    def run(i):
        x, w, b = jobs[i % 4]
        y = convfast.conv2d(x, w, b, padding=1).tobytes()
        counts.append(_core.last_call_threads())
        return y

    t = threading.Thread(target=monitor)
    t.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(run, range(40)))
    finally:
        stop.set()
        t.join()
    assert all(r == serial[i % 4] for i, r in enumerate(results))
    assert peak[0] <= CORES
    assert set(counts) <= set(range(1, CORES + 1))
    assert _core.threads_in_flight() == 0


def _gomp():
    name = ctypes.util.find_library("gomp") or "libgomp.so.1"
    try:
        lib = ctypes.CDLL(name)
        lib.GOMP_parallel
    except (OSError, AttributeError):
        pytest.skip("libgomp not found")
    return lib


@pytest.mark.parametrize("held", [0, CORES])
def test_call_from_inside_an_openmp_region_runs_serially(held):
    """convfast called from each thread of a user's OpenMP parallel region (GOMP_parallel through
    ctypes, the runtime convfast itself uses) runs on one thread and computes the same bits. It
    takes no token, so it does not wait even when other calls hold every core."""
    lib = _gomp()
    convfast.set_num_threads(2)
    _core.set_min_work_per_thread(0)
    x, w, b = _operands(c=16, size=30, seed=4)
    expected = convfast.conv2d(x, w, b, padding=1).tobytes()
    seen, lock = [], threading.Lock()
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

    def body(_):
        try:
            y = convfast.conv2d(x, w, b, padding=1)
            item = (lib.omp_in_parallel(), lib.omp_get_thread_num(), _core.last_call_threads(), y.tobytes())
        except BaseException as e:  # noqa: BLE001 - reported below, never raised through C
            item = e
        with lock:
            seen.append(item)

    callback = callback_type(body)
    _core.hold_threads(held)
    try:
        t, _ = _start(lib.GOMP_parallel, callback, None, 2, 0)
        t.join(60)
        hung = t.is_alive()
    finally:
        _core.hold_threads(-held)
    t.join(60)
    assert not hung, "a call inside the parallel region waited for a token"
    assert len(seen) == 2, seen
    for item in seen:
        assert not isinstance(item, BaseException), item
        in_parallel, _, threads, y = item
        assert in_parallel == 1 and threads == 1 and y == expected
    assert _core.threads_in_flight() == 0


# ------------------------------------------------------------------------------------------------
# OpenMP's own setting and threadpoolctl
# ------------------------------------------------------------------------------------------------
@needs_two_cores
def test_threadpoolctl_limits_take_effect():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    _core.set_min_work_per_thread(0)
    x, w, b = _operands()
    expected = convfast.conv2d(x, w, b, padding=1).tobytes()
    for explicit in (False, True):
        if explicit:
            convfast.set_num_threads(2)  # an explicit setting made before the limit
        convfast.conv2d(x, w, b, padding=1)
        assert _core.last_call_threads() == 2 or not explicit
        before = _core.last_call_threads()
        with threadpoolctl.threadpool_limits(1):
            assert convfast.get_num_threads() == 1
            assert convfast.conv2d(x, w, b, padding=1).tobytes() == expected
            assert _core.last_call_threads() == 1
        assert convfast.conv2d(x, w, b, padding=1).tobytes() == expected
        assert _core.last_call_threads() == before
    with threadpoolctl.threadpool_limits(user_api="openmp", limits=1):
        convfast.conv2d(x, w, b, padding=1)
        assert _core.last_call_threads() == 1
    # threadpoolctl sees the runtime convfast uses
    assert any(info["user_api"] == "openmp" for info in threadpoolctl.threadpool_info())


# ------------------------------------------------------------------------------------------------
# fork
# ------------------------------------------------------------------------------------------------
ALGOS = ["winograd", "gemm", "direct", "lanes", ""]


def _fork_workload(algo):
    """Forward, transposed, both gradients: {name: (bytes, algorithm)}."""
    rng = np.random.default_rng(7)
    groups = 16 if algo == "lanes" else 1
    x = rng.standard_normal((2, 16, 26, 26)).astype(np.float32)
    w = rng.standard_normal((16, 16 // groups, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    out = {}
    y = convfast.conv2d(x, w, b, padding=1, groups=groups)
    out["forward"] = (y.tobytes(), _core.last_algorithm())
    yt = convfast.conv_transpose2d(x, w, b, padding=1, groups=groups)
    out["transposed"] = (yt.tobytes(), _core.last_algorithm())
    gx, gw, gb = convfast.conv2d_backward(np.cos(y), x, w, b, padding=1, groups=groups)
    out["grad_weight"] = (gw.tobytes(), _core.last_algorithm())
    out["grad_input"] = (gx.tobytes(), "")
    out["threads"] = (_core.last_call_threads(), _core.serial_after_fork())
    return out


def _fork_child(fn, args, conn):
    try:
        conn.send(fn(*args))
    except BaseException as e:  # noqa: BLE001
        conn.send(repr(e))
    conn.close()


def _in_forked_child(fn, *args, held=0):
    """fn(*args) in a child forked (with `held` tokens held in the parent meanwhile): (its result,
    or None if it hung; the child's exit code)."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    _core.hold_threads(held)
    try:
        child = ctx.Process(target=_fork_child, args=(fn, args, send))
        child.start()
    finally:
        _core.hold_threads(-held)
    send.close()
    got = receive.recv() if receive.poll(60) else None
    child.join(10)
    if child.is_alive():
        child.kill()
        child.join()
    return got, child.exitcode


@needs_two_cores
@pytest.mark.parametrize("algo", ALGOS)
def test_fork_after_threaded_calls_computes_correctly(algo, monkeypatch):
    if algo:
        monkeypatch.setenv("CONVFAST_ALGO", algo)
    else:
        monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    convfast.set_num_threads(2)
    _core.set_min_work_per_thread(0)
    parent = _fork_workload(algo)
    assert parent["threads"] == (2, False)  # the parent's libgomp pool is running
    expected_algo = {"winograd": "winograd", "gemm": "gemm", "direct": "direct", "lanes": "channel_lanes"}.get(algo)
    if expected_algo:
        assert expected_algo in parent["forward"][1], parent["forward"][1]
    got, exitcode = _in_forked_child(_fork_workload, algo)
    assert got is not None, "the forked child hung"
    assert isinstance(got, dict), got
    assert got["threads"] == (1, True)  # serial in the child
    for name in ("forward", "transposed", "grad_weight", "grad_input"):
        assert got[name][0] == parent[name][0], f"{name} differs in the child"
        assert got[name][1].split(" threads=")[0] == parent[name][1].split(" threads=")[0]
    assert exitcode == 0


def _tokens_and_conv():
    before = _core.threads_in_flight()
    y = convfast.conv2d(*_operands(seed=6), padding=1)
    return before, y.tobytes(), _core.threads_in_flight()


@needs_two_cores
def test_fork_while_cores_are_held_starts_with_every_token_free():
    """The calls that held cores in the parent are not in a forked child: it starts with every
    token free, and its calls neither wait nor differ."""
    convfast.set_num_threads(2)
    _core.set_min_work_per_thread(0)
    expected = convfast.conv2d(*_operands(seed=6), padding=1).tobytes()
    # as if calls in flight on other threads held every core
    got, exitcode = _in_forked_child(_tokens_and_conv, held=CORES)
    assert got is not None, "the forked child hung"
    assert got == (0, expected, 0)
    assert exitcode == 0
    assert _core.threads_in_flight() == 0


def test_fork_before_any_threaded_call_keeps_threads():
    """A child forked before convfast ran threads (libgomp's pool not started) may still use them."""
    code = textwrap.dedent("""
        import multiprocessing, numpy as np, convfast
        from convfast import _core
        convfast.set_num_threads(2); _core.set_min_work_per_thread(0)
        x = np.random.default_rng(0).standard_normal((1, 16, 24, 24)).astype(np.float32)
        w = np.random.default_rng(1).standard_normal((16, 16, 3, 3)).astype(np.float32)
        def child(conn):
            y = convfast.conv2d(x, w, padding=1)
            conn.send((y.tobytes(), _core.last_call_threads(), _core.serial_after_fork()))
        if __name__ == "__main__":
            ctx = multiprocessing.get_context("fork")
            r, s = ctx.Pipe(duplex=False)
            p = ctx.Process(target=child, args=(s,)); p.start()
            got = r.recv() if r.poll(60) else None
            p.join(10)
            assert got is not None, "hung"
            y = convfast.conv2d(x, w, padding=1)
            assert got[0] == y.tobytes(), "differs"
            print(got[1], got[2])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(min(2, CORES)), "False"]


# ------------------------------------------------------------------------------------------------
# the wait policy set while the OpenMP runtime loads
# ------------------------------------------------------------------------------------------------
_ENV_PROBE = textwrap.dedent("""
    import os, sys
    seen = []
    class Probe:  # records the environment at the moment convfast._core is imported
        def find_spec(self, name, path=None, target=None):
            if name == "convfast._core":
                seen.append((os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY")))
            return None
    sys.meta_path.insert(0, Probe())
    import convfast
    print(repr((seen, os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"))))
""")


@pytest.mark.parametrize("user_env, at_load, after", [
    ({}, ("1000", None), (None, None)),                                   # set while loading, then removed
    ({"GOMP_SPINCOUNT": "5"}, ("5", None), ("5", None)),                  # the user's own value kept
    ({"OMP_WAIT_POLICY": "active"}, (None, "active"), (None, "active")),  # a policy: no spin count added
])
def test_wait_policy_set_only_while_openmp_loads(user_env, at_load, after):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(user_env)
    out = subprocess.run([sys.executable, "-c", _ENV_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen, spin, policy = eval(out.stdout.strip().splitlines()[-1])
    assert seen == [at_load]
    assert (spin, policy) == after


# ------------------------------------------------------------------------------------------------
# batch 1: the work is split over pixels when there are few images
# ------------------------------------------------------------------------------------------------
@needs_two_cores
@pytest.mark.parametrize("channels, size, stride, dtype", [(128, 28, 2, np.float32), (256, 14, 2, np.float64),
                                                           (64, 9, 1, np.float32)])
def test_batch_one_small_maps_use_every_thread(channels, size, stride, dtype, monkeypatch):
    """A 3x3 stride-2 layer on a 14x14 output was one GEMM item: now every thread gets items, with
    the same bits as one thread."""
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, channels, size, size)).astype(dtype)
    w = rng.standard_normal((channels, channels, 3, 3)).astype(dtype)
    b = rng.standard_normal(channels).astype(dtype)
    convfast.set_num_threads(1)
    one = convfast.conv2d(x, w, b, stride=stride, padding=1)
    convfast.set_num_threads(2)
    _core.set_min_work_per_thread(0)
    two = convfast.conv2d(x, w, b, stride=stride, padding=1)
    assert "gather_gemm" in _core.last_algorithm() and "threads=2" in _core.last_algorithm()
    assert two.tobytes() == one.tobytes()
    assert_close(two, reference.conv2d(x, w, b, stride=stride, padding=1), dtype=dtype, reduction_size=9 * channels)
