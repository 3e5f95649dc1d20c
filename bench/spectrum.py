"""Benchmark: singular values of every adapted matrix of the embedded model (SmolLM2-135M: 30 layers x 7).

Compares, on the same 210 matrices and the same three spectra per matrix (W_base, W_tuned, dW):
    torch.linalg.svdvals (lorascope's exact path: 1 LAPACK thread, wide matrices transposed; also timed as-is)
    vs numpy.linalg.svd(compute_uv=False)
    and scipy.linalg.svdvals (the peers), all single-threaded so the ratio compares the libraries, not threads.
Then times the whole lorascope analysis (spectra + 2 baselines + intruders) on the same pair.

W_tuned is a synthetic full fine-tune: W_base + Gaussian dW with ||dW||_F = 1e-3 ||W_base||_F per matrix
(the timing does not depend on what dW holds). Run: python bench/spectrum.py [--layers N]
"""

from __future__ import annotations

import os

# Pin the peers' BLAS to one thread before numpy loads (lorascope's own path pins LAPACK via lapack_threads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402

from lorascope.analysis.spectrum import lapack_threads, singular_values, spectrum_of_models  # noqa: E402
from lorascope.analysis.weights import iter_matrices  # noqa: E402
from lorascope.models import load_base  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="only the first N blocks (default: all)")
    args = ap.parse_args()

    t = time.time()
    base, _ = load_base("embedded")
    print(f"loaded embedded base in {time.time() - t:.1f}s")
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in iter_matrices(base, tuned):
            if args.layers is not None and m.layer is not None and m.layer >= args.layers:
                continue
            w = tuned.get_submodule(m.name).weight
            noise = torch.randn(w.shape, generator=g)
            w.add_(noise * (1e-3 * float(w.norm()) / float(noise.norm())))
    mats = [m for m in iter_matrices(base, tuned) if args.layers is None or (m.layer or 0) < args.layers]
    trios = [(m.w_base.contiguous(), m.w_tuned.contiguous(), m.delta.contiguous()) for m in mats]
    shapes = sorted({tuple(x[0].shape) for x in trios})
    print(f"{len(mats)} matrices, shapes {shapes}, 3 spectra each")

    t = time.time()
    with lapack_threads():
        _ = [[torch.linalg.svdvals(w) for w in trio] for trio in trios]
    t_plain = time.time() - t
    t = time.time()
    s_torch = [[singular_values(w) for w in trio] for trio in trios]  # transposes wide matrices
    t_torch = time.time() - t
    np_trios = [[w.numpy() for w in trio] for trio in trios]
    t = time.time()
    s_np = [[np.linalg.svd(w, compute_uv=False) for w in trio] for trio in np_trios]
    t_np = time.time() - t
    t = time.time()
    s_sp = [[scipy.linalg.svdvals(w, check_finite=False) for w in trio] for trio in np_trios]
    t_sp = time.time() - t
    err = max(
        float(np.max(np.abs(a.numpy() - b)) / max(float(b[0]), 1e-30))
        for ta, tb in zip(s_torch, s_np)
        for a, b in zip(ta, tb)
    )
    err_sp = max(
        float(np.max(np.abs(a.numpy() - b)) / max(float(b[0]), 1e-30))
        for ta, tb in zip(s_torch, s_sp)
        for a, b in zip(ta, tb)
    )

    t = time.time()
    s_delta = [singular_values(trio[2]) for trio in trios]  # what "the spectrum of dW" alone costs
    t_delta = time.time() - t
    assert len(s_delta) == len(mats)

    t = time.time()
    records, _ = spectrum_of_models(base, tuned, progress=False)
    t_full = time.time() - t
    # the same analysis with both cores for LAPACK (a standalone `lorascope spectrum`; a study runs it on one)
    os.environ["LORASCOPE_SVD_THREADS"] = "2"
    t = time.time()
    spectrum_of_models(base, tuned, progress=False)
    t_full2 = time.time() - t
    if args.layers is not None:
        records = [r for r in records if (r["layer"] or 0) < args.layers]

    n = 3 * len(mats)
    print(f"\n{n} singular-value computations (W_base, W_tuned, dW of {len(mats)} matrices), 1 thread each:")
    print(
        f"  lorascope singular_values {t_torch:7.2f}s  ({1000 * t_torch / n:.1f} ms each; torch.linalg.svdvals, "
        f"wide matrices transposed)"
    )
    print(
        f"  torch.linalg.svdvals as-is {t_plain:6.2f}s  -> transposing wide inputs is {t_plain / t_torch:.2f}x faster"
    )
    print(f"  numpy.linalg.svd (vals)   {t_np:7.2f}s  -> torch is {t_np / t_torch:.2f}x numpy's speed")
    print(f"  scipy.linalg.svdvals      {t_sp:7.2f}s  -> torch is {t_sp / t_torch:.2f}x scipy's speed")
    print(f"  max |s_torch - s_peer| / s_1: numpy {err:.1e}, scipy {err_sp:.1e}")
    print(f"\nspectrum of dW for every adapted matrix ({len(mats)}), 1 thread: {t_delta:.2f}s")
    print(
        f"full lorascope analysis (thin SVD of base and tuned, dW spectrum, gaussian + base+noise "
        f"baselines, intruders) for {len(mats)} matrices: {t_full:.2f}s on 1 thread, {t_full2:.2f}s on 2 "
        f"({t_full / t_full2:.2f}x)"
    )
    changed = [r for r in records if r["changed"]]
    frac = np.mean([r["rank_fraction_delta"] for r in changed])
    print(
        f"sanity: Gaussian dW needs {frac:.1%} of its spectrum for 90% energy (square Gaussian: ~51%, "
        f"1536x576 more: its singular values are flatter); "
        f"intruders found: {sum(r['intruders'] for r in changed)}"
    )


if __name__ == "__main__":
    main()
