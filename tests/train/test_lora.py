"""LoRA runs of the trainer (`lora:` block, `cheers.train.lora`), in this process: only the adapters change, the
export is a PEFT adapter (and, if asked, the merged official model) that the pipeline applies, checkpoints hold the
adapters alone and resume exactly, and bad settings are one-line errors. Runs under torchrun: test_lora_distributed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cheers.train import ckpt as ckpt_io
from cheers.train import engine as E
from cheers.train.settings import TrainConfigError, load_config

pytest.importorskip("peft")

LORA = {"rank": 4, "alpha": 8.0, "targets": ["llm", "flow_head"]}


@pytest.fixture(scope="module")
def base_dir(work) -> Path:
    """An official-format cheers-tiny directory (random init) with the smoke tokenizer: the frozen base."""
    from cheers.checkpoint import save_model
    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.tokenizer import CheersTokenizer

    root, _ = work
    tok = CheersTokenizer.from_dir(root / "tok")
    cfg = preset("cheers-tiny")
    cfg.tokens = tok.token_ids
    torch.manual_seed(0)
    model = CheersModel(cfg)
    E.init_weights(model, 0.02)
    out = root / "lora-base"
    save_model(model, out)
    tok.save(out)
    return out


def _steps(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == "step"}


def test_a_lora_run_trains_only_the_adapters_and_exports_them(flow_config, base_dir, tmp_path):
    from cheers.adapters import read_adapter
    from cheers.checkpoint import load_model
    from cheers.pipeline import Cheers

    cfg = flow_config(tmp_path / "run", lora={**LORA, "export_merged": True}, optim={"lr": 1e-2}, steps=3,
                      ckpt={"interval": 0, "export_final": True}, model={"init": str(base_dir)},
                      ema={"decay": 0.5, "start": 1})
    trainer = E.make_trainer(cfg)
    try:
        before = {n: p.detach().clone() for n, p in trainer.base.named_parameters()}
        assert {n for n, p in trainer.base.named_parameters() if p.requires_grad} == {n for n in before if ".lora_" in n}
        trainer.fit()
        after = dict(trainer.base.named_parameters())
    finally:
        trainer.close()
    lora = [n for n in before if ".lora_" in n]
    assert len(lora) == 2 * (14 + 20)  # A and B of the 14 LLM and 20 flow-head linear layers
    for n in before:
        if ".lora_" in n:
            assert not torch.equal(before[n], after[n]), n  # every adapter tensor trained (B starts at 0)
        else:
            assert torch.equal(before[n], after[n]), n  # the base did not move by a single bit
    # the PEFT adapter holds exactly the trained tensors
    config, state = read_adapter(tmp_path / "run" / "adapter")
    assert config.r == 4 and config.lora_alpha == 8.0 and config.base_model_name_or_path == str(base_dir)
    assert len(state) == len(lora)
    for n in lora:  # X.lora_A.default.weight -> base_model.model.X.lora_A.weight
        assert torch.equal(state["base_model.model." + n.replace(".default.weight", ".weight")], after[n].detach()), n
    ema_config, ema_state = read_adapter(tmp_path / "run" / "adapter_ema")
    assert any(not torch.equal(ema_state[k], state[k]) for k in state)  # the average, not the last weights
    # the merged export is the base with the adapter folded in: same outputs as applying the adapter
    merged = Cheers.from_pretrained(tmp_path / "run" / "export")
    applied = Cheers.from_pretrained(base_dir, adapter=tmp_path / "run" / "adapter")
    q = [[{"role": "user", "content": "What color is the star?"}]]
    torch.testing.assert_close(merged.next_token_logits(q), applied.next_token_logits(q), atol=1e-4, rtol=1e-5)
    assert set(load_model(tmp_path / "run" / "export").state_dict()) == set(load_model(base_dir).state_dict())
    base_logits = Cheers.from_pretrained(base_dir).next_token_logits(q)
    assert float((applied.next_token_logits(q) - base_logits).abs().max()) > 1e-3  # the adapter learned something


def test_lora_resume_is_exact_and_checkpoints_hold_only_adapters(flow_config, base_dir, tmp_path):
    """Dropout on the adapters (RNG state carried by the checkpoint) and 4 steps, split 2 + 2 by a resume."""
    common = dict(lora={**LORA, "dropout": 0.1}, steps=4, optim={"lr": 1e-2}, model={"init": str(base_dir)},
                  ckpt={"interval": 2, "keep": 0, "export_final": False})
    E.train(flow_config(tmp_path / "whole", **common))
    E.train(flow_config(tmp_path / "split", **common, debug={"max_steps_this_run": 2}))
    E.train(flow_config(tmp_path / "split", **common), resume=True)
    whole, split = _steps(tmp_path / "whole"), _steps(tmp_path / "split")
    assert sorted(whole) == sorted(split) == [1, 2, 3, 4]
    for s in whole:
        for key in ("loss", "ce_loss", "flow_loss", "grad_norm"):
            assert split[s][key] == whole[s][key], (s, key)  # bit-identical
    keys = ckpt_io.saved_keys(tmp_path / "split" / "ckpt" / "step_2")
    model_keys = [k for k in keys if k.startswith("model.")]
    params = [k for k in model_keys if ".lora_" in k]
    assert len(params) == 2 * (14 + 20)
    # besides the adapters only the buffers (the latent statistics of the batch norms), no base weight
    assert set(model_keys) - set(params) == {f"model.model.{m}.bn.{b}" for m in ("vae_model", "vae_decoder_projector")
                                             for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert all(".lora_" in k for k in keys if k.startswith("optim.state."))
    # --export-only writes the adapter of the latest checkpoint
    trainer = E.make_trainer(flow_config(tmp_path / "split", **common), resume=True)
    try:
        path = trainer.export()
        live = {n: p.detach().clone() for n, p in trainer.base.named_parameters() if ".lora_" in n}
    finally:
        trainer.close()
    from cheers.adapters import read_adapter

    state = read_adapter(path)[1]
    assert path == tmp_path / "split" / "adapter" and len(state) == len(live)
    assert all(torch.equal(state["base_model.model." + n.replace(".default.weight", ".weight")], t)
               for n, t in live.items())


def test_bad_lora_settings_are_one_line(flow_config, base_dir, tmp_path):
    def message(exc: pytest.ExceptionInfo) -> str:
        assert "\n" not in str(exc.value)
        return str(exc.value)

    for rank in (0, -1):
        err = pytest.raises(TrainConfigError, flow_config, tmp_path / "r", lora={"rank": rank})
        assert "lora.rank: must be >= 1" in message(err)
    err = pytest.raises(TrainConfigError, flow_config, tmp_path / "d", lora={"dropout": 1.0})
    assert "lora.dropout: must be in [0, 1)" in message(err)
    err = pytest.raises(TrainConfigError, load_config, "stage0_vae", ["lora.rank=4"])
    assert "lora: only kind 'flow' trains adapters" in message(err)
    err = pytest.raises(TrainConfigError, flow_config, tmp_path / "k", lora={"rnak": 4})
    assert "lora.rnak: unknown key (did you mean 'rank'?)" in message(err)
    cfg = flow_config(tmp_path / "t", lora={"targets": ["llm", "model.language_model.*.qproj"]})
    err = pytest.raises(TrainConfigError, E.make_trainer, cfg)
    assert message(err).startswith("lora: target 'model.language_model.*.qproj' matches no linear layer")
    # a LoRA run's checkpoint is adapters only: resuming it as a full run, or starting a stage from it, is refused
    common = dict(steps=1, model={"init": str(base_dir)}, ckpt={"interval": 1, "export_final": False})
    E.train(flow_config(tmp_path / "run", lora=LORA, **common))
    err = pytest.raises(ckpt_io.TrainCheckpointError, E.train, flow_config(tmp_path / "run", **common), resume=True)
    assert "no weights for" in message(err) and "other trainable parameters or lora settings" in str(err.value)
    err = pytest.raises(ckpt_io.TrainCheckpointError, E.train,
                        flow_config(tmp_path / "next", model={"init": str(tmp_path / "run")}))
    assert "is a LoRA run's checkpoint (adapters only)" in message(err) and "cheers merge-adapter" in str(err.value)
