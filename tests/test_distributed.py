"""The scan split over processes (torchrun + gloo) or shards (`--shard i/n` + `ffkv merge`) must give
exactly the atlas of one process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

SENTENCES = [
    "The cat sat on the mat while the dog slept by the fire.",
    "Paris is the capital of France and its largest city.",
    "In 1969 the first humans walked on the Moon.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog.",
    "Mozart wrote more than six hundred works, including symphonies and operas.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "The river flows north through the valley before it reaches the sea.",
    "Chess is played on a board of sixty-four squares.",
    "She bought apples, pears and plums at the market on Sunday.",
]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FFKV_DIST_TIMEOUT="60")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus.txt"
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(SENTENCES, size=rng.integers(1, 4))) for _ in range(40)]
    corpus.write_text("\n".join(docs))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<pad>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=128)
    model_dir = root / "model"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return root, model_dir, corpus


def _scan_args(setup, out, *extra):
    root, model_dir, corpus = setup
    return ["scan", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(out), "--top-k", "7",
            "--batch-tokens", "96", "--quiet", *extra]


def _run(cmd, timeout=180):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    return proc


def _ffkv(setup, out, *extra):
    proc = _run([sys.executable, "-m", "ffkv", *_scan_args(setup, out, *extra)])
    assert proc.returncode == 0, proc.stderr[-2000:]


def _torchrun(nproc, script_args, timeout=180):
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                 "--master-port", str(29500 + os.getpid() % 1000 + nproc), *script_args], timeout)


def assert_same_atlas(a: Path, b: Path) -> None:
    files = sorted(p.name for p in (a / "layers").iterdir())
    assert files == sorted(p.name for p in (b / "layers").iterdir()) and files
    for name in files:
        ta, tb = load_file(a / "layers" / name), load_file(b / "layers" / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k].nan_to_num(-7.0), tb[k].nan_to_num(-7.0)), f"{name}:{k} differs"
    for f in ("store/tokens.u32", "store/units.parquet", "scanned_units.npy"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.fixture(scope="module")
def single(setup):
    out = setup[0] / "single"
    _ffkv(setup, out)
    return out


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_equals_one_process(setup, single, nproc):
    out = setup[0] / f"torchrun{nproc}"
    proc = _torchrun(nproc, ["-m", "ffkv", *_scan_args(setup, out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_atlas(single, out)
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scan"]["world_size"] == nproc
    assert manifest["result"]["units_scanned"] == len(np.load(out / "scanned_units.npy"))


def test_shards_merge_to_whole(setup, single):
    root = setup[0]
    parts = [root / f"shard{i}" for i in range(3)]
    for i, p in enumerate(parts):
        _ffkv(setup, p, "--shard", f"{i}/3")
    from ffkv.merge import merge_atlases

    merged = merge_atlases([parts[2], parts[0], parts[1]], root / "merged", progress=False)
    assert_same_atlas(single, merged.path)
    assert merged.manifest["result"]["units_scanned"] == single_units(single)


def single_units(path: Path) -> int:
    return len(np.load(path / "scanned_units.npy"))


def test_merge_refuses_mismatch(setup, single):
    from ffkv.errors import FfkvError
    from ffkv.merge import merge_atlases

    root = setup[0]
    a, b = root / "mm0", root / "mm1"
    _ffkv(setup, a, "--shard", "0/2")
    _ffkv(setup, b, "--shard", "1/2", "--top-k", "5")
    with pytest.raises(FfkvError, match="other settings"):
        merge_atlases([a, b], root / "bad1", progress=False)
    with pytest.raises(FfkvError, match="exactly once"):
        merge_atlases([a, a], root / "bad2", progress=False)
    with pytest.raises(FfkvError, match="exactly once"):
        merge_atlases([a, single], root / "bad3", progress=False)
    assert not (root / "bad1" / "manifest.json").exists()


def test_merge_refuses_other_model(setup, tmp_path):
    from ffkv.errors import FfkvError
    from ffkv.merge import merge_atlases

    root, model_dir, corpus = setup
    other = tmp_path / "other_model"
    torch.manual_seed(1)
    cfg = transformers.GPT2Config.from_pretrained(model_dir)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(other)
    a, b = tmp_path / "a", tmp_path / "b"
    _ffkv(setup, a, "--shard", "0/2")
    _ffkv((root, other, corpus), b, "--shard", "1/2")
    with pytest.raises(FfkvError, match="another model"):
        merge_atlases([a, b], tmp_path / "m", progress=False)


@pytest.fixture(scope="module")
def halves(setup):
    """Two shard atlases (0/2, 1/2) side by side in one folder, scanned in-process."""
    from ffkv.cli import main

    root = setup[0] / "halves"
    parts = [root / "h0", root / "h1"]
    for i, p in enumerate(parts):
        assert main(_scan_args(setup, p, "--shard", f"{i}/2")) == 0
    return parts


def _snapshot(paths: list[Path]) -> dict:
    return {str(f): f.read_bytes() for p in paths for f in sorted(p.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("where", ["input", "parent", "inside"])
def test_merge_force_never_deletes_an_input(halves, where, capsys):
    from ffkv.cli import main
    from ffkv.errors import FfkvError
    from ffkv.merge import merge_atlases

    a, b = halves
    out = {"input": b, "parent": a.parent, "inside": a / "merged"}[where]
    needle = {"input": "is the input", "parent": "contains the input", "inside": "lies inside the input"}[where]
    before = _snapshot(halves)
    assert any(k.endswith("manifest.json") for k in before)
    with pytest.raises(FfkvError, match=needle):
        merge_atlases([a, b], out, force=True, progress=False)
    assert _snapshot(halves) == before
    capsys.readouterr()
    # the same through the command line: one line on stderr, exit code 2, nothing deleted or created
    via = Path(os.path.relpath(out)) if where == "parent" else out  # another spelling of the same folder
    assert main(["merge", str(a), str(b), "--out", str(via), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ffkv: error: ") and needle in err[0]
    assert _snapshot(halves) == before
    assert not (a / "merged").exists()


def test_merge_next_to_the_inputs_still_works(halves, single):
    from ffkv.merge import merge_atlases

    a, b = halves
    out = a.parent / "h0-merged"  # a sibling whose name starts like an input's: not inside it
    out.mkdir()
    (out / "old.txt").write_text("replaced by --force")
    merged = merge_atlases([a, b], out, force=True, progress=False)
    assert not (out / "old.txt").exists()
    assert_same_atlas(single, merged.path)


WRAPPER = """
import importlib, os, sys
from ffkv.cli import main
s = importlib.import_module("ffkv.scan")  # the module (the package attribute `ffkv.scan` is the function)
mode = sys.argv.pop(1)
if mode == "fail":
    original = s.make_batch
    def make_batch(*a, **k):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("injected failure on rank 1")
        return original(*a, **k)
    s.make_batch = make_batch
elif mode == "stop":
    original_scan = s.scan
    def scan(*a, **k):
        k["stop_after_batches"] = 1
        return original_scan(*a, **k)
    s.scan = scan
sys.exit(main(sys.argv[1:]))
"""


def test_failing_rank_fails_the_job(setup, tmp_path):
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    out = tmp_path / "failed"
    t0 = time.time()
    proc = _torchrun(2, [str(script), "fail", *_scan_args(setup, out)], timeout=150)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert time.time() - t0 < 150
    assert not (out / "manifest.json").exists()


def test_torchrun_resume_after_kill(setup, single, tmp_path):
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    out = tmp_path / "resumed"
    proc = _torchrun(2, [str(script), "stop", *_scan_args(setup, out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "manifest.json").exists()
    assert len(list((out / "checkpoint").iterdir())) == 2  # one checkpoint per rank
    refused = _torchrun(2, ["-m", "ffkv", *_scan_args(setup, out)])
    assert refused.returncode != 0 and "--resume" in refused.stdout + refused.stderr
    proc = _torchrun(2, ["-m", "ffkv", *_scan_args(setup, out, "--resume")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_atlas(single, out)
    assert not (out / "checkpoint").exists()
