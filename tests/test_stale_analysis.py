"""analysis.json and the report belong to one scan: after a new scan into the same folder, the old analysis is
refused by the report and never merged into by `ffkv analyze --only`."""

from __future__ import annotations

import json
import re

import pytest
from conftest import DOCUMENTS

import ffkv
from ffkv.cli import main

ANALYZE_FLAGS = ["--removal-keys", "2", "--removal-triggers", "3",
                 "--examples", "12", "--quiet"]
BLOCKS = ("patterns", "token_removal", "values", "aggregation", "causal")


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("stale") / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in DOCUMENTS) + "\n")
    return str(tiny_model_dir("gpt2")), str(corpus)


def _scan(inputs, out, *extra) -> None:
    model, corpus = inputs
    rc = main(["scan", "--model", model, "--corpus", corpus, "--out", str(out), "--max-length", "64",
               "--max-tokens", "200", "--quiet", *extra])
    assert rc == 0


def _analyze(out, *extra) -> dict:
    assert main(["analyze", str(out), *ANALYZE_FLAGS, *extra]) == 0
    return json.loads((out / "analysis.json").read_text())


def _meta_scan_id(html: str) -> str:
    found = re.findall(r'<meta name="ffkv-scan-id" content="([0-9a-f]*)">', html)
    assert len(found) == 1
    return found[0]


def _one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("ffkv: error: "), err
    return err[0]


def test_analysis_and_report_record_the_scan_id(inputs, tmp_path, capsys):
    out = tmp_path / "atlas"
    _scan(inputs, out)
    sid = ffkv.Atlas.load(out).scan_id
    analysis = _analyze(out)
    assert analysis["scan_id"] == sid
    assert main(["report", str(out)]) == 0
    assert _meta_scan_id((out / "report.html").read_text()) == sid


def test_rescan_makes_the_old_analysis_stale(inputs, tmp_path, capsys):
    out = tmp_path / "atlas"
    _scan(inputs, out)
    _analyze(out)
    assert main(["report", str(out)]) == 0
    old_id = ffkv.Atlas.load(out).scan_id
    old_report = (out / "report.html").read_text()
    _scan(inputs, out, "--force", "--top-k", "4")
    new_id = ffkv.Atlas.load(out).scan_id
    assert new_id != old_id
    capsys.readouterr()

    assert main(["report", str(out)]) == 2
    line = _one_line_error(capsys)
    assert f"ffkv analyze {out}" in line and old_id in line and new_id in line
    assert (out / "report.html").read_text() == old_report  # not rewritten from the stale analysis

    # --only does not merge the earlier scan's blocks: it starts afresh
    fresh = _analyze(out, "--only", "patterns")
    assert fresh["scan_id"] == new_id
    assert "patterns" in fresh and not any(b in fresh for b in BLOCKS[1:])
    assert not any(k.startswith(BLOCKS[1:]) for k in fresh)
    assert set(fresh["missing"]) == set(BLOCKS[1:])
    assert all("earlier scan" in reason for reason in fresh["missing"].values())
    assert fresh["atlas"]["scan"]["top_k"] == 4

    # the same scan: --only adds to what is there
    more = _analyze(out, "--only", "values")
    assert more["patterns"] == fresh["patterns"] and "values" in more
    assert set(more["missing"]) == {"token_removal", "aggregation", "causal"}
    assert "earlier scan" not in json.dumps(more["missing"])

    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert _meta_scan_id(html) == new_id
    assert 'data-missing="fig3"' in html  # token removal was not run on this scan


def test_analysis_without_scan_id_is_still_read(inputs, tmp_path, capsys):
    out = tmp_path / "atlas"
    _scan(inputs, out)
    analysis = _analyze(out)
    del analysis["scan_id"]
    (out / "analysis.json").write_text(json.dumps(analysis))
    assert main(["report", str(out)]) == 0
    assert _meta_scan_id((out / "report.html").read_text()) == ffkv.Atlas.load(out).scan_id

    # an older file of this very scan (same recorded atlas summary) is merged into ...
    merged = _analyze(out, "--only", "patterns")
    assert merged["values"] == analysis["values"] and merged["aggregation"] == analysis["aggregation"]
    assert merged["missing"] == {}

    # ... one whose summary is another scan's is not
    del merged["scan_id"]
    merged["atlas"]["result"]["seconds"] += 1.0
    (out / "analysis.json").write_text(json.dumps(merged))
    fresh = _analyze(out, "--only", "patterns")
    assert set(fresh["missing"]) == set(BLOCKS[1:]) and "values" not in fresh


def test_report_refuses_another_scan_id(inputs, tmp_path, capsys):
    out = tmp_path / "atlas"
    _scan(inputs, out)
    analysis = _analyze(out)
    analysis["scan_id"] = "0123456789abcdef"
    (out / "analysis.json").write_text(json.dumps(analysis))
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert "0123456789abcdef" in _one_line_error(capsys)
    assert not (out / "report.html").exists()


def test_corrupt_analysis_with_only_is_a_clear_error(inputs, tmp_path, capsys):
    out = tmp_path / "atlas"
    _scan(inputs, out)
    (out / "analysis.json").write_text("{not json")
    capsys.readouterr()
    assert main(["analyze", str(out), *ANALYZE_FLAGS, "--only", "patterns"]) == 2
    assert "without --only" in _one_line_error(capsys)
