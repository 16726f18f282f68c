"""The ``rewriter`` command.  Thin: every verb calls the Python API.

Exit codes: 0 success, 1 a check failed (merge mismatch, or plan drift from a lock), 2 bad input.
Every verb takes ``--quiet``: no progress bars, only the essential output.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torch", "torch._dynamo", "torch.export", "torch.onnx", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _dtype(name):
    import torch
    return getattr(torch, DTYPES[name]) if name else None


def _traced(spec: str, dtype: str | None = None, attn: str | None = None, *, dynamic: bool = True):
    """Load and trace the model named by ``spec`` (the one place the CLI traces).  ``dynamic=False``
    traces for the example shapes only: about half the time, enough where only the sites matter."""
    from .errors import RewriterError
    from .models import load_model
    from .progress import steps
    from .core.tracing import trace_model
    with steps(f"model {spec}", ["load", "trace"]) as step:
        step("load")
        model = load_model(spec, dtype=_dtype(dtype))
        if attn:
            if not hasattr(model, "set_attn_implementation"):
                raise RewriterError(f"--attn-implementation applies to Hugging Face models, not {type(model).__name__}")
            model.set_attn_implementation(attn)
        step("trace")
        return trace_model(model, dynamic=dynamic)


def _adapted(args, rules: list[str], dirs: list[str]) -> tuple:
    """``--model`` with the adapter directories and then the rule files stacked on it, all active;
    returns the model and the names of the adapters made from rules (fresh weights).  With
    several sources, each directory's adapter is named after the directory."""
    from .adapted import Adapted
    from .errors import RewriterError
    from .lock import as_identifier, stack_rules
    from .rules import load_rules
    if not dirs and not rules:
        raise RewriterError(f"{args.command} needs --rules or --adapter",
                            fix="both repeat: the adapters stack bottom to top in the order given")
    adapted = Adapted(_traced(args.model, args.dtype, getattr(args, "attn_implementation", None)))
    several = len(dirs) + len(rules) > 1
    for d in dirs:
        adapted.load_adapter(d, as_identifier(Path(d).resolve().name) if several else None, activate=several or None,
                             remap=getattr(args, "remap", None))
    return adapted, stack_rules(adapted, [load_rules(r) for r in rules])


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text)


def cmd_explain(args) -> int:
    from .rules import format_plan, load_rules, plan
    ruleset = load_rules(args.rules)  # graph-level methods (Llama-Adapter, X-LoRA) match their own targets
    model = _site_table(args, ruleset.method)
    p = plan(ruleset, list(model.targets(ruleset.method).values()), model.module_names())
    if args.json:
        print(json.dumps({**p.to_json(), "counts": p.counts, "warnings": p.warnings,
                          "unmatched": p.unmatched}, indent=2, default=str))
    else:
        print(format_plan(p))
    return 0


def _site_table(args, method: str):
    """The traced model's sites (an :class:`Adapted`, or a :class:`SiteTable` from the cache when the
    model has not changed since it was last traced)."""
    from . import sitecache
    key = None if args.no_cache else sitecache.model_key(args.model, dynamic=False)
    table = sitecache.load(key) if key else None
    if table is not None and table.has(method):
        if not args.quiet:
            print(f"(sites of {args.model} from the cache {sitecache.cache_dir()}; --no-cache retraces)",
                  file=sys.stderr)
        return table
    from .adapted import Adapted
    adapted = Adapted(_traced(args.model, dynamic=False))  # sites do not depend on shapes
    if key:
        table = table or sitecache.SiteTable(dict(adapted.sites), adapted.module_names())
        try:
            table.add(adapted, method)  # may raise (no attention for Llama-Adapter): the sites are kept
        finally:
            sitecache.store(key, table)
    return adapted


def cmd_apply(args) -> int:
    adapted, _ = _adapted(args, [args.rules], [])
    out = adapted.save_adapter(args.out, format=args.format)
    _say(args, adapted.explain())
    _say(args, f"\nsaved the initialised adapter ({args.format} format) to {out}")
    return 0


