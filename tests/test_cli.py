"""The command line: scan and show on a tiny model, and every bad input as one line on stderr + exit code 2."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import ffkv
from ffkv.cli import build_parser, main
from ffkv.scan import ScanConfig

ARCH = "llama"  # gated (two faces) and with a BOS prefix
SCAN_FLAGS = ["--max-length", "64", "--top-k", "5", "--batch-tokens", "256", "--dtype", "float64", "--quiet"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir(ARCH))


@pytest.fixture(scope="module")
def cli_atlas(model_dir, corpus_jsonl, tmp_path_factory):
    """An atlas written by `ffkv scan` in-process; returns (path, stdout)."""
    out = tmp_path_factory.mktemp("cli") / "atlas"
    capture = tmp_path_factory.mktemp("cli-out") / "stdout.txt"
    with open(capture, "w") as f, contextlib.redirect_stdout(f):
        rc = main(["scan", "--model", model_dir, "--corpus", str(corpus_jsonl), "--out", str(out), *SCAN_FLAGS])
    assert rc == 0
    return out, capture.read_text()


def test_scan_writes_the_same_atlas_as_the_api(cli_atlas, model_dir, corpus_jsonl, tmp_path):
    out, stdout = cli_atlas
    atlas = ffkv.Atlas.load(out)
    assert str(out) in stdout
    assert "llama" in stdout and "sentence units" in stdout
    scan = atlas.manifest["scan"]
    assert (scan["top_k"], scan["max_length"], scan["batch_tokens"], scan["dtype"]) == (5, 64, 256, "float64")
    config = replace(ScanConfig(), model=model_dir, corpus=str(corpus_jsonl), top_k=5, max_length=64,
                     batch_tokens=256, dtype="float64")
    api = ffkv.scan(config=config, out=tmp_path / "api", progress=False)
    for layer in atlas.layers:
        a, b = atlas.layer_tensors(layer), api.layer_tensors(layer)
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].nan_to_num().equal(b[name].nan_to_num()), name


def test_show_text(cli_atlas, capsys):
    out, _ = cli_atlas
    atlas = ffkv.Atlas.load(out)
    assert main(["show", str(out), "1", "3", "-n", "4"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("layer 1 key 3 face pos")
    triggers = atlas.triggers(1, 3, "pos", 4)
    assert len(triggers) == 4
    for t, line in zip(triggers, lines[1:5], strict=True):
        assert f"{t.score:+8.3f}" in line
        assert f"[[{t.trigger_token}]]" in line  # not a terminal: the trigger token is bracketed
    assert sum("value" in line for line in lines) == 2
    assert main(["show", str(out), "2", "0", "--face", "neg", "-n", "2"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("layer 2 key 0 face neg (-v)")
    assert len([line for line in text.splitlines() if "[[" in line]) == 2


def test_show_json(cli_atlas, capsys):
    out, _ = cli_atlas
    atlas = ffkv.Atlas.load(out)
    for args, (layer, key, face, n) in (([], (0, 7, "pos", 10)), (["--face", "neg", "-n", "3"], (0, 7, "neg", 3))):
        assert main(["show", str(out), str(layer), str(key), "--json", *args]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc == json.loads(json.dumps(atlas.show(layer, key, face, n)))
        assert len(doc["triggers"]) == min(n, 5) and len(doc["value"]["top_token_ids"]) == n


def _assert_one_line_error(rc, capsys, *needles):
    captured = capsys.readouterr()
    assert rc == 2, captured
    err = captured.err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ffkv: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert captured.out == ""  # nothing that looks like a result
    return lines[0]


def _scan(model, corpus, out, *extra):
    return main(["scan", "--model", str(model), "--corpus", str(corpus), "--out", str(out), *SCAN_FLAGS, *extra])


def _nothing_finished(out: Path) -> None:
    assert not (out / "manifest.json").exists()
    assert not (out / "layers").exists() or not any((out / "layers").iterdir())


def test_missing_model(corpus_jsonl, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (ffkv sets it for ORG/NAME models; keep it test-local)
    out = tmp_path / "atlas"
    _assert_one_line_error(_scan(tmp_path / "no-such-model", corpus_jsonl, out), capsys, "no-such-model")
    _nothing_finished(out)
    (tmp_path / "empty-dir").mkdir()
    _assert_one_line_error(_scan(tmp_path / "empty-dir", corpus_jsonl, out), capsys, "config.json")
    _assert_one_line_error(_scan("no-such-org/no-such-model", corpus_jsonl, out), capsys, "no-such-org/no-such-model")
    _nothing_finished(out)


def test_corrupt_gguf(corpus_jsonl, tmp_path, capsys, monkeypatch):
    home = tmp_path / "ffkv-home"
    monkeypatch.setenv("FFKV_HOME", str(home))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    out = tmp_path / "atlas"
    _assert_one_line_error(_scan(gguf, corpus_jsonl, out), capsys, "x.gguf")
    _nothing_finished(out)
    models = home / "models"
    assert not models.exists() or not any((d / "config.json").exists() for d in models.iterdir())
    _assert_one_line_error(_scan(tmp_path / "missing.gguf", corpus_jsonl, out), capsys, "missing.gguf")


def test_unsupported_architecture(unsupported_model_dir, corpus_jsonl, tmp_path, capsys):
    out = tmp_path / "atlas"
    model = unsupported_model_dir("bloom")
    capsys.readouterr()  # whatever building the test model printed
    line = _assert_one_line_error(_scan(model, corpus_jsonl, out), capsys, "bloom")
    for arch in ffkv.arch.ARCHITECTURES:
        assert arch in line
    _nothing_finished(out)


@pytest.mark.parametrize("name,content,needle", [
    ("empty.txt", b"", "no text"),
    ("blank.txt", b"\n   \n\t\n", "no text"),
    ("binary.txt", b"some text\x00\x01\x02\xff" * 20, "binary"),
    ("latin1.txt", "caf\u00e9 au lait\n".encode("latin-1"), "UTF-8"),
    ("corpus.csv", b"text\nhello world\n", "corpus.csv"),
    ("bad.jsonl", b'{"text": "fine"}\n{not json}\n', "bad.jsonl:2"),
    ("notext.jsonl", b'{"title": "x"}\n', '"text"'),
    ("empty.jsonl", b'{"text": "   "}\n', "no text"),
])
def test_bad_corpus(name, content, needle, model_dir, tmp_path, capsys):
    corpus = tmp_path / name
    corpus.write_bytes(content)
    out = tmp_path / "atlas"
    _assert_one_line_error(_scan(model_dir, corpus, out), capsys, needle)
    _nothing_finished(out)


def test_missing_corpus(model_dir, tmp_path, capsys):
    _assert_one_line_error(_scan(model_dir, tmp_path / "nope.txt", tmp_path / "atlas"), capsys, "nope.txt")


@pytest.mark.parametrize("extra,needle", [
    (["--layers", "3"], "layer 3 out of range"),
    (["--layers", "0,1-5"], "out of range"),
    (["--layers", "-1"], "--layers"),
    (["--layers", "one"], "--layers"),
    (["--top-k", "0"], "--top-k"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--unit", "paragraph"], "paragraph"),
    (["--max-length", "1"], "--max-length"),  # the BOS token leaves no room
    (["--shard", "2/2"], "--shard"),
])
def test_bad_scan_settings(extra, needle, model_dir, corpus_jsonl, tmp_path, capsys):
    out = tmp_path / "atlas"
    _assert_one_line_error(_scan(model_dir, corpus_jsonl, out, *extra), capsys, needle)
    _nothing_finished(out)


def test_existing_atlas_needs_force(cli_atlas, model_dir, corpus_jsonl, capsys):
    out, _ = cli_atlas
    manifest = (out / "manifest.json").read_text()
    layer = (out / "layers" / "layer_000.safetensors").read_bytes()
    _assert_one_line_error(_scan(model_dir, corpus_jsonl, out), capsys, "--force")
    assert (out / "manifest.json").read_text() == manifest
    assert (out / "layers" / "layer_000.safetensors").read_bytes() == layer


@pytest.mark.parametrize("args,needle", [
    (["9", "0"], "layer 9"),
    (["-1", "0"], "layer -1"),
    (["0", "64"], "key 64"),
    (["0", "-1"], "key -1"),
])
def test_show_out_of_range(args, needle, cli_atlas, capsys):
    out, _ = cli_atlas
    for fmt in ([], ["--json"]):
        _assert_one_line_error(main(["show", str(out), *args, *fmt]), capsys, needle)


def test_show_missing_or_unfinished_atlas(tmp_path, capsys, model_dir, corpus_jsonl):
    _assert_one_line_error(main(["show", str(tmp_path / "nope"), "0", "0"]), capsys, "does not exist")
    out = tmp_path / "unfinished"
    config = ScanConfig(model=model_dir, corpus=str(corpus_jsonl), max_length=64, batch_tokens=64, dtype="float64")
    assert ffkv.scan(out=out, config=config, progress=False, stop_after_batches=1) is None
    _assert_one_line_error(main(["show", str(out), "0", "0"]), capsys, "--resume")
    _assert_one_line_error(main(["scan", "--model", model_dir, "--corpus", str(corpus_jsonl), "--out", str(out),
                                 "--max-length", "64", "--batch-tokens", "64", "--quiet"]), capsys, "--resume")
    # and --resume finishes it
    assert main(["scan", "--model", model_dir, "--corpus", str(corpus_jsonl), "--out", str(out), "--max-length",
                 "64", "--batch-tokens", "64", "--dtype", "float64", "--quiet", "--resume"]) == 0
    assert ffkv.Atlas.load(out).manifest["result"]["units_scanned"] > 0


def test_show_neg_face_of_relu_atlas(tiny_model_dir, corpus_jsonl, tmp_path, capsys):
    out = tmp_path / "atlas"
    assert _scan(tiny_model_dir("opt"), corpus_jsonl, out, "--layers", "0") == 0
    capsys.readouterr()
    _assert_one_line_error(main(["show", str(out), "0", "0", "--face", "neg"]), capsys, "face")
    _assert_one_line_error(main(["show", str(out), "1", "0"]), capsys, "layer 1 is not in this atlas")


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(action.choices)


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_help(command, capsys):
    assert {"scan", "show"} <= set(_subcommands())
    with pytest.raises(SystemExit) as info:
        main(([command] if command else []) + ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ffkv" + (f" {command}" if command else ""))


def test_scan_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    out = capsys.readouterr().out
    for name in ScanConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out


def test_real_processes(model_dir, corpus_txt, tmp_path):
    """`python -m ffkv` and the installed `ffkv` script, as separate processes."""
    out = tmp_path / "atlas"
    proc = subprocess.run([sys.executable, "-m", "ffkv", "scan", "--model", model_dir, "--corpus", str(corpus_txt),
                           "--out", str(out), *SCAN_FLAGS, "--layers", "0,2"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no progress bars, not even the model loader's
    assert str(out) in proc.stdout
    atlas = ffkv.Atlas.load(out)
    assert atlas.layers == [0, 2] and atlas.manifest["corpus"]["corpus"] == "small.txt"
    script = Path(sys.executable).parent / "ffkv"
    assert script.exists()
    proc = subprocess.run([str(script), "show", str(out), "2", "5", "--json", "-n", "3"], capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(json.dumps(atlas.show(2, 5, "pos", 3)))
    proc = subprocess.run([str(script), "show", str(out), "1", "5"], capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("ffkv: error: layer 1")
    assert proc.stdout == ""


def test_thirds_summary_of_per_layer_arrays():
    from ffkv.cli import thirds

    assert thirds([1, 2, 3, 4, 5, 6]) == [1.5, 3.5, 5.5, 6]
    assert thirds([None, 2.0, None, 4.0, 6.0, None]) == [2.0, 4.0, 6.0, None]


@pytest.fixture
def analyzable(cli_atlas, tmp_path, monkeypatch):
    """A copy of the CLI atlas to analyse, and the dtypes of the models the analysis loads."""
    import shutil

    import ffkv.models

    out = tmp_path / "atlas"
    shutil.copytree(cli_atlas[0], out)
    loaded = []
    original = ffkv.models.load_model

    def load_model(*args, **kwargs):
        model = original(*args, **kwargs)
        loaded.append(next(model.model.parameters()).dtype)
        return model

    monkeypatch.setattr(ffkv.models, "load_model", load_model)
    return out, loaded


ANALYZE_SMALL = ["--only", "patterns", "--removal-triggers", "4", "--quiet"]


def test_removal_triggers_default_to_the_atlas_top_k(analyzable, capsys):
    """Unset, --removal-triggers is 25 or the atlas's top-k (5 here) when smaller; set out of range, one line."""
    out, _ = analyzable
    assert main(["analyze", str(out), "--only", "patterns", "--quiet"]) == 0
    assert json.loads((out / "analysis.json").read_text())["config"]["removal_triggers"] == 5
    capsys.readouterr()
    for bad in ("6", "0"):
        assert main(["analyze", str(out), "--only", "patterns", "--removal-triggers", bad, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "--removal-triggers" in err and "top-k 5" in err and err.count("\n") == 1


@pytest.mark.parametrize("flags,dtype", [([], "float64"), (["--dtype", "float32"], "float32"),
                                         (["--dtype", "float64"], "float64")])
def test_analyze_dtype(flags, dtype, analyzable, capsys):
    """The atlas was scanned in float64: that is the default; --dtype decides otherwise."""
    import torch

    out, loaded = analyzable
    assert main(["analyze", str(out), *ANALYZE_SMALL, *flags]) == 0
    assert loaded == [getattr(torch, dtype)]
    result = json.loads((out / "analysis.json").read_text())
    assert result["config"]["dtype"] == dtype and "patterns" in result


@pytest.mark.parametrize("flags,dtype", [([], "float64"), (["--dtype", "float32"], "float32")])
def test_analyze_dtype_of_model_flag(flags, dtype, analyzable, model_dir, capsys):
    import torch

    out, loaded = analyzable
    assert main(["analyze", str(out), *ANALYZE_SMALL, "--model", model_dir, *flags]) == 0
    assert loaded == [getattr(torch, dtype)]
    assert json.loads((out / "analysis.json").read_text())["config"]["dtype"] == dtype


def test_analyze_in_bfloat16(corpus_jsonl, tmp_path, monkeypatch, capsys):
    """A model whose weights bfloat16 holds exactly (as checkpoints saved in bfloat16 are): scanned in float32,
    analysed in bfloat16."""
    import torch
    from conftest import build_tiny_model, train_tokenizer

    import ffkv.models

    model_path = tmp_path / "model"
    build_tiny_model(ARCH).to(torch.bfloat16).to(torch.float32).save_pretrained(model_path)
    train_tokenizer(bos=True).save_pretrained(model_path)
    out = tmp_path / "atlas"
    assert main(["scan", "--model", str(model_path), "--corpus", str(corpus_jsonl), "--out", str(out),
                 "--max-length", "64", "--top-k", "5", "--quiet"]) == 0
    loaded = []
    original = ffkv.models.load_model
    monkeypatch.setattr(ffkv.models, "load_model",
                        lambda *a, **k: loaded.append(k.get("dtype")) or original(*a, **k))
    assert main(["analyze", str(out), *ANALYZE_SMALL, "--dtype", "bfloat16"]) == 0
    assert loaded == ["bfloat16"]
    result = json.loads((out / "analysis.json").read_text())
    assert result["config"]["dtype"] == "bfloat16" and "patterns" in result


def test_analyze_defaults_to_the_scan_dtype(model_dir, corpus_jsonl, tmp_path, monkeypatch, capsys):
    """A float32 checkpoint scanned in bfloat16: its weight fingerprint is the bfloat16 copy's, so the analysis
    loads the model in bfloat16 unless told otherwise."""
    import ffkv.models

    out = tmp_path / "atlas"
    assert main(["scan", "--model", model_dir, "--corpus", str(corpus_jsonl), "--out", str(out),
                 "--max-length", "64", "--top-k", "5", "--quiet", "--dtype", "bfloat16"]) == 0
    loaded = []
    original = ffkv.models.load_model
    monkeypatch.setattr(ffkv.models, "load_model",
                        lambda *a, **k: loaded.append(k.get("dtype")) or original(*a, **k))
    assert main(["analyze", str(out), *ANALYZE_SMALL]) == 0
    assert loaded == ["bfloat16"]
    assert json.loads((out / "analysis.json").read_text())["config"]["dtype"] == "bfloat16"


def test_analyze_bad_dtype(analyzable, capsys):
    out, loaded = analyzable
    _assert_one_line_error(main(["analyze", str(out), *ANALYZE_SMALL, "--dtype", "int8"]), capsys, "--dtype int8",
                           "float32")
    assert loaded == [] and not (out / "analysis.json").exists()
