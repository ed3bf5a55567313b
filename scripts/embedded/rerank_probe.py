"""Does the model's own understanding pick its better pictures? (issue 7 probe)

For every ShapesBench generation prompt of one seed, draw K candidates (candidate k uses seed + k * 100000, so
candidate 0 is exactly what `evaluate_shapes` draws), score each with the model's own caption likelihood
log p(prompt | picture, "Describe the image."), and judge all of them. Prints, per category: the mean of single
candidates (what plain sampling scores), the self-reranked pick, and the oracle best-of-K (upper bound).

    python scripts/embedded/rerank_probe.py --model DIR --k 4 --n 50 --seed 2
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from cheers.eval import judge as J
from cheers.eval import shapes as S
from cheers.eval.harness import batched_generate
from cheers.pipeline import Cheers
from cheers import sampling as SM


@torch.no_grad()
def caption_logprob(model: Cheers, images: list, texts: list[str], question: str, batch: int = 40) -> list[float]:
    """Sum of log p(text tokens + end-of-turn | picture, question) per pair (teacher forced)."""
    tok = model._tok()
    end = model.config.tokens.chat_end
    out: list[float] = []
    for lo in range(0, len(images), batch):
        ims, txt = images[lo:lo + batch], texts[lo:lo + batch]
        conv = [{"role": "user", "content": "<im_start><image><im_end>\n" + question}]
        prompt = tok.encode_prompt(conv, task="understand")
        replies = [tok.encode(t) + [end] for t in txt]
        rows = [prompt + r for r in replies]
        pixels = model._read_images(ims)
        prefix = SM.prefill(model.model, *SM.left_pad(rows, model.config.tokens.pad), model._latents(pixels),
                            keep_hidden=True)
        logp = torch.log_softmax(model.model.logits(prefix.hidden).float(), dim=-1)  # [B, S, V]
        for i, r in enumerate(replies):
            n = len(r)
            pred = logp[i, -n - 1:-1]  # positions that predict the reply tokens (rows are right-aligned)
            out.append(float(pred.gather(1, torch.tensor(r).unsqueeze(1)).sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--question", default="Describe the image.")
    ap.add_argument("--out", default="runs/embedded/rerank_probe.json")
    a = ap.parse_args()
    model = Cheers.from_pretrained(a.model)
    gens = S.eval_prompts(a.seed, a.n, 64, families=("generation",))["generation"]
    correct = torch.zeros(len(gens), a.k)
    score = torch.zeros(len(gens), a.k)
    for k in range(a.k):
        ims = batched_generate(model, [g.text for g in gens], a.seed + k * 100000, a.batch)
        correct[:, k] = torch.tensor([float(J.score_generation(im, g.geneval)["correct"]) for im, g in zip(ims, gens)])
        score[:, k] = torch.tensor(caption_logprob(model, ims, [g.prompt for g in gens], a.question, a.batch))
        print(f"candidate {k}: plain {correct[:, k].mean():.3f}", flush=True)
    pick = score.argmax(1)
    rows = defaultdict(lambda: {"single": [], "rerank": [], "oracle": []})
    for i, g in enumerate(gens):
        r = rows[g.category]
        r["single"].append(float(correct[i].mean()))
        r["rerank"].append(float(correct[i, pick[i]]))
        r["oracle"].append(float(correct[i].max()))
    table = {c: {m: sum(v) / len(v) for m, v in r.items()} for c, r in rows.items()}
    table["overall"] = {m: sum(table[c][m] for c in rows) / len(rows) for m in ("single", "rerank", "oracle")}
    for c, v in table.items():
        print(f"{c:14s} single {v['single']:.3f}  rerank {v['rerank']:.3f}  oracle {v['oracle']:.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "table": table}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
