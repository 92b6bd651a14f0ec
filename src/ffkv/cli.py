"""The `ffkv` command line. Bad input is one line on stderr and exit code 2 (a traceback with --debug)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
from pathlib import Path

from .errors import FfkvError
from .models import check_dtype
from .report.findings import fmt_value, thirds
from .report.findings import rows as summary_rows
from .scan import ScanConfig, parse_layers

RUN_MAX_TOKENS = 40_000
"""Token budget of `ffkv run` (the `make run` job): sized so that install, scan, analyses and report fit in
15 minutes on 2 CPU cores."""
RUN_ANALYZE = {"removal_keys": 4, "removal_triggers": 8, "examples": 1000}
"""Experiment sizes of `ffkv run` (smaller than `ffkv analyze`'s paper-sized defaults, same budget reason)."""
RUN_EXPLAIN = {"heldout_tokens": 4000}
"""`ffkv explain` settings of `ffkv run` (held-out text for the scores: 6,000 tokens by default)."""
REFERENCE_MAX_TOKENS = 1_000_000
"""Token budget of `ffkv run --reference`: all of the default corpus (1.05 M tokens) but about 5 %, held out for
the §5 experiments and the explanation scores, which need text the scan did not see."""


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, defaults: dict | None = None) -> None:
    """One flag per dataclass field, with the field's help text; the dataclass is the single source."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = (defaults or {}).get(f.name, f.default)
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        flag = "--" + f.name.replace("_", "-")
        if base is bool:  # a switch (--bos / --no-bos), not a flag that takes a value
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata.get("help", "") + f" (default: {'on' if default else 'off'})")
            continue
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default is not None else "")
        parser.add_argument(flag, type=base, default=default, help=help_text, metavar=f.name.upper())


def config_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _print_summary(atlas) -> None:
    m, r, c = atlas.manifest["model"], atlas.manifest["result"], atlas.manifest["corpus"]
    print(f"atlas      {atlas.path}")
    print(f"model      {m['name']} ({m['architecture']}, {m['n_layers']} layers x {m['d_ff']} memories, "
          f"{m['activation']}{', gated' if m['gated'] else ''})")
    prefix = c.get("special_prefix_tokens")
    print(f"corpus     {c['corpus']}: {c['n_units']} {c['unit']} units, {c['n_tokens']} tokens"
          + (f", each after {' '.join(prefix)} ({'--bos; ' if c.get('bos') else ''}fed, not scored)" if prefix else ""))
    print(f"scanned    {r['units_scanned']} units, {r['tokens_scanned']} prefixes in {r['seconds']:.0f} s "
          f"({r['tokens_per_second']:.0f} tok/s), layers {atlas.layers[0]}-{atlas.layers[-1]}, "
          f"faces {', '.join(atlas.faces)}, top-{atlas.manifest['scan']['top_k']}")
    layer = atlas.layers[len(atlas.layers) // 2]
    s = atlas.stats(layer)
    key = int(s["max"].argmax())
    print(f"example    `ffkv show {atlas.path} {layer} {key}` (the memory of layer {layer} with the "
          f"largest coefficient):")
    _print_show(atlas, layer, key, "pos", 3)


def _highlight(trigger, color: bool) -> str:
    context = trigger.context[-80:]
    tok = f"\033[1;33m{trigger.trigger_token}\033[0m" if color else f"[[{trigger.trigger_token}]]"
    nxt = "<end>" if trigger.next_token is None else trigger.next_token
    return f"{context}{tok}  -> {nxt!r}".replace("\n", " ")


def _print_show(atlas, layer: int, key: int, face: str, n: int) -> None:
    color = sys.stdout.isatty()
    sign = "+" if face == "pos" else "-"
    st = atlas.stats(layer)
    print(f"layer {layer} key {key} face {face} ({sign}v): fires > 0 on {st['frac_positive'][key]:.1%} of "
          f"prefixes, mean {st['mean'][key]:+.3f}, min {st['min'][key]:+.3f}, max {st['max'][key]:+.3f}")
    for t in atlas.triggers(layer, key, face, n):
        print(f"  {t.rank + 1:>3}  {t.score:+8.3f}  {_highlight(t, color)}")
    for normed in (False, True):
        v = atlas.value_tokens(layer, key, face, normed=normed, n=12)
        label = "value (through final norm)" if normed else "value (raw v.E)"
        print(f"  {label}: " + " ".join(repr(x) for x in v["top_tokens"]))


def cmd_scan(args) -> int:
    from .scan import scan

    config = config_from_args(ScanConfig, args)
    atlas = scan(out=args.out, config=config, resume=args.resume, force=args.force, progress=not args.quiet)
    if atlas is not None:
        _print_summary(atlas)
    return 0


def cmd_run(args) -> int:
    from .analysis.run import AnalyzeConfig, analyze
    from .corpus import load_corpus
    from .models import load_model
    from .report import write_report
    from .scan import resolve_device, scan

    config = config_from_args(ScanConfig, args)
    if args.reference and config.max_tokens == RUN_MAX_TOKENS:
        config.max_tokens = REFERENCE_MAX_TOKENS
    analyze_config = AnalyzeConfig() if args.reference else AnalyzeConfig(**RUN_ANALYZE)
    explain_config = {} if args.reference else RUN_EXPLAIN
    print(f"ffkv run: model {config.model}, corpus {config.corpus}, token budget {config.max_tokens} "
          f"(--max-tokens), atlas -> {args.out}", flush=True)
    corpus = load_corpus(config.corpus, config.text_column)  # before the model: a bad corpus fails fast
    model = load_model(config.model, device=resolve_device(config.device), dtype=config.dtype)  # once for all
    atlas = scan(model, corpus, args.out, config, resume=args.resume, force=args.force, progress=not args.quiet)
    if atlas is None:
        return 0
    _print_summary(atlas)
    print(f"ffkv run: explaining every memory face (ffkv explain, {explain_config or 'defaults'})", flush=True)
    from .analysis.explain import explain
    from .analysis.patterns import ExplainConfig

    _print_explain(explain(atlas.path, ExplainConfig(**explain_config), model=model, progress=not args.quiet))
    sizes = {k: getattr(analyze_config, k) for k in RUN_ANALYZE}
    print(f"ffkv run: analyses with {sizes} (see `ffkv analyze --help` for the paper's sizes)", flush=True)
    result = analyze(atlas.path, analyze_config, model=model, progress=not args.quiet)
    _print_analysis(result)
    print(f"ffkv run: report -> {write_report(atlas.path)}")
    return 0


def _print_analysis(result: dict) -> None:
    """The README's "paper beside ours" rows, from analysis.json: low / mid / high third of the layers, last."""
    a = result.get("aggregation") or {}
    print("per third of the layers (low / mid / high, last layer; [95% interval of the last layer's number]):")
    for row in summary_rows(result):
        values = row.values(result)
        if row.printed and values:
            line = f"  {row.name:<38} " + " / ".join(fmt_value(row, x) for x in thirds(values))
            last = row.last_interval(result)
            if last is not None:
                line += f"  [{row.fmt.format(last[0])}, {row.fmt.format(last[1])}]"
            print(line)
    if a.get("random_pair_cosine_mean") is not None:
        print(f"  §5.2 random vocabulary pairs: mean cosine {a['random_pair_cosine_mean']:.2f}, 95th percentile "
              f"{a['random_pair_cosine_q95']:.2f} (below it: distant)")
    for block, face in (("causal", "+v"), ("causal_neg", "-v")):
        pooled = (result.get(block) or {}).get("all_layers") or {}
        for role, word in (("agree", "agreeing"), ("suppress", "suppressing")):
            if pooled.get(f"n_{role}") and pooled.get(f"{role}_delta_ci") and pooled.get(f"{role}_control_delta_ci"):
                lo, hi = pooled[f"{role}_delta_ci"]
                clo, chi = pooled[f"{role}_control_delta_ci"]
                print(f"Causal, all layers ({face}): {pooled[f'n_{role}']} {word} memories off, Δlog p "
                      f"{pooled[f'{role}_delta']:+.3f} [{lo:+.3f}, {hi:+.3f}]; controls "
                      f"{pooled[f'{role}_control_delta']:+.3f} [{clo:+.3f}, {chi:+.3f}]")
    _print_top_max_prob(result)


