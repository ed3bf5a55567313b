"""EMA of the weights: the update rule, checkpointed averages, resuming, switching on at resume."""

from __future__ import annotations

import json

import pytest
import torch

from cheers.train import flow_stage as FS
from cheers.train.settings import TrainConfigError

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
    tr = FS.FlowTrainer(cfg, resume=resume)
    try:
        tr.fit()
    finally:
        tr.close()


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("model.vae_model.")}


def test_ema_is_the_average_of_the_checkpointed_weights_and_resumes_exactly(flow_config, tmp_path):
    from cheers.checkpoint import load_model
    from cheers.train.ckpt import load_checkpoint_model

    decay = 0.5
    full = tmp_path / "full"
    ema_cfg = {"decay": decay, "start": 1}
    _fit(flow_config(full, steps=4, ema=ema_cfg, optim={"lr": 2e-3},
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
    _fit(flow_config(part, steps=4, ema=ema_cfg, optim={"lr": 2e-3}, ckpt=ckpt,
                     debug={"max_steps_this_run": 2}))
    assert not (part / "export_ema").exists()
    _fit(flow_config(part, steps=4, ema=ema_cfg, optim={"lr": 2e-3}, ckpt=ckpt), resume=True)
    resumed = _trained(load_model(part / "export_ema"))
    for n in got:
        assert torch.equal(resumed[n], got[n]), n


def test_ema_switched_on_at_resume_starts_from_the_resumed_weights(flow_config, tmp_path):
    from cheers.checkpoint import load_model
    from cheers.train.ckpt import TrainCheckpointError, load_checkpoint_model

    run = tmp_path / "run"
    ckpt = {"interval": 1, "keep": 0, "export_final": True}
    _fit(flow_config(run, steps=4, ckpt=ckpt, debug={"max_steps_this_run": 2}))
    with pytest.raises(TrainCheckpointError, match="no averaged"):
        load_checkpoint_model(run / "ckpt" / "step_2", ema=True)
    _fit(flow_config(run, steps=4, ckpt=ckpt, ema={"decay": 0.5}), resume=True)
    w2, w3, w4 = (_trained(load_checkpoint_model(run / "ckpt" / f"step_{k}")) for k in (2, 3, 4))
    got = _trained(load_model(run / "export_ema"))
    for n in got:
        want = 0.5 * (0.5 * w2[n] + 0.5 * w3[n]) + 0.5 * w4[n]
        assert torch.allclose(got[n], want, atol=1e-6, rtol=0), n
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "ema_start"] == [2]


def test_ema_config_is_checked(flow_config, tmp_path):
    with pytest.raises(TrainConfigError, match="ema.decay"):
        flow_config(tmp_path / "a", ema={"decay": 1.0})
    with pytest.raises(TrainConfigError, match="kind 'flow'"):
        flow_config(tmp_path / "b", kind="vae", ema={"decay": 0.9})


def test_resume_with_a_smaller_trainable_set_freezes_what_was_dropped(flow_config, tmp_path):
    """A run resumed with more of the model excluded from training (e.g. the latent-to-pixel decoder frozen for
    speed) loads the optimizer and EMA state of what still trains, leaves the dropped parameters exactly at the
    checkpoint's values, and its checkpoints export with the averaged weights."""
    from cheers.train.ckpt import load_checkpoint_model

    run = tmp_path / "run"
    common = {"ckpt": {"interval": 1, "keep": 0, "export_final": False}, "ema": {"decay": 0.5},
              "optim": {"lr": 2e-3}}
    _fit(flow_config(run, steps=4, debug={"max_steps_this_run": 2}, **common))
    frozen = ["model.vae_model.*", "model.vision_representation.head.*", "model.vae_decoder_projector.*"]
    _fit(flow_config(run, steps=4, **{"trainable.exclude": frozen}, **common), resume=True)
    w2, w4 = (_trained(load_checkpoint_model(run / "ckpt" / f"step_{k}")) for k in (2, 4))
    decoder = [n for n in w2 if n.startswith("model.vae_decoder_projector.")]
    assert decoder
    for n in decoder:
        assert torch.equal(w2[n], w4[n]), n
    assert max(float((w4[n] - w2[n]).abs().max()) for n in w2 if n not in decoder) > 1e-4
    avg = _trained(load_checkpoint_model(run / "ckpt" / "step_4", ema=True))
    assert all(torch.equal(avg[n], w4[n]) for n in decoder)  # frozen: its weights, not an average
    assert max(float((avg[n] - w4[n]).abs().max()) for n in w4 if n not in decoder) > 1e-5
