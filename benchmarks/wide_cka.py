"""Streaming CKA on wide layers: SimilarityAccumulator (exact linear CKA from d x d float64
moments) vs MinibatchCKA (Nguyen et al. 2021's minibatch estimator, b x b Gram matrices), on two
layers of width ``--width`` over ``--n`` rows in batches of ``--batch``, side by side in one run.
One torch thread.

    .venv/bin/python benchmarks/wide_cka.py [--width 4096] [--n 2000] [--batch 200]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from netprobe.metrics import MinibatchCKA, SimilarityAccumulator  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d, n, b = args.width, args.n, args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x + 0.5 * torch.randn(n, d, generator=g)
    print(f"wide_cka: torch {torch.__version__}, threads = {torch.get_num_threads()}; width {d}, n {n}, batches of {b}")
    for name, make, mem in (("SimilarityAccumulator (exact, d x d moments)", SimilarityAccumulator, 3 * d * d * 8),
                            ("MinibatchCKA (b x b Grams per batch)", MinibatchCKA, 2 * b * b * 8)):
        t0 = time.perf_counter()
        acc = make()
        for i in range(0, n, b):
            acc.update(x[i:i + b], y[i:i + b])
        v = acc.linear_cka() if isinstance(acc, SimilarityAccumulator) else acc.compute()
        print(f"  {name:<46} {time.perf_counter() - t0:8.2f} s   value {float(v):.4f}   state ~{mem / 2**20:8.1f} MiB")
    print("  (the two estimate different quantities: exact biased linear CKA vs the minibatch debiased estimate)")


if __name__ == "__main__":
    main()
