"""Independent oracles: our Qwen2 decoder and SigLIP encoder against `transformers` with the same random weights
(test-only dependency, random init, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from cheers.config import TextConfig, VisionConfig
from cheers.model.qwen2 import KVCache, Qwen2Model
from cheers.model.siglip import SiglipVisionEncoder

transformers = pytest.importorskip("transformers", reason="transformers is the test-only oracle")


def test_qwen2_matches_transformers():
    torch.manual_seed(0)
    cfg = TextConfig(hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2, vocab_size=300,
                     rope_theta=1_000_000.0, max_position_embeddings=256)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=256, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True,
        rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # give biases and norms non-trivial values
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = Qwen2Model(cfg).eval()
    missing = ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()
                                    if k.startswith("model.")}, strict=True)
    assert not missing.missing_keys
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        hidden = ours(ours.embed_tokens(ids))
        got = hidden @ ours.embed_tokens.weight.T
    err = (got - expected).abs().max().item()
    assert err < 1e-4, f"logits differ by {err}"

    # incremental decoding through the KV cache equals the full forward
    cache = KVCache(cfg.num_layers)
    with torch.no_grad():
        h1 = ours(ours.embed_tokens(ids[:, :20]), cache=cache)
        cache.length = 20
        steps = []
        for i in range(20, 23):
            steps.append(ours(ours.embed_tokens(ids[:, i:i + 1]), cache=cache))
            cache.length += 1
        chunk_cache = KVCache(cfg.num_layers)
        ours(ours.embed_tokens(ids[:, :20]), cache=chunk_cache)
        chunk_cache.length = 20
        chunk = ours(ours.embed_tokens(ids[:, 20:]), cache=chunk_cache)  # several tokens on top of a cache
    inc = torch.cat([h1] + steps, dim=1)
    assert (inc - hidden).abs().max().item() < 1e-5
    assert (chunk - hidden[:, 20:]).abs().max().item() < 1e-5


def test_siglip_matches_transformers():
    torch.manual_seed(0)
    cfg = VisionConfig(hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, patch_size=16, image_size=64)
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=16,
        image_size=64, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=True,
    )
    hf = transformers.SiglipVisionModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name or "probe" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = SiglipVisionEncoder(cfg).eval()
    ours.load_state_dict({k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}, strict=True)
    pixels = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        out = hf(pixel_values=pixels)
        feats = ours(pixels)
        pooled = ours.head(feats)
    assert (feats - out.last_hidden_state).abs().max().item() < 1e-4
    assert (pooled - out.pooler_output).abs().max().item() < 1e-4
