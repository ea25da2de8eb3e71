"""Text sources and the field's perplexity windows, against the files read directly."""
import gzip
import json
import math

import pytest
import torch

from binarymos.data import DataError, documents, eval_windows, needs_bos, token_blocks
from binarymos.eval import perplexity
from conftest import SHARED_DATA
from pack_helpers import SPECIALS, encode, tiny_lm, tiny_tokenizer

BOS = SPECIALS.index("<s>")


def c4_sample():
    with gzip.open(SHARED_DATA / "c4" / "c4-validation-sample-2k.json.gz", "rt") as f:
        return [json.loads(line)["text"] for line in f]


def test_wikitext2_windows_follow_the_protocol():
    rows = (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text().split("\n")
    ids = encode(_printable("\n\n".join(rows)[:5000]))
    windows = eval_windows(_AsciiTokenizer(), "wikitext2", seq_len=64, max_windows=3)
    assert windows.shape == (3, 64)
    assert windows.flatten().tolist() == ([BOS] + ids)[:192]  # one stream: only the first window has the BOS


def test_c4_is_gptq_c4_new_and_never_overlaps_training_text():
    docs = c4_sample()
    windows = eval_windows(_AsciiTokenizer(), "c4", seq_len=1024)
    expected = [BOS] + encode(_printable(" ".join(docs[:1100])))
    assert windows.shape == (256, 1024)  # the first 256 windows
    assert windows.flatten().tolist() == expected[: 256 * 1024]
    train, valid, test = (set(documents("c4", s)) for s in ("train", "validation", "test"))
    assert test == set(docs[:1100]) and len(train) == len(docs) - 1200
    assert not (train & test) and not (train & valid) and not (valid & test)


def test_bos_windows_are_the_bos_then_the_stream_without_special_tokens():
    rows = (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text().split("\n")
    ids = encode(_printable("\n\n".join(rows)[:5000]))
    windows = eval_windows(_AsciiTokenizer(), "wikitext2", seq_len=64, max_windows=3, bos_token_id=BOS)
    assert windows.shape == (3, 64)
    assert windows[:, 0].tolist() == [BOS] * 3
    assert windows[:, 1:].flatten().tolist() == ids[:3 * 63]  # no second BOS from the tokenizer


def test_bos_windows_keep_the_c4_cap():
    expected = encode(_printable(" ".join(c4_sample()[:1100])))
    windows = eval_windows(_AsciiTokenizer(), "c4", seq_len=1024, bos_token_id=BOS)
    assert windows.shape == (256, 1024) and windows[:, 0].tolist() == [BOS] * 256
    assert windows[:, 1:].flatten().tolist() == expected[: 256 * 1023]


@pytest.mark.parametrize("arch, bos_first", [("gemma3_text", True), ("llama", False)])
def test_perplexity_puts_the_bos_before_every_window_only_for_gemma(arch, bos_first):
    rows = (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text().split("\n")
    stream = encode(_printable("\n\n".join(rows)[:1000]))
    if bos_first:
        windows = [[BOS] + stream[i * 31:(i + 1) * 31] for i in range(4)]
    else:
        flat = [BOS] + stream
        windows = [flat[i * 32:(i + 1) * 32] for i in range(4)]
    model = tiny_lm(arch)
    nll = []
    with torch.no_grad():
        for window in torch.tensor(windows):
            logp = torch.log_softmax(model(window[None]).logits[0, :-1].double(), -1)
            nll.append(-logp[torch.arange(31), window[1:]].mean().item())
    want = math.exp(sum(nll) / len(nll))
    assert perplexity(model, _AsciiTokenizer(), "wikitext2", seq_len=32, max_windows=4) == pytest.approx(want, rel=1e-5)


def test_needs_bos_for_gemma_types_only():
    from transformers import (Gemma2Config, Gemma3Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, LlavaConfig,
                              PaliGemmaConfig)

    assert all(needs_bos(c()) for c in (GemmaConfig, Gemma2Config, Gemma3TextConfig, Gemma3Config))
    assert needs_bos(PaliGemmaConfig())  # multimodal: its text model is a Gemma
    assert not needs_bos(LlamaConfig()) and not needs_bos(LlavaConfig())


def test_wikitext2_splits_come_from_their_own_files():
    train = documents("wikitext2", "train")
    assert train == [(SHARED_DATA / "wikitext-2-raw" / "wiki.train.first1MB.txt").read_text()]
    assert documents("c4_wiki", "train") == documents("c4", "train") + train


def test_calib_is_the_exllamav2_text():
    docs = documents("calib")
    assert len(docs) == 3 and all(len(d) > 100_000 for d in docs)
    with pytest.raises(DataError, match="training text only"):
        documents("calib", "test")


def test_calib_shares_no_passage_with_the_evaluation_text():
    """calib may join the training text (quality_study.sh's alltext): none of its 10-word sequences is in the
    WikiText-2 test split, and almost none (boilerplate) in the C4 test documents."""
    import re

    def passages(texts):
        words = re.findall(r"\w+", " ".join(texts).lower())
        return {" ".join(words[i:i + 10]) for i in range(len(words) - 9)}

    calib = passages(documents("calib"))
    assert len(calib) > 300_000
    assert not calib & passages(documents("wikitext2", "test"))
    assert len(calib & passages(documents("c4", "test"))) < 1e-4 * len(calib)


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    with gzip.open(tmp_path / "c.json.gz", "wt") as f:
        f.write(json.dumps({"text": "three"}) + "\n")
    paths = ",".join(str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.json.gz"))
    assert documents(paths) == ["hello world", "one", "two", "three"]


def test_a_binary_file_as_text_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(b"\x80\x81\xff" * 10)
    with pytest.raises(DataError, match=r"weights\.txt: not UTF-8 text \(byte 0: invalid start byte\)"):
        documents(str(path))


def test_token_blocks_join_documents_with_eos():
    tok = tiny_tokenizer()
    blocks = token_blocks(tok, ["ab", "cde"], seq_len=3)
    eos = tok.eos_token_id
    flat = encode("ab") + [eos] + encode("cde") + [eos]
    assert blocks.shape == (2, 3) and blocks.flatten().tolist() == flat[:6]


def test_token_blocks_with_bos_are_the_bos_then_the_stream():
    tok = tiny_tokenizer()
    eos = tok.eos_token_id
    docs = ["hello world", "a second document", "and a third"]
    stream = [i for doc in docs for i in encode(doc) + [eos]]
    blocks = token_blocks(tok, docs, seq_len=8, bos_token_id=BOS)
    assert blocks.shape == (len(stream) // 7, 8)
    assert blocks[:, 0].tolist() == [BOS] * len(blocks)
    assert blocks[:, 1:].flatten().tolist() == stream[: len(blocks) * 7]
    with pytest.raises(DataError, match="not one block"):
        token_blocks(tok, ["ab"], seq_len=8, bos_token_id=BOS)
    with pytest.raises(DataError, match="no room"):
        token_blocks(tok, docs, seq_len=1, bos_token_id=BOS)


@pytest.mark.parametrize("name, match", [("nosuch", "unknown data"), ("/no/such/file.txt", "no such file")])
def test_bad_data_is_a_clear_error(name, match):
    with pytest.raises(DataError, match=match):
        documents(name)


def test_missing_data_dir_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("BINARYMOS_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="does not exist"):
        documents("wikitext2", "test")
    with pytest.raises(DataError, match="unknown evaluation set"):
        eval_windows(tiny_tokenizer(), "ptb", 16, root=SHARED_DATA)


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_text_the_hub_cannot_give_is_a_clear_error_that_names_the_local_copy(monkeypatch, name):
    from types import SimpleNamespace

    from binarymos import data

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nsecond line")

    monkeypatch.delenv("BINARYMOS_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "_hf_datasets", lambda: SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match=r"ConnectionError: Couldn't reach the Hub\); offline, set BINARYMOS_DATA_DIR"):
        documents(name, "test")


def _printable(text: str) -> str:
    return "".join(ch if ch == "\n" or 32 <= ord(ch) < 127 else "?" for ch in text)


class _AsciiTokenizer:
    """tiny_tokenizer's ids, with any character outside its alphabet read as '?'; like LLaMA's
    tokenizer it puts its BOS in front unless asked not to."""

    bos_token_id = BOS

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        return {"input_ids": [BOS] * add_special_tokens + encode(_printable(text))}
