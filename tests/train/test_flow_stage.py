"""Flow stage, in-process: loss bookkeeping, the golden-e loss, one optimisation step, export round trip, NaN
policy, bad samples, the gate ablation."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

from cheers.train import flow_stage as FS
from cheers.train import run as R
from cheers.train.distributed import DistInfo
from cheers.train.settings import TrainConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CHEERS_SHARED", REPO.parent / "shared")).resolve()
GOLDEN_E = SHARED / "parity" / "goldens" / "e_train_loss.safetensors"
TINY_OFFICIAL = SHARED / "parity" / "tiny-official"

# ---- loss bookkeeping -------------------------------------------------------------------------------------------------


def test_count_ce_targets_matches_the_model(flow_config, tmp_path):
    tr = FS.FlowTrainer(flow_config(tmp_path / "run", micro_batch_size=4, grad_accum=2))
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
        assert int(FS.count_ce_targets(ids, am, labels, n, tr.img_end).sum()) == out.num_ce_tokens
    finally:
        tr.close()


def test_trainer_draws_flow_times_from_the_configured_distribution(flow_config, tmp_path):
    cfg = flow_config(tmp_path / "a", micro_batch_size=8,
                      **{"data.t_sampling": "logit_normal", "data.t_mean": -3.0, "data.t_std": 0.05})
    tr = FS.FlowTrainer(cfg)
    try:
        t = torch.cat([mb.inputs["t"] for mb in tr.next_micro_batches()])
        drawn = t[(t > 0) & (t < 1)]  # images to generate (understanding images sit at 1, text dummies at 0)
        assert drawn.numel() >= 2
        assert float(drawn.min()) > 0.035 and float(drawn.max()) < 0.065  # sigmoid(-3 +- 4 std) = 0.039-0.058
    finally:
        tr.close()


def test_trainer_loss_is_the_model_loss(flow_config, tmp_path):
    # latent cache off: the trainer passes the collated batch straight to the model -> bit-identical loss
    tr = FS.FlowTrainer(flow_config(tmp_path / "a", latents={"cache": False}))
    try:
        (mb,) = tr.next_micro_batches()
        assert "pixel_values" in mb.inputs
        ref = copy.deepcopy(tr.base)
        with torch.no_grad():
            want = ref(**mb.inputs, x0=mb.x0)
        loss, ce, flow, _ = FS.forward_backward(tr.model, [mb], tr.info, 1.0)
        assert float(loss) == float(want.loss)
        assert float(ce) == float(want.ce_loss) and float(flow) == float(want.flow_loss)
    finally:
        tr.close()
    # with the latent cache the latents are computed image by image: equal up to float32 rounding
    tr = FS.FlowTrainer(flow_config(tmp_path / "b"))
    try:
        (mb,) = tr.next_micro_batches()
        assert "latents" in mb.inputs
        inputs = {k: v for k, v in mb.inputs.items() if k != "latents"}
        ref_batch = _pixels_of(tr, mb)  # the pixel batch of the same samples
        with torch.no_grad():
            want = copy.deepcopy(tr.base)(**inputs, pixel_values=ref_batch, x0=mb.x0)
        loss, ce, flow, _ = FS.forward_backward(tr.model, [mb], tr.info, 1.0)
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


def test_one_step_decreases_the_loss_on_a_fixed_batch(flow_config, tmp_path):
    tr = FS.FlowTrainer(flow_config(tmp_path / "run", optim={"lr": 1e-3}, **{"model.channels_last": "true"}))
    try:
        assert tr.base.model.vae_decoder_projector.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        (mb,) = tr.next_micro_batches()
        with torch.no_grad():
            before = float(tr.base(**mb.inputs, x0=mb.x0).loss)
        loss, ce, flow, _ = FS.forward_backward(tr.model, [mb], tr.info, 1.0)
        assert float(loss) == before
        R.clip_gradients(tr.params, 1.0)
        tr.schedule.apply()
        tr.optimizer.step()
        with torch.no_grad():
            after = float(tr.base(**mb.inputs, x0=mb.x0).loss)
        assert after < before
    finally:
        tr.close()


def test_accumulation_equals_one_big_batch(flow_config, tmp_path):
    """2 micro-batches of 1 with accumulation give the loss and gradient of one batch of 2."""
    tr = FS.FlowTrainer(flow_config(tmp_path / "run", latents={"cache": False}))
    try:
        (big,) = tr.next_micro_batches()
        ref = copy.deepcopy(tr.base)
        loss, ce, flow, _ = FS.forward_backward(ref, [big], DistInfo(), 1.0)
        g_ref = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        halves = []
        for r in range(2):
            rows = slice(r, r + 1)
            ids = big.inputs["input_ids"][rows]
            am = big.inputs["attention_mask"][rows]
            n_img = int((FS.image_roles(big.inputs["input_ids"][: r], big.inputs["attention_mask"][: r]).numel()))
            k = FS.image_roles(ids, am).numel()
            batch = {"input_ids": ids, "attention_mask": am, "labels": big.inputs["labels"][rows],
                     "pixel_values": big.inputs["pixel_values"][n_img:n_img + k], "t": big.inputs["t"][n_img:n_img + k]}
            halves.append(FS.MicroBatch.from_batch(batch, big.x0[n_img:n_img + k], tr.n_img_tokens, tr.img_end))
        loss2, ce2, flow2, _ = FS.forward_backward(tr.base, halves, DistInfo(), 1.0)
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
    mb = FS.MicroBatch.from_batch(batch, g["x0_noise"].float(), model.config.num_image_tokens,
                                 model.config.tokens.img_end)
    loss, ce, flow, tasks = FS.forward_backward(model, [mb], DistInfo(), model.config.flow_loss_weight, per_task=True)
    total = float(loss)
    assert abs(total - float(g["total_loss"])) / float(g["total_loss"]) < 1e-5
    assert abs(float(ce) - float(g["text_loss"])) / float(g["text_loss"]) < 1e-5
    assert abs(float(flow) - float(g["image_loss"])) / float(g["image_loss"]) < 1e-5
    norm = R.clip_gradients([p for p in model.parameters() if p.requires_grad], None)
    assert abs(norm - float(g["grad_total_norm"])) / float(g["grad_total_norm"]) < 1e-4
    # the trainer's default on CPU: channels-last convolution stacks (same loss up to float32 rounding)
    model.channels_last_()
    for p in model.parameters():
        p.grad = None
    loss_cl, *_ = FS.forward_backward(model, [mb], DistInfo(), model.config.flow_loss_weight)
    assert abs(float(loss_cl) - float(g["total_loss"])) / float(g["total_loss"]) < 1e-5
    per = FS._per_task_metrics(tasks)
    # row 0 understanding, row 1 generation; together they give the text loss (weighted by token counts)
    assert set(per) == {"ce/understanding", "ce/generation", "flow/und_image", "flow/gen_target"}
    n0, n1 = float(tasks[4]), float(tasks[5])
    assert (per["ce/understanding"] * n0 + per["ce/generation"] * n1) / (n0 + n1) == pytest.approx(float(ce), rel=1e-6)
    assert (per["flow/und_image"] + per["flow/gen_target"]) / 2 == pytest.approx(float(flow), rel=1e-6)


# ---- runs ----------------------------------------------------------------------------------------------------------


def test_fit_export_and_load_model_roundtrip(flow_config, tmp_path):
    from cheers.checkpoint import load_model
    from cheers.tokenizer import CheersTokenizer

    out = tmp_path / "run"
    cfg = flow_config(out, steps=2, ckpt={"interval": 1, "keep": 1, "export_final": True})
    tr = FS.FlowTrainer(cfg)
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
        FS.FlowTrainer(cfg)


def test_nan_loss_stops_with_the_step(flow_config, tmp_path):
    cfg = flow_config(tmp_path / "a", steps=3, debug={"inject_nan_at_step": 2})
    tr = FS.FlowTrainer(cfg)
    try:
        with pytest.raises(R.NonFiniteLossError, match="at step 2"):
            tr.fit()
        assert tr.step == 2
    finally:
        tr.close()
    # a diverging learning rate: the step that first produces a non-finite loss is named
    tr = FS.FlowTrainer(flow_config(tmp_path / "b", steps=4, optim={"lr": 1e30, "grad_clip": 0}))
    try:
        with pytest.raises(R.NonFiniteLossError, match=r"at step [2-4]\b"):
            tr.fit()
    finally:
        tr.close()


def test_nan_skip_policy_counts_and_continues(flow_config, tmp_path):
    tr = FS.FlowTrainer(flow_config(tmp_path / "run", steps=3, nan_policy="skip",
                                   debug={"inject_nan_at_step": 2}))
    try:
        last = tr.fit()
        assert tr.step == 3 and tr.counters["nan_skipped_steps"] == 1
        assert math.isfinite(last["loss"])
        for p in tr.params:
            assert bool(torch.isfinite(p).all())
    finally:
        tr.close()


def test_bad_samples_skip_or_error(flow_config, work, tmp_path):
    root, files = work
    bad = tmp_path / "bad.jsonl"
    good = files["understanding"].read_text().splitlines()
    bad.write_text("\n".join([good[0], "{not json", good[1],
                              json.dumps({"id": "x", "image": "images/missing.png", "conversations": [
                                  {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]})]) + "\n")
    import shutil

    shutil.copytree(root / "data" / "images", tmp_path / "images")
    raw = {"data": {"sources": [{"path": str(bad)}]}}
    cfg = flow_config(tmp_path / "a", micro_batch_size=4, steps=1)
    cfg.data.sources = load_config(None, [], raw=raw).data.sources
    tr = FS.FlowTrainer(cfg)
    try:
        tr.fit()
        assert tr.counters["bad_samples"] >= 2
    finally:
        tr.close()
    from cheers.train.data import DataError

    cfg = flow_config(tmp_path / "b", micro_batch_size=4, steps=1, data={"on_bad_sample": "error"})
    cfg.data.sources = load_config(None, [], raw=raw).data.sources
    tr = FS.FlowTrainer(cfg)
    try:
        with pytest.raises(DataError, match="bad.jsonl:"):
            tr.fit()
    finally:
        tr.close()


def test_gate_ablation_switch_trains_and_exports_without_the_gate(flow_config, work, tmp_path):
    """`model.high_frequency_gate=false` (the paper's ablation): the gate is cut in training (its MLP receives no
    gradient, gate values are 0), and the exported config keeps it cut so sampling matches training."""
    from cheers.checkpoint import load_model

    out = tmp_path / "run"
    cfg = flow_config(out, steps=1, model={"preset": "cheers-tiny", "tokenizer": str(work[0] / "tok"),
                                                  "high_frequency_gate": False},
                      ckpt={"interval": 0, "export_final": True})
    tr = FS.FlowTrainer(cfg)
    try:
        assert tr.base.model.hi_gate.enabled is False
        (mb,) = tr.next_micro_batches()
        FS.forward_backward(tr.model, [mb], tr.info, tr.base.config.flow_loss_weight)
        assert all(p.grad is None for p in tr.base.model.hi_gate.gate.parameters())
        assert tr.base.model.hi_projector.diffusion_head_b.linear.weight.grad is not None
    finally:
        tr.close()
    tr2 = FS.FlowTrainer(flow_config(tmp_path / "run2", steps=1, ckpt={"interval": 0, "export_final": True},
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
