#!/usr/bin/env python3
"""MindSpore figures, side by side in one run: a network's checkpoint saved and loaded by
MindSpore's own ``save_checkpoint``/``load_checkpoint`` (a file; MindSpore does not fsync it,
so "+fsync" adds one for a durable comparison) and by ``ckptstore.mindspore`` (durable when it
returns, every chunk verified on load). Run in the MindSpore environment:

    python benches/mindspore_save_load.py --dir /tmp/msbench --mib 256 --rounds 5

Each round changes every parameter (no deduplication); medians are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ckptstore.mindspore import load_checkpoint, save_checkpoint


class Big(nn.Cell):
    """8 float32 parameters of ``mib`` MiB in all, and one bfloat16 one."""

    def __init__(self, mib: int):
        super().__init__()
        n = mib * (1 << 20) // 4 // 9
        rng = np.random.default_rng(0)
        for i in range(8):
            setattr(self, f"w{i}", Parameter(Tensor(rng.standard_normal(n, dtype=np.float32)),
                                             name=f"layer{i}.weight"))
        self.bf = Parameter(Tensor(rng.standard_normal(2 * n, dtype=np.float32), ms.bfloat16),
                            name="embed.bf16")


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", default="/tmp/ckptstore-msbench")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    net = Big(a.mib)
    nbytes = sum(p.asnumpy().nbytes for p in net.get_parameters())
    t: dict[str, list[float]] = {k: [] for k in (
        "ms save", "ms save+fsync", "ms load", "ckptstore save (durable)", "ckptstore load")}
    for r in range(a.rounds):
        for p in net.get_parameters():  # new values every round: nothing to deduplicate
            p.set_data(Tensor(p.asnumpy() + 1))
        f = os.path.join(a.dir, f"r{r}.ckpt")
        t0 = time.perf_counter()
        ms.save_checkpoint(net, f)
        t1 = time.perf_counter()
        fsync_file(f)
        t2 = time.perf_counter()
        ms.load_checkpoint(f)
        t3 = time.perf_counter()
        save_checkpoint(net, os.path.join(a.dir, "store", f"r{r}.ckpt"))
        t4 = time.perf_counter()
        load_checkpoint(os.path.join(a.dir, "store", f"r{r}.ckpt"))
        t5 = time.perf_counter()
        for k, v in zip(t, (t1 - t0, t2 - t0, t3 - t2, t4 - t3, t5 - t4)):
            t[k].append(v)
        os.remove(f)
    gb = nbytes / 1e9
    print(f"{nbytes / (1 << 20):.0f} MiB of parameters, {a.rounds} rounds, medians:")
    med = {k: statistics.median(v) for k, v in t.items()}
    for k, m in med.items():
        ref = "ms load" if "load" in k else "ms save+fsync"
        print(f"  {k:26s} {m:7.3f} s  {gb / m:6.2f} GB/s  ({m / med[ref]:4.2f}x {ref})")
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
