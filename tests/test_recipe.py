"""The recipe of the embedded model (recipes/cheers-shapes) is ~21 hours of CPU training: a wrong config path, a
stage that starts from the wrong weights or a re-run that differs from its siblings in more than its seed would only
show up hours in. These tests read the configs and run train.sh / data.sh with the trainer and the tools replaced by
a recorder, so they check what the recipe will run without training anything."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cheers.train.settings import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/cheers-shapes"
TRAIN = RECIPE / "train.sh"
DATA = RECIPE / "data.sh"
PACKAGE = "src/cheers/assets/cheers-shapes"
OUT = "runs/embedded"
SEED_FAMILY = ["14_mcq_seed240", "15_mcq_seed241", "16_mcq_seed242", "17_mcq_seed243"]
HEAD_ONLY, HEAD_ONLY_MORE = "18_head_only", "19_head_only_more"
HEAD_PATTERNS = ["model.gen_projector.*", "model.hi_gate.*", "model.hi_projector.*", "model.time_embed.*"]
# stands in for the interpreter and for `cheers`: records its arguments as one JSON line; runs only the `-c` snippets
# that compute an alpha (`print(1 / k)`)
STUB = """import json, os, sys
args = sys.argv[1:]
if args[:1] == ["-c"] and args[1].startswith("print("):
    exec(args[1])
    sys.exit(0)
