"""Quality of each CPU quantization mode against float32.

    python benchmarks/quantized_quality.py             # parity checkpoint + embedded model's answers (~5 minutes)
    python benchmarks/quantized_quality.py --t2i 8     # also ShapesBench text-to-image over 8 seeds (long)

Parity checkpoint (../shared/parity/tiny-official): relative L2 error of the first-step logits of goldens a and b
and of the CFG velocity of golden c against the float32 reference, and whether the greedy ids of a and b stay
those of the goldens. Embedded model (src/cheers/assets/cheers-shapes): greedy answers to the digits questions
and the ShapesBench understanding questions, the share identical to float32's, and each mode's accuracy. The last
line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from _common import SHARED  # noqa: E402  (puts src/ on the path)
from cheers import sampling as S  # noqa: E402
from cheers.pipeline import Cheers  # noqa: E402

MODES = ["float32", "int8", "int8-weight"]


def _golden(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(SHARED / "parity" / "goldens" / f"{name}.safetensors"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def parity(mode: str) -> dict:
    c = Cheers.from_pretrained(SHARED / "parity" / "tiny-official", quantize=None if mode == "float32" else mode)
    m = c.model
    out: dict = {}
    for key, name in (("a", "a_understanding"), ("b", "b_text_only")):
        g = _golden(name)
        prefix = S.prefill(m, g["input_ids"][None], g["attention_mask"][None], m.encode_images(g["pixel_values"]))
        logits: list = []
        ids = [int(t[0]) for t in S.decode_tokens(m, prefix, S.TextSampling(max_new_tokens=len(g["greedy_ids"])),
                                                  logits_hook=logits.append)]
        out[f"logits_rel_err_{key}"] = round(_rel(logits[0][0], g["logits_last"]), 5)
        out[f"greedy_equal_{key}"] = ids == g["greedy_ids"].tolist()
        out[f"greedy_tokens_equal_{key}"] = f"{sum(x == y for x, y in zip(ids, g['greedy_ids'].tolist()))}/{len(ids)}"
    g = _golden("c_velocity")
    lat = m.encode_images(g["pixel_values"])
    prefix = S.prefill(m, torch.stack([g["cond_input_ids"], g["uncond_input_ids"]]), None, torch.cat([lat, lat]))
    v = S.GuidedVelocity(m, prefix, float(g["cfg_scale"]), True)(g["x_t"], float(g["t"]))
    out["velocity_rel_err"] = round(_rel(v, g["cfg_velocity"].reshape(v.shape)), 5)
    return out


def answers(mode: str, work: Path, t2i_seeds: int) -> dict:
    from cheers.eval.harness import evaluate_digits, evaluate_shapes

    c = Cheers.from_pretrained(None, quantize=None if mode == "float32" else mode)
    d = evaluate_digits(c, n=50, out_dir=work / mode / "digits", tasks=("understanding",), verbose=False,
                        save_images=False)
    s = evaluate_shapes(c, n=10, out_dir=work / mode / "shapes", tasks=("understanding",), verbose=False,
                        save_images=False)
    preds = {}
    for sub in ("digits", "shapes"):
        for line in (work / mode / sub / "details.jsonl").read_text().splitlines():
            row = json.loads(line)
            preds[f"{sub}/{row['id']}"] = row["prediction"]
    out = {"digits_accuracy": round(d["understanding"]["accuracy"], 4),
           "shapes_understanding": round(s["understanding"]["overall"], 4), "predictions": preds}
    if t2i_seeds:
        scores = []
        for seed in range(t2i_seeds):
            r = evaluate_shapes(c, n=10, seed=seed, out_dir=work / mode / f"t2i-{seed}", tasks=("generation",),
                                verbose=False, save_images=False)
            scores.append(r["generation"]["overall"])
        out["shapes_t2i_overall"] = round(sum(scores) / len(scores), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--t2i", type=int, default=0, metavar="SEEDS", help="ShapesBench T2I over this many seeds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            row = parity(mode) if (SHARED / "parity" / "tiny-official").exists() else {}
            row.update(answers(mode, Path(tmp), args.t2i))
            table[mode] = row
    ref = table["float32"].pop("predictions")
    for mode in MODES[1:]:
        preds = table[mode].pop("predictions")
        same = sum(preds[k] == v for k, v in ref.items())
        table[mode]["answers_identical"] = round(same / len(ref), 4)
        table[mode]["answers_compared"] = len(ref)
    for mode, row in table.items():
        print(mode, {k: v for k, v in row.items()})
    print(json.dumps({"quality": table}))


if __name__ == "__main__":
    main()
