"""Vision pretraining stage: describing texts, positives, training only the ViT, exact resume, export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cheers.train import engine as E
from cheers.train.settings import TrainConfigError, load_config

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


def test_vision_stage_trains_only_the_vit_resumes_exactly_and_exports(flow_config, work, tmp_path):
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
        E.make_trainer(flow_config(tmp_path / "next", model={"init": str(full)}))


def test_vision_stage_refuses_gradient_accumulation_and_other_modules(work, tmp_path):
    with pytest.raises(TrainConfigError, match="grad_accum: 1"):
        E.make_trainer(_vision_config(work, tmp_path / "a", "grad_accum=2"))
    with pytest.raises(TrainConfigError, match="trains the ViT only"):
        E.make_trainer(_vision_config(work, tmp_path / "b", 'trainable.include=["*"]',
                                      'trainable.exclude=["model.vae_model.*"]'))
