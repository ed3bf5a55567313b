"""Numerical parity with the reference implementation on the tiny official checkpoint (../shared/parity).

Tolerances are those of ../shared/parity/README.md §4: single forwards atol=rtol=1e-4; cfg/sampled latents and
decoded images 1e-3; losses relative 1e-5; gradient norms relative 1e-4 (atol 1e-6 on full gradients).
"""

from __future__ import annotations

import json

import pytest
import torch

from cheers import sampling as S
from tests.conftest import golden, golden_meta, needs_shared

pytestmark = needs_shared

FWD = dict(atol=1e-4, rtol=1e-4)
SAMPLED = dict(atol=1e-3, rtol=1e-3)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str) -> None:
    actual = actual.detach().float().reshape(expected.shape)
    err = float((actual - expected).abs().max())
    assert torch.allclose(actual, expected, **tol), f"{what}: max abs error {err:.3g} exceeds {tol}"


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_vae_encode_decode(parity_model):
    g = golden("f_vae")
    vae = parity_model.model.vae_model
    with torch.no_grad():
        close(vae.encoder(g["pixel_values"]), g["encoder_moments"], FWD, "encoder moments")
        close(vae.encode(g["pixel_values"]), g["latent_normalized"], FWD, "normalized latent")
        close(vae.decode(g["latent_normalized"]), g["recon"], FWD, "vae_model decode")
        close(parity_model.model.vae_decoder_projector(g["latent_normalized"]), g["decoder_projector_out"], FWD,
              "decoder projector (its own bn statistics)")


@pytest.mark.parametrize("name", ["a_understanding", "b_text_only"])
def test_understanding_forward_and_greedy(parity_model, name, head=None):
    g = golden(name)
    m = parity_model
    with torch.no_grad():
        latents = m.encode_images(g["pixel_values"])
        reading = m.read_latents(latents, keep=True)
        if name == "a_understanding":
            close(latents, g["vae_latent"], FWD, "latent")
            close(reading.pixels, g["pixel_hat"], FWD, "decoder projector pixels")
            close(reading.features, g["vit_last_hidden"], FWD, "ViT last hidden")
            close(reading.tokens, g["und_proj_out"], FWD, "und projector")
        lay = m.layout(g["input_ids"][None], g["attention_mask"][None], reading.tokens)
        assert torch.equal(lay.mask[0, 0].to(torch.uint8), g["lm_attention_mask"]), "LLM attention mask"
        close(lay.embeds[0], g["lm_inputs_embeds"], FWD, "LLM input embeddings")
        hidden = m.model.language_model(lay.embeds, mask=lay.mask)
        close(hidden[0], g["lm_last_hidden"], FWD, "LLM final hidden")
        logits = m.lm_head(hidden[0])
        close(logits[-1], g["logits_last"], FWD, "logits at the last position")
        close(logits[:, g["logits_slice_ids"]], g["logits_slice"], FWD, "logits slice")
        assert torch.equal(logits.topk(8, dim=-1).indices, g["logits_top8_idx"])

    # greedy decoding with the KV cache
    prefix = S.prefill(m, g["input_ids"][None], g["attention_mask"][None], latents)
    step_logits = []
    ids = []
    for tok in S.decode_tokens(m, prefix, S.TextSampling(max_new_tokens=len(g["greedy_ids"])),
                               logits_hook=step_logits.append, head=head):
        ids.append(int(tok[0]))
    assert ids == g["greedy_ids"].tolist()
    got = torch.stack([s[0] for s in step_logits])
    close(got[:, g["logits_slice_ids"]], g["greedy_step_logits_slice"], FWD, "greedy step logits")


def test_velocity_evaluation(parity_model):
    g = golden("c_velocity")
    m = parity_model
    latents = m.encode_images(g["pixel_values"])
    ids = torch.stack([g["cond_input_ids"], g["uncond_input_ids"]])
    prefix = S.prefill(m, ids, None, torch.cat([latents, latents]), keep_hidden=True)
    close(prefix.hidden[0], g["cond_prefill_last_hidden"], FWD, "cond prefill")
    close(prefix.hidden[1], g["uncond_prefill_last_hidden"], FWD, "uncond prefill")
    with torch.no_grad():
        reading = m.read_latents(g["x_t"], keep=True)
        close(reading.pixels, g["xt_pixel_hat"], FWD, "x_t decoded")
        close(reading.features, g["xt_vit_last_hidden"], FWD, "x_t ViT")
        close(reading.tokens, g["xt_und_proj_out"], FWD, "x_t und projector")
        close(reading.detail, g["xt_patch_embedding_res"], FWD, "patch embedding (detail signal)")
        tau1, tau2 = m.model.time_embed(g["t"])
        close(tau1, g["t_emb_1"], FWD, "t_emb_1")
        close(tau2, g["t_emb_2"], FWD, "t_emb_2")
        hidden = S.extend(m, prefix, torch.cat([reading.tokens] * 2), causal=False, commit=False)
        out = m.velocity_head(hidden, g["t"].expand(2), torch.cat([reading.detail] * 2))
    for i, branch in enumerate(("cond", "uncond")):
        close(hidden[i], g[f"{branch}_lm_image_hidden"], FWD, f"{branch} image hidden")
        close(out.semantic[i], g[f"{branch}_gen_proj_out"], FWD, f"{branch} gen projector")
        close(out.gate[i], g[f"{branch}_hi_gate_value"], FWD, f"{branch} gate value")
        close(out.gated[i], g[f"{branch}_hi_gate_out"], FWD, f"{branch} gate output")
        close(out.detail_out[i], g[f"{branch}_hi_proj_out"], FWD, f"{branch} hi projector")
        close(out.velocity[i], g[f"{branch}_velocity"], FWD, f"{branch} velocity")
    v = S.GuidedVelocity(m, prefix, float(g["cfg_scale"]), True)(g["x_t"], float(g["t"]))
    close(v, g["cfg_velocity"], SAMPLED, "cfg velocity")


