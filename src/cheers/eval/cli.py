"""`cheers eval {shapes,digits,geneval,dpg,mcq}`: registered by `cheers.cli` through `add_eval_subcommands`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cheers.options import add_model_options, load_pipeline

__all__ = ["add_eval_subcommands", "run_eval", "load_model"]

BENCHMARKS = ("shapes", "digits", "geneval", "dpg", "mcq")


def _common(p: argparse.ArgumentParser, out_help: str, out_default: str | None, preset: str | None = None) -> None:
    add_model_options(p, compile=False, device_default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the items and of image sampling (default 0)")
    p.add_argument("--batch", type=int, default=8, help="inputs per model call (default 8)")
    p.add_argument("--out", default=out_default, required=out_default is None, help=out_help)
    default = f"the {preset} preset's" if preset else "the model's"
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default: {default})")
    p.add_argument("--cfg", type=float, default=None, help=f"classifier-free guidance scale (default: {default})")
    p.add_argument("--shift", type=float, default=None, help=f"time shift of the sampling grid (default: {default})")


def add_eval_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `eval` command and its benchmark sub-commands to an argparse sub-parsers object."""
    p = subparsers.add_parser("eval", help="evaluate a model (ShapesWorld, Digits, GenEval, DPG-Bench, MMBench)",
                              description="Evaluate a model on the built-in benchmarks or write outputs for "
                                          "external evaluators.")
    sub = p.add_subparsers(dest="eval_command", metavar="BENCHMARK")

    s = sub.add_parser("shapes", help="ShapesWorld: generation (GenEval rules), understanding, editing")
    _common(s, "output directory (report.json, details.jsonl, grids)", "eval-shapes")
    s.add_argument("--n", type=int, default=10, help="items per category / question type / edit kind")
    s.add_argument("--resolution", type=int, default=None, help="image resolution (default: the model's)")

    d = sub.add_parser("digits", help="real handwritten digits: draw a digit, read a digit")
    _common(d, "output directory (report.json, details.jsonl, grids)", "eval-digits")
    d.add_argument("--n", type=int, default=50, help="generation prompts and questions (default 50 each)")
    d.add_argument("--resolution", type=int, default=None, help="image resolution (default: the model's)")

    g = sub.add_parser("geneval", help="write images in GenEval's folder layout (the reference's GenEval settings)")
    _common(g, "output folder (00000/metadata.jsonl, 00000/samples/0000.png, ...)", None, "geneval")
    g.add_argument("--metadata", required=True, help="GenEval evaluation_metadata.jsonl")
    g.add_argument("--n-samples", type=int, default=4, help="images per prompt (default 4)")
    g.add_argument("--score", action="store_true", help="also score the folder with the ShapesWorld judge "
                                                        "(for ShapesWorld metadata only)")

    q = sub.add_parser("dpg", help="write DPG-Bench images (one 2x2 grid PNG per prompt file; the reference's "
                                   "DPG settings)")
    _common(q, "output folder", None, "dpg")
    q.add_argument("--prompts", required=True, help="folder of <name>.txt prompts")
    q.add_argument("--n-samples", type=int, default=4, help="images per prompt (default 4, a 2x2 grid)")
    for sp in (g, q):
        sp.add_argument("--prompt-template", default=None,
                        help="how each prompt is written, with {prompt} (default: the prompt as given, as the "
                             "reference's scripts do)")

    m = sub.add_parser("mcq", help="answer an MMBench-format TSV")
    _common(m, "predictions file (.tsv, or .csv)", None)
    m.add_argument("--tsv", required=True, help="MMBench-format TSV (index, question, hint, A-D, answer, "
                                                "category, image base64)")
    m.add_argument("--max-new-tokens", type=int, default=None, help="answer budget in tokens")

    for sp in (s, d, g, q, m):
        sp.set_defaults(func=run_eval)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    return p


def load_model(args: argparse.Namespace) -> Any:
    """`Cheers.from_pretrained` with the model options (imported lazily)."""
    return load_pipeline(args)


def _gen_kw(args: argparse.Namespace, preset: str | None = None) -> dict[str, Any]:
    """Sampling settings: the benchmark's preset (the reference's own settings), then what the command line says."""
    kw: dict[str, Any] = {}
    if preset:
        from cheers.eval.adapters import EVAL_PRESETS

        kw.update(EVAL_PRESETS[preset].sampling())
    for flag, key in (("steps", "steps"), ("cfg", "cfg_scale"), ("shift", "shift")):
        if getattr(args, flag, None) is not None:
            kw[key] = getattr(args, flag)
    return kw


def run_eval(args: argparse.Namespace, model: Any = None) -> int:
    """Run the benchmark named by `args.eval_command` (the model is loaded from `args.model` unless given)."""
    cmd = getattr(args, "eval_command", None)
    if cmd not in BENCHMARKS:
        raise ValueError(f"choose a benchmark: {', '.join(BENCHMARKS)}")
    if model is None:
        model = load_model(args)
    gen_kw = _gen_kw(args, cmd if cmd in ("geneval", "dpg") else None)
    template = getattr(args, "prompt_template", None)
    if template is not None:
        gen_kw["prompt_template"] = template
    if cmd == "shapes":
        from cheers.eval.harness import evaluate_shapes

        evaluate_shapes(model, n=args.n, seed=args.seed, out_dir=args.out, batch_size=args.batch,
                        resolution=args.resolution, gen_kw=gen_kw, edit_kw=gen_kw)
    elif cmd == "digits":
        from cheers.eval.harness import evaluate_digits

        evaluate_digits(model, n=args.n, seed=args.seed, out_dir=args.out, batch_size=args.batch,
                        resolution=args.resolution, gen_kw=gen_kw)
    elif cmd == "geneval":
        from cheers.eval.adapters import geneval_score, geneval_write

        out = geneval_write(model, args.metadata, args.out, n_samples=args.n_samples, seed=args.seed,
                            batch_size=args.batch, **gen_kw)
        print(f"wrote GenEval samples to {out}")
        if args.score:
            print(json.dumps(geneval_score(out), indent=2))
    elif cmd == "dpg":
        from cheers.eval.adapters import dpg_write

        paths = dpg_write(model, args.prompts, args.out, n_samples=args.n_samples, seed=args.seed,
                          batch_size=args.batch, **gen_kw)
        print(f"wrote {len(paths)} DPG-Bench grids to {args.out}")
    else:
        from cheers.eval.adapters import mcq_answer

        kw = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
        print(json.dumps(mcq_answer(model, args.tsv, args.out, batch_size=args.batch, **kw), indent=2))
    return 0
