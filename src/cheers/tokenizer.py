"""Text side of Cheers: the Qwen2 byte-level BPE tokenizer, the chat template and the prompt ids of each task.

`CheersTokenizer` wraps a `tokenizers.Tokenizer` (no `transformers` at runtime, no network):

* `CheersTokenizer.from_dir(path)` reads `tokenizer.json` when present, otherwise builds the Qwen2 tokenizer
  from `vocab.json` + `merges.txt` and the added tokens listed in `tokenizer_config.json`, then adds the five
  image tokens of Cheers (`<image>`, `<image_gen>`, `<im_start>`, `<im_end>`, `<no_mean>`) as special tokens
  if they are missing. On the released vocabulary they land on ids 151665-151669 (spec §C.1).
* `render_chat` renders the Qwen chat template of spec §C.2, `encode_prompt` turns a user content (or a message
  list) into the ids the reference processor produces: every `<image>` becomes one `-200` placeholder,
  `<image_gen>` one `-300`, and text-to-image / editing prompts end with `<im_start>`.
* `train_small_tokenizer` trains the small byte-level BPE vocabularies of the tiny presets, whose eight special
  tokens take ids 0-7 and whose newline byte is id 8 (`cheers.config._tiny_tokens()`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from cheers import constants as C
from cheers.config import TokenIds

__all__ = [
    "CheersTokenizer",
    "TokenizerError",
    "IMAGE_TOKENS",
    "SMALL_SPECIAL_TOKENS",
    "TASKS",
    "train_small_tokenizer",
]

PAD_TOKEN = "<|endoftext|>"
CHAT_START_TOKEN = "<|im_start|>"
CHAT_END_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<image>"
IMAGE_GEN_TOKEN = "<image_gen>"
IMG_START_TOKEN = "<im_start>"
IMG_END_TOKEN = "<im_end>"
NO_MEAN_TOKEN = "<no_mean>"

# Added to the base vocabulary in this order (so the released vocabulary gives them ids 151665..151669).
IMAGE_TOKENS = (IMAGE_TOKEN, IMAGE_GEN_TOKEN, IMG_START_TOKEN, IMG_END_TOKEN, NO_MEAN_TOKEN)
# The specials of the small tokenizers, ids 0..7 in this order (matches cheers.config._tiny_tokens()).
SMALL_SPECIAL_TOKENS = (PAD_TOKEN, CHAT_START_TOKEN, CHAT_END_TOKEN) + IMAGE_TOKENS

# Qwen2's pre-tokenization pattern: contractions, letter runs with at most one leading non-letter, single digits,
# punctuation runs (with an optional leading space and trailing newlines), newline runs, and whitespace runs that
# leave the last space to the following word.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# Tasks of encode_prompt, with the names used in the parity cases as aliases.
TASKS = {
    "understand": "understand",
    "i2t": "understand",
    "chat": "chat",
    "t2t": "chat",
    "t2i": "t2i",
    "generate": "t2i",
    "edit": "edit",
}
_APPENDS_IMG_START = {"t2i", "edit"}

# Roles of the official training format.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}

_CONFIG_FILE = "tokenizer_config.json"
_TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer directory cannot be read, or a tokenizer lacks a token Cheers needs."""


