"""Comparison helpers: every check states its tolerance and prints the worst element when it fails."""
from __future__ import annotations

import numpy as np


def assert_close(name: str, got, want, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Elementwise |got - want| <= atol + rtol * |want|; on failure report the worst element."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    err = np.abs(got - want)
    bound = atol + rtol * np.abs(want)
    if not np.all(err <= bound) or not np.all(np.isfinite(got)):
        excess = np.where(np.isfinite(got), err - bound, np.inf)
        i = np.unravel_index(int(np.argmax(excess)), got.shape)
        raise AssertionError(
            f"{name}: {int(np.sum(~(err <= bound)))} of {got.size} elements outside atol={atol:g} rtol={rtol:g}; "
            f"worst at {tuple(int(x) for x in i)}: got {got[i]!r}, want {want[i]!r}, |diff| {err[i]:.3g} "
            f"(max |diff| {err.max():.3g}, max |want| {np.abs(want).max():.3g})")


def scaled_atol(want, rel: float) -> float:
    """An absolute tolerance relative to the reference's largest magnitude (for sums of many terms)."""
    return rel * max(float(np.abs(np.asarray(want)).max()), 1e-30)


# ---- calling compiled kernels through ctypes (tests/test_ops*.py) ---------------------------------------

import ctypes  # noqa: E402


def P(a: np.ndarray | None):
    """A numpy array as a C pointer (None: NULL)."""
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def I(v: int):  # noqa: E743 - reads like the C type
    return ctypes.c_int(v)


def Z(v: int):
    return ctypes.c_size_t(v)


def Fl(v: float):
    return ctypes.c_float(v)


def f32(t) -> np.ndarray:
    """A torch tensor as a contiguous float32 numpy array."""
    return np.ascontiguousarray(t.detach().numpy().astype(np.float32))


def start_grad(shape, rng) -> np.ndarray:
    """A gradient buffer that already holds something, to check that backward accumulates."""
    return rng.standard_normal(shape).astype(np.float32)


def check_grad(name, buf, start, ref_grad, rel=1e-5):
    """buf == start + autograd's gradient, with an absolute tolerance of rel x the largest value."""
    want = start.astype(np.float64) + ref_grad.detach().numpy().astype(np.float64)
    assert_close(name, buf, want, rtol=1e-5, atol=scaled_atol(want, rel))
