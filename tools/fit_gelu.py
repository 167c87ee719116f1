"""Fit the rational function of the CPU kernels' GELU (models/csrc/cpu_kernels.h).

    python tools/fit_gelu.py    (about 7 minutes on 2 cores: 30 starts)

GELU(x) = x Phi(x), and Phi(x) - 1/2 = x P(x^2) / Q(x^2) on |x| <= 5.75 with P of degree 6 and Q of
degree 4 (Q(0) = 1, coefficients >= 0 so that Q >= 1 has no pole).  Least squares on the error,
then on its 4th, 8th and 16th powers, which pushes it towards the smallest maximum.  Prints the
coefficients (highest degree first, as the kernel's Horner steps use them) and the maximum errors of
Phi in float64 and evaluated in float32.
"""
import numpy as np
from scipy.optimize import least_squares
from scipy.special import ndtr

LIMIT, P_TERMS, Q_TERMS = 5.75, 7, 5


def phi_minus_half(c: np.ndarray, x: np.ndarray, dtype=np.float64) -> np.ndarray:
    p, q = c[:P_TERMS].astype(dtype), np.concatenate([[1.0], c[P_TERMS:]]).astype(dtype)
    x = x.astype(dtype)
    u = x * x
    return x * np.polyval(p[::-1], u) / np.polyval(q[::-1], u)


def main() -> None:
    x = np.linspace(0.0, LIMIT, 6000)
    target = ndtr(x) - 0.5
    lower = np.concatenate([np.full(P_TERMS, -np.inf), np.zeros(Q_TERMS - 1)])
    best = None
    for seed in range(30):  # a few starts: the fit has local minima
        rng = np.random.default_rng(seed)
        start = np.concatenate([[0.3989], rng.uniform(0, 0.1, P_TERMS - 1) * 10.0 ** -np.arange(1, P_TERMS),
                                rng.uniform(0, 0.2, Q_TERMS - 1) * 10.0 ** -np.arange(0, Q_TERMS - 1)])
        c = least_squares(lambda c: phi_minus_half(c, x) - target, start, bounds=(lower, np.inf), x_scale="jac").x
        for power in (4, 8, 16):
            c = least_squares(lambda c: np.abs(phi_minus_half(c, x) - target) ** (power / 2) * 1e3, c,
                              bounds=(lower, np.inf), x_scale="jac").x
        error = np.abs(phi_minus_half(c, x) - target).max()
        if best is None or error < best[0]:
            best = (error, c)
    error, c = best
    grid = np.linspace(0.0, LIMIT, 2_000_001)
    error32 = np.abs(phi_minus_half(c, grid, np.float32) - (ndtr(grid) - 0.5)).max()
    print("P, highest degree first:", ", ".join(f"{v:.7e}" for v in np.float32(c[:P_TERMS][::-1])))
    q = np.concatenate([[1.0], c[P_TERMS:]])
    print("Q, highest degree first:", ", ".join(f"{v:.7e}" for v in np.float32(q[::-1])))
    print(f"max error of Phi: {error:.2e} (float64), {error32:.2e} (float32)")


if __name__ == "__main__":
    main()
