#!/usr/bin/env python3
"""Peer benchmark: one transformer-shaped state dict (bf16 weights + f32
norms and optimizer moments), saved DURABLY — the call plus fsync of every file it wrote and of
the directory — by torch.save, safetensors.torch.save_file, DCP FileSystemWriter (sync and
async_save) and ckptstore (save, and save_async: stall and time to durable), then loaded back
cold (every file's pages dropped with posix_fadvise(DONTNEED) after the save); plus
``dd oflag=direct conv=fsync`` of the same byte count as the device's limit. Rounds are
interleaved (every method once per round, in a rotating order) and medians reported, as GB/s
(10^9 bytes/s of state) and ratios to safetensors and to dd.

Peak extra RSS of the async saves is sampled every 2 ms (RSS above the level before the call).

    python3 benches/peers.py --size 2 --rounds 5 --dir /mnt/nvme/peers   # the target size
    python3 benches/peers.py --size 0.25 --rounds 3                       # a small run
    python3 benches/peers.py --json ...                                   # machine-readable

Needs torch, safetensors and ckptstore installed; writes (and removes) at most two copies of
the state under --dir at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=float, default=2.0,
                   help="state size in GiB (default 2; the target is >= 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--dir", default="/tmp/ckptstore-peers",
                   help="scratch directory on the file system to measure (removed after)")
    p.add_argument("--only", default="",
                   help="comma-separated subset of methods (default: all): " +
                   ",".join(METHODS))
    p.add_argument("--async-budget-mib", type=int, default=256,
                   help="ckptstore save_async staging budget (default 256 MiB)")
    p.add_argument("--no-load", action="store_true", help="skip the cold loads")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    a = p.parse_args(argv)
    if a.size <= 0 or a.rounds < 1:
        p.error("--size must be > 0 and --rounds >= 1")
    return a


METHODS = ["dd_direct", "torch_save", "safetensors", "dcp", "dcp_async", "ckptstore",
           "ckptstore_async"]


def make_state(size_gib: float) -> dict[str, Any]:
    """Transformer-shaped: per layer qkv/out/up/down in bf16, two f32 norms, f32 Adam moments
    of the up projection; an embedding; as many layers as fit ``size_gib``."""
    import torch
    target = int(size_gib * (1 << 30))
    d = 2048 if target >= (512 << 20) else 512
    per_layer = 12 * d * d * 2 + 2 * d * 4 + 2 * 4 * d * d * 4
    vocab = 8192
    embed = vocab * d * 2
    layers = max(1, round((target - embed) / per_layer))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int, dtype: Any) -> Any:
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)

    model: dict[str, Any] = {"embed.weight": rnd(vocab, d, dtype=torch.bfloat16)}
    opt: dict[str, Any] = {}
    for i in range(layers):
        pre = f"layers.{i}."
        model[pre + "attn.qkv.weight"] = rnd(3 * d, d, dtype=torch.bfloat16)
        model[pre + "attn.out.weight"] = rnd(d, d, dtype=torch.bfloat16)
        model[pre + "mlp.up.weight"] = rnd(4 * d, d, dtype=torch.bfloat16)
        model[pre + "mlp.down.weight"] = rnd(d, 4 * d, dtype=torch.bfloat16)
        model[pre + "norm1.weight"] = rnd(d, dtype=torch.float32)
        model[pre + "norm2.weight"] = rnd(d, dtype=torch.float32)
        opt[pre + "mlp.up.exp_avg"] = rnd(4 * d, d, dtype=torch.float32)
        opt[pre + "mlp.up.exp_avg_sq"] = rnd(4 * d, d, dtype=torch.float32).abs()
    return {"model": model, "optim": opt}


def flat(state: dict[str, Any]) -> dict[str, Any]:
    return {f"{k}/{n}": t for k, sub in state.items() for n, t in sub.items()}


def nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in flat(state).values())


def fsync_tree(root: str) -> None:
    """fsync every file under root, then every directory (bottom-up), then root's parent."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(os.path.dirname(os.path.abspath(root)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(root: str) -> None:
    """Evicts the (clean, synced) pages of every file under root: the next read is cold."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples RSS every 2 ms in a thread; ``extra`` is the peak above the start level."""

    def __enter__(self) -> PeakRss:
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


# Each save returns {"durable": seconds, optional "stall", "extra_rss"}; each load seconds.

def save_dd(state: Any, d: str, n: int, args: Any) -> dict[str, float]:
    bs = 64 << 20
    count = max(1, n // bs)
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={d}/dd.bin", f"bs={bs}", f"count={count}",
                    "oflag=direct", "conv=fsync"], check=True, capture_output=True)
    fsync_tree(d)
    el = time.perf_counter() - t
    return {"durable": el * n / (count * bs)}  # scaled to the state's byte count


def save_torch(state: Any, d: str, n: int, args: Any) -> dict[str, float]:
    import torch
    t = time.perf_counter()
    torch.save(state, f"{d}/state.pt")
    fsync_tree(d)
    return {"durable": time.perf_counter() - t}


def load_torch(state: Any, d: str) -> float:
    import torch
    t = time.perf_counter()
    out = torch.load(f"{d}/state.pt", weights_only=True)
    el = time.perf_counter() - t
    del out
    return el


def save_safetensors(state: Any, d: str, n: int, args: Any) -> dict[str, float]:
    from safetensors.torch import save_file
    t = time.perf_counter()
    save_file(flat(state), f"{d}/state.safetensors")
    fsync_tree(d)
    return {"durable": time.perf_counter() - t}


