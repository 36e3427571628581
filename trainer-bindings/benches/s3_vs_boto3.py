#!/usr/bin/env python3
"""ckptstore on S3 against boto3's transfer manager, side by side on one S3 protocol server:
save and load GB/s of the same state, and the requests each makes per checkpoint.

    python3 benches/s3_vs_boto3.py --mib 256 --rounds 3

Starts moto_server on 127.0.0.1 (stopped after) unless --endpoint is given. moto is a
functional server written in Python, not a speed reference: read the ratios, not the absolute
figures. boto3 gets the same concurrency as ckptstore (4 parts of 16 MiB in flight) and the
easier job: it moves one file of the state's raw bytes (no hashing, no manifest), timed for the
transfer alone. ckptstore's save is `cs.save` into `cs.Store("s3://...")` (the local cache
write, with each segment streamed to the bucket as it is written, then the commit object);
its load is `cs.load` from a fresh cache (pull, then read and verify every chunk). Requests
are counted from the server's access log, and the server's CPU seconds per operation from
/proc (moto is CPU-bound: what it spends is most of each figure), the client's (this
process: ckptstore's threads, boto3's threads) from os.times. The machine may be shared: the
ratios are the medians of each round's ratio (the two sides of a round run back to back,
alternately first). moto keeps objects in memory (unless --moto-disk): by default it spills
every object over 5 MiB to a temporary file on the local disk, where on one machine it
competes with the client's own durable writes (ckptstore's cache), which no remote server's
storage does.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request

import boto3
import torch
from boto3.s3.transfer import TransferConfig

import ckptstore as cs


def start_moto(log_path: str, spill: bool = True) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")
    env = dict(os.environ)
    if not spill:
        # moto keeps an object over ~5 MiB in a temporary file on this machine's disk, the
        # disk the client's own writes go to; a remote server's storage is not the client's.
        env["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(1 << 40)
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("moto_server did not start")
            time.sleep(0.1)


def requests_by_method(log_path: str) -> collections.Counter[str]:
    """Requests answered so far, by method (from moto's access log)."""
    seen: collections.Counter[str] = collections.Counter()
    with open(log_path, errors="replace") as f:
        for line in f:
            if '" 2' in line or '" 4' in line or '" 5' in line:
                quoted = line.split('"')
                seen[quoted[1].split(" ")[0] if len(quoted) > 1 else "?"] += 1
    return seen


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--endpoint")
    ap.add_argument("--moto-disk", action="store_true",
                    help="let moto spill objects to temporary files on the local disk (its "
                    "default), where they compete with the client's own writes")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="s3bench-")
    log_path = os.path.join(work, "moto.log")
    proc = None
    endpoint = a.endpoint
    if endpoint is None:
        proc, endpoint = start_moto(log_path, spill=a.moto_disk)
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_REGION": "us-east-1"})
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT")).read()
        s3 = boto3.client("s3", endpoint_url=endpoint)
        cfg = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20,
                             max_concurrency=4, use_threads=True)
        g = torch.Generator().manual_seed(0)
        n = a.mib * (1 << 20) // 4 // 8
        rows: dict[str, list[float]] = {k: [] for k in
                                        ("cs_save", "cs_load", "boto_up", "boto_down")}
        reqs: dict[str, list[int]] = {k: [] for k in rows}
        server_cpu: dict[str, list[float]] = {k: [] for k in rows}
        client_cpu: dict[str, list[float]] = {k: [] for k in rows}
        methods: dict[str, collections.Counter[str]] = {}
        for r in range(a.rounds):
            state = {f"t{i}": torch.randn(n, generator=g) for i in range(8)}
            nbytes = sum(t.numel() * 4 for t in state.values())
            raw = os.path.join(work, "state.bin")
            with open(raw, "wb") as f:
                for t in state.values():
                    f.write(t.numpy().tobytes())

            def timed(key: str, fn) -> None:
                before = requests_by_method(log_path) if proc else collections.Counter()
                c0 = cpu_seconds(proc.pid) if proc else 0.0
                u0 = os.times()
                t0 = time.perf_counter()
                fn()
                rows[key].append(nbytes / (time.perf_counter() - t0) / 1e9)
                u1 = os.times()
                client_cpu[key].append(u1.user - u0.user + u1.system - u0.system)
                if proc:
                    methods[key] = requests_by_method(log_path) - before
                    reqs[key].append(sum(methods[key].values()))
                    server_cpu[key].append(cpu_seconds(proc.pid) - c0)

            url = f"s3://bench/run{r}"

            def ours() -> None:
                os.environ["CKPTSTORE_CACHE_DIR"] = os.path.join(work, f"cache-w{r}")
                with cs.Store(url) as st:
                    timed("cs_save", lambda: cs.save(st, state, step=r))
                os.environ["CKPTSTORE_CACHE_DIR"] = os.path.join(work, f"cache-r{r}")

                def load() -> None:
                    with cs.Store(url, read_only=True) as st:
                        back = cs.load(st)
                    assert all(torch.equal(back[k], state[k]) for k in state)
                timed("cs_load", load)

            def boto() -> None:
                timed("boto_up", lambda: s3.upload_file(raw, "bench", f"boto{r}", Config=cfg))
                timed("boto_down", lambda: s3.download_file("bench", f"boto{r}",
                                                            os.path.join(work, "down.bin"),
                                                            Config=cfg))
            # Alternate which side goes first (the server's memory and the disk's writeback
            # grow with each object: whoever runs second must not always pay for it).
            for side in ((ours, boto) if r % 2 == 0 else (boto, ours)):
                side()
            for d in (f"cache-w{r}", f"cache-r{r}"):
                shutil.rmtree(os.path.join(work, d), ignore_errors=True)
            # The round's objects go (untimed): the server's memory stays flat over rounds.
            listed = s3.list_objects_v2(Bucket="bench", Prefix=f"run{r}/").get("Contents", [])
            for key in [o["Key"] for o in listed] + [f"boto{r}"]:
                s3.delete_object(Bucket="bench", Key=key)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"state {a.mib} MiB, {a.rounds} rounds, medians (moto on loopback: ratios only)")
        for k in rows:
            rq = f", {statistics.median(reqs[k]):.0f} requests" if reqs[k] else ""
            sc = (f", server CPU {statistics.median(server_cpu[k]):.2f} s"
                  if server_cpu[k] else "")
            cc = f", client CPU {statistics.median(client_cpu[k]):.2f} s"
            by = (" (" + " ".join(f"{m} {n}" for m, n in sorted(methods[k].items())) + ")"
                  if k in methods else "")
            print(f"  {k:10s} {med[k]:.3f} GB/s{rq}{by}{sc}{cc}")

        def ratio(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(rows[a], rows[b]))
        print(f"  save ratio ckptstore/boto3 {ratio('cs_save', 'boto_up'):.2f}x, "
              f"load ratio {ratio('cs_load', 'boto_down'):.2f}x (medians of the rounds' ratios)")
    finally:
        if proc:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