@pytest.mark.parametrize("name", ["d_t2i_sampling", "g_edit"])
def test_sampling_loops(parity_model, name):
    g = golden(name)
    meta = golden_meta(name)
    m = parity_model
    cfg = float(meta["cfg_scale"])
    a = float(meta["alpha"])
    latents = m.encode_images(g["pixel_values"])
    ids = torch.stack([g["input_ids"], g["uncond_input_ids"]])
    uncond = S.cfg_rows([g["input_ids"].tolist()], {m.config.tokens.img_start, m.config.tokens.img_end},
                        m.config.tokens.no_mean)
    assert uncond[0] == g["uncond_input_ids"].tolist(), "unconditional prompt ids"
    prefix = S.prefill(m, ids, None, torch.cat([latents, latents]))
    trace: list = []
    velocity = S.GuidedVelocity(m, prefix, cfg, True, trace)
    if name == "g_edit":
        close(latents[0], g["z_image"], FWD, "source latent")
        steps = int(meta["effective_steps"])
        grid = S.time_grid(steps, a, t0=float(meta["start_t"]))
        x = 0.1 * latents + 0.9 * g["noise"][None]
    else:
        steps = int(meta["num_inference_steps"])
        grid = S.time_grid(steps, a)
        x = g["z0"][None]
    assert torch.allclose(torch.tensor(grid, dtype=torch.float32), g["step_t"], atol=1e-6)
    prompt_len = prefix.length
    x = S.integrate(velocity, x, grid)
    assert len(trace) == steps
    for i, step in enumerate(trace):
        close(step["x"][0], g["step_x_t"][i], SAMPLED, f"x_t at step {i}")
        close(step["v"][0], g["step_cond_velocity"][i], SAMPLED, f"cond velocity at step {i}")
        close(step["v"][1], g["step_uncond_velocity"][i], SAMPLED, f"uncond velocity at step {i}")
    close(x[0], g["final_latent"], SAMPLED, "final latent")
    with torch.no_grad():
        close(m.model.vae_model.decode(x)[0], g["decoded_image"], SAMPLED, "decoded image")
    # after the image the sampler appends <im_end> (the only generated id in the goldens)
    assert g["generated_ids"].tolist() == [m.config.tokens.img_end]
    assert prefix.length == prompt_len + m.config.num_image_tokens  # the last image block stays in the cache


def test_training_loss_and_gradients(parity_model):
    import copy

    g = golden("e_train_loss")
    meta = golden_meta("e_train_loss")
    m = copy.deepcopy(parity_model).train()
    for name, p in m.named_parameters():
        p.requires_grad_(not name.startswith("model.vae_model."))
    out = m(g["input_ids"], g["pixel_values"], g["t"], g["attention_mask"], g["labels"], x0=g["x0_noise"])
    assert torch.equal(out.ce_targets.reshape(-1), g["ce_labels_flat"]), "realigned CE labels"
    assert out.num_ce_tokens == 32
    assert torch.equal(out.layout.mask[:, 0].to(torch.uint8), g["lm_attention_mask"])
    close(out.layout.embeds, g["lm_inputs_embeds"], FWD, "LLM input embeddings")
    close(out.flow_target, g["ut_target"], FWD, "flow target")
    close(out.velocity, g["image_latent_pred"], FWD, "predicted velocity")
    close(out.gate, g["hi_gate_value"], FWD, "gate values")
    assert rel(float(out.ce_loss), float(g["text_loss"])) < 1e-5
    assert rel(float(out.flow_loss), float(g["image_loss"])) < 1e-5
    assert rel(float(out.loss), float(g["total_loss"])) < 1e-5
    out.loss.backward()
    params = dict(m.named_parameters())
    for name, norm in zip(json.loads(meta["grad_param_names"]), g["grad_norms"].tolist()):
        assert rel(float(params[name].grad.norm()), norm) < 1e-4, name
    all_norms = json.loads(meta["all_grad_norms"])
    assert set(all_norms) == {n for n, p in params.items() if p.grad is not None}
    for name, norm in all_norms.items():
        got = float(params[name].grad.norm())
        # k-projection biases have an exactly zero true gradient (softmax is shift invariant): compare absolutely
        assert rel(got, norm) < 1e-4 or abs(got - norm) < 1e-6, f"{name}: {got} vs {norm}"
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in m.parameters() if p.grad is not None))
    assert rel(float(total), float(g["grad_total_norm"])) < 1e-4
    for key, name in [("grad_hi_gate_gate_2_weight", "model.hi_gate.gate.2.weight"),
                      ("grad_gen_head_b_linear_bias", "model.gen_projector.diffusion_head_b.linear.bias"),
                      ("grad_time_embed_mlp_2_2_bias", "model.time_embed.mlp_2.2.bias")]:
        assert torch.allclose(params[name].grad, g[key], rtol=1e-4, atol=1e-6), key
