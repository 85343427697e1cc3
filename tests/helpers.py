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



class AdamWErrorBound:
    """An elementwise bound on how far fp32 AdamW weights may drift from the exact (float64) trajectory.

    Derivation. Each step's fp32 gradient differs from the exact one by at most ``delta_t = gamma *
    max|g_t|`` per element (summation order; callers check this assumption at every step, so it is not
    taken on trust). AdamW's update is ``u = m/(sqrt(v) + eps)`` after bias correction, where m and v are
    weighted means of past gradients and squared gradients with weights a_k and b_k. With D the largest
    delta so far:
      * |dm| <= D (the a_k sum to 1) and |d sqrt(v)| <= D (sqrt(v) is a weighted l2 norm);
      * |m| <= K sqrt(v) with K = sqrt(sum a_k^2 / b_k) (Cauchy-Schwarz), so |u| <= K and two updates
        differ by at most 2K;
      * so |du| <= min(2K, (1 + K) D / (max(sqrt(v) - D, 0) + eps)), with v the exact second moment.
    Weight decay multiplies an existing difference by (1 - lr*wd) <= 1, so the weight error after T steps
    is at most sum_t lr_t |du_t|, plus the fp32 rounding of the weight itself at each step. Where the
    true gradient is at rounding level (sqrt(v) ~ D: a key bias, a unit that no token reached) this is
    up to 2K lr per step, since Adam turns noise into lr-sized steps; where it is well above, the bound is
    a small fraction of lr.
    """

    def __init__(self, lr: float, betas: tuple[float, float], eps: float, gamma: float = 1e-4):
        self.lr, self.betas, self.eps, self.gamma = lr, betas, eps, gamma
        self.steps = 0
        self.D: dict[str, float] = {}
        self.acc: dict[str, np.ndarray] = {}

    def check_grad(self, name: str, got, exact) -> None:
        """The assumption: this step's fp32 gradient is within gamma * max|g| of the exact one."""
        exact = np.asarray(exact, dtype=np.float64)
        atol = scaled_atol(exact, self.gamma)
        assert_close(f"grad {name} at AdamW step {self.steps + 1}", got, exact, rtol=0, atol=atol)
        self.D[name] = max(self.D.get(name, 0.0), atol)

    def add_step(self, exp_avg_sq: dict[str, np.ndarray]) -> None:
        """After step t: ``exp_avg_sq`` is the exact run's (uncorrected) second moment of each tensor."""
        self.steps += 1
        t = self.steps
        b1, b2 = self.betas
        a = np.array([(1 - b1) * b1 ** k for k in range(t)]) / (1 - b1 ** t)
        b = np.array([(1 - b2) * b2 ** k for k in range(t)]) / (1 - b2 ** t)
        K = float(np.sqrt(np.sum(a * a / b)))
        for name, v in exp_avg_sq.items():
            D = self.D[name]
            s = np.sqrt(np.asarray(v, dtype=np.float64) / (1 - b2 ** t))
            du = np.minimum(2 * K, (1 + K) * D / (np.maximum(s - D, 0) + self.eps))
            self.acc[name] = self.acc.get(name, 0.0) + self.lr * du

    def check_weight(self, name: str, got, exact) -> None:
        exact = np.asarray(exact, dtype=np.float64)
        bound = self.acc[name] + 2 * self.steps * 2.0 ** -24 * np.abs(exact)   # + fp32 rounding of each step
        got = np.asarray(got, dtype=np.float64)
        err = np.abs(got - exact)
        if not np.all(err <= bound):
            i = np.unravel_index(int(np.argmax(err - bound)), err.shape)
            raise AssertionError(
                f"weight {name} after {self.steps} AdamW steps: {int(np.sum(~(err <= bound)))} of {err.size} "
                f"elements outside the propagated bound; worst at {tuple(int(x) for x in i)}: got {got[i]!r}, "
                f"exact {exact[i]!r}, |diff| {err[i]:.3g} > bound {bound[i]:.3g}")

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
