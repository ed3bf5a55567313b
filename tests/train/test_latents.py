"""The latent cache: exact, keyed by image and preprocessing, persistent on disk."""

from __future__ import annotations

import torch


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