def _print_top_max_prob(result: dict) -> None:
    """Fig 6's summary per face: the most confident values, where they sit and whether they agree."""
    for block, face in (("values", "+v"), ("values_neg", "-v")):
        t = (result.get(block) or {}).get("top_max_prob")
        if not t or not t.get("n"):
            continue
        print(f"Fig 6 top {t['n']} values by max probability ({face}): {t['upper']} in the upper layers (depth > "
              f"{t['upper_depth']:.3g}), {t['agree']} agree with their top-1 trigger, {t['agree_any']} with one of "
              f"their top-{t['k']} (paper: 97 and 46 of 100)")


def cmd_analyze(args) -> int:
    from .analysis.run import AnalyzeConfig, analyze

    config = config_from_args(AnalyzeConfig, args)  # checks the settings before a model is loaded
    model = None
    if args.model is not None:  # the atlas records how its model was named; this overrides it
        from .atlas import read_manifest
        from .models import load_model

        model = load_model(args.model, dtype=config.model_dtype(read_manifest(Path(args.atlas))))
    result = analyze(args.atlas, config, model=model, progress=not args.quiet)
    _print_analysis(result)
    print(f"wrote {Path(args.atlas) / 'analysis.json'}")
    return 0


def _print_explain(path: Path) -> None:
    """Per third of the layers: kinds of the explained faces and their held-out scores beside the baselines."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    if not rows:
        return
    layers = sorted({r["layer"] for r in rows})
    by_layer = {layer: [r for r in rows if r["layer"] == layer] for layer in layers}

    def per_layer(fn):
        return [fn(by_layer[layer]) for layer in layers]

    def mean(values):
        values = [v for v in values if v is not None and v == v]
        return sum(values) / len(values) if values else None

    table = [(f"faces {kind}", per_layer(lambda rs, k=kind: sum(r["kind"] == k for r in rs) / len(rs)), "{:.0%}")
             for kind in ("shallow", "semantic", "both", "none")]
    if "sim_corr" in rows[0]:
        fired = lambda rs: [r for r in rs if (r["heldout_fires"] or 0) > 0]  # noqa: E731
        table += [("simulation corr, explanation", per_layer(lambda rs: mean(r["sim_corr"] for r in rs)), "{:.2f}"),
                  ("  shuffled explanation", per_layer(lambda rs: mean(r["shuffled_sim_corr"] for r in rs)), "{:.2f}"),
                  ("  last-token lookup", per_layer(lambda rs: mean(r["lookup_sim_corr"] for r in rs)), "{:.2f}"),
                  ("firing F1, explanation", per_layer(lambda rs: mean(r["f1"] for r in fired(rs))), "{:.3f}"),
                  ("  shuffled explanation", per_layer(lambda rs: mean(r["shuffled_f1"] for r in fired(rs))), "{:.3f}"),
                  ("  last-token lookup", per_layer(lambda rs: mean(r["lookup_f1"] for r in fired(rs))), "{:.3f}")]
    print(f"explained {len(rows)} memory faces of {len(layers)} layers -> {path}")
    print("per third of the explained layers (low / mid / high, last layer):")
    for name, values, fmt in table:
        print(f"  {name:<32} " + " / ".join("-" if x is None else fmt.format(x) for x in thirds(values)))


def cmd_explain(args) -> int:
    from .analysis.explain import explain, parse_keys
    from .analysis.patterns import ExplainConfig
    from .atlas import read_manifest

    config = config_from_args(ExplainConfig, args)
    manifest = read_manifest(Path(args.atlas))
    layers = parse_layers(args.layers, manifest["model"]["n_layers"]) if args.layers else None
    model = None
    if args.model is not None:
        from .models import load_model

        model = load_model(args.model, dtype=manifest["scan"].get("dtype", "float32"))
    path = explain(args.atlas, config, layers=layers, keys=parse_keys(args.keys), face=args.face, model=model,
                   progress=not args.quiet, score=not args.no_score)
    _print_explain(path)
    return 0


def cmd_show(args) -> int:
    from .atlas import Atlas

    atlas = Atlas.load(args.atlas)
    if args.json:
        print(json.dumps(atlas.show(args.layer, args.key, args.face, args.n), ensure_ascii=False, indent=1))
    else:
        atlas.check(args.layer, args.key, args.face)
        _print_show(atlas, args.layer, args.key, args.face, args.n)
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    path = write_report(args.atlas, args.out)  # first: it refuses a missing atlas or a stale analysis.json
    if args.rows:
        analysis = Path(args.atlas) / "analysis.json"
        if analysis.exists():
            _print_analysis(json.loads(analysis.read_text()))
        explanations = Path(args.atlas) / "explanations.parquet"
        if explanations.exists():
            _print_explain(explanations)
    if args.verdicts:
        from .report import build_figures, load_inputs
        from .report.compare import STATUS_WORD

        for fig in build_figures(load_inputs(args.atlas)):
            if fig.verdict is not None:
                word = STATUS_WORD.get(fig.verdict.status, fig.verdict.status)
                print(f"Fig {fig.number} [{word}]: {fig.verdict.text.removeprefix(word + ': ')}")
    print(f"wrote {path}")
    return 0


def cmd_compare(args) -> int:
    from .report import write_comparison

    print(f"wrote {write_comparison(args.atlases, args.out)}")
    return 0


def cmd_merge(args) -> int:
    from .merge import merge_atlases

    atlas = merge_atlases(args.atlases, args.out, force=args.force)
    _print_summary(atlas)
    return 0


_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,256}")
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _check_allowed_host(name: str) -> str:
    """A name for the Host header check: a DNS name or an IP address, without scheme, port or wildcard."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    if len(name) > 253 or not _HOST_NAME.fullmatch(name):
        raise FfkvError(f"--allowed-host {name!r}: expected a host name or an IP address, without scheme, port "
                        "or wildcard (e.g. --allowed-host myhost.example.org)")
    return name


