"""Cost of the engine's primitives: 2 compute parties + dealer as OS processes over TLS on loopback.

One JSON object per line and per (op, n):
    op, n, seconds (median of --repeats runs after 2 untimed ones, the slower of alice and bob,
    dealer work included), rounds,
    bytes_per_element (largest compute party, sent + received with the other compute party, per input
    element), dealer_bytes_per_element (dealer <-> compute parties, per input element), max_abs_error
    (against float64 PyTorch), plaintext_seconds (the same op in PyTorch).

    python benchmarks/primitives.py            # n = 1,000 and 100,000
    python benchmarks/primitives.py --quick    # n = 100,000 only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import veil

OPS = ("mul", "relu", "lt", "eq", "max4", "exp", "reciprocal", "sigmoid", "softmax")
WARMUP = 2


def inputs(op: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Public benchmark inputs, the same in every party (generated from a fixed benchmark seed)."""
    g = torch.Generator().manual_seed(1234 + n)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 4
    y = torch.randn(n, generator=g, dtype=torch.float64) * 4
    if op == "eq":
        y = torch.where(torch.rand(n, generator=g) < 0.5, x, y)
    if op == "reciprocal":
        x = torch.rand(n, generator=g, dtype=torch.float64) * 30 + 0.1
    if op == "exp":
        x = torch.rand(n, generator=g, dtype=torch.float64) * 8 - 6
    return x, y


def _max4_shape(n: int) -> tuple[int, int, int, int]:
    return (1, n // 100, 10, 10)


SECURE: dict[str, Callable[[Any, Any], Any]] = {
    "mul": lambda x, y: x * y,
    "relu": lambda x, y: x.relu(),
    "lt": lambda x, y: x < y,
    "eq": lambda x, y: x == y,
    "max4": lambda x, y: x.reshape(*_max4_shape(x.numel())).max_pool2d(2),
    "exp": lambda x, y: x.exp(),
    "reciprocal": lambda x, y: x.reciprocal(),
    "sigmoid": lambda x, y: x.sigmoid(),
    "softmax": lambda x, y: x.reshape(-1, 10).softmax(1),
}
PLAIN: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mul": lambda x, y: x * y,
    "relu": lambda x, y: x.relu(),
    "lt": lambda x, y: (x < y).to(x.dtype),
    "eq": lambda x, y: (x == y).to(x.dtype),
    "max4": lambda x, y: F.max_pool2d(x.reshape(*_max4_shape(x.numel())), 2),
    "exp": lambda x, y: x.exp(),
    "reciprocal": lambda x, y: x.reciprocal(),
    "sigmoid": lambda x, y: x.sigmoid(),
    "softmax": lambda x, y: x.reshape(-1, 10).softmax(1),
}


def _barrier(session: veil.Session) -> None:
    session.transport.send(session.peer, b"\x00")
    session.transport.recv(session.peer)


def program(session: veil.Session, ops: list[str], sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    fp = session.fixed_point
    for n in sizes:
        for op in ops:
            x, y = inputs(op, n)
            # Round to the fixed-point grid so that eq's plaintext reference sees the same values.
            x, y = fp.decode(fp.encode(x), torch.float64), fp.decode(fp.encode(y), torch.float64)
            sx = session.share(x if session.party == "alice" else None, owner="alice")
            sy = session.share(y if session.party == "bob" else None, owner="bob")
            times, traffic = [], []
            for _ in range(WARMUP):  # untimed: first calls grow buffers and the dealer's guesses
                _barrier(session)
                SECURE[op](sx, sy)
            out = None
            for _ in range(repeats):
                _barrier(session)
                with session.measure() as m:
                    t0 = time.perf_counter()
                    out = SECURE[op](sx, sy)
                    times.append(time.perf_counter() - t0)
                traffic.append(m)
            assert out is not None
            got = out.reveal(to="alice")
            plain_times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                ref = PLAIN[op](x, y)
                plain_times.append(time.perf_counter() - t0)
            row = {"op": op, "n": n, "seconds": statistics.median(times), "rounds": traffic[-1]["rounds"],
                   "bytes": traffic[-1]["bytes_with_peer"], "dealer_bytes": traffic[-1]["bytes_with_dealer"],
                   "plaintext_seconds": statistics.median(plain_times)}
            if got is not None:
                row["max_abs_error"] = float((got.double() - ref).abs().max())
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="n = 100,000 only")
    ap.add_argument("--sizes", default=None, help="comma-separated element counts (default 1000,100000)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    sizes = [100_000] if args.quick else [int(s) for s in (args.sizes or "1000,100000").split(",")]
    ops = args.ops.split(",")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        ap.error(f"unknown ops {unknown}; choose from {list(OPS)}")
    bad = [n for n in sizes if n % 100]
    if bad:
        ap.error(f"sizes must be multiples of 100 (max4 pools 10x10 images, softmax rows of 10): {bad}")
    results = veil.launch(program, ops, sizes, args.repeats, timeout=600)
    for a, b in zip(results["alice"], results["bob"]):
        n = a["n"]
        line = {"op": a["op"], "n": n, "seconds": round(max(a["seconds"], b["seconds"]), 6),
                "rounds": a["rounds"],
                "bytes_per_element": round(max(a["bytes"], b["bytes"]) / n, 2),
                "dealer_bytes_per_element": round((a["dealer_bytes"] + b["dealer_bytes"]) / n, 2),
                "max_abs_error": a["max_abs_error"],
                "plaintext_seconds": round(a["plaintext_seconds"], 6),
                "protocol": "2pc+dealer", "transport": "tcp loopback, TLS 1.3 + AES-OCB3"}
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
