"""Latency of `ffkv serve` as a browser sees it: the real server in a subprocess, requests over loopback HTTP
(keep-alive).

    python benchmarks/serve_latency.py [ATLAS] [--requests 200] [--runs 10]
    python benchmarks/serve_latency.py [ATLAS] --clients 16 [--per-client 40] [--duration 300]

Without ATLAS (or --atlas) it uses ./atlas (what `make run` writes) when there is one, else builds a small atlas of
the default model once (`--max-tokens 3000`, about 2 minutes on 2 cores) under $FFKV_HOME/bench.

One client (the default): p50/p95/max of the memory page's API call (/api/memory/L/K, random memories), of
searches (half promotes=TOKEN, half text=WORD, with tokens and words drawn from the atlas's own triggers and
values, one text query in five a very common word) and, for information, of prompt runs (/api/run).
Budgets (95th percentile): memory 200 ms, search 300 ms. The first start also builds the search index.

--clients N: N clients at once, each with its own connection, each sending --per-client requests (fewer if
--duration runs out first) drawn at random: memory pages 45%, searches 45% (as above), prompt runs 10%. Prints
p50/p95/max per endpoint and the number of errors (any answer but 200, or no answer); exits 1 if there was one.
The clients send without pause, so prompt runs queue up for the model: with more clients than the server's
queue of waiting runs (`ffkv serve --queue-size`, 16) plus one, some runs are refused (503) by design.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

BUDGET_MS = {"memory": 200.0, "search": 300.0}
COMMON = ["the", "of", "and", "in", "is", "was", "a"]
PROMPTS = ["The capital of France is", "In 1969, the first man to walk on the moon was", "The river flows through the"]
MIX = [("memory", 0.45), ("search promotes", 0.225), ("search text", 0.225), ("run", 0.10)]


def default_atlas() -> Path:
    if (Path("atlas") / "manifest.json").exists():
        return Path("atlas")
    from ffkv.embedded import ffkv_home

    path = ffkv_home() / "bench" / "serve_atlas"
    if not (path / "manifest.json").exists():
        print(f"building a benchmark atlas in {path} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "ffkv", "scan", "--model", "default", "--max-tokens", "3000",
                        "--out", str(path), "--force", "--quiet"], check=True)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(atlas: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "ffkv", "serve", str(atlas), "--port", str(port)],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 1800  # the first start builds the search index
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"ffkv serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("ffkv serve did not come up")


def timed(client: httpx.Client, method: str, url: str, **kw) -> tuple[float, httpx.Response]:
    t = time.perf_counter()
    r = client.request(method, url, **kw)
    ms = (time.perf_counter() - t) * 1000
    if r.status_code != 200:
        sys.exit(f"{method} {url} -> {r.status_code} {r.text[:200]}")
    return ms, r


def report(name: str, ms: list[float], budgets: dict[str, float] = BUDGET_MS) -> bool:
    if not ms:
        print(f"{name:<16} n=0")
        return True
    a = np.asarray(ms)
    p50, p95 = np.percentile(a, 50), np.percentile(a, 95)
    budget = budgets.get(name)
    verdict = "" if budget is None else (f"  budget p95 <= {budget:.0f} ms: " + ("ok" if p95 <= budget else "OVER"))
    print(f"{name:<16} n={len(a):<4} p50 {p50:7.1f} ms   p95 {p95:7.1f} ms   max {a.max():7.1f} ms{verdict}")
    return budget is None or p95 <= budget


class Queries:
    """Random requests over one atlas: memories, and query words and tokens from its own triggers and values."""

    def __init__(self, client: httpx.Client, rng: random.Random):
        ov = client.get("/api/overview").json()
        self.layers, self.d_ff = ov["layers"], ov["d_ff"]
        words, tokens = set(), set()
        for _ in range(20):  # also warms the server up
            d = client.get(self.memory(rng)).json()
            for face in d["faces"].values():
                for t in face["triggers"]:
                    words.update(w for w in re.findall(r"[^\W\d_]{3,}", t["text"]))
                tokens.update(x.strip() for x in face["value"]["top_tokens"] if re.fullmatch(r"\s?\w{3,}", x))
        self.words, self.tokens = sorted(words), sorted(tokens)
        if not self.words or not self.tokens:
            sys.exit("the atlas gave no query words")

    def memory(self, rng: random.Random) -> str:
        return f"/api/memory/{rng.choice(self.layers)}/{rng.randrange(self.d_ff)}?n=10"

    def promotes(self, rng: random.Random) -> str:
        return f"/api/search?promotes={rng.choice(self.tokens)}&limit=50"

    def text(self, rng: random.Random, common: bool) -> str:
        return f"/api/search?text={rng.choice(COMMON) if common else rng.choice(self.words)}&limit=50"

    def request(self, kind: str, rng: random.Random) -> tuple[str, str, dict]:
        if kind == "memory":
            return "GET", self.memory(rng), {}
        if kind == "search promotes":
            return "GET", self.promotes(rng), {}
        if kind == "search text":
            return "GET", self.text(rng, rng.random() < 0.2), {}
        return "POST", "/api/run", {"json": {"prompt": rng.choice(PROMPTS)}}


def sequential(base: str, args, rng: random.Random) -> int:
    with httpx.Client(base_url=base, timeout=60) as client:
        q = Queries(client, rng)
        memory_ms = [timed(client, "GET", q.memory(rng))[0] for _ in range(args.requests)]
        search_ms = []
        for i in range(args.requests):
            if i % 2 == 0:
                url = q.promotes(rng)
            else:  # one text query in five: a very common word, the worst case
                url = q.text(rng, common=i % 10 == 1)
            search_ms.append(timed(client, "GET", url)[0])
        run_ms = [timed(client, "POST", "/api/run", json={"prompt": rng.choice(PROMPTS)})[0]
                  for _ in range(args.runs)]
    ok = report("memory", memory_ms)
    ok &= report("search", search_ms)
    if run_ms:
        report("run", run_ms)
    return 0 if ok else 1


def concurrent(base: str, args, rng: random.Random) -> int:
    with httpx.Client(base_url=base, timeout=60) as client:
        q = Queries(client, rng)
    kinds, weights = zip(*MIX)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.duration

    def client_loop(seed: int) -> None:
        r = random.Random(seed)
        with httpx.Client(base_url=base, timeout=args.timeout) as c:
            for _ in range(args.per_client):
                if time.monotonic() > deadline:
                    return
                kind = r.choices(kinds, weights)[0]
                method, url, kw = q.request(kind, r)
                t = time.perf_counter()
                try:
                    resp = c.request(method, url, **kw)
                    error = None if resp.status_code == 200 else f"{resp.status_code} {resp.text[:160]}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                ms = (time.perf_counter() - t) * 1000
                with lock:
                    times[kind].append(ms)
                    if error:
                        errors.append(f"{method} {url}: {error}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(rng.randrange(2**32),)) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    done = sum(len(v) for v in times.values())
    print(f"{args.clients} clients at once: {done} requests of {args.clients * args.per_client} in {seconds:.1f} s "
          f"({done / seconds:.1f} requests/s)" + ("; stopped by --duration" if time.monotonic() > deadline else ""))
    for kind in kinds:
        report(kind, times[kind], budgets={})
    print(f"errors           {len(errors)}")
    for e in errors[:10]:
        print(f"  {e}")
    return 1 if errors else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("atlas", type=Path, nargs="?", default=None, help="the atlas to serve (default: see below)")
    ap.add_argument("--atlas", dest="atlas_flag", type=Path, default=None, metavar="ATLAS",
                    help="the same, as an option")
    ap.add_argument("--requests", type=int, default=200, metavar="N",
                    help="one client: requests per kind (default 200)")
    ap.add_argument("--runs", type=int, default=10, metavar="N",
                    help="one client: prompt runs, for information (default 10)")
    ap.add_argument("--clients", type=int, default=1, metavar="N", help="clients sending requests at once (default 1)")
    ap.add_argument("--per-client", type=int, default=40, metavar="N",
                    help="with --clients above 1: requests each client sends (default 40)")
    ap.add_argument("--duration", type=float, default=300, metavar="SECONDS",
                    help="with --clients above 1: seconds after which clients stop sending (default 300)")
    ap.add_argument("--timeout", type=float, default=120, metavar="SECONDS",
                    help="with --clients above 1: seconds a request may take before it counts as an error "
                    "(default 120)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.atlas is not None and args.atlas_flag is not None:
        ap.error("give the atlas once")
    if args.clients < 1 or args.per_client < 1 or args.duration <= 0 or args.timeout <= 0:
        ap.error("--clients and --per-client must be at least 1, --duration and --timeout positive")
    atlas = args.atlas or args.atlas_flag or default_atlas()
    port = free_port()
    t0 = time.time()
    proc = start_server(atlas, port)
    print(f"server up in {time.time() - t0:.1f} s; atlas {atlas}; {os.cpu_count()} CPUs", flush=True)
    rng = random.Random(args.seed)
    base = f"http://127.0.0.1:{port}"
    try:
        return concurrent(base, args, rng) if args.clients > 1 else sequential(base, args, rng)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
