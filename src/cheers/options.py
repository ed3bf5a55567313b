"""Model-loading command-line options shared by every `cheers` command (and `cheers serve`), in one place.

Torch-free at import: building the parser must stay fast.
"""

from __future__ import annotations

import argparse
from typing import Any

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
MODEL_HELP = ("model: a local directory (official format + tokenizer), a Hugging Face Hub repo id such as "
              "ai9stars/Cheers, or a preset name; default: the embedded model")


def add_model_options(p: argparse.ArgumentParser, compile: bool = True, device_default: str | None = "cpu") -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model (default: main)")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter to apply: directory or Hub repo id")
    p.add_argument("--device", default=device_default, help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="dtype the weights are held and run in; auto = the checkpoint's on CUDA, float32 on CPU")
    p.add_argument("--quantize", default=None, metavar="MODE[:PATTERNS]",
                   help="quantize the linear layers as they load: int8 (int8 weights and activations; CPU, GPU), "
                        "int8-weight (weights only), int4-weight and fp8 (CUDA); PATTERNS (comma-separated module "
                        "globs, !GLOB excludes) narrow it, e.g. int8:model.language_model.*; a quantized checkpoint "
                        "loads as stored (see docs/quantization.md)")
    if compile:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the language model and output head: ~2x faster text decoding of small "
                            "models after a one-time compile of ~30 s (cached on disk); needs a C++ compiler on CPU")


def load_pipeline(a: argparse.Namespace, **extra: Any) -> Any:
    """`Cheers.from_pretrained` with the options `add_model_options` added."""
    from cheers.pipeline import Cheers

    kw: dict[str, Any] = {"dtype": a.dtype, "revision": a.revision, "compile": getattr(a, "compile", False),
                          "adapter": getattr(a, "adapter", None), "quantize": getattr(a, "quantize", None)}
    if a.device:
        kw["device"] = a.device
    return Cheers.from_pretrained(a.model, **kw, **extra)
