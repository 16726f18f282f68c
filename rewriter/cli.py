"""The ``rewriter`` command.  Thin: every verb calls the Python API.

Exit codes: 0 success, 1 a check failed (merge mismatch), 2 bad input.
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


def _model(args):
    from .models import load_model
    return load_model(args.model, dtype=_dtype(getattr(args, "dtype", None)))


def _adapted(args):
    """Apply --rules or load --adapter onto --model."""
    import rewriter
    model = _model(args)
    if getattr(args, "adapter", None):
        return rewriter.load_adapter(model, args.adapter)
    return rewriter.apply(model, args.rules)


def cmd_explain(args) -> int:
    import rewriter
    from .rules import format_plan, plan
    rules = rewriter.load_rules(args.rules)
    sites = rewriter.find_sites(rewriter.trace(_model(args)))
    p = plan(rules, sites)
    if args.json:
        print(json.dumps({**p.to_json(), "counts": p.counts, "warnings": p.warnings,
                          "unmatched": p.unmatched}, indent=2, default=str))
    else:
        print(format_plan(p))
    return 0


def cmd_apply(args) -> int:
    adapted = _adapted(args)
    out = adapted.save_adapter(args.out, format=args.format)
    if not args.quiet:
        print(adapted.explain())
        print(f"\nsaved the initialised adapter ({args.format} format) to {out}")
    return 0


def cmd_check(args) -> int:
    from .check import check_merge, perturb
    adapted = _adapted(args)
    if args.rules and not args.no_perturb:
        perturb(adapted, seed=args.seed)  # fresh adapters are no-ops: make the check mean something
    report = check_merge(adapted, atol=args.atol)
    print(report.to_json() if args.json else report.format(limit=args.limit))
    return 0 if report.ok else 1


def cmd_export(args) -> int:
    import rewriter
    adapted = _adapted(args)
    path = rewriter.export(adapted, args.out, format=args.format, merged=not args.unmerged)
    if not args.quiet:
        print(f"wrote {path} ({'unmerged' if args.unmerged else 'merged'})")
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import PEFT_CONFIG
    from .peft_config import read_peft_config, rules_from_peft_config, to_toml
    path = Path(args.config)
    path = path / PEFT_CONFIG if path.is_dir() else path
    cfg = read_peft_config(path)
    ruleset = rules_from_peft_config(cfg, model_type=args.model_type, output_embedding=args.output_embedding,
                                     source=str(path))
    text = f"# converted from {path} (PEFT {cfg.get('peft_version', '?')}) by rewriter convert\n" + to_toml(ruleset)
    if args.out:
        from .checkpoint import atomic_write
        atomic_write(Path(args.out), text.encode())
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(out=Path(args.out), steps=args.steps, quiet=args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewriter", description="Declarative model surgery for PEFT adapters.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    def model_arg(p):
        p.add_argument("--model", required=True,
                       help="a local Hugging Face model directory, builtin:<preset> (tiny-llama, tiny-gpt2, "
                            "tiny-bert, tiny-t5, ..., minilm) or package.module:factory")

    p = sub.add_parser("explain", help="show which sites each rule adapts, with parameters")
    p.add_argument("rules")
    model_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("apply", help="apply a rule file and save the initialised adapter")
    p.add_argument("rules")
    model_arg(p)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["rewriter", "peft"], default="rewriter")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("check", help="check merged == unmerged per site (exit 1 on mismatch)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--rules")
    src.add_argument("--adapter", help="an adapter directory, rewriter or PEFT format")
    model_arg(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype to check in (the one you deploy)")
    p.add_argument("--atol", type=float, help="absolute tolerance (default: derived from dtype and sizes)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=20, help="sites shown, worst first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-perturb", action="store_true", help="with --rules: keep the no-op initial weights")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("export", help="export the rewritten model (.pt2, .onnx, or readable code)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--rules")
    src.add_argument("--adapter")
    model_arg(p)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["pt2", "onnx", "code"])
    p.add_argument("--unmerged", action="store_true", help="keep the adapter ops (default: merged)")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="convert a PEFT adapter_config.json into a rule file")
    p.add_argument("config", help="adapter_config.json or its directory")
    p.add_argument("--out")
    p.add_argument("--model-type", help="model type, when target_modules is not set (e.g. llama)")
    p.add_argument("--output-embedding", default="lm_head", help="excluded by 'all-linear' (default lm_head)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="train a LoRA on MiniLM, merge, check, export (about a minute)")
    p.add_argument("--out", default="rewriter-demo")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__
        print(f"rewriter {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    _quiet_libraries()
    from .errors import RewriterError
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
