"""Request parsing and validation: the JSON (or form) bodies of the image, edit and chat endpoints become typed
requests with the model's defaults filled in, or a 4xx naming the offending field. Also the batch keys: requests
with equal keys may share one model call."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from cheers.samplers import SAMPLERS
from cheers.serve.context import Context
from cheers.serve.errors import ApiError, bad, json_type
from cheers.serve.fields import Fields

IMAGE_FIELDS = frozenset({"model", "prompt", "n", "size", "seed", "steps", "cfg", "cfg_scale", "shift", "sampler",
                          "cfg_interval", "response_format", "output_format", "user", "quality", "style",
                          "background", "moderation", "output_compression", "partial_images", "stream"})
EDIT_FIELDS = IMAGE_FIELDS | {"image", "images", "edit_start"}
EDIT_FORM_FIELDS = IMAGE_FIELDS | {"image", "image[]", "edit_start"}
# OpenAI's request fields (and the model's own top_k, repetition_penalty): those that map to the model are
# implemented, those that only tune the service are accepted and ignored (IGNORED), and those that would change
# what the reply means (tools, JSON mode, audio, web search) are refused unless absent or off.
IGNORED_CHAT_FIELDS = frozenset({"user", "store", "metadata", "service_tier", "prediction", "reasoning_effort",
                                 "verbosity", "safety_identifier", "prompt_cache_key", "parallel_tool_calls"})
CHAT_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                         "repetition_penalty", "stop", "seed", "stream", "stream_options", "n", "presence_penalty",
                         "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format", "tools",
                         "tool_choice", "functions", "function_call", "modalities", "audio", "web_search_options"}
                        | IGNORED_CHAT_FIELDS)
MESSAGE_FIELDS = frozenset({"role", "content", "name", "refusal", "tool_calls", "function_call", "audio"})
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# the model's seeds draw numpy noise pictures, whose generator takes seeds below 2**32: one range for every endpoint
MAX_SEED = 2**32 - 1


def image_options(ctx: Context, f: Fields) -> tuple[dict[str, Any], int, int]:
    """steps/cfg/shift/sampler (model defaults filled in, so equal settings batch), n and the seed."""
    d = ctx.model.image_defaults
    s = ctx.settings
    cfg = f.float("cfg", None, 0.0, 100.0)
    cfg_scale = f.float("cfg_scale", None, 0.0, 100.0)
    if cfg is not None and cfg_scale is not None and cfg != cfg_scale:
        raise bad(f"'cfg' ({cfg}) and 'cfg_scale' ({cfg_scale}) disagree; give one of them", "cfg_scale")
    opts = {
        "steps": f.int("steps", int(d.steps), 1, s.max_steps),
        "cfg_scale": float(cfg if cfg is not None else cfg_scale if cfg_scale is not None else d.cfg_scale),
        "shift": f.float("shift", float(d.shift), 0.0, 100.0, lo_open=True),
        "sampler": f.str("sampler", d.sampler, choices=SAMPLERS),
        "cfg_interval": f.interval("cfg_interval", tuple(d.cfg_interval)),
    }
    n = f.int("n", 1, 1, min(s.max_n, s.max_queue))
    seed = f.int("seed", None, 0, MAX_SEED + 1 - n)  # image i of the request uses seed + i
    if seed is None:
        seed = secrets.randbelow(2**31)
    size = f.str("size", "auto")
    R = ctx.resolution
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", size)
    if size != "auto" and not (m and int(m.group(1)) == R and int(m.group(2)) == R):
        raise bad(f"unsupported size {size!r}: this model makes {R}x{R} images only", f.param("size"),
                  code="unsupported_size")
    f.str("response_format", "b64_json", choices=("b64_json",))
    f.str("output_format", "png", choices=("png",))
    ctx.check_model(f)
    f.str("user", None)
    # accepted and ignored: the model has one quality and style, PNGs are lossless
    f.str("quality", None, choices=("auto", "standard", "hd", "low", "medium", "high"))
    f.str("style", None, choices=("vivid", "natural"))
    f.str("moderation", None, choices=("auto", "low"))
    f.int("output_compression", None, 0, 100)
    if f.str("background", None, choices=("auto", "opaque", "transparent")) == "transparent":
        raise unsupported("background", "transparent backgrounds are not supported: the model makes opaque images")
    f.int("partial_images", None, 0, 0)
    if f.bool("stream", False):
        raise unsupported("stream", "streamed image generation is not supported; leave 'stream' out")
    return opts, n, seed


@dataclass
class ImageRequest:
    """A validated image generation or edit request."""

    prompt: str
    n: int
    seed: int
    options: dict[str, Any]
    image: Any = None  # edits: the source PIL image


def parse_image_request(ctx: Context, body: Any) -> ImageRequest:
    """The JSON body of /v1/images/generations."""
    f = Fields(body)
    f.only(IMAGE_FIELDS)
    prompt = f.str("prompt", nonempty=True)
    opts, n, seed = image_options(ctx, f)
    check_image_prompt(ctx, prompt, prompt, "t2i", 0)
    return ImageRequest(prompt, n, seed, opts)


def check_image_prompt(ctx: Context, prompt: str, layout: str, task: str, n_images: int) -> None:
    """Reserved tokens, then the length: first by a bound that needs no tokenizing, then by one tokenization."""
    tok = ctx.tokenizer()
    ctx.check_text(prompt, "prompt")
    ctx.check_chars(len(prompt), n_images, ctx.image_tokens + 1, "prompt", "the generated image")
    ids = tok.encode_prompt(layout, task=task)
    ctx.check_prompt_length(ctx.positions(ids), ctx.image_tokens + 1, "prompt", "the generated image")


def parse_edit_request(ctx: Context, body: Any, form: bool = False, upload: tuple[str, bytes] | None = None
                       ) -> ImageRequest:
    """JSON: `image` (data URL) or `images: [{"image_url": data URL}]`; multipart: the uploaded `image` file."""
    f = Fields(body, form=form)
    f.only(EDIT_FORM_FIELDS if form else EDIT_FIELDS)
    prompt = f.str("prompt", nonempty=True)
    opts, n, seed = image_options(ctx, f)
    # start time of the edit (t0 = 1 would leave no step): larger keeps more of the source picture
    opts["edit_start"] = f.float("edit_start", float(ctx.model.image_defaults.edit_start), 0.0, 0.99)
    # the image is found before the prompt is checked (a missing one is the first thing to say) but decoded after
    # (decoding is the costly part)
    if form:
        if upload is None:
            raise bad("missing required file 'image' (multipart/form-data upload)", "image", code="missing_field")
        source: tuple[Any, str] = (upload[1], "image")
    elif body.get("image") is not None:
        if body.get("images") is not None:
            raise bad("give 'image' or 'images', not both", "images")
        source = (body["image"], "image")
    elif body.get("images") is not None:
        ims = body["images"]
        if not isinstance(ims, list) or len(ims) != 1:
            raise bad("'images' must be an array with exactly one image (one source image per edit)", "images")
        im = ims[0]
        if isinstance(im, dict):
            Fields(im, "images[0]").only({"image_url"})
            im = im.get("image_url")
        source = (im, "images[0].image_url")
    else:
        raise bad("missing required field 'image' (a data URL, or upload a file with multipart/form-data)",
                  "image", code="missing_field")
    check_image_prompt(ctx, prompt, f"<im_start><image><im_end>\n{prompt}", "edit", 1)
    image = ctx.decode_image(source[0], source[1]) if form else ctx.image_from_url(*source)
    return ImageRequest(prompt, n, seed, opts, image)


@dataclass
class ChatRequest:
    """A validated chat request: the conversation (images decoded) and the sampling options."""

    conversation: list[dict[str, Any]]
    options: dict[str, Any]
    n: int
    stream: bool
    include_usage: bool
    prompt_tokens: int
    max_tokens: int
    batchable: bool


def parse_chat_request(ctx: Context, body: Any) -> ChatRequest:
    """The JSON body of /v1/chat/completions: messages with text and image_url parts, sampling options.

    Cheap checks come first and the costly work last: the structure and the options, the reserved tokens and a
    length bound that needs no tokenizing, then one tokenization of the whole prompt, then the images."""
    s = ctx.settings
    f = Fields(body)
    f.only(CHAT_FIELDS)
    ctx.check_model(f)
    f.str("user", None)
    msgs = f.raw("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    tok = ctx.tokenizer()
    turns, layout, n_images, n_chars = [], [], 0, 0
    for i, m in enumerate(msgs):
        mf = Fields(m, f"messages[{i}]")
        mf.only(MESSAGE_FIELDS)
        role = mf.str("role", choices=tuple(ROLES))
        mf.str("name", None)
        mf.str("refusal", None)
        for k in ("tool_calls", "function_call", "audio"):
            if m.get(k) not in (None, []):
                raise unsupported(f"messages[{i}].{k}", f"'messages[{i}].{k}': this model has no tools or audio")
        content = m.get("content")
        texts, urls = [], []
        if content is None:
            if role != "assistant":
                raise bad(f"missing required field 'messages[{i}].content'", f"messages[{i}].content")
        elif isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for k, part in enumerate(content):
                p = f"messages[{i}].content[{k}]"
                pf = Fields(part, p)
                kind = pf.str("type", choices=("text", "image_url"))
                if kind == "text":
                    pf.only({"type", "text"})
                    texts.append(pf.str("text"))
                else:
                    pf.only({"type", "image_url"})
                    iu = part.get("image_url")
                    if isinstance(iu, dict):
                        Fields(iu, f"{p}.image_url").only({"url", "detail"})
                        urls.append((iu.get("url"), f"{p}.image_url.url"))
                    else:
                        urls.append((iu, f"{p}.image_url"))
                    n_images += 1
                    if n_images > s.max_images:
                        raise bad(f"too many images: more than {s.max_images} in one request", p,
                                  code="too_many_images")
        else:
            raise bad(f"'messages[{i}].content' must be a string or an array of content parts, got "
                      f"{json_type(content)}", f"messages[{i}].content")
        text = "\n".join(texts)
        ctx.check_text(text, f"messages[{i}].content")
        n_chars += len(text)
        turns.append((ROLES[role], text, urls))
        layout.append({"role": ROLES[role],
                       "content": "".join("<im_start><image><im_end>\n" for _ in urls) + text})

    t = ctx.model.text_defaults
    max_tokens = f.int("max_completion_tokens", None, 1, s.max_tokens)
    mt = f.int("max_tokens", None, 1, s.max_tokens)
    if max_tokens is not None and mt is not None and mt != max_tokens:
        raise bad("'max_tokens' and 'max_completion_tokens' disagree; give one of them", "max_tokens")
    max_tokens = max_tokens or mt or min(int(t.max_new_tokens), s.max_tokens)
    temperature = f.float("temperature", float(t.temperature), 0.0, 2.0)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) and x for x in stop):
        stops = tuple(stop)
    else:
        raise bad("'stop' must be a string or an array of at most 4 non-empty strings", "stop")
    seed = f.int("seed", None, 0, MAX_SEED)
    refuse_meaning_changes(f, body)
    logprobs = f.bool("logprobs", False)
    top_logprobs = f.int("top_logprobs", None, 0, 20)
    if top_logprobs is not None and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    opts = {
        "max_new_tokens": max_tokens,
        "temperature": temperature,
        "top_p": f.float("top_p", float(t.top_p), 0.0, 1.0, lo_open=True),
        "top_k": f.int("top_k", int(t.top_k), 0, None),
        "repetition_penalty": f.float("repetition_penalty", float(t.repetition_penalty), 0.0, 10.0, lo_open=True),
        "stop": list(stops),
        "seed": seed if temperature > 0 else 0,
        "presence_penalty": f.float("presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": f.float("frequency_penalty", 0.0, -2.0, 2.0),
        "logit_bias": logit_bias(ctx, body.get("logit_bias")),
        "logprobs": (top_logprobs or 0) if logprobs else None,
    }
    n = f.int("n", 1, 1, min(s.max_n, s.max_queue))
    stream = f.bool("stream", False)
    include_usage = False
    if body.get("stream_options") is not None:
        so = Fields(body["stream_options"], "stream_options")
        so.only({"include_usage", "continuous_usage_stats", "include_obfuscation"})
        include_usage = so.bool("include_usage", False)
        so.bool("continuous_usage_stats", False)
        so.bool("include_obfuscation", False)  # obfuscation pads chunks against length side channels: not needed
        if not stream:
            raise bad("'stream_options' is only allowed with stream: true", "stream_options")
    if stream and n > 1:
        raise bad("stream: true supports n = 1 only", "n")
    ctx.check_chars(n_chars, n_images, max_tokens, "messages", "max_tokens")
    ids = tok.encode_prompt(layout, task="chat")
    prompt_tokens = ctx.positions(ids)
    ctx.check_prompt_length(prompt_tokens, max_tokens, "messages", "max_tokens")
    conversation = [{"role": role, "content": text, "images": [ctx.image_from_url(u, p) for u, p in urls]}
                    for role, text, urls in turns]
    # sampled replies with a fixed seed run alone so that the seed reproduces them whatever else is queued
    batchable = not (temperature > 0 and seed is not None)
    return ChatRequest(conversation, opts, n, stream, include_usage, prompt_tokens, max_tokens, batchable)


def unsupported(param: str, message: str) -> ApiError:
    """A 400 in OpenAI's shape for a standard field whose requested meaning this model cannot honour."""
    return bad(message, param, code="unsupported_parameter")


