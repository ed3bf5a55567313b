"""LoRA adapters (`cheers.adapters`, `Cheers.from_pretrained(adapter=...)`, `cheers merge-adapter`): files in PEFT's
own format that `peft` itself loads, merged outputs equal to unmerged ones, several adapters switched at run time,
adapters from the Hub, and one-line errors for adapters that do not fit.

Tolerance of merged vs unmerged (float32 on CPU): W x + s B (A x) and (W + s B A) x differ only by summation
order; measured max |difference| 5e-6 on logits of size ~10 and 2e-5 on latents of size ~25 for a deliberately
strong random adapter (B, A ~ N(0, 0.1^2)); asserted: 1e-4 absolute + 1e-5 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cheers import adapters as A
from cheers.checkpoint import load_model
from cheers.pipeline import Cheers

peft = pytest.importorskip("peft")

ATOL, RTOL = 1e-4, 1e-5
QUESTION = [[{"role": "user", "content": "What color is the star?"}]]


def outputs(c: Cheers) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits of a question and the final latents of a 2-step generation (fixed seed)."""
    logits = c.next_token_logits(QUESTION)
    latents = c.generate_image("a red circle", seed=3, steps=2, output_type="latent")
    return logits, latents


def random_adapter(base_dir: Path, out: Path, targets: list[str], rank: int = 4, seed: int = 1,
                   scale: float = 0.1) -> Path:
    """An adapter for `base_dir` with random (not zero) A and B, written in PEFT's format."""
    model = load_model(base_dir)
    config = A.make_config(A.resolve_targets(model, targets), rank, 2.0 * rank, base=str(base_dir))
    A.add_adapter(model, config, "x")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return A.save_adapter(out, config, A.adapter_state(model.named_parameters(), "x"))


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"llm": random_adapter(tiny_model_dir, root / "llm", ["llm"]),
            "head": random_adapter(tiny_model_dir, root / "head", ["flow_head", "projectors"], rank=2, seed=2)}


@pytest.fixture(scope="module")
def base_outputs(tiny_model_dir) -> tuple[torch.Tensor, torch.Tensor]:
    return outputs(Cheers.from_pretrained(tiny_model_dir))


# ---- PEFT's format ------------------------------------------------------------------------------------------------


def test_the_adapter_file_is_peft_format_and_peft_loads_it(tiny_model_dir, adapter_dirs):
    d = adapter_dirs["llm"]
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fields = json.loads((d / "adapter_config.json").read_text())
    assert fields["peft_type"] == "LORA" and fields["r"] == 4 and fields["lora_alpha"] == 8.0
    ours = load_file(str(d / "adapter_model.safetensors"))
    n_layers = 2 * 7  # cheers-tiny: 2 LLM layers x (q, k, v, o, gate, up, down)
    assert len(ours) == 2 * n_layers
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in ours)
    # peft's own reader returns the same keys and tensors
    theirs = peft.utils.load_peft_weights(str(d))
    assert sorted(theirs) == sorted(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    # PeftModel.from_pretrained puts every tensor where we put it, and runs the model as our pipeline does
    pm = peft.PeftModel.from_pretrained(load_model(tiny_model_dir), str(d))
    got = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if ".lora_" in k}
    assert sorted(got) == sorted(ours) and all(torch.equal(got[k], ours[k]) for k in ours)
    pipe = Cheers.from_pretrained(tiny_model_dir, adapter=d)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        a = pm.get_base_model().model.language_model(pm.get_base_model().model.language_model.embed_tokens(ids))
        b = pipe.model.model.language_model(pipe.model.model.language_model.embed_tokens(ids))
    assert torch.equal(a, b)


def test_state_dict_keys_stay_official_around_the_adapter(tiny_model_dir, adapter_dirs):
    plain = load_model(tiny_model_dir)
    pipe = Cheers.from_pretrained(tiny_model_dir, adapter=adapter_dirs["llm"])
    keys = set(pipe.model.state_dict())
    base_keys = {k.replace(".base_layer.", ".") for k in keys if ".lora_" not in k}
    assert base_keys == set(plain.state_dict())  # the only change: adapted layers hold the original as base_layer
    pipe.merge_adapter()
    assert set(pipe.model.state_dict()) == set(plain.state_dict()) and pipe.adapters == []


# ---- merged == unmerged -----------------------------------------------------------------------------------------


