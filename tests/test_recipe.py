"""The embedded model's recipe (scripts/embedded/train_embedded.sh) is hours of CPU training: a wrong config path or a
re-run that differs from stage 24 in more than its seed would only show up after the earlier stages finished. These
tests read the script itself and check what it will run, without training."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cheers.train.settings import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "scripts/embedded/train_embedded.sh"
HEAD_ONLY = "p27/stage25_head_only.yaml"
HEAD_ONLY_MORE = "p27/stage26_head_only_more.yaml"
HEAD_PATTERNS = ["model.gen_projector.*", "model.hi_gate.*", "model.hi_projector.*", "model.time_embed.*"]


def _recipe_text() -> str:
    return RECIPE.read_text()


def _members() -> list[tuple[str, str]]:
    """(tag, config path under scripts/embedded) of the stage-24 family, in the order the loop averages them."""
    m = re.search(r'^MEMBERS="([^"]*)"', _recipe_text(), flags=re.M)
    assert m, f"{RECIPE}: no MEMBERS=\"...\" list"
    return [tuple(entry.split(":", 1)) for entry in m.group(1).split()]  # type: ignore[misc]


def _flat(cfg: TrainConfig) -> dict[str, object]:
    out: dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            out[prefix] = node

    walk(cfg.to_dict(), "")
    return out


def _differ(a: dict[str, object], b: dict[str, object]) -> set[str]:
    """Keys of two flattened configs whose values differ (or that only one has)."""
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def test_recipe_is_valid_bash() -> None:
    res = subprocess.run(["bash", "-n", str(RECIPE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_every_stage_config_the_recipe_names_exists_and_loads() -> None:
    text = _recipe_text()
    named = set(re.findall(r"scripts/embedded/([\w./-]+\.yaml)", text))
    named |= {path for _, path in _members()}
    assert len(named) >= 15, f"expected the recipe's ~17 stage configs, found {sorted(named)}"
    for rel in sorted(named):
        path = REPO / "scripts/embedded" / rel
        assert path.is_file(), f"{RECIPE} names {rel}, which does not exist"
        cfg = load_config(path)
        assert cfg.steps > 0 and cfg.output_dir, rel


def test_stage24_family_differs_only_in_seed_stage_and_output() -> None:
    """The shipped weights are a mean of re-runs of one stage: each member must be that stage with another seed."""
    members = _members()
    assert [tag for tag, _ in members] == ["24", "24b", "24c", "24d"]
    flats = [_flat(load_config(REPO / "scripts/embedded" / path)) for _, path in members]
    base = flats[0]
    for (tag, path), flat in zip(members[1:], flats[1:]):
        differ = _differ(base, flat)
        assert differ == {"seed", "stage", "output_dir"}, f"{path}: differs from stage 24 in {sorted(differ)}"
        assert flat["output_dir"] == f"runs/embedded/stage{tag}", path
    seeds = [f["seed"] for f in flats]
    assert len(set(seeds)) == len(seeds), f"members share a seed: {seeds}"


def test_every_member_has_a_step_count_variable() -> None:
    text = _recipe_text()
    for tag, _ in _members():
        var = f"STAGE{tag.upper()}_STEPS"
        assert re.search(rf"^{var}=\$\{{{var}:-\d+\}}$", text, flags=re.M), f"{RECIPE}: no default for {var}"


def test_member_loop_trains_each_member_and_keeps_the_running_mean(tmp_path: Path) -> None:
    """Run the recipe from the stage-24 loop to the shipped package with the trainer and the scripts replaced by a
    recorder: each member trains from its own config, the averages give every member weight 1/k (alpha 1/2, 1/3,
    1/4 on the running mean), the head-only stages 25 and 26 follow, and stage 26's EMA is what gets packaged."""
    text = _recipe_text()
    start = text.index("MEMBERS=")
    end = text.index("\n", text.index("--dest src/cheers/assets/cheers-shapes"))
    steps = "\n".join(re.findall(r"^STAGE2[4-6][A-Z]?_STEPS=.*$", text, flags=re.M))
    stub = tmp_path / "stub.py"
    # stands in for the venv's python: runs `-c` snippets (the loop computes alpha with one), records everything else
    stub.write_text("import sys\nif sys.argv[1] == '-c':\n    exec(sys.argv[2])\n"
                    "else:\n    print('PY', *sys.argv[1:])\n")
    script = f'set -euo pipefail\nPY="{sys.executable} {stub}"\nCHEERS="echo TRAIN"\nOUT={tmp_path}/out\n{steps}\n'
    script += text[start:end].rstrip("\\") + "\n"
    res = subprocess.run(["bash", "-c", script, "recipe"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    trained = [ln.split()[2] for ln in lines if ln.startswith("TRAIN")]
    assert trained == [f"scripts/embedded/{path}" for _, path in _members()] + [f"scripts/embedded/{HEAD_ONLY}",
                                                                         f"scripts/embedded/{HEAD_ONLY_MORE}"]
    averages = [ln.split() for ln in lines if "average_exports.py" in ln]
    assert [a[a.index("--alpha") + 1] for a in averages] == ["0.5", "0.3333333333333333", "0.25"]
    soups = [f"{tmp_path}/out/soup{t}/export" for t in ("24b", "24c", "24d")]
    assert [a[a.index("--dest") + 1] for a in averages] == soups
    assert averages[0][averages[0].index("--a") + 1] == f"{tmp_path}/out/stage24/export_ema_step_2000"
    assert averages[2][averages[2].index("--a") + 1] == f"{tmp_path}/out/soup24c/export"
    exports = [ln.split() for ln in lines if "export_step.py" in ln]
    assert exports[-2][2:] == [f"{tmp_path}/out/stage25/ckpt/step_1500", f"{tmp_path}/out/stage25/export_ema_step_1500",
                               "--ema"]
    assert exports[-1][2:] == [f"{tmp_path}/out/stage26/ckpt/step_3000", f"{tmp_path}/out/stage26/export_ema_step_3000",
                               "--ema"]
    package = [ln.split() for ln in lines if "package.py" in ln]
    assert len(package) == 1
    assert package[0][package[0].index("--export") + 1] == f"{tmp_path}/out/stage26/export_ema_step_3000"
    assert package[0][package[0].index("--dest") + 1] == "src/cheers/assets/cheers-shapes"
    # stage 25 starts from the mean the loop ends with (the recipe runs with OUT=runs/embedded)
    head_cfg = load_config(REPO / "scripts/embedded" / HEAD_ONLY)
    assert head_cfg.model.init == "runs/embedded/soup24d/export"
    # stage 26 continues from stage 25's exported EMA, and differs from stage 25 only in that and its own run
    more = load_config(REPO / "scripts/embedded" / HEAD_ONLY_MORE)
    assert more.model.init == "runs/embedded/stage25/export_ema_step_1500"
    assert _differ(_flat(more), _flat(head_cfg)) == {"seed", "stage", "output_dir", "steps", "model.init"}


def test_head_only_stage_is_stage_24_with_only_the_head_and_its_generation_sources() -> None:
    """Stage 25 keeps stage 24's settings and the weights of its generation and edit sources; what it changes is
    named here, so a stray override (another lr, flow-time law or EMA) fails."""
    head = load_config(REPO / "scripts/embedded" / HEAD_ONLY)
    base = load_config(REPO / "scripts/embedded" / _members()[0][1])
    assert list(head.trainable.include) == HEAD_PATTERNS and list(head.trainable.exclude) == []
    picture_free = [s for s in base.data.sources if s.task in ("generation", "edit")]
    assert [(s.name, s.path, s.weight, s.task) for s in head.data.sources] == \
        [(s.name, s.path, s.weight, s.task) for s in picture_free]
    differ = _differ(_flat(head), _flat(base))
    assert differ == {"seed", "stage", "output_dir", "steps", "model.init", "trainable.include", "trainable.exclude",
                      "data.sources"}, sorted(differ)


def test_head_only_stage_leaves_understanding_unchanged() -> None:
    """Stage 25 is shipped on the claim that understanding reads none of the parameters it trains: change all of them
    and the answer logits must be bit-identical, while the velocity of a generated image must move."""
    from cheers import constants as C
    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.train.optim import select_trainable

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = CheersModel(preset("cheers-tiny")).eval()
    head = load_config(REPO / "scripts/embedded" / HEAD_ONLY)
    trainable, frozen = select_trainable(model, list(head.trainable.include), list(head.trainable.exclude))
    assert trainable and frozen
    assert all(any(n.startswith(p[:-1]) for p in HEAD_PATTERNS) for n in trainable), trainable
    g, c = model.config.grid, model.config.latent_channels
    latents = torch.randn(2, c, g, g)
    read = torch.tensor([[10, 11, C.IMAGE_PLACEHOLDER, 12, 13, 14]])
    gen = torch.tensor([[10, 11, 12, C.IMAGE_GEN_PLACEHOLDER, 13]])

    def run():
        with torch.no_grad():
            und = model(read, t=torch.ones(1), latents=latents[:1], return_logits=True).logits
            vel = model(gen, t=torch.full((1,), 0.3), latents=latents[1:], x0=torch.zeros_like(latents[1:])).velocity
        return und, vel

    und0, vel0 = run()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    und1, vel1 = run()
    assert torch.equal(und0, und1)
    assert (vel0 - vel1).abs().max() > 1e-3
