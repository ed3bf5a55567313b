import json

import pytest

from cheers import constants as C
from cheers.config import TokenIds, _tiny_tokens
from cheers.tokenizer import (
    SMALL_SPECIAL_TOKENS,
    CheersTokenizer,
    TokenizerError,
    render_chat,
    train_small_tokenizer,
)

from tests.conftest import SHARED  # noqa: E402  (one definition of where ../shared is)
needs_shared = pytest.mark.skipif(
    not (SHARED / "reference" / "tokenizer" / "vocab.json").is_file(),
    reason=f"shared reference data not found at {SHARED} (set CHEERS_SHARED)",
)

SMALL_TEXTS = [
    "A red disk and a green box.\nBased on the above description, generate an image.",
    "<|im_start|>user\n<im_start><image><im_end>\nWhat is this?<|im_end|>\n",
    "The quick brown fox jumps over the lazy dog.",
    "Tabs\tand\nnewlines\r\n and   spaces 12345",
    "一只戴着帽子的猫 🎨",
] * 20


@pytest.fixture(scope="module")
def qwen():
    return CheersTokenizer.from_dir(SHARED / "reference" / "tokenizer")


@pytest.fixture(scope="module")
def cases():
    return json.loads((SHARED / "parity" / "tokenizer_cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return train_small_tokenizer(SMALL_TEXTS, 400, tmp_path_factory.mktemp("small_tok"))


@needs_shared
def test_released_token_ids(qwen, cases):
    assert qwen.token_ids == TokenIds()
    for content, i in cases["special_token_ids"].items():
        assert qwen.token_to_id(content) == i
    assert qwen.token_to_id("<no_mean>") == C.NO_MEAN_ID
    assert qwen.vocab_size == 151670
    assert qwen.encode("\n") == [198]


@needs_shared
def test_reference_cases(qwen, cases):
    assert len(cases["cases"]) == 11
    for case in cases["cases"]:
        text = qwen.render_chat([{"role": "user", "content": case["user_content"]}])
        assert text == case["rendered_text"]
        ids = qwen.encode(text)
        assert ids == case["plain_token_ids"], case["user_content"]
        assert qwen.decode(ids) == text
        assert qwen.encode_prompt(case["user_content"], case["task"]) == case["processor_input_ids"]
        # content round-trips on its own too
        assert qwen.decode(qwen.encode(case["user_content"])) == case["user_content"]


@needs_shared
def test_task_names_and_batch(qwen, cases):
    names = {"i2t": "understand", "t2t": "chat", "t2i": "t2i", "edit": "edit"}
    contents = [c["user_content"] for c in cases["cases"]]
    tasks = [names[c["task"]] for c in cases["cases"]]
    assert qwen.encode_prompts(contents, tasks) == [c["processor_input_ids"] for c in cases["cases"]]
    t2i = [c for c in cases["cases"] if c["task"] == "t2i"]
    assert qwen.encode_prompts([c["user_content"] for c in t2i], "t2i") == [c["processor_input_ids"] for c in t2i]
    with pytest.raises(ValueError, match="unknown task"):
        qwen.encode_prompt("hi", "caption")
    # a message list and a -300 placeholder
    msgs = [{"role": "user", "content": "draw"}, {"role": "assistant", "content": "<im_start><image_gen><im_end>"}]
    ids = qwen.encode_prompt(msgs, "chat")
    assert ids.count(C.IMAGE_GEN_PLACEHOLDER) == 1 and C.IMAGE_GEN_ID not in ids
    assert qwen.decode([C.IMAGE_PLACEHOLDER]) == "<image>"


@needs_shared
def test_golden_prompts(qwen):
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = SHARED / "parity" / "goldens"
    for name, task in (("a_understanding", "understand"), ("b_text_only", "chat"), ("g_edit", "edit")):
        with safe_open(str(g / f"{name}.safetensors"), "pt") as f:
            meta = f.metadata()
        want = load_file(str(g / f"{name}.safetensors"))["input_ids"].tolist()
        if "content" in meta:
            assert qwen.encode_prompt(meta["content"], task) == want
        plain = [C.IMAGE_ID if i == C.IMAGE_PLACEHOLDER else i for i in want]
        if task == "edit":
            plain = plain[:-1]  # the appended <im_start> is not part of the rendered text
        assert qwen.encode(meta["prompt_text"]) == plain


def test_render_chat_layout():
    text = render_chat([{"role": "user", "content": "hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    text = render_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
        ],
        add_generation_prompt=False,
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
    )


@needs_shared
def test_save_and_reload(qwen, cases, tmp_path):
    qwen.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    again = CheersTokenizer.from_dir(tmp_path)
    assert again.token_ids == qwen.token_ids and again.vocab_size == qwen.vocab_size
    for case in cases["cases"]:
        assert again.encode(case["rendered_text"]) == case["plain_token_ids"]
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["token_ids"]["no_mean"] == C.NO_MEAN_ID


def test_from_dir_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not a tokenizer directory"):
        CheersTokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="missing vocab.json, merges.txt"):
        CheersTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(TokenizerError, match="cannot be read"):
        CheersTokenizer.from_dir(tmp_path)


def test_small_tokenizer_layout(small):
    assert small.token_ids == _tiny_tokens()
    for i, content in enumerate(SMALL_SPECIAL_TOKENS):
        assert small.token_to_id(content) == i
    assert small.id_to_token(8) == "Ċ"
    assert small.encode("\n") == [8]
    assert small.vocab_size <= 400
    text = "<|im_start|>user\n<im_start><image><im_end>\nWhat is this? 一只猫 🎨<|im_end|>\n"
    ids = small.encode(text)
    assert ids[0] == 1 and 3 in ids and 5 in ids and 6 in ids
    assert small.decode(ids) == text
    assert small.encode_prompt("A cat.", "t2i")[-1] == 5
    assert C.IMAGE_PLACEHOLDER in small.encode_prompt("<image>\nWhat?", "understand")
    assert small.decode(ids, skip_special_tokens=True) == "user\n\nWhat is this? 一只猫 🎨\n"


def test_small_tokenizer_deterministic_and_reloadable(small, tmp_path):
    again = train_small_tokenizer(SMALL_TEXTS, 400, tmp_path / "b")
    assert again.backend.to_str() == small.backend.to_str()
    loaded = CheersTokenizer.from_dir(tmp_path / "b")
    assert loaded.token_ids == _tiny_tokens()
    for t in SMALL_TEXTS[:5]:
        assert loaded.encode(t) == small.encode(t)
    with pytest.raises(ValueError, match="vocab_size"):
        train_small_tokenizer(SMALL_TEXTS, 100)
