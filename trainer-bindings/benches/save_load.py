#!/usr/bin/env python3
"""Python-side save/load figures of ckptstore on this machine: sync save (durable), async save
(stall and time to durable), loads (numpy zero-copy and torch one copy), with torch.save +
fsync as a reference point. Not a peer benchmark (that is benches/peers.py's job); a quick check that the bindings add little over the engine.

    python3 benches/save_load.py --dir /tmp/bench --mib 256 --rounds 3

Each round saves fresh random bytes (no deduplication); medians are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import torch

import ckptstore as cs


def state_of(mib: int, g: torch.Generator) -> dict:
    # transformer-ish: f16 weights (numpy has no bf16) and f32 optimizer moments, 8 tensors
    n = mib * (1 << 20) // 8
    out = {}
    for i in range(4):
        out[f"layer{i}.weight"] = torch.randn(n // 2, generator=g).half()
        out[f"layer{i}.exp_avg"] = torch.randn(n // 4, generator=g)
    return out


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="scratch directory (deleted first)")
    ap.add_argument("--mib", type=int, default=512, help="state size in MiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-mib", type=int, default=256,
                    help="save_async staging budget (a state larger than it stalls on writes)")
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    g = torch.Generator().manual_seed(0)
    gb = args.mib * (1 << 20) / 1e9
    rows: dict[str, list[float]] = {k: [] for k in (
        "torch.save+fsync", "cs.save", "cs.save_async stall", "cs.save_async durable",
        "cs.load numpy", "cs.load torch")}
    store = cs.Store(os.path.join(args.dir, "store"), async_budget_bytes=args.budget_mib << 20)
    for r in range(args.rounds):
        st = state_of(args.mib, g)
        t = time.perf_counter()
        p = os.path.join(args.dir, f"t{r}.pt")
        torch.save(st, p)
        fsync_tree(args.dir)
        rows["torch.save+fsync"].append(time.perf_counter() - t)
        os.remove(p)

        t = time.perf_counter()
        cs.save(store, st, step=2 * r)
        rows["cs.save"].append(time.perf_counter() - t)

        st = state_of(args.mib, g)
        t = time.perf_counter()
        h = cs.save_async(store, st, step=2 * r + 1)
        rows["cs.save_async stall"].append(time.perf_counter() - t)
        h.wait()
        rows["cs.save_async durable"].append(time.perf_counter() - t)

        t = time.perf_counter()
        cs.load(store, step=2 * r + 1, framework="numpy")
        rows["cs.load numpy"].append(time.perf_counter() - t)
        t = time.perf_counter()
        cs.load(store, step=2 * r + 1)
        rows["cs.load torch"].append(time.perf_counter() - t)
        store.apply_retention(keep_last=1)
    store.close()
    print(f"{args.mib} MiB state, async budget {args.budget_mib} MiB, {args.rounds} rounds, "
          f"medians (loads warm: page cache)")
    for k, v in rows.items():
        m = statistics.median(v)
        print(f"  {k:24s} {m:8.3f} s  {gb / m:7.2f} GB/s")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
