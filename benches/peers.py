#!/usr/bin/env python3
"""Peer benchmark: one transformer-shaped state dict (bf16 weights + f32
norms and optimizer moments), saved DURABLY — the call plus fsync of every file it wrote and of
the directory — by torch.save, safetensors.torch.save_file, DCP FileSystemWriter (sync and
async_save) and ckptstore (save, and save_async: stall and time to durable), then loaded back
cold (every file's pages dropped with posix_fadvise(DONTNEED) after the save); plus
``dd oflag=direct conv=fsync`` of the same byte count as the device's limit. Rounds are
interleaved (every method once per round, in a rotating order) and medians reported, as GB/s
(10^9 bytes/s of state) and ratios to safetensors and to dd.

Before each load the script waits ``--settle`` seconds (default 5) after dropping the cache.
On a VM whose balloon reports free memory to the host (the 2-core development VM:
``page_reporting``, 2 s delay) memory freed in the last seconds is still backed by the host and
faults in up to ten times faster than memory freed earlier: without the wait, a loader that
follows its own buffered save (safetensors, torch.save: the dropped page cache) or another
method's large free gets warm memory and the next one cold, and the order decides the ranking.
After the wait every loader gets cold memory, as a job resumed in a new process does.

Peak extra RSS of the async saves is sampled every 2 ms (RSS above the level before the call).

Two load figures per method: ``load`` is the call alone; ``load+touch`` the call plus reading
one byte of every page of every tensor, the least a trainer does with a loaded state. They
differ for lazy loaders: safetensors' ``load_file`` maps the file and returns before reading it
(its tensors fault in from the page cache on first use), while ckptstore's default load reads,
verifies and copies everything before it returns.

    python3 benches/peers.py --size 0.25,1,2 --plot peers.svg             # GB/s against size

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
    p.add_argument("--size", default="2",
                   help="state size in GiB, or several comma-separated (default 2; the target "
                   "is >= 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--dir", default="/tmp/ckptstore-peers",
                   help="scratch directory on the file system to measure (removed after)")
    p.add_argument("--only", default="",
                   help="comma-separated subset of methods (default: all): " +
                   ",".join(METHODS))
    p.add_argument("--async-budget-mib", type=int, default=256,
                   help="ckptstore save_async staging budget (default 256 MiB)")
    p.add_argument("--no-load", action="store_true", help="skip the cold loads")
    p.add_argument("--settle", type=float, default=SETTLE_S,
                   help="seconds to wait after dropping the cache, before each load (default "
                   f"{SETTLE_S:g}: every loader then starts from the same, cold, memory; see the "
                   "module comment)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", default=None,
                   help="also write an SVG chart of save and load GB/s against size")
    a = p.parse_args(argv)
    try:
        a.sizes = [float(x) for x in str(a.size).split(",") if x]
    except ValueError:
        p.error(f"--size {a.size!r}: GiB as a number, or several comma-separated")
    if not a.sizes or min(a.sizes) <= 0 or a.rounds < 1:
        p.error("--size must be > 0 and --rounds >= 1")
    if a.settle < 0:
        p.error("--settle must be >= 0")
    return a


SETTLE_S = 5.0

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


def make_cold(root: str, settle: float) -> None:
    """Drops root's pages, then waits ``settle`` seconds (module comment: equal memory)."""
    drop_cache(root)
    time.sleep(settle)


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


def load_torch(state: Any, d: str, touched: bool = False) -> float:
    import torch
    t = time.perf_counter()
    out = torch.load(f"{d}/state.pt", weights_only=True)
    if touched:
        touch(out)
    el = time.perf_counter() - t
    del out
    return el


def save_safetensors(state: Any, d: str, n: int, args: Any) -> dict[str, float]:
    from safetensors.torch import save_file
    t = time.perf_counter()
    save_file(flat(state), f"{d}/state.safetensors")
    fsync_tree(d)
    return {"durable": time.perf_counter() - t}


def load_safetensors(state: Any, d: str, touched: bool = False) -> float:
    from safetensors.torch import load_file
    t = time.perf_counter()
    out = load_file(f"{d}/state.safetensors")
    if touched:
        touch(out)
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


def load_dcp(state: Any, d: str, touched: bool = False) -> float:
    import torch
    import torch.distributed.checkpoint as dcp
    into = {k: {n: torch.empty_like(t) for n, t in sub.items()} for k, sub in state.items()}
    t = time.perf_counter()
    dcp.load(into, storage_reader=dcp.FileSystemReader(d))
    if touched:
        touch(into)
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


def load_cs(state: Any, d: str, touched: bool = False) -> float:
    import ckptstore as cs
    t = time.perf_counter()
    with cs.Store(d, read_only=True) as store:
        out = cs.load(store)  # verifies every chunk's BLAKE3
    if touched:
        touch(out)
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