def _merge_report(args, adapted, fresh: list[str]):
    from .check import check_merge, perturb
    if fresh and not args.no_perturb:
        # fresh adapters are no-ops: move them so that the check means something
        perturb(adapted, seed=args.seed, adapter_names=fresh)
    return check_merge(adapted, atol=args.atol)


def _print_merge(args, report) -> None:
    if args.json:
        print(report.to_json())
    else:
        print(report.format(limit=args.limit, failures_only=args.quiet))


def cmd_check(args) -> int:
    if args.lock:
        return _check_lock(args)
    from .errors import RewriterError
    if not args.model:
        raise RewriterError("check needs --model (or --lock, which records it)")
    report = _merge_report(args, *_adapted(args, args.rules or [], args.adapter or []))
    _print_merge(args, report)
    return 0 if report.ok else 1


def _check_lock(args) -> int:
    from .adapted import Adapted
    from .errors import RewriterError
    from .lock import check_lock, read_lock, stack_rules
    if args.rules or args.adapter:
        raise RewriterError("--lock takes the rule files from the lock", fix="drop --rules/--adapter, or drop --lock")
    lock = read_lock(args.lock)
    rulesets = lock.load_rules()
    adapted = Adapted(_traced(args.model or lock.model, args.dtype or lock.dtype))
    drift = check_lock(lock, adapted, rulesets)
    merge = _merge_report(args, adapted, stack_rules(adapted, rulesets)) if drift.ok else None
    ok = drift.ok and merge.ok
    if args.json:
        print(json.dumps({"ok": ok, "lock": drift.to_dict(), "merge": merge.to_dict() if merge else None}, indent=2))
        return 0 if ok else 1
    if not (args.quiet and drift.ok):
        print(drift.format())
    if merge is None:
        print("merge check skipped: the plan drifted")
    else:
        _print_merge(args, merge)
    return 0 if ok else 1


def cmd_lock(args) -> int:
    from .adapted import Adapted
    from .lock import make_lock, stack_rules, write_lock
    from .rules import load_rules
    rulesets = [load_rules(r) for r in args.rules]
    adapted = Adapted(_traced(args.model, args.dtype))
    names = stack_rules(adapted, rulesets)
    out = Path(args.out)
    lock = make_lock(adapted, rulesets, names, model=args.model, dtype=DTYPES.get(args.dtype), lock_path=out)
    write_lock(out, lock)
    sites = sum(len(a["sites"]) for a in lock["adapters"])
    _say(args, f"wrote {out}: {len(names)} adapter(s) {names}, {sites} site(s), "
               f"graph {lock['graph']['fingerprint'][:12]}")
    return 0


def cmd_export(args) -> int:
    import rewriter
    adapted, _ = _adapted(args, args.rules or [], args.adapter or [])
    path = rewriter.export(adapted, args.out, format=args.format, merged=not args.unmerged, program=args.program)
    kind = f"weights for {args.program}" if args.program else "unmerged" if args.unmerged else "merged"
    _say(args, f"wrote {path} ({kind})")
    return 0