def refuse_meaning_changes(f: Fields, body: dict) -> None:
    """Fields that would change what a reply means are refused unless absent or off (OpenAI's error shape)."""
    if body.get("tools") is not None:
        raise unsupported("tools", "'tools' is not supported: this model does not call functions")
    if body.get("functions") is not None:
        raise unsupported("functions", "'functions' is not supported: this model does not call functions")
    tc = body.get("tool_choice")
    if tc is not None and tc not in ("none", "auto"):
        raise unsupported("tool_choice", "'tool_choice' other than none/auto is not supported: no tools")
    fc = body.get("function_call")
    if fc is not None and fc not in ("none", "auto"):
        raise unsupported("function_call", "'function_call' other than none/auto is not supported: no functions")
    rf = body.get("response_format")
    if rf is not None:
        rff = Fields(rf, "response_format")
        kind = rff.str("type", choices=("text", "json_object", "json_schema"))
        if kind != "text":
            raise unsupported("response_format", f"response_format type '{kind}' is not supported: the model's "
                                                 "output is not constrained to JSON; use type 'text'")
    mod = body.get("modalities")
    if mod is not None:
        if not isinstance(mod, list) or any(not isinstance(x, str) for x in mod):
            raise bad("'modalities' must be an array of strings", "modalities")
        if set(mod) - {"text"}:
            raise unsupported("modalities", "only the 'text' output modality is supported")
    for name in ("audio", "web_search_options"):
        if body.get(name) is not None:
            raise unsupported(name, f"'{name}' is not supported by this model")
    for name in ("user", "service_tier", "reasoning_effort", "verbosity", "safety_identifier", "prompt_cache_key"):
        f.str(name, None)
    f.bool("store", None)
    f.bool("parallel_tool_calls", None)
    if body.get("metadata") is not None:
        Fields(body["metadata"], "metadata")


