"""`cheers merge-adapter BASE ADAPTER OUT`: fold a PEFT LoRA adapter into its base model (`cheers.adapters`).

Torch-free at import, as the `cheers` parser must stay fast.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_merge_adapter_subcommand(subparsers: Any) -> None:
    """Register `merge-adapter` on the `cheers` command's subparsers."""
    p = subparsers.add_parser(
        "merge-adapter", help="fold a LoRA adapter into its base model and write an official-format directory",
        description="Load BASE, apply the PEFT LoRA adapter ADAPTER, merge it into the weights (W + scaling * B A, "
                    "in float32) and write the merged model to OUT in the official format (config.json, "
                    "safetensors, tokenizer, generation and preprocessor configs).")
    p.add_argument("base", help="base model: directory, Hub repo id, or 'embedded' (the packaged model)")
    p.add_argument("adapter", help="adapter directory or Hub repo id (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="stored dtype of the merged weights (default auto: the base model's own)")
    p.set_defaults(func=_cmd_merge_adapter)


def _cmd_merge_adapter(a: argparse.Namespace) -> int:
    from cheers.pipeline import Cheers

    pipe = Cheers.from_pretrained(None if a.base == "embedded" else a.base, dtype="float32", adapter=a.adapter)
    stored = pipe.config.torch_dtype
    pipe.merge_adapter()
    print(pipe.save_pretrained(a.out, dtype=stored if a.dtype == "auto" else a.dtype))
    return 0