def test_merged_outputs_equal_unmerged_outputs(tiny_model_dir, adapter_dirs, base_outputs, tmp_path):
    for kind in ("llm", "head"):
        pipe = Cheers.from_pretrained(tiny_model_dir, adapter=adapter_dirs[kind])
        unmerged = outputs(pipe)
        changed = max(float((u - b).abs().max()) for u, b in zip(unmerged, base_outputs))
        assert changed > 0.1, kind  # the adapter really acts on what is compared
        pipe.merge_adapter()
        merged = outputs(pipe)
        for m, u in zip(merged, unmerged):
            torch.testing.assert_close(m, u, atol=ATOL, rtol=RTOL)
    # the command writes an official directory that reloads to the same merged model
    from cheers.cli import main

    assert main(["merge-adapter", str(tiny_model_dir), str(adapter_dirs["head"]), str(tmp_path / "merged")]) == 0
    reloaded = Cheers.from_pretrained(tmp_path / "merged")
    assert reloaded.adapters == [] and set(reloaded.model.state_dict()) == set(load_model(tiny_model_dir).state_dict())
    for r, m in zip(outputs(reloaded), merged):
        assert torch.equal(r, m)


def test_the_training_merge_equals_peft_merge(tiny_model_dir, adapter_dirs):
    """`merged_state_dict` (the trainer's merged export, on a state dict) == peft's own merge of the layers."""
    config, _ = A.read_adapter(adapter_dirs["llm"])
    pipe = Cheers.from_pretrained(tiny_model_dir, adapter=adapter_dirs["llm"])
    ours = A.merged_state_dict(pipe.model.state_dict(), config, "default")
    pipe.merge_adapter()
    theirs = pipe.model.state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0)


# ---- several adapters --------------------------------------------------------------------------------------------


def test_adapters_are_listed_and_switched_at_run_time(tiny_model_dir, adapter_dirs, base_outputs):
    singles = {k: outputs(Cheers.from_pretrained(tiny_model_dir, adapter=d)) for k, d in adapter_dirs.items()}
    pipe = Cheers.from_pretrained(tiny_model_dir)
    assert pipe.adapters == [] and pipe.active_adapter is None
    pipe.load_adapter(adapter_dirs["llm"], "llm")
    pipe.load_adapter(adapter_dirs["head"], "head", activate=False)
    assert pipe.adapters == ["llm", "head"] and pipe.active_adapter == "llm"

    def same(got, want):
        return all(torch.equal(g, w) for g, w in zip(got, want))

    assert same(outputs(pipe), singles["llm"])
    pipe.set_adapter("head")
    assert pipe.active_adapter == "head" and same(outputs(pipe), singles["head"])
    pipe.set_adapter(None)
    assert pipe.active_adapter is None and same(outputs(pipe), base_outputs)  # the base model, bit for bit
    with pipe.using_adapter("llm"):
        assert same(outputs(pipe), singles["llm"])
    assert pipe.active_adapter is None
    with pytest.raises(A.AdapterError, match="no adapter named 'nope' \\(loaded: llm, head\\)"):
        pipe.set_adapter("nope")
    with pytest.raises(A.AdapterError, match="already loaded"):
        pipe.load_adapter(adapter_dirs["llm"], "llm")
    with pytest.raises(A.AdapterError, match="save_pretrained: adapters are loaded"):
        pipe.save_pretrained(tiny_model_dir.parent / "never")
    assert not any(p.requires_grad for n, p in pipe.model.named_parameters() if ".lora_" in n)


