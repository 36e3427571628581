#!/usr/bin/env python3
"""``cs.save`` against the CLI's durable save of the same bytes: ``ckptstore bench --json``
(its "store save, durable (sync)": a new store, one transaction of 64 MiB f32 tensors of
pseudo-random bytes, commit, fdatasync'ed) and then, in this process, ``cs.save`` of the same
layout (64 MiB float32 tensors, pseudo-random bytes) into a new store each round, durable on
return, the store's open and close included as in the bench. Medians; ratio = Python seconds
÷ CLI seconds (the target is <= 1.05).

    python3 benches/py_vs_cli.py --size 2 --rounds 3 [--bin target/release/ckptstore]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=float, default=2, help="GiB (default 2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default="/tmp/ckptstore-py-vs-cli")
    p.add_argument("--bin", default=shutil.which("ckptstore") or "target/release/ckptstore")
    a = p.parse_args()
    import numpy as np
    import torch

    import ckptstore as cs
    n = int(a.size * (1 << 30))
    out = subprocess.run([a.bin, "bench", "--dir", a.dir, "--size", str(n), "--rounds",
                          str(a.rounds), "--json"], check=True, capture_output=True, text=True)
    rep = json.loads(out.stdout)
    rep = rep[0] if isinstance(rep, list) else rep
    cli_gbps = rep.get("save_gbps") or rep["sizes"][0]["save_gbps"]
    cli = n / 1e9 / cli_gbps
    data = torch.from_numpy(np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8))
    f32 = data.view(torch.float32)
    per = (64 << 20) // 4
    state = {f"layers.{i}.weight": f32[o:o + per] for i, o in enumerate(range(0, f32.numel(), per))}
    secs = []
    try:
        for r in range(a.rounds):
            d = os.path.join(a.dir, "py")
            shutil.rmtree(d, ignore_errors=True)
            t = time.perf_counter()
            with cs.Store(d) as s:
                cs.save(s, state, step=r)
            secs.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)
    py = statistics.median(secs)
    print(f"{n / 1e9:.2f} GB, medians of {a.rounds}: CLI durable save {cli:.3f} s "
          f"({n / 1e9 / cli:.2f} GB/s), cs.save {py:.3f} s ({n / 1e9 / py:.2f} GB/s): "
          f"cs.save / CLI = {py / cli:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
