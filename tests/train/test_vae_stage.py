"""Stage 0: the autoencoder trains and hands its decoder and latent statistics over."""

from __future__ import annotations

import math

import torch

from cheers.train import engine as E
from cheers.train.settings import load_config


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