# ---- bad input -------------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_an_adapter_for_another_base_is_one_line(tiny_model_dir, adapter_dirs, tmp_path):
    src = adapter_dirs["llm"]
    fields = json.loads((src / "adapter_config.json").read_text())
    state = load_file(str(src / "adapter_model.safetensors"))

    def variant(name: str, cfg: dict | None = None, tensors: dict | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(cfg if cfg is not None else fields))
        save_file(tensors if tensors is not None else state, str(d / "adapter_model.safetensors"))
        return d

    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    wide = {**state, key: torch.zeros(4, 96)}
    err = pytest.raises(A.AdapterError, Cheers.from_pretrained, tiny_model_dir, adapter=variant("shape", tensors=wide))
    assert f"{key} is [4, 96] but this model needs [4, 64]" in _one_line(err)

    deeper = {**fields, "target_modules": ["model.language_model.layers.5.self_attn.q_proj"]}
    err = pytest.raises(A.AdapterError, Cheers.from_pretrained, tiny_model_dir, adapter=variant("names", deeper))
    assert "targets model.language_model.layers.5.self_attn.q_proj, which this model lacks" in _one_line(err)

    extra = {**state, "base_model.model.model.language_model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}
    err = pytest.raises(A.AdapterError, Cheers.from_pretrained, tiny_model_dir, adapter=variant("extra", tensors=extra))
    assert "outside the adapter's targets, e.g. base_model.model.model.language_model.layers.9" in _one_line(err)

    err = pytest.raises(A.AdapterError, Cheers.from_pretrained, tiny_model_dir,
                        adapter=variant("rank0", {**fields, "r": 0}))
    assert "r must be an integer >= 1 (got 0)" in _one_line(err)

    err = pytest.raises(A.AdapterError, Cheers.from_pretrained, tiny_model_dir,
                        adapter=variant("ia3", {**fields, "peft_type": "IA3"}))
    assert "peft_type 'IA3'; only LoRA adapters" in _one_line(err)

    (tmp_path / "empty").mkdir()
    err = pytest.raises(A.AdapterError, Cheers.from_pretrained, tiny_model_dir, adapter=tmp_path / "empty")
    assert "no adapter_config.json (not a PEFT adapter directory)" in _one_line(err)

    # the command reports the same cause in one line
    from cheers.cli import main

    assert main(["merge-adapter", str(tiny_model_dir), str(tmp_path / "shape"), str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_bad_targets_and_ranks_are_one_line(tiny_model_dir):
    model = load_model(tiny_model_dir)
    err = pytest.raises(A.AdapterError, A.resolve_targets, model, ["llm", "model.language_model.layers.*.attn.q"])
    assert _one_line(err).startswith("target 'model.language_model.layers.*.attn.q' matches no linear layer")
    err = pytest.raises(A.AdapterError, A.resolve_targets, model, ["lm_head"])
    assert "selects lm_head: the VAE and the output head are never adapted" in _one_line(err)
    err = pytest.raises(A.AdapterError, A.resolve_targets, model, ["llm"], exclude=["*"])
    assert "remove every target layer" in _one_line(err)
    for bad in (0, -2):
        err = pytest.raises(A.AdapterError, A.make_config, ["model.und_projector.mlp.0"], bad, 16.0)
        assert _one_line(err) == f"rank must be an integer >= 1 (got {bad})"
    # groups and patterns select exactly the documented layers
    assert len(A.resolve_targets(model, ["llm"])) == 14
    assert len(A.resolve_targets(model, ["llm_attention"])) == 8
    assert A.resolve_targets(model, ["projectors"]) == ["model.und_projector.mlp.0", "model.und_projector.mlp.2"]
    assert len(A.resolve_targets(model, ["flow_head"])) == 20
    vit = A.resolve_targets(model, ["vit"])
    assert len(vit) == 12 and not any(".head." in n for n in vit)
    assert A.resolve_targets(model, ["re:model\\.language_model\\.layers\\.1\\.mlp\\.(up|down)_proj"]) == [
        "model.language_model.layers.1.mlp.up_proj", "model.language_model.layers.1.mlp.down_proj"]


def test_a_compiled_pipeline_keeps_its_adapter(tiny_model_dir, adapter_dirs):
    pipe = Cheers.from_pretrained(tiny_model_dir, adapter=adapter_dirs["llm"])
    pipe.head.compiled = True  # what OutputHead.compile sets; the check needs no real compile
    with pytest.raises(A.AdapterError, match="set_adapter: this pipeline is compiled and keeps its adapter"):
        pipe.set_adapter(None)
    with pytest.raises(A.AdapterError, match="load_adapter: this pipeline is compiled"):
        pipe.load_adapter(adapter_dirs["head"], "head")


# ---- the Hub -----------------------------------------------------------------------------------------------------


def test_an_adapter_from_a_hub_repo_id(tiny_model_dir, adapter_dirs, tmp_path, monkeypatch):
    from cheers.hub import HubError
    from tests.hub_server import HubServer
    from tests.test_hub import point_hf_at

    with HubServer(tokens=("hf_t",)) as hub:
        hub.add_repo("someone/cheers-lora", adapter_dirs["llm"])
        hub.add_repo("someone/not-an-adapter", tiny_model_dir)
        point_hf_at(monkeypatch, hub.url, tmp_path / "hf-home")
        pipe = Cheers.from_pretrained(tiny_model_dir, adapter="someone/cheers-lora")
        local = Cheers.from_pretrained(tiny_model_dir, adapter=adapter_dirs["llm"])
        assert all(torch.equal(a, b) for a, b in zip(outputs(pipe), outputs(local)))
        fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path}
        assert fetched == {"adapter_config.json", "adapter_model.safetensors"}
        err = pytest.raises(HubError, pipe.load_adapter, "someone/not-an-adapter", "other")
        assert "someone/not-an-adapter: no adapter_config.json or adapter_model.safetensors in the repo" in _one_line(err)