with open(os.environ["RECIPE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
"""


def _cfg(name: str) -> TrainConfig:
    return load_config(RECIPE / f"{name}.yaml")


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


def _stub_run(tmp_path: Path, script: str = "train.sh", args: tuple[str, ...] = (),
              done: tuple[str, ...] = ()) -> list[list[str]]:
    """Run a copy of the recipe in tmp_path with the recorder as PY and CHEERS; `done`: directories that exist before
    the run (finished checkpoints). Returns the recorded calls in order (`cheers` calls start with "cheers")."""
    root = tmp_path / "root"
    shutil.copytree(RECIPE, root / "recipes/cheers-shapes")
    (root / OUT).mkdir(parents=True)
    for d in done:
        if d.endswith(".json"):
            (root / d).parent.mkdir(parents=True)
            (root / d).write_text("{}")
        else:
            (root / d).mkdir(parents=True)
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": "/usr/bin:/bin", "RECIPE_LOG": str(log), "PY": f"{sys.executable} {stub}",
           "CHEERS": f"{sys.executable} {stub} cheers"}
    res = subprocess.run(["bash", str(root / "recipes/cheers-shapes" / script), *args], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _tool_calls(calls: list[list[str]], tool: str) -> list[list[str]]:
    return [c for c in calls if c[0] == f"recipes/cheers-shapes/tools/{tool}"]


def _opt(call: list[str], flag: str) -> str:
    return call[call.index(flag) + 1]


def _stage_names() -> list[str]:
    return sorted(p.stem for p in RECIPE.glob("*.yaml"))


@pytest.mark.parametrize("script", ["train.sh", "data.sh"])
def test_recipe_scripts_are_valid_bash(script: str) -> None:
    res = subprocess.run(["bash", "-n", str(RECIPE / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_stage_configs_are_numbered_standalone_and_all_used() -> None:
    """01..19 with no gap, each readable alone (no `extends`), each named by train.sh, nothing else in the folder
    that train.sh does not name, and each writes to runs/embedded/<its name> (where train.sh looks for it)."""
    names = _stage_names()
    assert [n[:2] for n in names] == [f"{k:02d}" for k in range(1, 20)], names
    text = TRAIN.read_text()
    for name in names:
        raw = yaml.safe_load((RECIPE / f"{name}.yaml").read_text())
        assert "extends" not in raw, f"{name}.yaml still extends {raw['extends']}"
        cfg = _cfg(name)
        assert cfg.steps > 0 and cfg.output_dir == f"{OUT}/{name}" and cfg.stage == name, name
        assert name in text, f"train.sh never names {name}.yaml"


def test_step_defaults_are_each_stage_schedule() -> None:
    """STEPS_NN defaults to all of stage NN's schedule: a smaller default would ship a model stopped early."""
    text = TRAIN.read_text()
    for name in _stage_names()[1:]:
        m = re.search(rf"^STEPS_{name[:2]}=\$\{{STEPS_{name[:2]}:-(\d+)\}}$", text, flags=re.M)
        assert m, f"train.sh: no default for STEPS_{name[:2]}"
        assert int(m.group(1)) == _cfg(name).steps, name


def test_stub_run_trains_every_stage_in_order_and_packages_the_last_ema(tmp_path: Path) -> None:
    """The whole recipe with the trainer and the tools recorded: each config trains once, in order, to the end of its
    schedule, with train.sh's arguments passed on; the seed family is averaged as a running mean (alpha 1/2, 1/3,
    1/4), and stage 19's EMA is packaged into the package directory with the sampling defaults it ships with."""
    calls = _stub_run(tmp_path, args=("log.progress=false",))
    trains = [c for c in calls if c[0] == "cheers"]
    assert [Path(c[2]).stem for c in trains] == _stage_names()
    for c in trains:
        name = Path(c[2]).stem
        assert c[1] == "train" and c[-2:] == ["--resume", "log.progress=false"], c
        assert "model.channels_last=true" in c
        if name != "01_vae":
            assert f"debug.max_steps_this_run={_cfg(name).steps}" in c, c
    averages = _tool_calls(calls, "average_exports.py")
    assert [float(_opt(a, "--alpha")) for a in averages] == [0.5, 0.5, 0.5, 1 / 3, 0.25]
    family = [_cfg(n).output_dir for n in SEED_FAMILY]
    assert _opt(averages[2], "--a") == f"{family[0]}/export_ema_step_2000"
    for k, a in enumerate(averages[2:], start=1):
        assert _opt(a, "--b") == f"{family[k]}/export_ema_step_2000"
        if k > 1:  # the running mean: the previous average is A
            assert _opt(a, "--a") == _opt(averages[k], "--dest")
    package = _tool_calls(calls, "package.py")[-1]
    last = _cfg(HEAD_ONLY_MORE)
    assert _opt(package, "--export") == f"{last.output_dir}/export_ema_step_{last.steps}"
    assert _opt(package, "--dest") == PACKAGE and "--card" not in package
    shipped = json.loads((REPO / PACKAGE / "generation_config.json").read_text())["cheers"]["image"]
    lo, hi = (float(v) for v in _opt(package, "--cfg-interval").split(","))
    assert (float(_opt(package, "--cfg")), [lo, hi], _opt(package, "--sampler"), int(_opt(package, "--steps"))) == \
        (shipped["cfg_scale"], shipped["cfg_interval"], shipped["sampler"], shipped["steps"])
    assert [_opt(c, "--model") for c in _tool_calls(calls, "evaluate.py")] == [PACKAGE]
    assert calls.index(package) < calls.index(_tool_calls(calls, "evaluate.py")[0])


def test_every_stage_starts_from_weights_the_run_wrote_before_it(tmp_path: Path) -> None:
    """A stage's model.init is a directory an earlier step of the run writes (an export, an average or a package),
    every checkpoint export reads the stage trained just before it, at its last step, and every average or package
    reads what the run wrote."""
    calls = _stub_run(tmp_path)
    written: set[str] = set()
    last_trained: TrainConfig | None = None
    for c in calls:
        if c[0] == "cheers":
            name = Path(c[2]).stem
            cfg = _cfg(name)
            if name != "01_vae":
                assert cfg.model.init in written, f"{name}: model.init {cfg.model.init} is not written before it"
            written.add(f"{cfg.output_dir}/export")  # ckpt.export_final
            last_trained = cfg
        elif c[0].endswith("export_step.py"):
            assert last_trained is not None
            ema = "--ema" in c
            assert c[1] == f"{last_trained.output_dir}/ckpt/step_{last_trained.steps}", c
            assert c[2] == f"{last_trained.output_dir}/export_{'ema_' if ema else ''}step_{last_trained.steps}", c
            if ema:
                assert last_trained.ema.decay > 0, f"{c}: the stage keeps no EMA"
            written.add(c[2])
        elif c[0].endswith(("package.py", "average_exports.py")):
            inputs = [_opt(c, "--export")] if c[0].endswith("package.py") else [_opt(c, "--a"), _opt(c, "--b")]
            assert set(inputs) <= written, f"{c}: reads what the run has not written"
            written.add(_opt(c, "--dest"))
    assert _cfg(HEAD_ONLY).model.init == _opt(_tool_calls(calls, "average_exports.py")[-1], "--dest")


def test_finished_stages_are_skipped_and_still_exported(tmp_path: Path) -> None:
    """Re-running after stages finished trains only the rest; the exports between stages are written again."""
    done = [f"{_cfg(n).output_dir}/ckpt/step_{_cfg(n).steps}" for n in ("02_joint", "03_continue", "14_mcq_seed240")]
    calls = _stub_run(tmp_path, done=(f"{OUT}/01_vae/export/config.json", *done))
    trained = [Path(c[2]).stem for c in calls if c[0] == "cheers"]
    assert trained == [n for n in _stage_names() if n not in ("01_vae", "02_joint", "03_continue", "14_mcq_seed240")]
    exports = [c[1] for c in _tool_calls(calls, "export_step.py")]
    assert done[1] in exports and done[2] in exports


def test_data_command_writes_every_file_the_stages_read(tmp_path: Path) -> None:
    """data.sh runs each data tool once into runs/embedded/data, and every source file of every stage (and the
    tokenizer) is one that data.sh guards and writes."""
    calls = _stub_run(tmp_path, script="data.sh")
    tools = [Path(c[0]).name if c[0] != "-c" else "make_dataset" for c in calls]
    assert tools == ["make_data.py", "make_big_objects.py", "make_big_objects.py", "make_scene_text.py",
                     "make_shape_names.py", "make_shape_names.py", "make_dataset"]
    assert all(_opt(c, "--out") == f"{OUT}/data" for c in calls if c[0] != "-c")
    guarded = set(re.findall(r"\[ -f \$D/([\w/.]+) \] \|\|", DATA.read_text()))
    written = {"shapes_generation.jsonl", "shapes_understanding.jsonl", "shapes_edit.jsonl", "shapes_text.jsonl",
               "digits_generation.jsonl", "digits_understanding.jsonl", "scene_text.jsonl"}  # beside a guarded file
    for name in _stage_names():
        cfg = _cfg(name)
        for s in cfg.data.sources:
            assert s.path.startswith(f"{OUT}/data/"), s.path
            assert s.path.removeprefix(f"{OUT}/data/") in guarded | written, f"{name}: nothing writes {s.path}"
    assert _cfg("01_vae").model.tokenizer == f"{OUT}/data/tokenizer" and "tokenizer/tokenizer.json" in guarded


def test_seed_family_differs_only_in_seed_stage_and_output() -> None:
    """The mean of stages 14-17 is a mean of re-runs of one stage: each member must be that stage with another
    seed."""
    flats = [_flat(_cfg(n)) for n in SEED_FAMILY]
    for name, flat in zip(SEED_FAMILY[1:], flats[1:]):
        differ = _differ(flats[0], flat)
        assert differ == {"seed", "stage", "output_dir"}, f"{name}: differs from {SEED_FAMILY[0]} in {sorted(differ)}"
    seeds = [f["seed"] for f in flats]
    assert len(set(seeds)) == len(seeds), f"members share a seed: {seeds}"


def test_head_only_continuation_differs_only_in_its_run_and_start() -> None:
    """Stage 19 continues stage 18's exported EMA and differs from stage 18 only in that and its own run."""
    head, more = _cfg(HEAD_ONLY), _cfg(HEAD_ONLY_MORE)
    assert more.model.init == f"{head.output_dir}/export_ema_step_{head.steps}"
    assert _differ(_flat(more), _flat(head)) == {"seed", "stage", "output_dir", "steps", "model.init"}


def test_head_only_stage_is_the_seed_family_stage_with_only_the_head_and_its_generation_sources() -> None:
    """Stage 18 keeps stage 14's settings and the weights of its generation and edit sources; what it changes is
    named here, so a stray override (another lr, flow-time law or EMA) fails."""
    head, base = _cfg(HEAD_ONLY), _cfg(SEED_FAMILY[0])
    assert list(head.trainable.include) == HEAD_PATTERNS and list(head.trainable.exclude) == []
    picture_free = [s for s in base.data.sources if s.task in ("generation", "edit")]
    assert [(s.name, s.path, s.weight, s.task) for s in head.data.sources] == \
        [(s.name, s.path, s.weight, s.task) for s in picture_free]
    differ = _differ(_flat(head), _flat(base))
    assert differ == {"seed", "stage", "output_dir", "steps", "model.init", "trainable.include", "trainable.exclude",
                      "data.sources"}, sorted(differ)


def test_head_only_stage_leaves_understanding_unchanged() -> None:
    """Stage 18 rests on the claim that understanding reads none of the parameters it trains: change all of them and
    the answer logits must be bit-identical, while the velocity of a generated image must move."""
    from cheers import constants as C
    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.train.optim import select_trainable

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = CheersModel(preset("cheers-tiny")).eval()
    head = _cfg(HEAD_ONLY)
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
