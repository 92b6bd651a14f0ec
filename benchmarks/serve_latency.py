"""Latency of `ffkv serve` as a browser sees it: the real server in a subprocess, requests over HTTP (keep-alive).

    python benchmarks/serve_latency.py [--atlas ATLAS] [--requests 200]

Without --atlas it uses ./atlas (what `make run` writes) when there is one, else builds a small atlas of the
default model once (`--max-tokens 3000`, about 2 minutes on 2 cores) under $FFKV_HOME/bench. Prints p50/p95/max
of the memory page's API call (/api/memory/L/K, random memories), of searches (half promotes=TOKEN, half
text=WORD, with tokens and words drawn from the atlas's own triggers and values, one text query in five a very
common word) and, for information, of prompt runs (/api/run).
Budgets (95th percentile): memory 200 ms, search 300 ms. The first start also builds the search index.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

BUDGET_MS = {"memory": 200.0, "search": 300.0}
COMMON = ["the", "of", "and", "in", "is", "was", "a"]


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


def report(name: str, ms: list[float]) -> bool:
    a = np.asarray(ms)
    p50, p95 = np.percentile(a, 50), np.percentile(a, 95)
    budget = BUDGET_MS.get(name)
    verdict = "" if budget is None else (f"  budget p95 <= {budget:.0f} ms: " + ("ok" if p95 <= budget else "OVER"))
    print(f"{name:<8} n={len(a):<4} p50 {p50:7.1f} ms   p95 {p95:7.1f} ms   max {a.max():7.1f} ms{verdict}")
    return budget is None or p95 <= budget


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--atlas", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=200, help="requests per kind (default 200)")
    ap.add_argument("--runs", type=int, default=10, help="prompt runs, for information (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    atlas = args.atlas or default_atlas()
    port = free_port()
    t0 = time.time()
    proc = start_server(atlas, port)
    print(f"server up in {time.time() - t0:.1f} s; atlas {atlas}; {os.cpu_count()} CPUs", flush=True)
    rng = random.Random(args.seed)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            ov = client.get("/api/overview").json()
            layers, d_ff = ov["layers"], ov["d_ff"]

            def random_memory() -> str:
                return f"/api/memory/{rng.choice(layers)}/{rng.randrange(d_ff)}?n=10"

            # warm up, and collect query words and tokens from the atlas's own triggers and values
            words, tokens = set(), set()
            for _ in range(20):
                d = client.get(random_memory()).json()
                for face in d["faces"].values():
                    for t in face["triggers"]:
                        words.update(w for w in re.findall(r"[^\W\d_]{3,}", t["text"]))
                    tokens.update(x.strip() for x in face["value"]["top_tokens"] if re.fullmatch(r"\s?\w{3,}", x))
            words, tokens = sorted(words), sorted(tokens)
            if not words or not tokens:
                sys.exit("the atlas gave no query words")

            memory_ms = [timed(client, "GET", random_memory())[0] for _ in range(args.requests)]
            search_ms = []
            for i in range(args.requests):
                if i % 2 == 0:
                    url = f"/api/search?promotes={rng.choice(tokens)}&limit=50"
                elif i % 10 == 1:  # the worst case: a word in nearly every trigger
                    url = f"/api/search?text={rng.choice(COMMON)}&limit=50"
                else:
                    url = f"/api/search?text={rng.choice(words)}&limit=50"
                search_ms.append(timed(client, "GET", url)[0])
            prompts = ["The capital of France is", "In 1969, the first man to walk on the moon was",
                       "The river flows through the"]
            run_ms = [timed(client, "POST", "/api/run", json={"prompt": rng.choice(prompts)})[0]
                      for _ in range(args.runs)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ok = report("memory", memory_ms)
    ok &= report("search", search_ms)
    if run_ms:
        report("run", run_ms)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