def cmd_convert(args) -> int:
    from .core.files import PEFT_CONFIG
    from .rules.peft import read_peft_config, rules_from_peft_config, to_toml
    path = Path(args.config)
    path = path / PEFT_CONFIG if path.is_dir() else path
    cfg = read_peft_config(path)
    ruleset = rules_from_peft_config(cfg, model_type=args.model_type, output_embedding=args.output_embedding,
                                     source=str(path))
    text = f"# converted from {path} (PEFT {cfg.get('peft_version', '?')}) by rewriter convert\n" + to_toml(ruleset)
    if args.out:
        from .core.files import atomic_write
        atomic_write(Path(args.out), text.encode())
        _say(args, f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(out=Path(args.out), steps=args.steps, quiet=args.quiet)
    return 0


def cmd_plot_scalings(args) -> int:
    from .plot import main_plot_scalings
    return main_plot_scalings(args.args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewriter", description="Declarative model surgery for PEFT adapters.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars, only essential output")

    def verb(name, func, help):
        p = sub.add_parser(name, help=help, parents=[common])
        p.set_defaults(func=func)
        return p

    def model_arg(p, required=True):
        p.add_argument("--model", required=required,
                       help="a local Hugging Face model directory, builtin:<preset> (tiny-llama, tiny-gpt2, "
                            "tiny-bert, tiny-t5, ..., minilm) or package.module:factory")

    def sources(p):
        p.add_argument("--rules", action="append", help="a rule file; repeat to stack adapters (bottom first)")
        p.add_argument("--adapter", action="append", help="an adapter directory, rewriter or PEFT format; repeatable")
        p.add_argument("--remap", help="a TOML file whose [remap] table renames the --adapter checkpoints' modules "
                                       '("old.prefix" = "new.prefix"; a rule file may carry it)')

    p = verb("explain", cmd_explain, "show which sites each rule adapts, with parameters")
    p.add_argument("rules")
    model_arg(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-cache", action="store_true",
                   help="trace the model even when its sites are cached (see REWRITER_CACHE_DIR in the README)")

    p = verb("apply", cmd_apply, "apply a rule file and save the initialised adapter")
    p.add_argument("rules")
    model_arg(p)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["rewriter", "peft"], default="rewriter")
    p.add_argument("--dtype", choices=sorted(DTYPES))

    p = verb("lock", cmd_lock, "record the resolved plan of rule files (and a graph fingerprint) for CI")
    p.add_argument("rules", nargs="+", help="rule files, stacked bottom first")
    model_arg(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="the dtype you deploy in (check --lock uses it)")
    p.add_argument("--out", default="rules.lock.json", help="default: rules.lock.json")

    p = verb("check", cmd_check, "check merged == unmerged per site, and with --lock that the plan has not "
                                 "drifted (exit 1 on mismatch or drift)")
    sources(p)
    p.add_argument("--lock", help="a lock file from rewriter lock: re-plan its rule files on its model")
    model_arg(p, required=False)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype to check in (the one you deploy)")
    p.add_argument("--atol", type=float, help="absolute tolerance (default: derived from dtype and sizes)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=20, help="sites shown, worst first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-perturb", action="store_true", help="keep the no-op initial weights of --rules adapters")

    p = verb("export", cmd_export, "export the rewritten model (.pt2, .onnx, readable code .py, or adapter "
                                   "weights .safetensors for an unmerged .pt2)")
    sources(p)
    model_arg(p)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["pt2", "onnx", "code", "weights"])
    p.add_argument("--unmerged", action="store_true", help="keep the adapter ops (default: merged)")
    p.add_argument("--program", help="with a .safetensors --out: the unmerged .pt2 whose adapter slots it fills")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--attn-implementation", help="re-trace with this attention (e.g. eager, for ONNX)")

    p = verb("convert", cmd_convert, "convert a PEFT adapter_config.json into a rule file")
    p.add_argument("config", help="adapter_config.json or its directory")
    p.add_argument("--out")
    p.add_argument("--model-type", help="model type, when target_modules is not set (e.g. llama)")
    p.add_argument("--output-embedding", default="lm_head", help="excluded by 'all-linear' (default lm_head)")

    p = verb("plot-scalings", cmd_plot_scalings, "draw X-LoRA scalings (tokens x experts) as a PNG heatmap")
    p.add_argument("args", nargs=argparse.REMAINDER, help="SCALINGS.safetensors --out heat.png [--layer L] "
                                                            "[--tokens 0,2,5]")

    p = verb("demo", cmd_demo, "train a LoRA on MiniLM, merge, check, export (about a minute)")
    p.add_argument("--out", default="rewriter-demo")
    p.add_argument("--steps", type=int, default=100)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .version import __version__
        print(f"rewriter {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    _quiet_libraries()
    from .errors import RewriterError
    from .progress import set_quiet
    set_quiet(args.quiet)
    try:
        return args.func(args)
    except RewriterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
