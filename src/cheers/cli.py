"""`cheers` command line: generate, ask, chat, edit, info, demo, train, eval, serve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from cheers.adapter_cli import add_merge_adapter_subcommand
from cheers.demo import add_demo_subcommand
from cheers.eval.cli import add_eval_subcommands
from cheers.options import add_model_options, load_pipeline
from cheers.samplers import SAMPLERS
from cheers.serve import add_serve_subcommand
from cheers.train.cli import add_train_subcommand

def _add_model(p: argparse.ArgumentParser) -> None:
    add_model_options(p)


def _add_image_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, reference 80)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (reference 9.5; 1 = off)")
    p.add_argument("--shift", type=float, default=None, help="time shift a of the sampling grid (reference 0.5)")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help="; ".join(f"{s.name}: {s.summary}" for s in SAMPLERS.values()))
    p.add_argument("--cfg-interval", type=_interval, default=None, metavar="LO,HI",
                   help="guide only for LO <= t <= HI (t = 0 is noise; default: the model's, 0,1 = every step)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--batch", type=int, default=16, help="images per model call")
    p.add_argument("-o", "--output", default="cheers-out", help="output PNG file (one image) or directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar over denoising steps")


def _interval(s: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}': expected LO,HI, two numbers such as 0.1,0.8") from None
    return lo, hi


def _add_text_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="output budget in tokens")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def _text_kwargs(a: argparse.Namespace) -> dict:
    keys = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "seed")
    return {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}


def _load(a: argparse.Namespace):
    return load_pipeline(a)


def _save_images(images, output: str, prefix: str) -> list[str]:
    out = Path(output)
    if len(images) == 1 and out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(out)
        return [str(out)]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        path = out / f"{prefix}_{i:03d}.png"
        im.save(path)
        paths.append(str(path))
    return paths


def cmd_generate(a: argparse.Namespace) -> int:
    prompts = list(a.prompt)
    if a.prompts_file:
        prompts += [ln.strip() for ln in Path(a.prompts_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise ValueError("give at least one prompt (positional or --prompts-file)")
    c = _load(a)
    prompts = [p for p in prompts for _ in range(a.n)]
    images = c.generate_image(prompts, seed=a.seed, steps=a.steps, cfg_scale=a.cfg, shift=a.shift,
                              sampler=a.sampler, batch_size=a.batch, progress=not a.no_progress,
                              cfg_interval=a.cfg_interval)
    for path in _save_images(images, a.output, "image"):
        print(path)
    return 0


def cmd_edit(a: argparse.Namespace) -> int:
    c = _load(a)
    images = c.edit([a.image] * len(a.instruction), a.instruction, seed=a.seed, steps=a.steps, cfg_scale=a.cfg,
                    shift=a.shift, sampler=a.sampler, batch_size=a.batch, progress=not a.no_progress,
                    cfg_interval=a.cfg_interval, edit_start=a.edit_start)
    for path in _save_images(images, a.output, "edit"):
        print(path)
    return 0


def cmd_ask(a: argparse.Namespace) -> int:
    c = _load(a)
    kw = _text_kwargs(a)
    if a.stream:
        for piece in c.answer([a.image], [a.question], stream=True, **kw):
            print(piece, end="", flush=True)
        print()
    else:
        print(c.answer([a.image], [a.question], **kw)[0])
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    c = _load(a)
    kw = _text_kwargs(a)
    history: list[dict] = []
    if a.message:  # one-shot
        history.append({"role": "user", "content": a.message, "images": a.image or []})
        for piece in c.chat(history, stream=True, **kw):
            print(piece, end="", flush=True)
        print()
        return 0
    print("cheers chat: type a message; '/image PATH' attaches an image to the next message, '/reset' clears, "
          "'/quit' or Ctrl-D exits.", file=sys.stderr)
    pending: list[str] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() == "/quit":
            return 0
        if line.strip() == "/reset":
            history, pending = [], []
            continue
        if line.startswith("/image "):
            pending.append(line[len("/image "):].strip())
            continue
        history.append({"role": "user", "content": line, "images": pending})
        pending = []
        print("cheers> ", end="", flush=True)
        reply = ""
        try:
            for piece in c.chat(history, stream=True, **kw):
                reply += piece
                print(piece, end="", flush=True)
        except (ValueError, OSError) as err:  # a bad image or too-long history: report and keep the session
            history.pop()
            print(f"\n[error] {err}", file=sys.stderr)
            continue
        print()
        history.append({"role": "assistant", "content": reply})


def cmd_info(a: argparse.Namespace) -> int:
    import torch

    from cheers.config import preset
    from cheers.model.cheers import CheersModel

    if a.model and not Path(a.model).exists():
        from cheers import quantize as Q
        from cheers.pipeline import describe

        spec = Q.parse_spec(a.quantize)
        if spec is not None:
            Q.check_device(spec.mode, a.device)
        with torch.device("meta"):  # a preset: count parameters (and bytes) without allocating them
            model = CheersModel(preset(a.model))
        if spec is not None:
            Q.prepare_meta(model, Q.record(spec, Q.targets(model, spec)))
            model.config.quantization = Q.record(spec, Q.names_of(model))
        data = describe(model, f"preset:{a.model}")
    else:
        data = _load(a).info()
    if a.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"model: {data['source']} ({data['config']})")
    print(f"images: {data['resolution']} px -> latent {data['latent']} -> {data['image_tokens']} LLM tokens; vocab {data['vocab']}")
    print("parameters:")
    for k, v in data["parameters"].items():
        print(f"  {k:<26} {v:>15,}")
    from cheers.quantize import human_bytes

    print(f"memory ({data['quantization'] or 'not quantized'}; bits = stored bits per parameter, scales included):")
    for k, v in data["memory"].items():
        print(f"  {k:<26} {human_bytes(v['bytes']):>12} {v['bits']:>6.2f} bits  {v['quantized_linears']:>4} quantized "
              "linear layers")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cheers",
        description="Cheers: one model for text-to-image, image understanding, editing and chat.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="text-to-image", description="Generate images from text prompts.")
    g.add_argument("prompt", nargs="*", help="prompt(s); each gives --n images")
    g.add_argument("--prompts-file", help="a text file with one prompt per line")
    g.add_argument("--n", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    _add_model(g)
    _add_image_opts(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("edit", help="edit an image by an instruction", description="Edit an image.")
    e.add_argument("image", help="source image file")
    e.add_argument("instruction", nargs="+", help="instruction(s); one output per instruction")
    _add_model(e)
    _add_image_opts(e)
    e.add_argument("--edit-start", type=float, default=None, metavar="T0",
                   help="start time in [0, 1): sampling starts from T0 * source + (1 - T0) * noise; larger keeps more "
                        "of the source (default: the model's generation_config, else the reference's 0.1)")
    e.set_defaults(func=cmd_edit)

    q = sub.add_parser("ask", help="answer a question about an image", description="Image understanding.")
    q.add_argument("image", help="image file")
    q.add_argument("question", help="the question")
    q.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    _add_model(q)
    _add_text_opts(q)
    q.set_defaults(func=cmd_ask)

    c = sub.add_parser("chat", help="interactive chat (streaming)", description="Chat with the model.")
    c.add_argument("-m", "--message", help="send one message and exit instead of starting the REPL")
    c.add_argument("--image", action="append", help="attach an image to --message (repeatable)")
    _add_model(c)
    _add_text_opts(c)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="configuration and parameter counts", description="Describe a model.")
    _add_model(i)
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    add_demo_subcommand(sub)
    add_train_subcommand(sub)
    add_eval_subcommands(sub)
    add_serve_subcommand(sub)
    add_merge_adapter_subcommand(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("cheers: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, KeyError) as err:
        # every domain error (bad checkpoint, image, prompt, data) is a one-line cause
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"cheers: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
