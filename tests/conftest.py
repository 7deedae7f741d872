"""Shared test helpers: tolerances, hypothesis profiles, the optional PyTorch oracle."""
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