def touch(x: Any) -> int:
    """Reads one byte of every page of every tensor in ``x`` (faults in what a lazy load left
    on disk)."""
    import torch
    if isinstance(x, dict):
        return sum(touch(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(touch(v) for v in x)
    if isinstance(x, torch.Tensor) and x.numel():
        return int(x.reshape(-1).view(torch.uint8)[::4096].sum())
    return 0


def run(args: argparse.Namespace, size: float) -> dict[str, Any]:
    methods = [m for m in METHODS if not args.only or m in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(METHODS)
    if unknown:
        sys.exit(f"peers.py: unknown method(s) {sorted(unknown)}; known: {METHODS}")
    state = make_state(size)
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
                    make_cold(d, args.settle)
                    res[base].setdefault("load", []).append(LOAD[base](state, d))
                    make_cold(d, args.settle)
                    res[base].setdefault("load_touched", []).append(
                        LOAD[base](state, d, touched=True))
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
    lt_st = med.get("safetensors", {}).get("load_touched")
    st, dd = gbs.get("safetensors"), gbs.get("dd_direct")
    lines = [f"state {n / 1e9:.2f} GB, median of {r['rounds']} interleaved rounds; "
             f"save = call + fsync of every file and the directory",
             f"{'method':<16} {'save GB/s':>9} {'x safet.':>8} {'x dd':>6} {'stall s':>8} "
             f"{'extra RSS MiB':>13} {'load GB/s':>9} {'load+touch':>10} {'x safet.':>8}"]
    for m, v in med.items():
        g = gbs.get(m)
        cell = lambda x, f: (f % x) if x is not None else "-"  # noqa: E731
        lines.append(
            f"{m:<16} {cell(g, '%.2f'):>9} {cell(g / st if g and st else None, '%.2f'):>8} "
            f"{cell(g / dd if g and dd else None, '%.2f'):>6} "
            f"{cell(v.get('stall'), '%.3f'):>8} "
            f"{cell(v['extra_rss'] / 2**20 if 'extra_rss' in v else None, '%.0f'):>13} "
            f"{cell(n / 1e9 / v['load'] if 'load' in v else None, '%.2f'):>9} "
            f"{cell(n / 1e9 / v['load_touched'] if 'load_touched' in v else None, '%.2f'):>10} "
            f"{cell(lt_st / v['load_touched'] if lt_st and 'load_touched' in v else None, '%.2f'):>8}")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    """GB/s against state size: every method's durable save (solid) and cold load+touch
    (dashed), one colour per method; a small hand-written SVG."""
    import math
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]
    series: list[tuple[str, bool, str, list[tuple[float, float]]]] = []
    methods = list(results[0]["median"])
    for i, m in enumerate(methods):
        c = colors[i % len(colors)]
        for key, dashed, what in (("durable", False, "save"), ("load_touched", True, "load")):
            pts = [(r["bytes"] / 1e9, r["bytes"] / 1e9 / r["median"][m][key])
                   for r in results if key in r["median"].get(m, {})]
            if pts:
                series.append((f"{m} {what}", dashed, c, pts))
    w, h, left, right, top, bottom = 820, 460, 70, 260, 40, 60
    pw, ph = w - left - right, h - top - bottom
    xs = sorted({p[0] for s in series for p in s[3]})
    ymax = max(p[1] for s in series for p in s[3])
    ytop = next(m * 10 ** math.floor(math.log10(ymax)) for m in (1, 2, 2.5, 5, 10)
                if m * 10 ** math.floor(math.log10(ymax)) >= ymax)
    lo, hi = math.log2(xs[0]), math.log2(xs[-1])

    def px(x: float) -> float:
        return left + (pw / 2 if hi == lo else (math.log2(x) - lo) / (hi - lo) * pw)

    def py(y: float) -> float:
        return top + ph - y / ytop * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left + pw / 2}" y="22" font-size="15" text-anchor="middle">peers: durable '
           f'save (solid) and cold load + touch (dashed), GB/s against state size</text>']
    for k in range(6):
        y = ytop * k / 5
        out.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + pw}" y2="{py(y):.1f}" '
                   f'stroke="#ddd"/><text x="{left - 6}" y="{py(y) + 4:.1f}" '
                   f'text-anchor="end">{y:g}</text>')
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{top + ph + 18}" text-anchor="middle">'
                   f'{x:.2f} GB</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
               f'stroke="#333"/>')
    for i, (label, dashed, c, pts) in enumerate(series):
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        out.append(f'<polyline points="{line}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>' for x, y in pts]
        ly = top + 10 + 18 * i
        out.append(f'<line x1="{left + pw + 12}" y1="{ly}" x2="{left + pw + 36}" y2="{ly}" '
                   f'stroke="{c}" stroke-width="2"{dash}/><text x="{left + pw + 42}" '
                   f'y="{ly + 4}">{label}</text>')
    out.append("</svg>\n")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    results = [run(args, size) for size in args.sizes]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=1))
    else:
        print("\n\n".join(table(r) for r in results))
    if args.plot:
        plot(results, args.plot)
        print(f"chart: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
