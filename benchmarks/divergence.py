"""Time of one exact-divergence evaluation: a loop of vector-Jacobian products against vmap-batched chunks.

The augmented field of ``log_likelihood(divergence="exact")`` (``sdediff.likelihood._divergence_field``:
the score, its vector-Jacobian products, the drift) is evaluated at ``t = 0.3`` of ``VPSDE()`` in
float64 for 64-D inputs. It runs for each batch size (``--batches``), each score (the 64-D test-bed
mixture of ``likelihood.py`` and a ``TimeMLP(dim=64)``, width 128, depth 3) and each ``chunk_size``
(``--chunks``; 1 is the plain loop). Reported: the median over ``--repeats`` timed evaluations after
one warm-up, in ms. Results: ``benchmarks/results/divergence.json``; the table is printed as markdown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import sdediff
from sdediff.likelihood import _divergence_field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from likelihood import make_problem  # noqa: E402
import timing  # noqa: E402
from timing import timed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 200, 800])
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "divergence.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, f64 = torch.device(args.device), torch.float64
    sde = sdediff.VPSDE()
    torch.manual_seed(0)
    net = sdediff.TimeMLP(dim=64).to(device=device, dtype=f64)
    t = torch.tensor(0.3, dtype=f64, device=device)
    rows = []
    print("| batch | score | " + " | ".join("loop (1)" if c == 1 else f"chunk {c}" for c in args.chunks) + " |")
    print("|---:|---|" + "---:|" * len(args.chunks))
    for batch in args.batches:
        gm, x = make_problem(batch, 0, device)
        state = torch.cat([x, torch.zeros(batch, 1, dtype=f64, device=device)], 1)
        for name, score in (("mixture", gm.score_fn(sde)), ("MLP", lambda y, s: net(y, s))):
            ms = []
            for chunk in args.chunks:
                field = _divergence_field(sde, score, x.shape, "exact", None, chunk)
                timed(lambda: field(state, t), device)
                ms.append(1e3 * statistics.median(timed(lambda: field(state, t), device)[0]
                                                  for _ in range(args.repeats)))
                rows.append({"batch": batch, "score": name, "chunk_size": chunk, "ms": ms[-1]})
            print(f"| {batch} | {name} | " + " | ".join(f"{v:.1f} ms" for v in ms) + " |", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "t": 0.3, "sde": "VPSDE()", "dtype": "float64", "dim": 64}
    timing.write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