def _qwen2_pipeline(tok: Tokenizer) -> None:
    """Install Qwen2's normalizer, pre-tokenizer and decoder on `tok` (NFC; regex split; byte-level, no prefix space)."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()


def _chat_template() -> str:
    return (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + C.DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


class CheersTokenizer:
    """Byte-level BPE tokenizer with the Cheers special tokens, chat template and task prompts."""

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>"):
        self._tok = tokenizer
        self.source = source
        self._ensure_image_tokens()
        self._token_ids = self._lookup_token_ids()

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "CheersTokenizer":
        """Load `tokenizer.json` if the directory has one, else Qwen2 BPE from `vocab.json` + `merges.txt` (+ the
        added tokens of `tokenizer_config.json`). The five image tokens are added as special tokens if absent."""
        d = Path(path)
        if not d.is_dir():
            raise TokenizerError(f"{d}: not a tokenizer directory")
        if (d / _TOKENIZER_FILE).is_file():
            try:
                tok = Tokenizer.from_file(str(d / _TOKENIZER_FILE))
            except Exception as err:  # the Rust side raises a plain Exception
                raise TokenizerError(f"{d / _TOKENIZER_FILE}: cannot be read ({err})") from None
            return cls(tok, source=str(d))
        vocab, merges = d / "vocab.json", d / "merges.txt"
        missing = [p.name for p in (vocab, merges) if not p.is_file()]
        if missing:
            raise TokenizerError(f"{d}: no {_TOKENIZER_FILE} and missing {', '.join(missing)}")
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges))
        except Exception as err:
            raise TokenizerError(f"{d}: cannot read vocab.json/merges.txt ({err})") from None
        tok = Tokenizer(bpe)
        _qwen2_pipeline(tok)
        cfg_path = d / _CONFIG_FILE
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise TokenizerError(f"{cfg_path}: not valid JSON ({err.msg} at line {err.lineno})") from None
            _add_listed_tokens(tok, cfg.get("added_tokens_decoder", {}), cfg_path)
        return cls(tok, source=str(d))

    def _ensure_image_tokens(self) -> None:
        for content in IMAGE_TOKENS:
            if self._tok.token_to_id(content) is None:
                self._tok.add_special_tokens([AddedToken(content, normalized=False, special=True)])

    def _lookup_token_ids(self) -> TokenIds:
        def need(content: str) -> int:
            i = self._tok.token_to_id(content)
            if i is None:
                raise TokenizerError(f"{self.source}: tokenizer has no '{content}' token")
            return i

        newline = self._tok.encode("\n", add_special_tokens=False).ids
        if len(newline) != 1:
            raise TokenizerError(f"{self.source}: '\\n' is not a single token ({newline})")
        return TokenIds(
            pad=need(PAD_TOKEN),
            chat_start=need(CHAT_START_TOKEN),
            chat_end=need(CHAT_END_TOKEN),
            image=need(IMAGE_TOKEN),
            image_gen=need(IMAGE_GEN_TOKEN),
            img_start=need(IMG_START_TOKEN),
            img_end=need(IMG_END_TOKEN),
            no_mean=need(NO_MEAN_TOKEN),
            newline=newline[0],
        )

    # ---- basic API ----------------------------------------------------------------------------------------------
    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def token_ids(self) -> TokenIds:
        """The special ids the model needs, looked up by token content."""
        return TokenIds(**vars(self._token_ids))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary + added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special and added tokens written in the text are recognised. No BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Negative image placeholders are written back as `<image>` / `<image_gen>`."""
        t = self._token_ids
        out = []
        for i in ids:
            i = int(i)
            if i == C.IMAGE_PLACEHOLDER:
                i = t.image
            elif i == C.IMAGE_GEN_PLACEHOLDER:
                i = t.image_gen
            elif i < 0:
                raise ValueError(f"cannot decode negative id {i}")
            out.append(i)
        return self._tok.decode(out, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json` and a small `tokenizer_config.json` (loadable by `from_dir`)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (_TOKENIZER_FILE + ".tmp")
        self._tok.save(str(tmp))
        os.replace(tmp, d / _TOKENIZER_FILE)
        added = {
            str(i): {"content": a.content, "special": a.special}
            for i, a in sorted(self._tok.get_added_tokens_decoder().items())
        }
        cfg = {
            "tokenizer_class": "CheersTokenizer",
            "add_bos_token": False,
            "bos_token": None,
            "eos_token": CHAT_END_TOKEN,
            "pad_token": PAD_TOKEN,
            "chat_template": _chat_template(),
            "default_system_prompt": C.DEFAULT_SYSTEM_PROMPT,
            "token_ids": vars(self._token_ids),
            "added_tokens_decoder": added,
        }
        with open(d / _CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
            f.write("\n")

    # ---- chat template ------------------------------------------------------------------------------------------
    def render_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        system_prompt: str = C.DEFAULT_SYSTEM_PROMPT,
    ) -> str:
        """The Qwen chat layout (spec §C.2). Messages are `{"role", "content"}` (or the training format's
        `{"from": "human"|"gpt", "value"}`); a system turn with `system_prompt` is inserted first unless the first
        message is a system message. Contents are inserted verbatim."""
        return render_chat(messages, add_generation_prompt=add_generation_prompt, system_prompt=system_prompt)

    def encode_prompt(
        self,
        content_or_messages: str | Sequence[Mapping[str, str]],
        task: str = "understand",
        system_prompt: str = C.DEFAULT_SYSTEM_PROMPT,
    ) -> list[int]:
        """Ids of an inference prompt as the reference processor builds them.

        `content_or_messages` is the user content or a message list. `task` is one of "understand", "chat", "t2i",
        "edit" (aliases "i2t", "t2t", "generate"). `<image>` becomes one -200 placeholder, `<image_gen>` one -300;
        "t2i" and "edit" prompts end with `<im_start>` after the assistant header.
        """
        try:
            kind = TASKS[task]
        except KeyError:
            raise ValueError(f"unknown task '{task}'; choose one of {', '.join(sorted(set(TASKS)))}") from None
        if isinstance(content_or_messages, str):
            messages: Sequence[Mapping[str, str]] = [{"role": "user", "content": content_or_messages}]
        else:
            messages = content_or_messages
        ids = self.encode(render_chat(messages, add_generation_prompt=True, system_prompt=system_prompt))
        ids = self.to_placeholders(ids)
        if kind in _APPENDS_IMG_START:
            ids.append(self._token_ids.img_start)
        return ids

    def encode_prompts(
        self,
        contents: Sequence[str | Sequence[Mapping[str, str]]],
        task: str | Sequence[str] = "understand",
        system_prompt: str = C.DEFAULT_SYSTEM_PROMPT,
    ) -> list[list[int]]:
        """Batched `encode_prompt` (one task for all, or one per prompt); unpadded lists of ids."""
        tasks = [task] * len(contents) if isinstance(task, str) else list(task)
        if len(tasks) != len(contents):
            raise ValueError(f"{len(contents)} prompts but {len(tasks)} tasks")
        return [self.encode_prompt(c, t, system_prompt=system_prompt) for c, t in zip(contents, tasks)]

    def to_placeholders(self, ids: Iterable[int]) -> list[int]:
        """Replace `<image>` ids by -200 and `<image_gen>` ids by -300."""
        img, gen = self._token_ids.image, self._token_ids.image_gen
        return [C.IMAGE_PLACEHOLDER if i == img else C.IMAGE_GEN_PLACEHOLDER if i == gen else i for i in ids]

    def __repr__(self) -> str:
        return f"CheersTokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def render_chat(
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = True,
    system_prompt: str = C.DEFAULT_SYSTEM_PROMPT,
) -> str:
    """See `CheersTokenizer.render_chat`."""
    parts = []
    for k, m in enumerate(messages):
        role, content = _role_content(m, k)
        if k == 0 and role != "system":
            parts.append(f"{CHAT_START_TOKEN}system\n{system_prompt}{CHAT_END_TOKEN}\n")
        parts.append(f"{CHAT_START_TOKEN}{role}\n{content}{CHAT_END_TOKEN}\n")
    if not messages:
        parts.append(f"{CHAT_START_TOKEN}system\n{system_prompt}{CHAT_END_TOKEN}\n")
    if add_generation_prompt:
        parts.append(f"{CHAT_START_TOKEN}assistant\n")
    return "".join(parts)


def _role_content(m: Mapping[str, Any], k: int) -> tuple[str, str]:
    if "role" in m:
        role, content = m["role"], m.get("content")
    elif "from" in m:
        role, content = _ROLE_ALIASES.get(m["from"], m["from"]), m.get("value")
    else:
        raise ValueError(f"message {k} has neither 'role' nor 'from'")
    if not isinstance(role, str) or not isinstance(content, str):
        raise ValueError(f"message {k}: role and content must be strings")
    return role, content


def _add_listed_tokens(tok: Tokenizer, listed: Mapping[str, Mapping[str, Any]], where: Path) -> None:
    """Add the tokens of a `tokenizer_config.json` `added_tokens_decoder` at their listed ids (in id order)."""
    for key, spec in sorted(listed.items(), key=lambda kv: int(kv[0])):
        want = int(key)
        content = spec["content"]
        if tok.token_to_id(content) is None:
            at = AddedToken(
                content,
                single_word=bool(spec.get("single_word", False)),
                lstrip=bool(spec.get("lstrip", False)),
                rstrip=bool(spec.get("rstrip", False)),
                normalized=bool(spec.get("normalized", not spec.get("special", False))),
                special=bool(spec.get("special", False)),
            )
            if at.special:
                tok.add_special_tokens([at])
            else:
                tok.add_tokens([at])
        got = tok.token_to_id(content)
        if got != want:
            raise TokenizerError(f"{where}: added token {content!r} got id {got}, the file says {want}")


# ---- small tokenizers ---------------------------------------------------------------------------------------------


def _merge_pair(m: Any) -> tuple[str, str]:
    if isinstance(m, str):  # older tokenizer.json: "a b"
        a, b = m.split(" ")
        return a, b
    return m[0], m[1]


def train_small_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
) -> CheersTokenizer:
    """Train a byte-level BPE tokenizer with Qwen2's pre-tokenization on `texts`.

    Layout: the eight specials `<|endoftext|> <|im_start|> <|im_end|> <image> <image_gen> <im_start> <im_end>
    <no_mean>` take ids 0-7, the newline byte ("Ċ" in byte-level notation) id 8, then the other 255 bytes and the
    learned merges. The result is a pure function of (texts, vocab_size, min_frequency). Saved to `out_dir` (if
    given) in the `tokenizer.json` format that `CheersTokenizer.from_dir` reads.
    """
    n_base = len(SMALL_SPECIAL_TOKENS) + 256
    if vocab_size < n_base:
        raise ValueError(f"vocab_size {vocab_size} < {n_base} (8 specials + 256 bytes)")
    texts = list(texts)
    specials = [AddedToken(s, normalized=False, special=True) for s in SMALL_SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE())
    _qwen2_pipeline(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Registered before training so that specials written in the texts are cut out whole, never merged into.
    tok.add_special_tokens(specials)
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    order = [t for t, _ in by_id]
    newline = _byte_level_char(ord("\n"))
    if order[: len(SMALL_SPECIAL_TOKENS)] != list(SMALL_SPECIAL_TOKENS):
        raise AssertionError(f"trainer put the specials at unexpected ids: {order[:8]}")
    order.remove(newline)
    order.insert(len(SMALL_SPECIAL_TOKENS), newline)
    vocab = {t: i for i, t in enumerate(order)}
    merges = [_merge_pair(m) for m in model["merges"]]
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    _qwen2_pipeline(out)
    out.add_special_tokens(specials)
    result = CheersTokenizer(out, source=str(out_dir) if out_dir is not None else "<trained>")
    from cheers.config import _tiny_tokens

    if result.token_ids != _tiny_tokens():
        raise AssertionError(f"small tokenizer ids {result.token_ids} != {_tiny_tokens()}")
    if out_dir is not None:
        result.save(out_dir)
    return result


def _byte_level_char(b: int) -> str:
    """The printable character GPT-2 style byte-level BPE uses for byte `b`."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    if b in printable:
        return chr(b)
    extra = [x for x in range(256) if x not in printable]
    return chr(256 + extra.index(b))