def cmd_serve(args) -> int:
    try:
        from .server import serve
        from .server.app import is_loopback
    except ImportError as exc:
        raise FfkvError(f"`ffkv serve` needs fastapi and uvicorn ({exc.name} is missing): pip install fastapi uvicorn")
    if not is_loopback(args.host) and not args.allow_remote:
        raise FfkvError(f"refusing to serve on non-loopback host {args.host!r}: the app runs the model for anyone "
                        "who can reach it; add --allow-remote to do it anyway")
    if not 1 <= args.port <= 65535:
        raise FfkvError(f"--port {args.port}: expected 1-65535")
    allowed = [_check_allowed_host(name) for name in args.allowed_host]
    if args.token is not None and not _TOKEN.fullmatch(args.token):
        raise FfkvError("--token: expected 16-256 letters, digits or - _ . ~ (it travels in URLs and cookies)")
    queue = {}  # unset: the server's defaults
    if args.queue_size is not None:
        if not 0 <= args.queue_size <= 1000:
            raise FfkvError(f"--queue-size {args.queue_size}: expected 0-1000")
        queue["queue_size"] = args.queue_size
    if args.queue_timeout is not None:
        if not 0 < args.queue_timeout <= 3600:  # also refuses nan
            raise FfkvError(f"--queue-timeout {args.queue_timeout:g}: expected more than 0 and at most 3600 seconds")
        queue["queue_timeout"] = args.queue_timeout
    check_dtype(args.dtype)
    serve(args.atlas, host=args.host.strip("[]"), port=args.port, allowed_hosts=allowed, token=args.token,
          model=args.model, device=args.device, dtype=args.dtype, **queue)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffkv", description="FFN layers as key-value memories: scan a corpus "
                                     "with a causal LM, keep every memory's top trigger prefixes, analyse them.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, fn, defaults, text in (
        ("scan", cmd_scan, {}, "scan a corpus and write an atlas"),
        ("run", cmd_run, {"max_tokens": RUN_MAX_TOKENS}, "the `make run` job on the embedded defaults: "
         "scan, analyze and report, printing a summary"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        add_dataclass_arguments(p, ScanConfig, defaults)
        p.add_argument("--out", "-o", default="atlas", help="atlas directory to write (default: atlas)")
        p.add_argument("--resume", action="store_true", help="continue an interrupted scan in --out")
        p.add_argument("--force", action="store_true", help="overwrite an existing atlas or unfinished scan")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "run":
            p.add_argument("--reference", action="store_true", help="the README's reference run: scan "
                           f"{REFERENCE_MAX_TOKENS:,} tokens (all of the default corpus but ~5%% held out, unless "
                           "--max-tokens says otherwise) and run explain and analyze at their paper-sized "
                           "defaults (hours on a CPU)")
        p.set_defaults(fn=fn)

    from .analysis.run import AnalyzeConfig

    text = "run the paper's experiments (§3-§5) on an atlas and write ATLAS/analysis.json"
    p = sub.add_parser("analyze", help=text, description=text)
    p.add_argument("atlas")
    add_dataclass_arguments(p, AnalyzeConfig)
    p.add_argument("--model", default=None, help="the atlas's model, where it is not found by the name the "
                   "atlas records (it must have the same weights)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_analyze)

    from .analysis.patterns import ExplainConfig

    text = ("explain every memory face offline: the patterns its top triggers share, what its value promotes and "
            "suppresses, one line, and scores on held-out text; writes ATLAS/explanations.parquet")
    p = sub.add_parser("explain", help=text, description=text)
    p.add_argument("atlas")
    p.add_argument("--layers", default=None, help="layers to explain, e.g. '0,5-9' (default: all scanned)")
    p.add_argument("--keys", default=None, help="only these memories, LAYER:KEY pairs like '15:455,3:17'")
    p.add_argument("--face", choices=("pos", "neg", "both"), default="both", help="faces to explain (default both)")
    add_dataclass_arguments(p, ExplainConfig)
    p.add_argument("--no-score", action="store_true", help="skip the held-out scores (no model pass)")
    p.add_argument("--model", default=None, help="the atlas's model, where it is not found by the name the atlas "
                   "records (it must have the same weights)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_explain)

    text = "write a self-contained HTML report of every figure, beside the paper's numbers"
    p = sub.add_parser("report", help=text, description=text)
    p.add_argument("atlas")
    p.add_argument("--out", "-o", default=None, help="HTML file to write (default: ATLAS/report.html)")
    p.add_argument("--verdicts", action="store_true", help="also print each figure's verdict (our numbers with "
                   "their 95%% intervals beside the paper's)")
    p.add_argument("--rows", action="store_true", help="also print the rows `ffkv analyze` and `ffkv explain` "
                   "print (per third of the layers), from the atlas's analysis.json and explanations.parquet")
    p.set_defaults(fn=cmd_report)

    text = ("write one self-contained HTML page comparing two or more atlases: every figure with each model's "
            "curves beside the paper's on relative depth, and per finding each model's verdict, whether it holds "
            "across models and its numbers per third of the layers")
    p = sub.add_parser("compare", help=text, description=text,
                       usage="%(prog)s [-h] ATLAS ATLAS [ATLAS ...] [--out OUT.html]")
    # zero or one atlas is refused by write_comparison, in one line like every other bad input
    p.add_argument("atlases", nargs="*", metavar="ATLAS", help="atlas directories, two or more (atlases without "
                   "analysis.json are drawn around; two atlases of one model are told apart by their folder names)")
    p.add_argument("--out", "-o", default=None, help="HTML file to write (default: compare.html in the current "
                   "directory)")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("show", help="one memory: its top triggers and the tokens its value promotes")
    p.add_argument("atlas")
    p.add_argument("layer", type=int)
    p.add_argument("key", type=int)
    p.add_argument("--face", choices=("pos", "neg"), default="pos",
                   help="pos: largest coefficients (value +v); neg: most negative (value -v)")
    p.add_argument("-n", type=int, default=10, help="triggers to show (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("merge", help="merge atlases scanned on disjoint shards (`scan --shard i/n`) into one")
    p.add_argument("atlases", nargs="+")
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_merge)

    text = "browse an atlas in a local web app: memories, search, prompt debugger with interventions"
    p = sub.add_parser("serve", help=text, description=text)
    p.add_argument("atlas")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; a non-loopback "
                   "address needs --allow-remote)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (anyone who can reach "
                   "it can run the model)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable); loopback names and the --host "
                   "address are always accepted, any other name is refused (DNS-rebinding guard)")
    p.add_argument("--token", default=None, help="the token every request must carry (Authorization: Bearer "
                   "TOKEN, or a page opened once with ?token=TOKEN, which sets a cookie); on a non-loopback --host a "
                   "random one is made and printed when this is not given; loopback needs none")
    p.add_argument("--model", default=None, help="load the model from here instead of the name in the atlas "
                   "manifest (must be the same weights)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="float32", help="what the model runs in: float32, bfloat16, float16 or "
                   "float64 (default: float32)")
    p.add_argument("--queue-size", type=int, default=None, metavar="N", help="prompt runs that may wait while the "
                   "model is busy; more are answered 503 (default: 16)")
    p.add_argument("--queue-timeout", type=float, default=None, metavar="SECONDS", help="how long a prompt run "
                   "may wait for the model before it is answered 503 (default: 30)")
    p.set_defaults(fn=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except FfkvError as exc:
        if args.debug:
            raise
        print(f"ffkv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ffkv: interrupted (a scan can be continued with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
