"""Loading from and pushing to the Hugging Face Hub (`cheers.hub`, `Cheers.from_pretrained("owner/name")`) against
the local test Hub of tests/hub_server.py: only the files the model reads are fetched, a dropped download resumes,
the cache works offline, and repo / revision / auth / cache / layout problems are one-line errors naming the repo.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE, ... once, when it is imported; the `hub_env` fixture
sets the variables and mirrors them into `huggingface_hub.constants`, so no request ever leaves 127.0.0.1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cheers.checkpoint import INDEX_NAME, CheckpointError, load_model, save_model
from cheers.hub import HubError, push_to_hub, resolve_model_dir
from cheers.pipeline import Cheers
from cheers.testing import make_tiny_model_dir
from tests.conftest import SHARED, TINY_OFFICIAL, needs_shared
from tests.hub_server import HubServer

REPO = "ai9stars/Cheers"
TOKEN = "hf_test_token"
GEN_CONFIG = {"cheers": {"image": {"steps": 3, "cfg_scale": 2.0, "shift": 1.0}, "text": {"max_new_tokens": 5}}}
MODEL_FILES = {"config.json", INDEX_NAME, "tokenizer.json", "tokenizer_config.json", "generation_config.json",
               "preprocessor_config.json"}
# files a repo may hold that the model never reads
UNRELATED = {"optimizer.pt": b"\x80\x04not a model" * 100, "README.md": b"# Cheers\n",
             "vocab.json": b"{}", "merges.txt": b"#version: 0.2\n", "training_args.bin": b"\x00" * 64}


def release_layout(src: Path, dst: Path, seed_shift: float = 0.0, dtype: torch.dtype = torch.bfloat16,
                   max_shard_bytes: int = 600_000) -> Path:
    """`src` (a model directory) re-saved as the release is laid out: sharded bf16 safetensors with an index,
    tokenizer files, generation_config.json and preprocessor_config.json. `seed_shift` moves every weight."""
    model = load_model(src)
    if seed_shift:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(seed_shift)
    save_model(model, dst, max_shard_bytes=max_shard_bytes, dtype=dtype)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    (dst / "generation_config.json").write_text(json.dumps(GEN_CONFIG))
    (dst / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "UMMImageProcessor",
                                                              "scale_resolution": model.config.resolution,
                                                              "patch_size": model.config.vision.patch_size}))
    return dst


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    d = release_layout(tiny_model_dir, tmp_path_factory.mktemp("release") / "cheers")
    assert len(json.loads((d / INDEX_NAME).read_text())["weight_map"]) > 0 and len(shards(d)) >= 3
    return d


def shards(d: Path) -> list[str]:
    return sorted(set(json.loads((d / INDEX_NAME).read_text())["weight_map"].values()))


@pytest.fixture(scope="module")
def hub(model_dir, tmp_path_factory):
    """The test Hub with REPO (the tiny model in the release layout, plus files the model does not need)."""
    extra = tmp_path_factory.mktemp("extra") / "extra.safetensors"  # valid weights the index does not name
    save_file({"x": torch.zeros(4)}, str(extra))
    with HubServer(tokens=(TOKEN,), other_users=("hf_other_user",)) as server:
        server.add_repo(REPO, model_dir)
        server.commit(REPO, {**UNRELATED, "extra.safetensors": extra}, message="unrelated files")
        yield server


def point_hf_at(monkeypatch, url: str, home: Path) -> Path:
    """HF_* variables for a test, mirrored into huggingface_hub.constants (read at import); -> the Hub cache."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
                       "HF_HUB_DISABLE_XET": "1"}.items():
        monkeypatch.setenv(var, value)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    for name, value in {"ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": template, "HF_HOME": str(home),
                        "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN_PATH": str(home / "token"),
                        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"), "HF_HUB_OFFLINE": False,
                        "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True}.items():
        monkeypatch.setattr(constants, name, value)
    assert constants.ENDPOINT.startswith("http://127.0.0.1:")
    return home / "hub"


def go_offline(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache(hub, tmp_path, monkeypatch) -> Path:
    hub.reset_log()
    return point_hf_at(monkeypatch, hub.url, tmp_path / "hf-home")


def outputs(c: Cheers) -> tuple[torch.Tensor, bytes]:
    """Next-token logits of a question and the bytes of a generated image (fixed seed)."""
    logits = c.next_token_logits([[{"role": "user", "content": "What color is the star?"}]])
    return logits, c.generate_image("a red circle", seed=3, steps=2)[0].tobytes()


def no_xet(hub: HubServer) -> bool:
    return not any("xet" in r.path.lower() or any("xet" in k for k in r.headers) for r in hub.requests)


# ---- downloading ----------------------------------------------------------------------------------------------
def test_repo_id_loads_the_same_model_as_the_local_dir(hub, cache, model_dir):
    c = Cheers.from_pretrained(REPO)
    snap = Path(c.source)
    assert snap == cache / "models--ai9stars--Cheers" / "snapshots" / hub.repos[REPO].branches["main"]
    local = Cheers.from_pretrained(model_dir)
    (logits, image), (local_logits, local_image) = outputs(c), outputs(local)
    assert torch.equal(logits, local_logits) and image == local_image
    assert vars(c.image_defaults) == vars(local.image_defaults) and c.image_defaults.steps == 3
    for name in MODEL_FILES | set(shards(model_dir)):
        assert (snap / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert no_xet(hub)


def test_only_the_files_the_model_reads_are_fetched(hub, cache, model_dir):
    snap = resolve_model_dir(REPO)
    needed = MODEL_FILES | set(shards(model_dir))
    assert set(hub.downloaded(REPO)) == needed
    assert {p.name for p in snap.iterdir()} == needed
    touched = {r.path.split("/", 5)[5] for r in hub.requests if r.path.split("/")[3:4] == ["resolve"]}
    assert touched == needed  # not even a HEAD for optimizer.pt, extra.safetensors, vocab.json, README.md, ...
    # weights come through the CDN redirect, small files straight from the Hub
    assert {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.server == "cdn"} == {
        hub_sha256(hub, s) for s in shards(model_dir)}
    # a second call re-reads the branch head only: every file comes from the cache
    n = len(hub.requests)
    assert resolve_model_dir(REPO) == snap
    assert [r.path for r in hub.requests[n:]] == [f"/api/models/{REPO}/revision/main"]
    assert len(hub.served) == len(needed)


def hub_sha256(hub: HubServer, name: str) -> str:
    return hub.repos[REPO].commits[hub.repos[REPO].branches["main"]][name].sha256


def test_a_dropped_download_resumes_with_a_range_request(hub, cache, model_dir, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes what it received in chunks of DOWNLOAD_CHUNK_SIZE (10 MB) and resumes from the last
    # whole chunk; 64 KiB chunks let a 600 kB shard show the resume
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 65536)
    first = shards(model_dir)[0]
    size = (model_dir / first).stat().st_size
    hub.cut_once(REPO, first, 100_000)
    snap = resolve_model_dir(REPO)
    assert (snap / first).read_bytes() == (model_dir / first).read_bytes()
    parts = [(s.start, s.sent, s.complete) for s in hub.served if s.path == first]
    assert parts == [(0, 100_000, False), (65536, size - 65536, True)]
    ranges = [r.headers.get("range") for r in hub.requests if r.server == "cdn" and r.method == "GET"
              and r.path.endswith(hub_sha256(hub, first))]
    assert ranges == [None, "bytes=65536-"]


def test_a_revision_selects_a_branch_and_a_missing_one_is_named(hub, cache, model_dir):
    hub.commit(REPO, {"generation_config.json": json.dumps({"cheers": {"image": {"steps": 7}}}).encode()},
               branch="v2")
    assert Cheers.from_pretrained(REPO, revision="v2").image_defaults.steps == 7
    assert Cheers.from_pretrained(REPO).image_defaults.steps == 3
    with pytest.raises(HubError) as err:
        Cheers.from_pretrained(REPO, revision="no-such-branch")
    assert str(err.value) == f"{REPO}: revision 'no-such-branch' not found on the Hub ({hub.url})"


def test_a_missing_repo_is_one_line_naming_it(hub, cache):
    with pytest.raises(HubError) as err:
        Cheers.from_pretrained("someone/missing")
    assert str(err.value) == (f"someone/missing: not a local directory, and no such repo on the Hub ({hub.url}); "
                              "a private repo needs a token (HF_TOKEN or token=)")
    assert isinstance(err.value, CheckpointError)
    for bad in ("/no/such/dir", "./relative/x", "a/b/c"):  # not repo ids: never sent to the Hub
        with pytest.raises(CheckpointError, match=f"^{Path(bad)}: not a directory$"):
            resolve_model_dir(bad)
    with pytest.raises(CheckpointError, match="^someone/missing: not a directory$"):
        resolve_model_dir(Path("someone/missing"))  # a Path is always local
    assert [r.path for r in hub.requests] == [f"/api/models/someone/missing/revision/main"]


def test_a_local_directory_wins_over_a_repo_id(hub, cache, tmp_path, monkeypatch, model_dir):
    monkeypatch.chdir(tmp_path)
    other = make_tiny_model_dir(tmp_path / "ai9stars" / "Cheers", seed=5)
    c = Cheers.from_pretrained(REPO)
    assert c.source == REPO and hub.requests == []
    assert torch.equal(outputs(c)[0], outputs(Cheers.from_pretrained(other))[0])
    assert not torch.equal(outputs(c)[0], outputs(Cheers.from_pretrained(model_dir))[0])
    assert Cheers.from_pretrained("cheers-tiny").source == "preset:cheers-tiny" and hub.requests == []


def test_gated_and_private_repos_need_the_token(hub, cache, monkeypatch, model_dir):
    hub.add_repo("org/gated", model_dir, gated=True)
    hub.add_repo("org/private", model_dir, private=True)
    with pytest.raises(HubError) as err:
        resolve_model_dir("org/gated")
    assert str(err.value) == (f"org/gated: gated repo on {hub.url}; accept its conditions on the Hub and log in "
                              "(HF_TOKEN or token=)")
    with pytest.raises(HubError, match="^org/gated: gated repo on "):
        resolve_model_dir("org/gated", token="hf_other_user")  # a valid account without access
    with pytest.raises(HubError) as err:
        resolve_model_dir(REPO, token="hf_expired")  # an unknown token is refused even for a public repo
    assert str(err.value) == (f"{REPO}: not authorized on {hub.url} (HTTP 401); check the token (HF_TOKEN or "
                              "token=)")
    with pytest.raises(HubError, match="^org/private: not a local directory, and no such repo on the Hub"):
        resolve_model_dir("org/private")
    assert resolve_model_dir("org/private", token=TOKEN).is_dir()
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # read by huggingface_hub at each request
    snap = resolve_model_dir("org/gated")
    assert (snap / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
    assert {r.headers.get("authorization") for r in hub.requests if r.path.startswith("/org/gated/")} == {
        f"Bearer {TOKEN}"}
    # the CDN gets no credentials (huggingface_hub drops them for another host)
    assert all("authorization" not in r.headers for r in hub.requests if r.server == "cdn")


def test_snapshots_without_config_or_weights_are_refused(hub, cache, model_dir):
    tok = {n: model_dir / n for n in ("tokenizer.json", "tokenizer_config.json")}
    first, *rest = shards(model_dir)
    hub.add_repo("org/no-config", {**tok, **{s: model_dir / s for s in shards(model_dir)},
                                   INDEX_NAME: model_dir / INDEX_NAME})
    hub.add_repo("org/no-weights", {**tok, "config.json": model_dir / "config.json", "optimizer.pt": b"x"})
    hub.add_repo("org/lost-shard", {**tok, "config.json": model_dir / "config.json",
                                    INDEX_NAME: model_dir / INDEX_NAME, first: model_dir / first})
    cases = {
        "org/no-config": "org/no-config: no config.json in the repo (not a Cheers model); snapshot ",
        "org/no-weights": ("org/no-weights: no model weights in the repo (expected model.safetensors or "
                           "model.safetensors.index.json)"),
        "org/lost-shard": f"org/lost-shard: {INDEX_NAME} names shard(s) the repo lacks: {', '.join(rest)}",
    }
    for repo_id, message in cases.items():
        with pytest.raises(HubError) as err:
            Cheers.from_pretrained(repo_id)
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    assert "optimizer.pt" not in hub.downloaded("org/no-weights")


# ---- the cache, offline ---------------------------------------------------------------------------------------
def test_offline_loading_from_the_cache_with_the_hub_stopped(model_dir, tmp_path, monkeypatch):
    with HubServer() as server:
        commit = server.add_repo(REPO, model_dir)
        cache = point_hf_at(monkeypatch, server.url, tmp_path / "hf-home")
        online = outputs(Cheers.from_pretrained(REPO))
    # the Hub is gone: local_files_only, HF_HUB_OFFLINE=1 and an unreachable Hub all read the cache
    snap = str(cache / "models--ai9stars--Cheers" / "snapshots" / commit)
    c = Cheers.from_pretrained(REPO, local_files_only=True)
    logits, image = outputs(c)
    assert c.source == snap and torch.equal(logits, online[0]) and image == online[1]
    for kwargs in ({"local_files_only": True, "revision": commit}, {}):
        assert str(resolve_model_dir(REPO, **kwargs)) == snap
    go_offline(monkeypatch)
    c = Cheers.from_pretrained(REPO)
    assert c.source == snap and torch.equal(outputs(c)[0], online[0])


def test_offline_and_not_cached_names_the_repo_and_the_cache(tmp_path, monkeypatch):
    with HubServer() as server:
        cache = point_hf_at(monkeypatch, server.url, tmp_path / "hf-home")
    with pytest.raises(HubError) as err:  # the Hub unreachable
        resolve_model_dir(REPO)
    assert str(err.value).startswith(f"{REPO}: the Hub ({server.url}) cannot be reached (")
    assert str(err.value).endswith(f") and the model is not in the Hub cache {cache}")
    with pytest.raises(HubError) as err:
        resolve_model_dir(REPO, local_files_only=True, cache_dir=tmp_path / "elsewhere")
    assert str(err.value) == (f"{REPO}: not in the Hub cache {tmp_path / 'elsewhere'} (complete), and downloads "
                              "are off (local_files_only=True)")
    go_offline(monkeypatch)
    with pytest.raises(HubError) as err:
        Cheers.from_pretrained(REPO, revision="v1")
    assert str(err.value) == (f"{REPO} (revision 'v1'): not in the Hub cache {cache} (complete), and downloads "
                              "are off (HF_HUB_OFFLINE=1)")


# ---- uploading ------------------------------------------------------------------------------------------------
def test_push_to_hub_uploads_a_loadable_model(hub, cache, model_dir, tmp_path):
    info = push_to_hub(model_dir, "me/pushed", token=TOKEN, private=True)
    repo = hub.repos["me/pushed"]
    assert repo.private and info.oid == repo.branches["main"]
    files = hub.files("me/pushed")
    assert set(files) == {p.name for p in model_dir.iterdir()} | {".gitattributes"}
    assert all(files[p.name] == p.read_bytes() for p in model_dir.iterdir())
    # weights went through the git-LFS batch API and a PUT to storage; small files inline in the commit
    puts = {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "PUT"}
    assert puts == {hub.repos["me/pushed"].commits[info.oid][s].sha256 for s in shards(model_dir)}
    assert no_xet(hub)
    c = Cheers.from_pretrained("me/pushed", token=TOKEN)
    assert torch.equal(outputs(c)[0], outputs(Cheers.from_pretrained(model_dir))[0])

    changed = tmp_path / "changed"
    shutil.copytree(model_dir, changed)
    (changed / "generation_config.json").write_text(json.dumps({"cheers": {"image": {"steps": 9}}}))
    n = len(hub.requests)
    dev = push_to_hub(changed, "me/pushed", token=TOKEN, revision="dev", commit_message="fewer steps")
    assert repo.branches["dev"] == dev.oid and repo.branches["main"] == info.oid
    assert not any(r.method == "PUT" for r in hub.requests[n:])  # the unchanged weights are not sent again
    main_files, dev_files = hub.files("me/pushed"), hub.files("me/pushed", "dev")
    assert {p for p in dev_files if dev_files[p] != main_files.get(p)} == {"generation_config.json"}
    assert Cheers.from_pretrained("me/pushed", revision="dev", token=TOKEN).image_defaults.steps == 9

    with pytest.raises(HubError) as err:
        push_to_hub(model_dir, "me/other")  # no token
    assert str(err.value).startswith(f"me/other: upload to {hub.url} failed (") and "401" in str(err.value)
    assert "me/other" not in hub.repos
    with pytest.raises(CheckpointError, match=f"^{tmp_path}: no config.json"):
        push_to_hub(tmp_path, "me/pushed", token=TOKEN)


# ---- the release's own layout ---------------------------------------------------------------------------------
@needs_shared
def test_the_release_layout_with_a_bpe_tokenizer(hub, cache, tmp_path):
    """The released repo's files: vocab.json + merges.txt (no tokenizer.json), bf16 shards with an index."""
    src = tmp_path / "src"
    shutil.copytree(TINY_OFFICIAL, src)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(SHARED / "reference" / "tokenizer" / name, src / name)
    d = release_layout(src, tmp_path / "release", max_shard_bytes=8_000_000)
    hub.add_repo("org/release", {**{p.name: p for p in d.iterdir()}, "optimizer.pt": b"x" * 1000})
    c = Cheers.from_pretrained("org/release")
    assert set(hub.downloaded("org/release")) == {p.name for p in d.iterdir()}
    assert "tokenizer.json" not in {p.name for p in Path(c.source).iterdir()}
    logits = c.next_token_logits([[{"role": "user", "content": "What is this?"}]])
    assert torch.equal(logits, Cheers.from_pretrained(d).next_token_logits(
        [[{"role": "user", "content": "What is this?"}]]))


def test_pipeline_push_to_hub_round_trips(hub, cache, model_dir):
    """`Cheers.push_to_hub` saves a complete directory and uploads it; loading the repo gives the same outputs."""
    pipe = Cheers.from_pretrained(model_dir)
    info = pipe.push_to_hub("me/from-pipeline", token=TOKEN)
    assert info.oid == hub.repos["me/from-pipeline"].branches["main"]
    files = set(hub.files("me/from-pipeline"))
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json"} <= files
    again = Cheers.from_pretrained("me/from-pipeline", token=TOKEN)
    assert torch.equal(outputs(again)[0], outputs(pipe)[0])