def load_safetensors(state: Any, d: str) -> float:
    from safetensors.torch import load_file
    t = time.perf_counter()
    out = load_file(f"{d}/state.safetensors")
    el = time.perf_counter() - t
    del out
    return el


def save_dcp(state: Any, d: str, n: int, args: Any) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp
    t = time.perf_counter()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(d, sync_files=True))
    fsync_tree(d)
    return {"durable": time.perf_counter() - t}


def save_dcp_async(state: Any, d: str, n: int, args: Any) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp
    with PeakRss() as peak:
        t = time.perf_counter()
        fut = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(d, sync_files=True))
        stall = time.perf_counter() - t
        fut.result()
        fsync_tree(d)
        durable = time.perf_counter() - t
    return {"durable": durable, "stall": stall, "extra_rss": peak.extra}


def load_dcp(state: Any, d: str) -> float:
    import torch
    import torch.distributed.checkpoint as dcp
    into = {k: {n: torch.empty_like(t) for n, t in sub.items()} for k, sub in state.items()}
    t = time.perf_counter()
    dcp.load(into, storage_reader=dcp.FileSystemReader(d))
    return time.perf_counter() - t


def save_cs(state: Any, d: str, n: int, args: Any) -> dict[str, float]:
    import ckptstore as cs
    t = time.perf_counter()
    with cs.Store(d) as store:
        cs.save(store, state, step=1)
    return {"durable": time.perf_counter() - t}


def save_cs_async(state: Any, d: str, n: int, args: Any) -> dict[str, float]:
    import ckptstore as cs
    import torch
    # RSS from before the store exists, so the staging pool counts; the pool is allocated by
    # a small warm-up save first (a trainer allocates it once, not per save).
    with PeakRss() as peak:
        store = cs.Store(d, async_budget_bytes=args.async_budget_mib << 20)
        try:
            cs.save_async(store, {"warmup": torch.zeros(1)}, step=0).wait()
            t = time.perf_counter()
            h = cs.save_async(store, state, step=1)
            stall = time.perf_counter() - t
            h.wait()
            durable = time.perf_counter() - t
        finally:
            store.close()
    return {"durable": durable, "stall": stall, "extra_rss": peak.extra}


def load_cs(state: Any, d: str) -> float:
    import ckptstore as cs
    t = time.perf_counter()
    with cs.Store(d, read_only=True) as store:
        out = cs.load(store)  # verifies every chunk's BLAKE3
    el = time.perf_counter() - t
    del out
    return el


SAVE: dict[str, Callable[..., dict[str, float]]] = {
    "dd_direct": save_dd, "torch_save": save_torch, "safetensors": save_safetensors,
    "dcp": save_dcp, "dcp_async": save_dcp_async, "ckptstore": save_cs,
    "ckptstore_async": save_cs_async,
}
LOAD: dict[str, Callable[..., float]] = {
    "torch_save": load_torch, "safetensors": load_safetensors, "dcp": load_dcp,
    "ckptstore": load_cs,
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    methods = [m for m in METHODS if not args.only or m in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(METHODS)
    if unknown:
        sys.exit(f"peers.py: unknown method(s) {sorted(unknown)}; known: {METHODS}")
    state = make_state(args.size)
    n = nbytes(state)
    os.makedirs(args.dir, exist_ok=True)
    res: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    try:
        for r in range(args.rounds):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for m in order:
                d = os.path.join(args.dir, m)
                shutil.rmtree(d, ignore_errors=True)
                os.makedirs(d)
                gc.collect()
                out = SAVE[m](state, d, n, args)
                for k, v in out.items():
                    res[m].setdefault(k, []).append(v)
                base = m.removesuffix("_async")
                if not args.no_load and m in LOAD:
                    drop_cache(d)
                    res[base].setdefault("load", []).append(LOAD[base](state, d))
                shutil.rmtree(d, ignore_errors=True)
                print(f"round {r + 1}/{args.rounds} {m}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in out.items() if k != "extra_rss"),
                    file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    med = {m: {k: statistics.median(v) for k, v in ks.items()} for m, ks in res.items()}
    return {"bytes": n, "rounds": args.rounds, "median": med, "all": res}


def table(r: dict[str, Any]) -> str:
    n, med = r["bytes"], r["median"]
    gbs = {m: n / 1e9 / v["durable"] for m, v in med.items() if "durable" in v}
    st, dd = gbs.get("safetensors"), gbs.get("dd_direct")
    lines = [f"state {n / 1e9:.2f} GB, median of {r['rounds']} interleaved rounds; "
             f"save = call + fsync of every file and the directory",
             f"{'method':<16} {'save GB/s':>9} {'x safet.':>8} {'x dd':>6} {'stall s':>8} "
             f"{'extra RSS MiB':>13} {'load GB/s':>9}"]
    for m, v in med.items():
        g = gbs.get(m)
        cell = lambda x, f: (f % x) if x is not None else "-"  # noqa: E731
        lines.append(
            f"{m:<16} {cell(g, '%.2f'):>9} {cell(g / st if g and st else None, '%.2f'):>8} "
            f"{cell(g / dd if g and dd else None, '%.2f'):>6} "
            f"{cell(v.get('stall'), '%.3f'):>8} "
            f"{cell(v['extra_rss'] / 2**20 if 'extra_rss' in v else None, '%.0f'):>13} "
            f"{cell(n / 1e9 / v['load'] if 'load' in v else None, '%.2f'):>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    r = run(args)
    print(json.dumps(r, indent=1) if args.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
