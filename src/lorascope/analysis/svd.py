"""SVD primitives shared by the spectrum, intruder and truncation analyses: decompositions and spectrum statistics.

    s = singular_values(w)                 # descending, fp32 (LAPACK, or the fp64 Gram path for large matrices)
    u, s, vh = thin_svd(w)                 # full thin SVD, under lapack_threads()
    rank_at_energy(s, 0.9)                 # smallest k holding 90% of sum(s^2)

SVD path, decided by size: matrices whose smaller side is <= ``EXACT_MAX`` (2048) use LAPACK
(torch.linalg.svd / svdvals, fp32). Larger ones use the eigen-decomposition of the smaller Gram matrix in
fp64 ("gram"): s_i^2 = eig(W W^T). Its absolute error on s_i^2 is ~1e-16 * n * s_1^2, so every energy
statistic is exact to ~1e-10 and only singular values below ~1e-6 * s_1 lose relative accuracy.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from ..errors import LorascopeError

EXACT_MAX = 2048
EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------------------
# decompositions


@contextmanager
def lapack_threads():
    """Run decompositions with LORASCOPE_SVD_THREADS threads (default 1).

    Why: LAPACK's SVD/eigh gain little from threads at these sizes, and with busy cores OpenMP spin-waiting
    makes them pathological: measured on 2 shared cores, svdvals of a 1000x1000 matrix took 18.7 s with 2
    threads and 0.2 s with 1. Threads are restored afterwards.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LORASCOPE_SVD_THREADS", "1")))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def svd_method(shape: tuple[int, ...], method: str = "auto") -> str:
    if method not in ("auto", "exact", "gram"):
        raise LorascopeError(f"svd method must be auto, exact or gram (got {method!r})")
    return ("exact" if min(shape) <= EXACT_MAX else "gram") if method == "auto" else method


def _gram_eigh(w: torch.Tensor, vectors: bool):
    w64 = w.double()
    wide = w.shape[0] <= w.shape[1]
    g = w64 @ w64.T if wide else w64.T @ w64
    if not vectors:
        return torch.linalg.eigvalsh(g).flip(0).clamp_min(0).sqrt(), None, wide
    ev, vec = torch.linalg.eigh(g)
    return ev.flip(0).clamp_min(0).sqrt(), vec.flip(1), wide


def singular_values(w: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """All min(m, n) singular values, descending, fp32."""
    with lapack_threads():
        if svd_method(tuple(w.shape), method) == "exact":
            # LAPACK via torch is ~2x faster on tall than on wide inputs (576x1536: 0.066 s vs 0.164 s)
            return torch.linalg.svdvals(w.float().T if w.shape[0] < w.shape[1] else w.float())
        return _gram_eigh(w, vectors=False)[0].float()


def thin_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, s, Vh) of torch.linalg.svd(full_matrices=False), fp32, under lapack_threads."""
    with lapack_threads():
        if w.shape[0] < w.shape[1]:  # decompose the tall transpose (faster, see singular_values)
            u, s, vh = torch.linalg.svd(w.float().T, full_matrices=False)
            return vh.T, s, u.T
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        return u, s, vh


def left_svd(w: torch.Tensor, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(U [m, min(m,n)] orthonormal columns, s descending) of w."""
    if svd_method(tuple(w.shape), method) == "exact":
        u, s, _ = thin_svd(w)
        return u, s
    with lapack_threads():
        s, vec, wide = _gram_eigh(w, vectors=True)
    if wide:
        return vec.float(), s.float()
    # tall: vec holds V; U = W V / s, then re-orthonormalise (tiny s make the division noisy)
    with lapack_threads():
        u = torch.linalg.qr((w.double() @ vec) / s.clamp_min(s[0] * 1e-12)).Q
    return u.float(), s.float()


# ---------------------------------------------------------------------------------------------------------
# statistics of one spectrum (s: descending singular values)


def rank_at_energy(s: torch.Tensor, energy: float = 0.9) -> int:
    """Smallest k with cumsum(s^2)[k-1] >= energy * sum(s^2); 0 for a zero matrix."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0
    # tiny slack so an exact 90% split (e.g. planted spectra) is not lost to rounding
    return (
        int(torch.searchsorted(torch.cumsum(e, 0) / total, torch.tensor([energy * (1 - 1e-12)], dtype=torch.float64)))
        + 1
    )


def stable_rank(s: torch.Tensor) -> float:
    s = s.double()
    return 0.0 if float(s[0]) == 0.0 else float((s**2).sum() / s[0] ** 2)


def effective_rank(s: torch.Tensor) -> float:
    """exp(H(p)), p = s / sum(s) (Roy & Vetterli 2007): n for a flat spectrum, 1 for rank one."""
    s = s.double()
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(s: torch.Tensor, shape: tuple[int, ...], floor: float = 0.0) -> int:
    """Count of s_i > max(max(m, n) * eps32 * s_1, floor) (numpy.linalg.matrix_rank's default tolerance)."""
    if float(s[0]) == 0.0:
        return 0
    tol = max(max(shape) * EPS32 * float(s[0]), floor)
    return int((s > tol).sum())


def spectrum_stats(s: torch.Tensor, shape: tuple[int, ...], energy: float, floor: float = 0.0) -> dict:
    return {
        "rank_at_energy": rank_at_energy(s, energy),
        "stable_rank": round(stable_rank(s), 3),
        "effective_rank": round(effective_rank(s), 3),
        "numerical_rank": numerical_rank(s, shape, floor),
    }
