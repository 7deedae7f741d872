"""Shared test helpers: tolerances, hypothesis profiles, the optional PyTorch oracle."""
import itertools
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Hypothesis profiles: "ci" (bounded, CI=true), "dev" (default) and "long" (HYPOTHESIS_PROFILE=long,
# thousands of examples, for local runs).
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except Exception:  # pragma: no cover - torch is optional outside CI
    HAVE_TORCH = False

requires_torch = pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch not installed")


def tolerance(dtype, reduction_size=1):
    """Documented error bound of convfast against the float64 reference: relative to the largest
    |term| sum, float32 results are within ~ sqrt(K) * 2**-23 * a small factor; float64 within 1e-12."""
    if np.dtype(dtype) == np.float64:
        return 1e-12
    return 2e-6 * max(1.0, np.sqrt(reduction_size))


def assert_close(actual, expected, dtype=None, reduction_size=1):
    """Compare scaled by the magnitude of the expected result (a conv output's natural scale)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    dtype = dtype or actual.dtype
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max(initial=0.0))
    assert err <= tolerance(dtype, reduction_size) * scale, f"max abs error {err} > {tolerance(dtype, reduction_size) * scale}"


def assert_torch_close(actual, expected, dtype, reduction_size=1):
    """Within twice convfast's documented bound (the oracle, PyTorch or NumPy, carries its own
    rounding), relative to the expected result's scale; dtype must match exactly."""
    expected = expected.detach().numpy() if hasattr(expected, "detach") else np.asarray(expected)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == np.dtype(dtype), (actual.dtype, dtype)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max(initial=0.0))
    bound = 2 * tolerance(dtype, reduction_size) * scale
    assert err <= bound, f"max abs error {err} > {bound}"


def conv_operands(rng, batch, cin, cout, spatial, kernel, groups=1, dtype="float32"):
    """Standard-normal (x, weight, bias) of a convolution layer, in dtype."""
    x = rng.standard_normal((batch, cin) + tuple(spatial)).astype(dtype)
    w = rng.standard_normal((cout, cin // groups) + tuple(kernel)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    return x, w, b


NP_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap",
               "symmetric": "symmetric"}


def weight_grad_oracle(x, gy, kernel, pads, mode="zeros", groups=1, stride=None, dilation=None, dtype=np.float64):
    """The weight gradient from its definition, independent of convfast: gw[cb, ca, t] =
    sum_{n, o} gy[n, cb, o] * xpad[n, G(cb) * Ca_g + ca, o * stride + t * dilation], with xpad = x
    padded by the (before, after) pairs ``pads`` in ``mode``; computed in ``dtype``."""
    rank = len(kernel)
    stride = stride or (1,) * rank
    dilation = dilation or (1,) * rank
    xp = np.pad(x.astype(dtype), ((0, 0), (0, 0)) + tuple(tuple(p) for p in pads), mode=NP_PAD_MODE[mode])
    gy = gy.astype(dtype)
    n, ca_g, cb_g = x.shape[0], x.shape[1] // groups, gy.shape[1] // groups
    out_spatial = gy.shape[2:]
    gw = np.empty((gy.shape[1], ca_g) + tuple(kernel), dtype)
    for tap in itertools.product(*(range(k) for k in kernel)):
        window = xp[(slice(None), slice(None)) + tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                                                       for t, d, o, s in zip(tap, dilation, out_spatial, stride))]
        for g in range(groups):
            a = window[:, g * ca_g:(g + 1) * ca_g].reshape(n, ca_g, -1)
            b = gy[:, g * cb_g:(g + 1) * cb_g].reshape(n, cb_g, -1)
            gw[(slice(g * cb_g, (g + 1) * cb_g), slice(None)) + tap] = np.einsum("nbk,nak->ba", b, a)
    return gw
