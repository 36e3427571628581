#!/usr/bin/env python3
"""GPU figures from Python, side by side in one run (needs a CUDA GPU and the wheel with the
engine's `cuda` feature):

  - save: the stall of ``cs.save_async`` of SIZE GiB of device tensors (the engine's CUDA
    stager copying into its pinned pool, fenced) next to one plain pinned device-to-host copy
    of the same bytes (``torch`` ``copy_(non_blocking=True)`` into a pinned buffer + sync);
  - restore: ``cs.load(store, device="cuda:0")`` (read, verify, pinned ring, async copies)
    next to one plain pinned host-to-device copy of the same bytes.

    python benches/cuda_save_load.py --dir /tmp/cudabench --gib 2 --rounds 3

Medians are printed; the ratio is ckptstore's bandwidth over the plain copy's (issue target:
>= 0.8 for the save stall). The store is dropped from the page cache only if run as root with
--drop-caches.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import torch

import ckptstore as cs
from ckptstore import _cuda


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/ckptstore-cudabench")
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--drop-caches", action="store_true")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    assert _cuda.staging_available(), cs._native.cuda_staging()
    n = int(a.gib * (1 << 30)) // 4 // 8
    state = {f"w{i}": torch.randn(n, device="cuda") for i in range(8)}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    flat = torch.cat([t.view(-1).view(torch.uint8) for t in state.values()])
    d2h, h2d, stall, restore = [], [], [], []
    shutil.rmtree(a.dir, ignore_errors=True)
    # a pool that holds a whole save: the stall is the staging, not waiting for the disk
    with cs.Store(a.dir, async_budget_bytes=nbytes + (64 << 20)) as s:
        for r in range(a.rounds):
            for t in state.values():
                t.add_(1.0)  # new bytes every round: nothing deduplicates
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pinned.copy_(flat, non_blocking=True)
            torch.cuda.synchronize()
            d2h.append(time.perf_counter() - t0)
            h = cs.save_async(s, state, step=r)
            stall.append(h.stall_seconds)
            h.wait()
            if a.drop_caches:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            t0 = time.perf_counter()
            back = cs.load(s, step=r, device="cuda:0")
            torch.cuda.synchronize()
            restore.append(time.perf_counter() - t0)
            assert all(torch.equal(back[k], v) for k, v in state.items())
            del back
            t0 = time.perf_counter()
            flat.copy_(pinned, non_blocking=True)
            torch.cuda.synchronize()
            h2d.append(time.perf_counter() - t0)
    gb = nbytes / 1e9
    for what, ours, plain in (("save stall", stall, d2h), ("restore", restore, h2d)):
        o, p = gb / statistics.median(ours), gb / statistics.median(plain)
        print(f"{what}: ckptstore {o:.2f} GB/s, plain pinned copy {p:.2f} GB/s, "
              f"ratio {o / p:.2f} ({gb:.2f} GB, {torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