def logit_bias(ctx: Context, value: Any) -> dict[str, float] | None:
    """OpenAI's logit_bias: {token id (a string): bias in [-100, 100]}, ids within the vocabulary."""
    if value is None or value == {}:
        return None
    f = Fields(value, "logit_bias")
    if len(value) > 300:
        raise bad("'logit_bias' may hold at most 300 tokens", "logit_bias")
    vocab = int(ctx.model.config.text.vocab_size)
    out = {}
    for k in value:
        if not (isinstance(k, str) and k.isdigit() and int(k) < vocab):
            raise bad(f"'logit_bias' keys must be token ids below {vocab}; got {k[:20]!r}", "logit_bias")
        out[str(int(k))] = f.float(k, None, -100.0, 100.0)
    return out


def chat_key(req: ChatRequest) -> tuple:
    """Chat requests with equal keys decode with the same settings, so they can share a batch."""
    o = req.options
    return ("chat", o["max_new_tokens"], o["temperature"], o["top_p"], o["top_k"], o["repetition_penalty"],
            tuple(o["stop"]), o["seed"] if o["temperature"] > 0 else 0)


def image_key(task: str, opts: dict[str, Any]) -> tuple:
    """Image requests with equal keys sample with the same settings, so they can share a batch."""
    return (task, opts["steps"], opts["cfg_scale"], opts["shift"], opts["sampler"], opts["cfg_interval"])
