"""Trainer engine: the stage configs it runs (packaged and recipe), their trainable sets and LR schedules, the
registry of stage trainers, and stages chained through exports and training checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cheers.train import engine as E
from cheers.train.settings import STAGE_KINDS, TrainConfigError, apply_override, load_config

REPO = Path(__file__).resolve().parents[2]

STAGES = ("stage0_vae", "stage1_align", "stage2_pretrain", "stage3_pretrain", "stage4_sft")


# ---- configs --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STAGES)
def test_packaged_stage_configs_load(name):
    cfg = load_config(name)
    assert cfg.stage == name
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.eps == 1e-8 and cfg.optim.grad_clip == 1.0
    if name != "stage0_vae":
        assert cfg.kind == "flow" and cfg.data.cfg_dropout == 0.2
        assert "model.vae_model.*" in cfg.trainable.exclude or not any(
            p.startswith("model.vae_model") for p in cfg.trainable.include)
    else:
        assert cfg.kind == "vae"


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("**/*.yaml")), ids=lambda p: p.name)
def test_repository_recipe_configs_load(path):
    """Every recipe config in the repository stays valid, standalone (no `extends:` chain to follow)."""
    assert load_config(path).stage
    assert "extends" not in path.read_text(encoding="utf-8")


def test_stage1_mix_and_stage4_pairing():
    s1 = load_config("stage1_align")
    assert [s.weight for s in s1.data.sources] == [3, 6, 1]
    assert load_config("stage4_sft").data.pairing == "alternate"


def test_overrides():
    cfg = load_config("stage1_align", ["optim.lr=3e-4", "data.sources.0.weight=2", "steps=7", "model.init=null",
                                       "model.preset=cheers-tiny", "trainable.include=[model.gen_projector.*]",
                                       "distributed.strategy=fsdp2"])
    assert cfg.optim.lr == 3e-4 and cfg.steps == 7 and cfg.model.init is None
    assert cfg.data.sources[0].weight == 2.0 and cfg.trainable.include == ["model.gen_projector.*"]
    assert cfg.distributed.strategy == "fsdp2"
    with pytest.raises(TrainConfigError, match="did you mean 'lr'"):
        load_config("stage1_align", ["optim.lrr=1"])
    with pytest.raises(TrainConfigError, match="schedule.kind"):
        load_config("stage1_align", ["schedule.kind=linear"])
    cfg = load_config("stage1_align", ["data.t_sampling=logit_normal", "data.t_mean=-0.5"])
    assert (cfg.data.t_sampling, cfg.data.t_mean, cfg.data.t_std) == ("logit_normal", -0.5, 1.0)
    assert load_config("stage1_align", ["data.t_uniform=0.25"]).data.t_uniform == 0.25
    with pytest.raises(TrainConfigError, match="data.t_sampling"):
        load_config("stage1_align", ["data.t_sampling=beta"])
    with pytest.raises(TrainConfigError, match="data.t_std: must be > 0"):
        load_config("stage1_align", ["data.t_std=0"])
    with pytest.raises(TrainConfigError, match="data.t_uniform: must be in"):
        load_config("stage1_align", ["data.t_uniform=-0.1"])
    with pytest.raises(TrainConfigError, match="expected an integer"):
        load_config("stage1_align", ["steps=abc"])
    with pytest.raises(TrainConfigError, match="key.sub=value"):
        apply_override({}, "steps")
    with pytest.raises(TrainConfigError, match="no such config"):
        load_config("stage9_nothing")


def test_trainable_patterns_stage1():
    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.train.optim import select_trainable

    model = CheersModel(preset("cheers-tiny"))
    cfg = load_config("stage1_align")
    trainable, frozen = select_trainable(model, cfg.trainable.include, cfg.trainable.exclude)
    assert "model.language_model.embed_tokens.weight" in trainable  # = the tied LM head
    assert any(n.startswith("model.gen_projector.") for n in trainable)
    assert any(n.startswith("model.hi_gate.") for n in trainable)
    for prefix in ("model.language_model.layers.", "model.vision_representation.", "model.vae_model.",
                   "model.vae_decoder_projector."):
        assert not any(n.startswith(prefix) for n in trainable), prefix
    assert model.lm_head.weight.requires_grad
    with pytest.raises(TrainConfigError, match="matches no parameter"):
        select_trainable(model, ["model.nothing.*"], [])
    t2, _ = select_trainable(model, ["re:model\\.hi_gate\\..*"], [])
    assert t2 and all(n.startswith("model.hi_gate.") for n in t2)


def test_joint_after_vision_stage_freezes_the_whole_vit():
    """A joint stage after ViT pretraining must not train the ViT (doing so erased its shape features)."""
    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.train.optim import select_trainable

    model = CheersModel(preset("cheers-small-p8"))
    cfg = load_config(REPO / "tests/fixtures/joint_frozen_vit.yaml")
    assert cfg.model.init.endswith("vision/export") and cfg.schedule.kind == "wsd" and cfg.steps == 2300
    trainable, frozen = select_trainable(model, cfg.trainable.include, cfg.trainable.exclude)
    frozen_roots = {n.split(".")[1] for n in frozen}
    assert frozen_roots == {"vae_model", "vae_decoder_projector", "vision_representation"}, frozen_roots
    vit = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.vision_representation."))
    assert vit > 5e5 and not any(n.startswith("model.vision_representation.") for n in trainable)
    assert any(n.startswith("model.hi_gate.") for n in trainable) and model.lm_head.weight.requires_grad


def test_decoder_stage_trains_the_latent_to_pixel_decoder():
    """Stage 05 of the cheers-shapes recipe trains the latent-to-pixel decoder (paper stage 2): frozen, it hid the
    noise of x_t from the velocity head, which sees x_t only through decoder -> ViT."""
    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.train.optim import select_trainable

    model = CheersModel(preset("cheers-small"))
    cfg = load_config(REPO / "recipes/cheers-shapes/05_big_objects.yaml")
    assert cfg.model.init == "runs/embedded/04_continue2/package" and cfg.schedule.kind == "wsd"
    trainable, frozen = select_trainable(model, cfg.trainable.include, cfg.trainable.exclude)
    assert {n.split(".")[1] for n in frozen} == {"vae_model", "vision_representation"}
    assert all(n.startswith("model.vision_representation.head.") for n in frozen if "vision_representation" in n)
    decoder = [n for n in trainable if n.startswith("model.vae_decoder_projector.decoder.")]
    assert len(decoder) > 20 and model.lm_head.weight.requires_grad


def test_lr_schedule():
    from cheers.train.optim import LRSchedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = LRSchedule(opt, 1.0, total_steps=100, warmup_steps=10, kind="cosine", min_lr_ratio=0.1)
    assert s.lr(0) == 0.0 and s.lr(5) == pytest.approx(0.5) and s.lr(10) == pytest.approx(1.0)
    assert s.lr(55) == pytest.approx(0.1 + 0.9 * 0.5) and s.lr(100) == pytest.approx(0.1)
    c = LRSchedule(opt, 2.0, total_steps=100, warmup_steps=0, kind="constant")
    assert c.lr(0) == 2.0 and c.lr(99) == 2.0
    # warm-up / stable / decay: flat until the last 20 steps, then linear to the floor
    w = LRSchedule(opt, 1.0, total_steps=100, warmup_steps=10, kind="wsd", min_lr_ratio=0.1, decay_steps=20)
    assert w.lr(5) == pytest.approx(0.5) and w.lr(10) == 1.0 and w.lr(79) == 1.0 and w.lr(80) == 1.0
    assert w.lr(90) == pytest.approx(0.55) and w.lr(100) == pytest.approx(0.1)


def test_wsd_schedule_from_config():
    from cheers.train.optim import LRSchedule
    from cheers.train.settings import load_config

    cfg = load_config("stage2_pretrain", ["steps=1000", "schedule.kind=wsd", "schedule.warmup=50",
                                          "schedule.decay=0.25", "schedule.min_lr_ratio=0", "optim.lr=1e-3"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = LRSchedule.for_run(opt, cfg)
    assert (s.warmup, s.decay) == (50, 250)
    assert s.lr(749) == pytest.approx(1e-3) and s.lr(875) == pytest.approx(0.5e-3) and s.lr(1000) == 0.0


def test_stages_chain_through_export_and_training_checkpoints(work, tmp_path):
    """stage0 export -> stage1_align (packaged config) -> a later stage initialised from stage 1's training
    checkpoint (weights only, fresh optimizer and data position)."""
    root, files = work
    s0 = tmp_path / "s0"
    common = ["threads=1", "log.progress=false", "schedule.warmup=0", "micro_batch_size=2", "steps=1",
              f"data.sources=[{{path: {files['understanding']}, weight: 3}}, {{path: {files['generation']}, weight: 6}},"
              f" {{path: {files['text']}, weight: 1}}]"]
    E.train(load_config("stage0_vae", [f"output_dir={s0}", "model.preset=cheers-tiny", f"model.tokenizer={root / 'tok'}",
                                       "vae.stats_images=2"] + common))
    s1 = tmp_path / "s1"
    E.train(load_config("stage1_align", [f"output_dir={s1}", f"model.init={s0 / 'export'}", "ckpt.export_final=false",
                                         "latents.dir=memory"] + common))
    from cheers.checkpoint import load_model

    start = load_model(s0 / "export")
    tr = E.FlowTrainer(load_config("stage2_pretrain", [f"output_dir={tmp_path / 's2'}", f"model.init={s1}",
                                                       "latents.dir=memory"] + common))
    try:
        assert tr.step == 0 and tr.feed.index == 0
        got = tr.base.state_dict()
        changed = [k for k, v in start.state_dict().items() if not torch.equal(v, got[k])]
        # stage 1 trained exactly its modules; the frozen ones arrive unchanged through the checkpoint
        assert changed and all(k.split(".")[1] in ("und_projector", "gen_projector", "hi_projector", "hi_gate",
                                                   "time_embed", "language_model") or k == "lm_head.weight"
                               for k in changed), changed
        assert not any(k.startswith("model.language_model.layers.") for k in changed)
        assert any(n.startswith("model.language_model.layers.") for n in tr.trainable)  # stage 2 trains the LLM
    finally:
        tr.close()


# ---- the trainer registry -----------------------------------------------------------------------------------------


def test_every_stage_kind_has_its_trainer():
    assert set(E.TRAINERS) == set(STAGE_KINDS) == {"flow", "vae", "vision"}
    assert [E.TRAINERS[k].kind for k in STAGE_KINDS] == list(STAGE_KINDS)
    assert E.TRAINERS["flow"] is E.FlowTrainer and E.TRAINERS["vae"] is E.VAETrainer
    assert E.TRAINERS["vision"] is E.VisionTrainer
    assert all(issubclass(t, E.RunBase) for t in E.TRAINERS.values())


def test_an_unknown_stage_kind_is_refused_before_anything_runs(tmp_path):
    cfg = load_config("stage1_align", [f"output_dir={tmp_path / 'run'}"])
    cfg.kind = "diffusion"  # a config edited after validation
    with pytest.raises(TrainConfigError, match="kind: unknown stage kind 'diffusion'; choose one of flow, vae, vision"):
        E.make_trainer(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(TrainConfigError, match="kind: 'diffusion' is not one of flow, vae, vision"):
        load_config("stage1_align", ["kind=diffusion"])
