"""Data pipeline: golden-e ids and labels, tokenization and labels, samples and collate, bad data, streams, CFG
dropout."""

import itertools
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cheers import constants as C
from cheers.config import _tiny_tokens
from cheers.processor import preprocess_generation, preprocess_understanding
from cheers.tokenizer import train_small_tokenizer
from cheers.train.data import (
    DataError,
    JsonlSource,
    Record,
    Sample,
    SampleBuilder,
    SampleStream,
    cfg_dropout,
    collate,
    encode_conversation,
)

from tests.conftest import SHARED  # noqa: E402  (one definition of where ../shared is)
from tests.conftest import GOLDENS  # noqa: E402
needs_shared = pytest.mark.skipif(
    not (GOLDENS / "e_train_loss.safetensors").is_file() or not (SHARED / "reference" / "tokenizer").is_dir(),
    reason=f"shared parity data not found at {SHARED} (set CHEERS_SHARED)",
)
R, N_IMG = 32, 4
T = _tiny_tokens()

UND = {"id": "u", "image": "a.png", "conversations": [
    {"from": "human", "value": "<im_start><image><im_end>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}
GEN = {"id": "g", "image": "b.png", "conversations": [
    {"from": "human", "value": "A red disk.\nBased on the above description, generate an image."},
    {"from": "gpt", "value": "<im_start><image_gen><im_end>"}]}
EDIT = {"id": "e", "image": "a.png, b.png", "conversations": [
    {"from": "human", "value": "<im_start><image><im_end>\nMake it blue."},
    {"from": "gpt", "value": "<im_start><image_gen><im_end>"}]}
TEXT = {"id": "t", "conversations": [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi!"},
                                     {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye."}]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [json.dumps(r) for r in (UND, GEN, EDIT, TEXT)] * 10 + ["What is this? A cat. Make it blue."] * 10
    return train_small_tokenizer(texts, 320, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def qwen():
    from cheers.tokenizer import CheersTokenizer

    return CheersTokenizer.from_dir(SHARED / "reference" / "tokenizer")


@pytest.fixture()
def root(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (48, 36, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def builder(tok, **kw):
    kw.setdefault("cfg_dropout", 0.0)
    return SampleBuilder(tok, R, N_IMG, **kw)


# ---- golden e -------------------------------------------------------------------------------------------------------


@needs_shared
def test_golden_e_ids_labels_mask(qwen):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = str(GOLDENS / "e_train_loss.safetensors")
    e = load_file(path)
    with safe_open(path, "pt") as f:
        convs = json.loads(f.metadata()["samples"])
    samples = []
    for c in convs:
        ids, labels = encode_conversation(c, qwen)
        samples.append(Sample(ids, labels, torch.zeros(1, 3, 2, 2), torch.ones(1)))
    batch = collate(samples, pad_id=0)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(batch[key], e[key]), key


@needs_shared
def test_golden_e_full_pipeline(qwen, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = str(GOLDENS / "e_train_loss.safetensors")
    e = load_file(path)
    with safe_open(path, "pt") as f:
        convs = json.loads(f.metadata()["samples"])
    rows = [{"id": "s0", "image": "e_sample0_image.png", "conversations": convs[0]},
            {"id": "s1", "image": ["e_sample1_image.png"], "conversations": convs[1]}]
    src = JsonlSource(write_jsonl(tmp_path / "e.jsonl", rows), GOLDENS, shuffle=False, loop=False)
    stream = SampleStream(src, SampleBuilder(qwen, 128, 16, max_length=57, cfg_dropout=0.0))
    batch = next(stream.batches(2, pad_id=0))
    assert list(batch) == ["input_ids", "attention_mask", "labels", "pixel_values", "t"]
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(batch[key], e[key]), key
    assert torch.equal(batch["pixel_values"].to(torch.bfloat16).float(), e["pixel_values"])
    assert batch["t"][0] == 1.0 and 0.0 < batch["t"][1] < 1.0
    # the expanded length of the longest row is the golden's 57; one position less is too long
    with pytest.raises(DataError, match=r"e\.jsonl:2: sample too long: 57 positions"):
        b = SampleBuilder(qwen, 128, 16, max_length=56, cfg_dropout=0.0)
        SampleStream(JsonlSource(tmp_path / "e.jsonl", GOLDENS, shuffle=False), b).batches(2).__next__()


# ---- tokenization and labels ----------------------------------------------------------------------------------------


def test_labels_with_small_tokenizer(tok):
    ids, labels = encode_conversation(EDIT["conversations"], tok)
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
    assert (ids == C.IMAGE_PLACEHOLDER).sum() == 1 and (ids == C.IMAGE_GEN_PLACEHOLDER).sum() == 1
    assert not torch.isin(ids, torch.tensor([T.image, T.image_gen])).any()
    # the read image (user turn) is ignored, the generated one (assistant turn) keeps its token id as label
    assert labels[ids == C.IMAGE_PLACEHOLDER].item() == C.IGNORE_INDEX
    assert labels[ids == C.IMAGE_GEN_PLACEHOLDER].item() == T.image_gen
    structural = torch.tensor([T.newline, T.chat_start, T.chat_end, T.img_start, T.img_end, T.no_mean])
    pos = torch.isin(ids, structural)
    assert torch.equal(labels[pos], ids[pos])
    # the assistant turn is the tail: <|im_start|>assistant\n<im_start><image_gen><im_end><|im_end|>\n
    tail = tok.encode("<|im_start|>assistant\n<im_start><image_gen><im_end><|im_end|>\n")
    assert labels[-len(tail):].tolist() == tail
    # non-structural user/system tokens are ignored
    head = tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert all((lab == i) == (i in structural.tolist()) for i, lab in zip(head, labels[: len(head)].tolist()))
    # values are stripped
    ids2, _ = encode_conversation([{"from": "human", "value": "  Hello there \n"}, {"from": "gpt", "value": " Hi! "}], tok)
    ids3, _ = encode_conversation([{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi!"}], tok)
    assert torch.equal(ids2, ids3)


def test_multi_turn_labels(tok):
    ids, labels = encode_conversation(TEXT["conversations"], tok)
    text_ids = tok.encode("Hi!")
    # assistant content labelled, user content not
    s = ids.tolist()
    for k in range(len(s) - len(text_ids) + 1):
        if s[k: k + len(text_ids)] == text_ids:
            assert labels[k: k + len(text_ids)].tolist() == text_ids
    user = tok.encode("Hello there")
    k = next(k for k in range(len(s)) if s[k: k + len(user)] == user)
    assert all(lab == C.IGNORE_INDEX or i == T.newline for i, lab in zip(user, labels[k: k + len(user)].tolist()))


# ---- samples and collate --------------------------------------------------------------------------------------------


def test_build_samples_images_and_t(tok, root):
    b = builder(tok)
    und = b.build(Record(json.dumps(UND).encode(), "x:1", root), 0)
    assert und.pixel_values.shape == (1, 3, R, R) and und.t.tolist() == [1.0]
    assert torch.equal(und.pixel_values[0], preprocess_understanding(root / "a.png", R))
    gen = b.build(Record(json.dumps(GEN).encode(), "x:2", root), 1)
    assert torch.equal(gen.pixel_values[0], preprocess_generation(root / "b.png", R))
    assert 1e-6 <= gen.t.item() <= 1 - 1e-6 and gen.t.item() != 1.0
    edit = b.build(Record(json.dumps(EDIT).encode(), "x:3", root), 2)
    assert torch.equal(edit.pixel_values[0], preprocess_understanding(root / "a.png", R))
    assert torch.equal(edit.pixel_values[1], preprocess_generation(root / "b.png", R))
    assert edit.t[0] == 1.0 and 0 < edit.t[1] < 1
    text = b.build(Record(json.dumps(TEXT).encode(), "x:4", root), 3)
    assert torch.equal(text.pixel_values, torch.zeros(1, 3, R, R)) and text.t.tolist() == [0.0]
    # same index -> same draws; other index -> other draws
    assert torch.equal(b.build(Record(json.dumps(GEN).encode(), "x:2", root), 1).t, gen.t)
    assert not torch.equal(b.build(Record(json.dumps(GEN).encode(), "x:2", root), 7).t, gen.t)

    batch = collate([text, edit, und], pad_id=T.pad)
    assert list(batch) == ["input_ids", "attention_mask", "labels", "pixel_values", "t"]
    L = max(len(s.input_ids) for s in (text, edit, und))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, L)
    assert batch["pixel_values"].shape == (4, 3, R, R)
    assert torch.equal(batch["pixel_values"][1:3], edit.pixel_values) and torch.equal(batch["pixel_values"][3], und.pixel_values[0])
    assert batch["t"].tolist() == [0.0, 1.0, edit.t[1].item(), 1.0]
    for row, s in enumerate((text, edit, und)):
        n = len(s.input_ids)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (L - n)
        assert torch.equal(batch["input_ids"][row, :n], s.input_ids)
        assert (batch["input_ids"][row, n:] == T.pad).all() and (batch["labels"][row, n:] == -100).all()
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    with pytest.raises(ValueError, match="need 1 image"):
        collate([Sample(und.input_ids, und.labels, und.pixel_values[:0], und.t[:0])], 0)


def test_flow_time_sampling_uniform_or_logit_normal(tok, root):
    g = torch.Generator().manual_seed(0)
    uni = builder(tok).draw_t(20000, g)
    assert abs(float(uni.mean()) - 0.5) < 0.01 and abs(float((uni < 0.4).float().mean()) - 0.4) < 0.01
    b = builder(tok, t_sampling="logit_normal", t_mean=-1.0, t_std=1.0)
    ln = b.draw_t(20000, torch.Generator().manual_seed(0))
    assert abs(float(ln.median()) - float(torch.sigmoid(torch.tensor(-1.0)))) < 0.01  # median sigmoid(-1) = 0.269
    assert float((ln < 0.4).float().mean()) > 0.65 and 1e-6 <= float(ln.min()) and float(ln.max()) <= 1 - 1e-6
    # a sample's time is the builder's draw from that sample's own generator (reproducible per index)
    gen = b.build(Record(json.dumps(GEN).encode(), "x:2", root), 5)
    assert torch.equal(gen.t, b.draw_t(1, b.generator(5)))
    with pytest.raises(ValueError, match="t_sampling must be one of uniform, logit_normal"):
        builder(tok, t_sampling="beta")
    with pytest.raises(ValueError, match="t_std must be > 0"):
        builder(tok, t_sampling="logit_normal", t_std=0.0)


def test_flow_time_mixture_keeps_a_uniform_share(tok):
    # t_mean -3: the logit-normal part sits almost entirely below 0.25, so draws above 0.5 come from the uniform share
    pure = builder(tok, t_sampling="logit_normal", t_mean=-3.0).draw_t(20000, torch.Generator().manual_seed(1))
    mix = builder(tok, t_sampling="logit_normal", t_mean=-3.0, t_uniform=0.2).draw_t(
        20000, torch.Generator().manual_seed(1))
    assert float((pure > 0.5).float().mean()) < 0.01
    assert abs(float((mix > 0.5).float().mean()) - 0.2 * 0.5) < 0.01  # 20 % uniform, half of them above 0.5
    # t_uniform 0 draws exactly the old stream; 1 is uniform
    zero = builder(tok, t_sampling="logit_normal", t_mean=-3.0, t_uniform=0.0).draw_t(
        20000, torch.Generator().manual_seed(1))
    assert torch.equal(zero, pure)
    one = builder(tok, t_sampling="logit_normal", t_mean=-3.0, t_uniform=1.0).draw_t(
        20000, torch.Generator().manual_seed(1))
    assert abs(float(one.mean()) - 0.5) < 0.01
    with pytest.raises(ValueError, match="t_uniform must be in"):
        builder(tok, t_sampling="logit_normal", t_uniform=1.5)


def test_max_length_counts_images_and_dummy(tok, root):
    text_len = builder(tok).build(Record(json.dumps(TEXT).encode(), "x:1", root)).expanded_length(N_IMG)
    b = builder(tok, max_length=text_len)
    b.build(Record(json.dumps(TEXT).encode(), "x:1", root))
    b = builder(tok, max_length=text_len - 1)
    with pytest.raises(DataError, match=r"^x:1: sample too long: .* 1 image\(s\) x 4 tokens"):
        b.build(Record(json.dumps(TEXT).encode(), "x:1", root))


# ---- bad data -------------------------------------------------------------------------------------------------------


BAD_CASES = [
    ('{"id": "x", "conversations": [', "malformed JSON"),
    ('[1, 2]', "record must be a JSON object"),
    ({"id": "x", "conversations": UND["conversations"], "image": "a.png", "caption": "?"}, r"unknown key\(s\) \['caption'\]"),
    ({"id": "x"}, "missing 'conversations'"),
    ({"id": [1], "conversations": TEXT["conversations"]}, "'id' must be a string or an integer"),
    ({"conversations": "hello"}, "'conversations' must be a non-empty list"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}, "must start with a human turn"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "roles must alternate human/gpt: turn 1"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}]}, "must end with a gpt turn"),
    ({"conversations": [{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}]}, "unknown role 'robot'"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}]}, "'value' must be a string"),
    ({"conversations": [{"from": "human", "value": "a", "lang": "en"}, {"from": "gpt", "value": "b"}]}, r"turn 0 has unknown key"),
    ({"conversations": [{"from": "human", "value": "a"}, "b"]}, "turn 1 is a str"),
    ({"image": "a.png", "conversations": TEXT["conversations"]}, r"0 image tag\(s\) .* but 1 image path"),
    ({"conversations": UND["conversations"]}, r"1 image tag\(s\) in the conversation \(<image> x1, <image_gen> x0\) but 0 image path"),
    ({"image": "a.png", "conversations": EDIT["conversations"]}, r"2 image tag\(s\) in the conversation \(<image> x1, <image_gen> x1\) but 1"),
    ({"image": 5, "conversations": UND["conversations"]}, "'image' must be a path"),
    ({"image": ["a.png", ""], "conversations": EDIT["conversations"]}, "image path 1 is ''"),
    ({"image": "missing.png", "conversations": UND["conversations"]}, r"image 1/1 not found: .*missing\.png"),
    ({"image": "a.png, broken.png", "conversations": EDIT["conversations"]}, r"image to generate 2/2 unusable: .*broken\.png: not a recognised"),
]


@pytest.mark.parametrize("row,cause", BAD_CASES)
def test_bad_samples_name_file_line_and_cause(tok, root, row, cause):
    path = write_jsonl(root / "data.jsonl", [UND, "", row, GEN])  # the bad record is on line 3
    stream = SampleStream(JsonlSource(path, shuffle=False, loop=False), builder(tok))
    assert next(stream).id == "u"
    with pytest.raises(DataError) as info:
        next(stream)
    assert info.value.where == f"{path}:3"
    assert str(info.value).startswith(f"{path}:3: ")
    import re

    assert re.search(cause, info.value.cause), info.value.cause
    assert next(stream).id == "g"  # the stream continues after the bad line


def test_invalid_utf8_line(tok, root):
    path = root / "bin.jsonl"
    path.write_bytes(json.dumps(UND).encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
    stream = SampleStream(JsonlSource(path, shuffle=False, loop=False), builder(tok))
    next(stream)
    with pytest.raises(DataError, match=r"bin\.jsonl:2: line is not valid UTF-8"):
        next(stream)


def test_skip_policy_counts_and_logs(tok, root, caplog):
    rows = [UND, "{broken", GEN, {"conversations": UND["conversations"]}, TEXT, EDIT,
            {"image": "missing.png", "conversations": UND["conversations"]}]
    path = write_jsonl(root / "mixed.jsonl", rows)
    stream = SampleStream(JsonlSource(path, shuffle=False, loop=False), builder(tok), on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="cheers.data"):
        got = [s.id for s in stream]
    assert got == ["u", "g", "t", "e"]
    assert stream.skipped == 3 and stream.built == 4 and stream.drawn == 7
    assert [m.split(": ")[0] for m in stream.skipped_samples] == [f"{path}:2", f"{path}:4", f"{path}:7"]
    assert sum(f"{path}:" in r.getMessage() for r in caplog.records) == 3
    # batches: 4 good samples, batch 3 -> 3 + 1
    stream = SampleStream(JsonlSource(path, shuffle=False, loop=False), builder(tok), on_bad_sample="skip")
    sizes = [b["input_ids"].shape[0] for b in stream.batches(3)]
    assert sizes == [3, 1]
    with pytest.raises(ValueError, match="on_bad_sample"):
        SampleStream(stream.source, builder(tok), on_bad_sample="ignore")


def test_all_bad_does_not_spin(tok, root):
    path = write_jsonl(root / "bad.jsonl", ["{"] * 3)
    stream = SampleStream(JsonlSource(path, shuffle=True), builder(tok), on_bad_sample="skip", max_consecutive_bad=10)
    with pytest.raises(DataError, match="10 bad samples in a row"):
        next(stream)
    empty = write_jsonl(root / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="contains no records"):
        next(JsonlSource(empty, shuffle=False))
    with pytest.raises(DataError, match="no such data file"):
        JsonlSource(root / "nope.jsonl")


# ---- streams --------------------------------------------------------------------------------------------------------


def test_sample_stream_resume_is_exact(tok, root):
    rows = [UND, GEN, EDIT, TEXT, "{bad", GEN, GEN, EDIT]
    path = write_jsonl(root / "s.jsonl", rows)

    def stream():
        return SampleStream(JsonlSource(path, shuffle=True, seed=3), builder(tok, cfg_dropout=0.5, seed=9),
                            on_bad_sample="skip")

    a = stream()
    batches = a.batches(2)
    for _ in range(3):
        next(batches)
    state = json.loads(json.dumps(a.state_dict()))
    want = [next(batches) for _ in range(5)]
    b = stream()
    b.load_state_dict(state)
    got = list(itertools.islice(b.batches(2), 5))
    for x, y in zip(want, got):
        for key in x:
            assert torch.equal(x[key], y[key]), key
    assert b.skipped == a.skipped and b.drawn == a.drawn
    # two fresh streams give identical batches (determinism)
    for x, y in zip(stream().batches(3), stream().batches(3)):
        assert all(torch.equal(x[k], y[k]) for k in x)
        break


# ---- CFG dropout ----------------------------------------------------------------------------------------------------


def test_cfg_dropout_rate_and_survivors(tok):
    ids, _ = encode_conversation(EDIT["conversations"], tok)
    batch = ids.repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    out, dropped = cfg_dropout(batch, T, p=0.2, generator=g)
    assert abs(dropped.float().mean().item() - 0.2) < 0.02
    assert torch.equal(out[~dropped], batch[~dropped])
    row = out[dropped][0]
    keep = torch.isin(ids, torch.tensor([C.IMAGE_GEN_PLACEHOLDER, C.IMAGE_PLACEHOLDER, T.img_start, T.img_end]))
    assert torch.equal(row[keep], ids[keep])
    assert (row[~keep] == T.no_mean).all()
    assert (row == C.IMAGE_GEN_PLACEHOLDER).sum() == 1 and (row == C.IMAGE_PLACEHOLDER).sum() == 1
    # rows without an image to generate are never dropped
    und, _ = encode_conversation(UND["conversations"], tok)
    out, dropped = cfg_dropout(und.repeat(100, 1), T, p=1.0)
    assert not dropped.any() and torch.equal(out, und.repeat(100, 1))
    # padding survives when a mask is given; same seed -> same result
    mask = torch.ones(2, len(ids), dtype=torch.long)
    mask[1, -3:] = 0
    out, _ = cfg_dropout(ids.repeat(2, 1), T, p=1.0, attention_mask=mask)
    assert torch.equal(out[1, -3:], ids[-3:]) and (out[0, -3:] != ids[-3:]).any()
    a = cfg_dropout(batch, T, 0.2, torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, cfg_dropout(batch, T, 0.2, torch.Generator().manual_seed(5))[0])


def test_cfg_dropout_in_builder_keeps_labels(tok, root):
    b = builder(tok, cfg_dropout=0.5, seed=1)
    plain = builder(tok).build(Record(json.dumps(GEN).encode(), "x:1", root))
    samples = [b.build(Record(json.dumps(GEN).encode(), "x:1", root), i) for i in range(200)]
    rate = sum(s.cfg_dropped for s in samples) / 200
    assert 0.38 < rate < 0.62
    for s in samples:
        assert torch.equal(s.labels, plain.labels)
        if s.cfg_dropped:
            assert (s.input_ids == T.no_mean).sum() == len(s.input_ids) - 3  # <im_start>, -300, <im_end> survive
        else:
            assert torch.equal(s.input_ids, plain.input_ids)
    und = [b.build(Record(json.dumps(UND).encode(), "x:1", root), i) for i in range(20)]
    assert not any(s.cfg_dropped for s in und)


def test_bad_image_black_policy(tok, root, caplog):
    b = builder(tok, bad_image="black")
    row = {"image": ["missing.png", "broken.png"], "conversations": EDIT["conversations"]}
    with caplog.at_level(logging.WARNING, logger="cheers.data"):
        s = b.build(Record(json.dumps(row).encode(), "f.jsonl:9", root))
    assert torch.equal(s.pixel_values, torch.zeros(2, 3, R, R)) and b.black_images == 2
    assert [r.getMessage().split(": ")[0] for r in caplog.records] == ["f.jsonl:9", "f.jsonl:9"]
    with pytest.raises(ValueError, match="bad_image"):
        builder(tok, bad_image="grey")
