"""The embedded default model shipped in the package: loads offline, within the size budget, and works."""

from __future__ import annotations

from cheers.pipeline import EMBEDDED_DIR, Cheers


def test_embedded_model_ships_and_runs():
    files = {p.name: p.stat().st_size for p in EMBEDDED_DIR.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert name in files, f"{name} missing from {EMBEDDED_DIR}"
    assert sum(files.values()) <= 25 * 1024**2, f"embedded model is {sum(files.values()) / 1024**2:.1f} MB > 25 MB"
    c = Cheers.from_pretrained(None)
    assert c.config.resolution == 64 and c.config.head.high_frequency_gate
    images = c.generate_image(["A photo of a red circle.\nBased on the above description, generate an image."] * 2,
                              seed=[0, 0], steps=4)
    assert images[0].size == (64, 64)
    assert images[0].tobytes() == images[1].tobytes(), "same seed, same image"
    assert images[0].getextrema() != ((0, 0), (0, 0), (0, 0)), "not a blank picture"
    reply = c.chat([{"role": "user", "content": "How many sides does a triangle have?"}], max_new_tokens=8)
    assert isinstance(reply, str) and reply.strip()
