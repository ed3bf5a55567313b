"""Can the velocity head see the noisy latent it denoises?

In Cheers the head never receives x_t itself: x_t goes through the latent-to-pixel decoder, the ViT patch embedding
(the high-frequency "detail" the gate injects) and the LLM. If the decoder loses the noise in x_t (a decoder trained
only on clean latents does), the head cannot predict the -x0 part of the velocity x1 - x0 and the flow loss stays
high at small t, whatever else is trained.

For each t on a grid this fits a ridge regression, per image token, from the detail vector (d_v numbers) to the
token's x_t (its 2x2 latent cells x channels) on half of the held-out images and reports R^2 on the other half,
next to the same regression from x_t itself to the velocity (what a head with direct access could reach linearly).
"""

from __future__ import annotations

import argparse
import json

import torch

from cheers.checkpoint import load_model
from cheers.eval.shapes import eval_prompts
from cheers.processor import preprocess_generation
from cheers.shapes.world import render_scene

T_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)


def ridge_r2(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
             lam: float = 1e-2) -> float:
    """R^2 on the test rows of a ridge regression (with intercept) fitted on the training rows; the penalty is
    `lam` x the mean diagonal of the Gram matrix, so it does not depend on the features' scale."""
    def aug(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)

    a = aug(x_train)
    gram = a.T @ a
    penalty = lam * float(gram.diagonal().mean()) * torch.eye(a.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram + penalty, a.T @ y_train.double())
    pred, y = aug(x_test) @ w, y_test.double()
    return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[N, C, g, g] -> [N * g * g, C] in the head's raster order."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


@torch.no_grad()
def xt_visibility(model, n: int = 20, seed: int = 3, ts: tuple[float, ...] = T_GRID) -> dict[float, dict[str, float]]:
    """Per t: R^2 of detail -> x_t, detail -> velocity and x_t -> velocity (held-out half of n x 6 ShapesBench scenes)."""
    res = model.config.resolution
    items = eval_prompts(seed=seed, n=n, resolution=res, families=("generation",))["generation"]
    x1 = model.encode_images(torch.stack([preprocess_generation(render_scene(it.spec, res), res) for it in items]))
    g = torch.Generator().manual_seed(seed)
    split = (x1.shape[0] // 2) * x1.shape[2] * x1.shape[3]  # first half of the images train, second half test
    out = {}
    for t in ts:
        x0 = torch.randn(x1.shape, generator=g)
        xt = t * x1 + (1 - t) * x0
        detail = model.read_latents(xt).detail
        d = detail.reshape(-1, detail.shape[-1])
        xt_tok, v_tok = _tokens(xt), _tokens(x1 - x0)
        fit = lambda a, b: round(ridge_r2(a[:split], b[:split], a[split:], b[split:]), 3)  # noqa: E731
        out[t] = {"detail->x_t": fit(d, xt_tok), "detail->v": fit(d, v_tok), "x_t->v": fit(xt_tok, v_tok)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=60, help="scenes per generation category (half fit, half test)")
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    model = load_model(a.model).eval()
    print(json.dumps({"model": a.model, "by_t": xt_visibility(model, a.n, a.seed)}))


if __name__ == "__main__":
    main()
