"""`ffkv scan` killed with SIGKILL at random points -- between batches, in the middle of a checkpoint write, in the
middle of the final layer writes, just before the manifest lands -- and resumed each time: the finished atlas
equals an uninterrupted scan byte for byte, and an interrupted one is never readable as finished."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ffkv
from ffkv.errors import FfkvError

# Runs `ffkv scan` in a child process; argv: MODE N, then the scan's arguments. MODE 'checkpoint' / 'layer':
# the N-th checkpoint / layer file is half written, then the process kills itself; 'manifest': it dies with the
# manifest written to its temporary file but not renamed; 'batch': it dies as it builds its N-th batch; 'slow':
# a pause before each batch (the test kills it from outside); 'none': it runs to the end.
CHILD = r"""
import importlib, os, signal, sys
from ffkv.cli import main

scan_module, atlas_module = importlib.import_module("ffkv.scan"), importlib.import_module("ffkv.atlas")

mode, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def die_half_written(real):
    def save(tensors, path, *args, **kwargs):
        calls[0] += 1
        real(tensors, path, *args, **kwargs)
        if calls[0] == n:
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return save

if mode == "checkpoint":
    scan_module.save_file = die_half_written(scan_module.save_file)
elif mode == "layer":
    atlas_module.save_file = die_half_written(atlas_module.save_file)
elif mode in ("batch", "slow"):
    real_make_batch = scan_module.make_batch
    def make_batch(*args, **kwargs):
        calls[0] += 1
        if mode == "batch" and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "slow":
            import time
            time.sleep(0.3)
        return real_make_batch(*args, **kwargs)
    scan_module.make_batch = make_batch
elif mode == "manifest":
    real_replace = os.replace
    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)
        def replace(self, src, dst):
            if str(dst).endswith("manifest.json"):
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
    atlas_module.os = _Os()
sys.exit(main(sys.argv[3:]))
"""

FILES = ("layers", "store", "scanned_units.npy")


def _bytes(atlas: Path) -> dict[str, bytes]:
    out = {}
    for name in FILES:
        p = atlas / name
        for f in sorted(p.rglob("*") if p.is_dir() else [p]):
            if f.is_file() and not f.name.endswith(".tmp"):
                out[str(f.relative_to(atlas))] = f.read_bytes()
    return out


def _finished(out: Path) -> bool:
    try:
        ffkv.Atlas.load(out)
    except FfkvError:
        return False
    return True


@pytest.fixture(scope="module")
def scan_args(tiny_model_dir, corpus_jsonl):
    return ["scan", "--model", str(tiny_model_dir("llama")), "--corpus", str(corpus_jsonl), "--max-length", "64",
            "--batch-tokens", "64", "--max-batch", "4", "--top-k", "5", "--value-top", "3",
            "--checkpoint-every", "0", "--quiet"]


def test_sigkill_anywhere_then_resume_equals_one_uninterrupted_scan(scan_args, tmp_path):
    reference = tmp_path / "reference"
    assert subprocess.run([sys.executable, "-c", CHILD, "none", "0", *scan_args, "--out", str(reference)],
                          capture_output=True, timeout=300).returncode == 0
    want = _bytes(reference)
    assert any(k.startswith("layers/") for k in want)

    out = tmp_path / "killed"
    rng = random.Random(0)
    plan = [("checkpoint", 2), ("batch", rng.randint(1, 3)), ("checkpoint", 1), ("slow", None),
            ("batch", rng.randint(1, 3)), ("layer", 2), ("manifest", 1), ("none", None)]
    kills = []
    for mode, n in plan:
        args = [sys.executable, "-c", CHILD, mode, str(n or 0), *scan_args, "--out", str(out)]
        if (out / "checkpoint").exists() or (out / "store").exists():
            args.append("--resume")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if mode == "slow":  # from outside, at a random moment after the run has saved a new checkpoint
            checkpoints = out / "checkpoint"
            before = {f: f.stat().st_mtime_ns for f in checkpoints.glob("*.safetensors")}
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:
                now = {f: f.stat().st_mtime_ns for f in checkpoints.glob("*.safetensors")}
                if now != before:
                    time.sleep(rng.uniform(0.0, 0.3))
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.02)
        rc = proc.wait(timeout=300)
        stderr = proc.stderr.read().decode()
        if rc == -signal.SIGKILL:
            kills.append(mode)
            assert not _finished(out), f"an atlas killed in mode {mode} reads as finished"
            continue
        assert rc == 0 and mode == "none", (mode, stderr)
        assert _finished(out)
    assert kills == [mode for mode, _ in plan[:-1]]
    assert _bytes(out) == want
    assert not (out / "checkpoint").exists()
