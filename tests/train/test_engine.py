"""Trainer engine, in-process: configs, parameter selection, schedule, loss bookkeeping, the golden-e loss,
one optimisation step, export round trip, NaN policy, latent cache, stage 0 (VAE)."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

from cheers.train import engine as E
from cheers.train.distributed import DistInfo
from cheers.train.settings import TrainConfigError, apply_override, load_config

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CHEERS_SHARED", REPO.parent / "shared")).resolve()
GOLDEN_E = SHARED / "parity" / "goldens" / "e_train_loss.safetensors"
TINY_OFFICIAL = SHARED / "parity" / "tiny-official"

STAGES = ("stage0_vae", "stage1_align", "stage2_pretrain", "stage3_pretrain", "stage4_sft")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from cheers.shapes.smoke import make_dataset, make_tokenizer

    root = tmp_path_factory.mktemp("engine")
    files = make_dataset(root / "data", n_understanding=4, n_generation=4, n_edit=2, n_text=2)
    make_tokenizer(root / "tok")
    return root, files


def flow_config(work, out: Path, **extra) -> "E.TrainConfig":
    root, files = work
    raw = {
        "stage": "test", "steps": 2, "micro_batch_size": 2, "output_dir": str(out), "threads": 1,
        "model": {"preset": "cheers-tiny", "tokenizer": str(root / "tok")},
        "schedule": {"warmup": 0}, "log": {"interval": 1, "progress": False},
        "ckpt": {"interval": 0, "export_final": False},
        "latents": {"dir": "memory"},
        "data": {"sources": [{"path": str(files[k]), "weight": w}
                             for k, w in (("understanding", 3), ("generation", 6), ("text", 1), ("edit", 1))]},
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in extra.items()]
    return load_config(None, overrides, raw=raw)


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


@pytest.mark.parametrize("path", sorted((REPO / "scripts").glob("**/*.yaml")), ids=lambda p: p.name)
def test_repository_recipe_configs_load(path):
    """Recipe configs elsewhere in the repository (extending the packaged stages) stay valid."""
    assert load_config(path).stage


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


def test_p8_joint_after_vision_stage_freezes_the_whole_vit():
    """The joint stage after ViT pretraining must not train the ViT (doing so erased its shape features)."""
    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.train.optim import select_trainable

    model = CheersModel(preset("cheers-small-p8"))
    cfg = load_config(REPO / "scripts/embedded/p8/stage1_joint_vision.yaml")
    assert cfg.model.init.endswith("vision/export") and cfg.schedule.kind == "wsd" and cfg.steps == 2300
    trainable, frozen = select_trainable(model, cfg.trainable.include, cfg.trainable.exclude)
    frozen_roots = {n.split(".")[1] for n in frozen}
    assert frozen_roots == {"vae_model", "vae_decoder_projector", "vision_representation"}, frozen_roots
    vit = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.vision_representation."))
    assert vit > 5e5 and not any(n.startswith("model.vision_representation.") for n in trainable)
    assert any(n.startswith("model.hi_gate.") for n in trainable) and model.lm_head.weight.requires_grad


def test_decoder_stage_trains_the_latent_to_pixel_decoder():
    """The continued stage of scripts/embedded/p4dec trains the latent-to-pixel decoder (paper stage 2): frozen, it
    hid the noise of x_t from the velocity head (scripts/embedded/xt_visibility.py)."""
    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.train.optim import select_trainable

    model = CheersModel(preset("cheers-small"))
    cfg = load_config(REPO / "scripts/embedded/p4dec/stage5_decoder.yaml")
    assert cfg.model.init == "runs/embedded/continue2/package" and cfg.schedule.kind == "wsd"
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


def test_global_batch_does_not_depend_on_the_split(work):
    """1 rank x micro 4, 2 ranks x micro 2 and 1 rank x micro 2 x accumulation 2 take the same records."""
    from cheers.train.feed import RecordFeed, slot_range

    cfg = flow_config(work, Path("/nonexistent"))
    layouts = {(1, 4, 1), (2, 2, 1), (1, 2, 2), (4, 1, 1)}
    seen = {}
    for world, micro, accum in layouts:
        recs = RecordFeed(cfg.data, 0).take(world * micro * accum)
        got = []
        for k in range(accum):
            for r in range(world):
                a, b = slot_range(k, r, world, micro)
                got += [(i, rec.where) for i, rec in recs[a:b]]
        seen[(world, micro, accum)] = sorted(got)
    assert len({tuple(v) for v in seen.values()}) == 1
    # alternate pairing: equal contiguous halves per global batch, in source order
    cfg.data.pairing = "alternate"
    cfg.data.sources = cfg.data.sources[:2]
    recs = RecordFeed(cfg.data, 0).take(4)
    assert [r.source for _, r in recs] == ["understanding", "understanding", "generation", "generation"]


def test_resume_with_an_added_source(work):
    """data.add_sources_on_resume: the saved sources continue exactly, the appended one starts fresh; without the
    flag, or when a saved source is missing, resuming is refused with both source lists in the message."""
    import copy

    from cheers.train.feed import RecordFeed
    from cheers.train.settings import TrainConfigError

    cfg = flow_config(work, Path("/nonexistent"))
    feed = RecordFeed(cfg.data, 0)
    feed.take(9)
    state = copy.deepcopy(feed.state_dict())
    want = [(i, r.where, r.source) for i, r in feed.take(40)]  # the old mix's continuation

    more = copy.deepcopy(cfg.data)
    more.sources.append(copy.deepcopy(more.sources[2]))
    more.sources[-1].name, more.sources[-1].weight = "extra", 4.0
    with pytest.raises(TrainConfigError, match="add_sources_on_resume"):
        RecordFeed(more, 0).load_state_dict(copy.deepcopy(state))
    more.add_sources_on_resume = True
    grown = RecordFeed(more, 0)
    grown.load_state_dict(copy.deepcopy(state))
    got = grown.take(40)
    assert [i for i, _ in got] == [w[0] for w in want]  # the global index carries on (noise, t, dropout seeds)
    assert 5 <= sum(r.source == "extra" for _, r in got) <= 30  # weight 4 of 15: ~10.7 expected
    # each saved source continues with the records it would have given next
    for name in ("understanding", "generation"):
        old = [w for _, w, src in want if src == name]
        new = [r.where for _, r in got if r.source == name]
        k = min(len(old), len(new))
        assert k >= 3 and new[:k] == old[:k]
    # the grown stream saves and resumes exactly as any other
    st2 = copy.deepcopy(grown.state_dict())
    a = [(i, r.where, r.source) for i, r in grown.take(12)]
    again = RecordFeed(more, 0)
    again.load_state_dict(st2)
    assert [(i, r.where, r.source) for i, r in again.take(12)] == a
    # removing a saved source is refused even with the flag
    fewer = copy.deepcopy(more)
    fewer.sources = fewer.sources[1:]
    with pytest.raises(TrainConfigError, match="does not match"):
        RecordFeed(fewer, 0).load_state_dict(copy.deepcopy(state))


# ---- loss bookkeeping -------------------------------------------------------------------------------------------------


def test_count_ce_targets_matches_the_model(work, tmp_path):
    tr = E.FlowTrainer(flow_config(work, tmp_path / "run", micro_batch_size=4, grad_accum=2))
    try:
        for _ in range(2):
            for mb in tr.next_micro_batches():
                with torch.no_grad():
                    out = tr.base(**mb.inputs, x0=mb.x0)
                assert out.num_ce_tokens == mb.n_ce
        # hand-made corner cases: <im_end> right after an image, prefixed text-only row, right padding
        ids = torch.tensor([[5, -200, 6, 9, 10, 0], [1, 9, 6, 2, 0, 0]])
        am = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
        labels = torch.tensor([[5, -100, 6, 9, 10, -100], [1, 9, 6, 2, -100, -100]])
        n = tr.base.config.num_image_tokens
        lat = torch.zeros(2, *tr.latent_shape)
        with torch.no_grad():
            out = tr.base(input_ids=ids, attention_mask=am, labels=labels, latents=lat, t=torch.ones(2),
                          x0=torch.zeros_like(lat))
        assert int(E.count_ce_targets(ids, am, labels, n, tr.img_end).sum()) == out.num_ce_tokens
    finally:
        tr.close()


def test_trainer_draws_flow_times_from_the_configured_distribution(work, tmp_path):
    cfg = flow_config(work, tmp_path / "a", micro_batch_size=8,
                      **{"data.t_sampling": "logit_normal", "data.t_mean": -3.0, "data.t_std": 0.05})
    tr = E.FlowTrainer(cfg)
    try:
        t = torch.cat([mb.inputs["t"] for mb in tr.next_micro_batches()])
        drawn = t[(t > 0) & (t < 1)]  # images to generate (understanding images sit at 1, text dummies at 0)
        assert drawn.numel() >= 2
        assert float(drawn.min()) > 0.035 and float(drawn.max()) < 0.065  # sigmoid(-3 +- 4 std) = 0.039-0.058
    finally:
        tr.close()


def test_trainer_loss_is_the_model_loss(work, tmp_path):
    # latent cache off: the trainer passes the collated batch straight to the model -> bit-identical loss
    tr = E.FlowTrainer(flow_config(work, tmp_path / "a", latents={"cache": False}))
    try:
        (mb,) = tr.next_micro_batches()
        assert "pixel_values" in mb.inputs
        ref = copy.deepcopy(tr.base)
        with torch.no_grad():
            want = ref(**mb.inputs, x0=mb.x0)
        loss, ce, flow, _ = E.forward_backward(tr.model, [mb], tr.info, 1.0)
        assert float(loss) == float(want.loss)
        assert float(ce) == float(want.ce_loss) and float(flow) == float(want.flow_loss)
    finally:
        tr.close()
    # with the latent cache the latents are computed image by image: equal up to float32 rounding
    tr = E.FlowTrainer(flow_config(work, tmp_path / "b"))
    try:
        (mb,) = tr.next_micro_batches()
        assert "latents" in mb.inputs
        inputs = {k: v for k, v in mb.inputs.items() if k != "latents"}
        ref_batch = _pixels_of(tr, mb)  # the pixel batch of the same samples
        with torch.no_grad():
            want = copy.deepcopy(tr.base)(**inputs, pixel_values=ref_batch, x0=mb.x0)
        loss, ce, flow, _ = E.forward_backward(tr.model, [mb], tr.info, 1.0)
        assert math.isclose(float(loss), float(want.loss), rel_tol=1e-5)
    finally:
        tr.close()


def _pixels_of(tr, mb):
    """The pixel batch behind a cached micro-batch (re-drawn from a fresh feed of the same config)."""
    from cheers.train.data import collate
    from cheers.train.feed import RecordFeed

    feed = RecordFeed(tr.cfg.data, tr.cfg.seed)
    recs = feed.take(mb.inputs["input_ids"].shape[0])
    samples = [tr.builder.build(r, i) for i, r in recs]
    batch = collate(samples, tr.tokenizer.token_ids.pad)
    assert torch.equal(batch["input_ids"], mb.inputs["input_ids"])
    return batch["pixel_values"]


def test_one_step_decreases_the_loss_on_a_fixed_batch(work, tmp_path):
    tr = E.FlowTrainer(flow_config(work, tmp_path / "run", optim={"lr": 1e-3}, **{"model.channels_last": "true"}))
    try:
        assert tr.base.model.vae_decoder_projector.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        (mb,) = tr.next_micro_batches()
        with torch.no_grad():
            before = float(tr.base(**mb.inputs, x0=mb.x0).loss)
        loss, ce, flow, _ = E.forward_backward(tr.model, [mb], tr.info, 1.0)
        assert float(loss) == before
        E.clip_gradients(tr.params, 1.0)
        tr.schedule.apply()
        tr.optimizer.step()
        with torch.no_grad():
            after = float(tr.base(**mb.inputs, x0=mb.x0).loss)
        assert after < before
    finally:
        tr.close()


def test_accumulation_equals_one_big_batch(work, tmp_path):
    """2 micro-batches of 1 with accumulation give the loss and gradient of one batch of 2."""
    tr = E.FlowTrainer(flow_config(work, tmp_path / "run", latents={"cache": False}))
    try:
        (big,) = tr.next_micro_batches()
        ref = copy.deepcopy(tr.base)
        loss, ce, flow, _ = E.forward_backward(ref, [big], DistInfo(), 1.0)
        g_ref = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        halves = []
        for r in range(2):
            rows = slice(r, r + 1)
            ids = big.inputs["input_ids"][rows]
            am = big.inputs["attention_mask"][rows]
            n_img = int((E.image_roles(big.inputs["input_ids"][: r], big.inputs["attention_mask"][: r]).numel()))
            k = E.image_roles(ids, am).numel()
            batch = {"input_ids": ids, "attention_mask": am, "labels": big.inputs["labels"][rows],
                     "pixel_values": big.inputs["pixel_values"][n_img:n_img + k], "t": big.inputs["t"][n_img:n_img + k]}
            halves.append(E.MicroBatch.from_batch(batch, big.x0[n_img:n_img + k], tr.n_img_tokens, tr.img_end))
        loss2, ce2, flow2, _ = E.forward_backward(tr.base, halves, DistInfo(), 1.0)
        assert float(loss2) == pytest.approx(float(loss), rel=1e-5)
        for n, p in tr.base.named_parameters():
            if n in g_ref:
                torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-4, atol=1e-6)
    finally:
        tr.close()


@pytest.mark.skipif(not GOLDEN_E.exists(), reason=f"parity goldens not found under {SHARED} (set CHEERS_SHARED)")
def test_golden_e_loss_and_grad_norm():
    from safetensors.torch import load_file

    from cheers.checkpoint import load_model

    g = load_file(str(GOLDEN_E))
    model = load_model(TINY_OFFICIAL).train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two spinning OpenMP threads crawl on a busy 2-core machine
    try:
        _golden_e_checks(g, model)
    finally:
        torch.set_num_threads(threads)


def _golden_e_checks(g, model):
    batch = {"input_ids": g["input_ids"], "attention_mask": g["attention_mask"], "labels": g["labels"],
             "pixel_values": g["pixel_values"].float(), "t": g["t"].reshape(-1)}
    mb = E.MicroBatch.from_batch(batch, g["x0_noise"].float(), model.config.num_image_tokens,
                                 model.config.tokens.img_end)
    loss, ce, flow, tasks = E.forward_backward(model, [mb], DistInfo(), model.config.flow_loss_weight, per_task=True)
    total = float(loss)
    assert abs(total - float(g["total_loss"])) / float(g["total_loss"]) < 1e-5
    assert abs(float(ce) - float(g["text_loss"])) / float(g["text_loss"]) < 1e-5
    assert abs(float(flow) - float(g["image_loss"])) / float(g["image_loss"]) < 1e-5
    norm = E.clip_gradients([p for p in model.parameters() if p.requires_grad], None)
    assert abs(norm - float(g["grad_total_norm"])) / float(g["grad_total_norm"]) < 1e-4
    # the trainer's default on CPU: channels-last convolution stacks (same loss up to float32 rounding)
    model.channels_last_()
    for p in model.parameters():
        p.grad = None
    loss_cl, *_ = E.forward_backward(model, [mb], DistInfo(), model.config.flow_loss_weight)
    assert abs(float(loss_cl) - float(g["total_loss"])) / float(g["total_loss"]) < 1e-5
    per = E._per_task_metrics(tasks)
    # row 0 understanding, row 1 generation; together they give the text loss (weighted by token counts)
    assert set(per) == {"ce/understanding", "ce/generation", "flow/und_image", "flow/gen_target"}
    n0, n1 = float(tasks[4]), float(tasks[5])
    assert (per["ce/understanding"] * n0 + per["ce/generation"] * n1) / (n0 + n1) == pytest.approx(float(ce), rel=1e-6)
    assert (per["flow/und_image"] + per["flow/gen_target"]) / 2 == pytest.approx(float(flow), rel=1e-6)


# ---- runs ----------------------------------------------------------------------------------------------------------


def test_fit_export_and_load_model_roundtrip(work, tmp_path):
    from cheers.checkpoint import load_model
    from cheers.tokenizer import CheersTokenizer

    out = tmp_path / "run"
    cfg = flow_config(work, out, steps=2, ckpt={"interval": 1, "keep": 1, "export_final": True})
    tr = E.FlowTrainer(cfg)
    try:
        last = tr.fit()
        assert last["step"] == 2 and math.isfinite(last["loss"])
        for key in ("ce_loss", "flow_loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s"):
            assert key in last
        (mb,) = tr.next_micro_batches()
    finally:
        tr.close()
    base = tr.base.eval()
    base.to(memory_format=torch.contiguous_format)  # the trainer keeps the conv stack channels-last on CPU
    with torch.no_grad():
        want = base(**mb.inputs, x0=mb.x0)
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["latest", "step_2"]  # keep=1 pruned step_1
    loaded = load_model(out / "export")
    with torch.no_grad():
        got = loaded(**mb.inputs, x0=mb.x0)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.velocity, want.velocity)
    for (n1, a), (n2, b) in zip(sorted(loaded.state_dict().items()), sorted(base.state_dict().items())):
        assert n1 == n2 and torch.equal(a, b), n1
    tok = CheersTokenizer.from_dir(out / "export")
    assert tok.token_ids == loaded.config.tokens
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and "export" in events and events[-1] == "end"
    # a second run in the same directory must not silently overwrite it
    with pytest.raises(TrainConfigError, match="--resume"):
        E.FlowTrainer(cfg)


def test_nan_loss_stops_with_the_step(work, tmp_path):
    cfg = flow_config(work, tmp_path / "a", steps=3, debug={"inject_nan_at_step": 2})
    tr = E.FlowTrainer(cfg)
    try:
        with pytest.raises(E.NonFiniteLossError, match="at step 2"):
            tr.fit()
        assert tr.step == 2
    finally:
        tr.close()
    # a diverging learning rate: the step that first produces a non-finite loss is named
    tr = E.FlowTrainer(flow_config(work, tmp_path / "b", steps=4, optim={"lr": 1e30, "grad_clip": 0}))
    try:
        with pytest.raises(E.NonFiniteLossError, match=r"at step [2-4]\b"):
            tr.fit()
    finally:
        tr.close()


def test_nan_skip_policy_counts_and_continues(work, tmp_path):
    tr = E.FlowTrainer(flow_config(work, tmp_path / "run", steps=3, nan_policy="skip",
                                   debug={"inject_nan_at_step": 2}))
    try:
        last = tr.fit()
        assert tr.step == 3 and tr.counters["nan_skipped_steps"] == 1
        assert math.isfinite(last["loss"])
        for p in tr.params:
            assert bool(torch.isfinite(p).all())
    finally:
        tr.close()


def test_latent_cache_is_exact_and_persistent(work, tmp_path):
    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.train.latents import LatentCache, image_key, vae_fingerprint

    root, _ = work
    model = CheersModel(preset("cheers-tiny")).eval()
    vae = model.model.vae_model
    pics = torch.rand(3, 3, 64, 64)
    paths = sorted((root / "data" / "images").glob("*.png"))[:3]
    keys = [image_key(p, i == 0, 64) for i, p in enumerate(paths)]
    assert len(set(keys)) == 3 and image_key(paths[0], False, 64) != keys[0]  # preprocessing is part of the key
    cache = LatentCache(vae.encode, vae_fingerprint(vae), tmp_path / "cache")
    got = cache.latents(keys, pics)
    with torch.no_grad():
        for i in range(3):
            assert torch.equal(got[i], vae.encode(pics[i:i + 1])[0])
    assert cache.misses == 3
    cache.latents(keys, pics)
    assert cache.hits == 3 and cache.misses == 3
    fresh = LatentCache(lambda x: (_ for _ in ()).throw(AssertionError("encoder must not run")),
                        vae_fingerprint(vae), tmp_path / "cache")
    assert torch.equal(fresh.latents(keys, pics), got) and fresh.disk_hits == 3


def test_bad_samples_skip_or_error(work, tmp_path):
    root, files = work
    bad = tmp_path / "bad.jsonl"
    good = files["understanding"].read_text().splitlines()
    bad.write_text("\n".join([good[0], "{not json", good[1],
                              json.dumps({"id": "x", "image": "images/missing.png", "conversations": [
                                  {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]})]) + "\n")
    import shutil

    shutil.copytree(root / "data" / "images", tmp_path / "images")
    raw = {"data": {"sources": [{"path": str(bad)}]}}
    cfg = flow_config(work, tmp_path / "a", micro_batch_size=4, steps=1)
    cfg.data.sources = load_config(None, [], raw=raw).data.sources
    tr = E.FlowTrainer(cfg)
    try:
        tr.fit()
        assert tr.counters["bad_samples"] >= 2
    finally:
        tr.close()
    from cheers.train.data import DataError

    cfg = flow_config(work, tmp_path / "b", micro_batch_size=4, steps=1, data={"on_bad_sample": "error"})
    cfg.data.sources = load_config(None, [], raw=raw).data.sources
    tr = E.FlowTrainer(cfg)
    try:
        with pytest.raises(DataError, match="bad.jsonl:"):
            tr.fit()
    finally:
        tr.close()


def test_stage0_vae_trains_and_hands_over(work, tmp_path):
    from cheers.checkpoint import load_model
    from cheers.model.vae import patchify
    from cheers.processor import load_image, preprocess_generation
    from cheers.train.vae_stage import ImageFeed
    from cheers.train.feed import RecordFeed

    root, files = work
    out = tmp_path / "vae"
    cfg = load_config("stage0_vae", [
        f"output_dir={out}", "steps=3", "micro_batch_size=2", "threads=1", "model.preset=cheers-tiny",
        f"model.tokenizer={root / 'tok'}", "vae.stats_images=6", "log.interval=1", "log.progress=false",
        "schedule.warmup=0", "ckpt.interval=2",
        f"data.sources=[{{path: {files['generation']}}}, {{path: {files['understanding']}}}]",
    ])
    tr = E.make_trainer(cfg)
    try:
        last = tr.fit()
        assert last["step"] == 3 and math.isfinite(last["loss"]) and last["psnr"] > 0
    finally:
        tr.close()
    model = load_model(out / "export")
    m = model.model
    assert torch.equal(m.vae_model.bn.running_mean, m.vae_decoder_projector.bn.running_mean)
    assert torch.equal(m.vae_model.bn.running_var, m.vae_decoder_projector.bn.running_var)
    for (n, a), (_, b) in zip(m.vae_model.decoder.state_dict().items(),
                              m.vae_decoder_projector.decoder.state_dict().items()):
        assert torch.equal(a, b), n
    # the statistics standardize the latents of the images they were measured on
    feed = ImageFeed(RecordFeed(cfg.data, cfg.seed))
    pics = torch.stack([preprocess_generation(load_image(p), 64) for _, p in feed.take(6)])
    with torch.no_grad():
        z = model.encode_images(pics)
        raw = patchify(m.vae_model.encoder(pics)[:, :m.vae_model.z_channels])
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    var = raw.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(m.vae_model.bn.running_var, var, rtol=1e-3, atol=1e-6)
    assert (out / "ckpt" / "step_3").is_dir() and (out / "ckpt" / "step_2").is_dir()


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


def test_gate_ablation_switch_trains_and_exports_without_the_gate(work, tmp_path):
    """`model.high_frequency_gate=false` (the paper's ablation): the gate is cut in training (its MLP receives no
    gradient, gate values are 0), and the exported config keeps it cut so sampling matches training."""
    from cheers.checkpoint import load_model

    out = tmp_path / "run"
    cfg = flow_config(work, out, steps=1, model={"preset": "cheers-tiny", "tokenizer": str(work[0] / "tok"),
                                                  "high_frequency_gate": False},
                      ckpt={"interval": 0, "export_final": True})
    tr = E.FlowTrainer(cfg)
    try:
        assert tr.base.model.hi_gate.enabled is False
        (mb,) = tr.next_micro_batches()
        E.forward_backward(tr.model, [mb], tr.info, tr.base.config.flow_loss_weight)
        assert all(p.grad is None for p in tr.base.model.hi_gate.gate.parameters())
        assert tr.base.model.hi_projector.diffusion_head_b.linear.weight.grad is not None
    finally:
        tr.close()
    tr2 = E.FlowTrainer(flow_config(work, tmp_path / "run2", steps=1, ckpt={"interval": 0, "export_final": True},
                                    model={"preset": "cheers-tiny", "tokenizer": str(work[0] / "tok"),
                                           "high_frequency_gate": False}))
    try:
        tr2.fit()
    finally:
        tr2.close()
    loaded = load_model(tmp_path / "run2" / "export")
    assert loaded.config.head.high_frequency_gate is False and loaded.model.hi_gate.enabled is False
    with torch.no_grad():
        out_ = loaded(**mb.inputs, x0=mb.x0)
    assert torch.count_nonzero(out_.gate) == 0


# ---- vision pretraining stage ------------------------------------------------------------------------------------


def test_vision_pair_text_takes_the_describing_turns():
    from cheers.train.vision_stage import pair_text

    gen = [("system", "sys"), ("user", "Draw a red star.\nBased on the above description, generate an image."),
           ("assistant", "<im_start><image_gen><im_end>")]
    cap = [("user", "<im_start><image><im_end>\nWhat do you see?"), ("assistant", "There is a blue circle.")]
    assert pair_text(gen) == "Draw a red star."
    assert pair_text(cap) == "There is a blue circle."
    assert pair_text([("user", "<image>\nIs there a star?"), ("assistant", "Yes")]) == ""  # one word: no pair
    assert pair_text([("user", "<image>\nIs there a star?"), ("assistant", "Yes")], min_words=1) == "Yes"


def test_vision_positives_follow_the_key_words():
    from cheers.train.vision_stage import meaning_keys

    texts = ["Draw a star.", "A photo of a star.", "Two red circles.", "There are 2 red circles.", "A red circle.",
             "Nothing here."]
    assert meaning_keys(texts, []) == texts
    keys = meaning_keys(texts, ["star", "circle", "circles=circle", "red", "two=2", "2"])
    assert keys[0] == keys[1] == "star" and keys[2] == keys[3] == "2 circle red"
    assert keys[4] == "circle red" and keys[5] != keys[4] and len(set(keys)) == 4


def _vision_config(work, out: Path, *extra: str):
    root, files = work
    return load_config(None, [f"output_dir={out}", *extra], raw={
        "stage": "vision-test", "kind": "vision", "steps": 3, "micro_batch_size": 4, "threads": 1,
        "model": {"preset": "cheers-tiny", "tokenizer": str(root / "tok")},
        "trainable": {"include": ["model.vision_representation.*"]},
        "optim": {"lr": 1e-3}, "schedule": {"warmup": 0}, "log": {"interval": 1, "progress": False},
        "ckpt": {"interval": 2, "keep": 0},
        "data": {"sources": [{"path": str(files["generation"])}, {"path": str(files["understanding"])}]},
    })


def test_vision_stage_trains_only_the_vit_resumes_exactly_and_exports(work, tmp_path):
    from cheers.checkpoint import load_model
    from cheers.train.ckpt import TrainCheckpointError

    full = tmp_path / "full"
    tr = E.make_trainer(_vision_config(work, full))
    try:
        start = {k: v.clone() for k, v in tr.base.state_dict().items()}
        last = tr.fit()
        assert last["step"] == 3 and math.isfinite(last["loss"]) and 0.0 <= last["retrieval_top1"] <= 1.0
        end = tr.base.state_dict()
        changed = {k for k in start if not torch.equal(start[k], end[k])}
        assert changed and all(k.startswith("model.vision_representation.") for k in changed), sorted(changed)[:5]
        assert any(k.startswith("model.vision_representation.head.") for k in changed)  # the SigLIP head trains
        assert tr.counters["bad_samples"] == 0 and tr.counters["samples"] == 12
    finally:
        tr.close()
    exported = load_model(full / "export").state_dict()  # the official format: no text tower keys
    assert set(exported) == set(end) and all(torch.equal(exported[k], end[k]) for k in end)

    # interrupted after step 2 (its checkpoint), resumed: the same weights as the uninterrupted run
    part = tmp_path / "part"
    E.train(_vision_config(work, part, "debug.max_steps_this_run=2"))
    E.train(_vision_config(work, part), resume=True)
    resumed = load_model(part / "export").state_dict()
    assert all(torch.equal(resumed[k], end[k]) for k in end)

    # a later stage cannot start from the stage's training checkpoint (it holds the text tower): clear error
    with pytest.raises(TrainCheckpointError, match="vision-pretraining checkpoint"):
        E.make_trainer(flow_config(work, tmp_path / "next", model={"init": str(full)}))


def test_vision_stage_refuses_gradient_accumulation_and_other_modules(work, tmp_path):
    with pytest.raises(TrainConfigError, match="grad_accum: 1"):
        E.make_trainer(_vision_config(work, tmp_path / "a", "grad_accum=2"))
    with pytest.raises(TrainConfigError, match="trains the ViT only"):
        E.make_trainer(_vision_config(work, tmp_path / "b", 'trainable.include=["*"]',
                                      'trainable.exclude=["model.vae_model.*"]'))


# ---- EMA of the weights -----------------------------------------------------------------------------------------


def test_weight_ema_update_start_and_swap():
    from cheers.train.ema import WeightEMA

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = WeightEMA([("w", p)], decay=0.75, start=1)
    with torch.no_grad():
        p.copy_(torch.tensor([5.0, 6.0]))
    ema.update(1)  # up to `start` the average is the weights themselves
    assert torch.equal(ema.state_dict()["w"], torch.tensor([5.0, 6.0]))
    with torch.no_grad():
        p.copy_(torch.tensor([9.0, 2.0]))
    ema.update(2)
    assert torch.allclose(ema.shadow[0], torch.tensor([0.75 * 5 + 0.25 * 9, 0.75 * 6 + 0.25 * 2]))
    with ema.swapped_in():
        assert torch.allclose(p, torch.tensor([6.0, 5.0]))
    assert torch.equal(p.detach(), torch.tensor([9.0, 2.0]))
    with pytest.raises(ValueError, match="decay"):
        WeightEMA([("w", p)], decay=1.0)


def _fit(cfg, resume: bool = False) -> None:
    tr = E.FlowTrainer(cfg, resume=resume)
    try:
        tr.fit()
    finally:
        tr.close()


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("model.vae_model.")}


def test_ema_is_the_average_of_the_checkpointed_weights_and_resumes_exactly(work, tmp_path):
    from cheers.checkpoint import load_model
    from cheers.train.ckpt import load_checkpoint_model

    decay = 0.5
    full = tmp_path / "full"
    ema_cfg = {"decay": decay, "start": 1}
    _fit(flow_config(work, full, steps=4, ema=ema_cfg, optim={"lr": 2e-3},
                     ckpt={"interval": 1, "keep": 0, "export_final": True}))
    steps = [_trained(load_checkpoint_model(full / "ckpt" / f"step_{k}")) for k in range(1, 5)]
    want = dict(steps[0])
    for w in steps[1:]:
        want = {n: decay * want[n] + (1 - decay) * w[n] for n in want}
    got = _trained(load_model(full / "export_ema"))
    plain = _trained(load_model(full / "export"))
    assert sorted(got) == sorted(want)
    moved = max(float((plain[n] - got[n]).abs().max()) for n in got)
    assert moved > 1e-3  # the average differs from the last weights: the test can tell them apart
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=0), n
        assert torch.equal(plain[n], steps[-1][n]), n
    from_ckpt = _trained(load_checkpoint_model(full / "ckpt" / "step_4", ema=True))
    for n in want:
        assert torch.equal(from_ckpt[n], got[n]), n

    # stopped after 2 steps and resumed: the average continues bit-identically
    part = tmp_path / "part"
    ckpt = {"interval": 2, "keep": 0, "export_final": True}
    _fit(flow_config(work, part, steps=4, ema=ema_cfg, optim={"lr": 2e-3}, ckpt=ckpt,
                     debug={"max_steps_this_run": 2}))
    assert not (part / "export_ema").exists()
    _fit(flow_config(work, part, steps=4, ema=ema_cfg, optim={"lr": 2e-3}, ckpt=ckpt), resume=True)
    resumed = _trained(load_model(part / "export_ema"))
    for n in got:
        assert torch.equal(resumed[n], got[n]), n


def test_ema_switched_on_at_resume_starts_from_the_resumed_weights(work, tmp_path):
    from cheers.checkpoint import load_model
    from cheers.train.ckpt import TrainCheckpointError, load_checkpoint_model

    run = tmp_path / "run"
    ckpt = {"interval": 1, "keep": 0, "export_final": True}
    _fit(flow_config(work, run, steps=4, ckpt=ckpt, debug={"max_steps_this_run": 2}))
    with pytest.raises(TrainCheckpointError, match="no averaged"):
        load_checkpoint_model(run / "ckpt" / "step_2", ema=True)
    _fit(flow_config(work, run, steps=4, ckpt=ckpt, ema={"decay": 0.5}), resume=True)
    w2, w3, w4 = (_trained(load_checkpoint_model(run / "ckpt" / f"step_{k}")) for k in (2, 3, 4))
    got = _trained(load_model(run / "export_ema"))
    for n in got:
        want = 0.5 * (0.5 * w2[n] + 0.5 * w3[n]) + 0.5 * w4[n]
        assert torch.allclose(got[n], want, atol=1e-6, rtol=0), n
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "ema_start"] == [2]


def test_ema_config_is_checked(work, tmp_path):
    with pytest.raises(TrainConfigError, match="ema.decay"):
        flow_config(work, tmp_path / "a", ema={"decay": 1.0})
    with pytest.raises(TrainConfigError, match="kind 'flow'"):
        flow_config(work, tmp_path / "b", kind="vae", ema={"decay": 0.9})


def test_resume_with_a_smaller_trainable_set_freezes_what_was_dropped(work, tmp_path):
    """A run resumed with more of the model excluded from training (e.g. the latent-to-pixel decoder frozen for
    speed) loads the optimizer and EMA state of what still trains, leaves the dropped parameters exactly at the
    checkpoint's values, and its checkpoints export with the averaged weights."""
    from cheers.train.ckpt import load_checkpoint_model

    run = tmp_path / "run"
    common = {"ckpt": {"interval": 1, "keep": 0, "export_final": False}, "ema": {"decay": 0.5},
              "optim": {"lr": 2e-3}}
    _fit(flow_config(work, run, steps=4, debug={"max_steps_this_run": 2}, **common))
    frozen = ["model.vae_model.*", "model.vision_representation.head.*", "model.vae_decoder_projector.*"]
    _fit(flow_config(work, run, steps=4, **{"trainable.exclude": frozen}, **common), resume=True)
    w2, w4 = (_trained(load_checkpoint_model(run / "ckpt" / f"step_{k}")) for k in (2, 4))
    decoder = [n for n in w2 if n.startswith("model.vae_decoder_projector.")]
    assert decoder
    for n in decoder:
        assert torch.equal(w2[n], w4[n]), n
    assert max(float((w4[n] - w2[n]).abs().max()) for n in w2 if n not in decoder) > 1e-4
    avg = _trained(load_checkpoint_model(run / "ckpt" / "step_4", ema=True))
    assert all(torch.equal(avg[n], w4[n]) for n in decoder)  # frozen: its weights, not an average
    assert max(float((avg[n] - w4[n]).abs().max()) for n in w4 if n not in decoder) > 1e-5
