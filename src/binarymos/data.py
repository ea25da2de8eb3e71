"""Text for training and evaluation, offline first.

Named sources: ``wikitext2``, ``c4``, ``c4_wiki`` (the authors' mix), ``calib`` (English
calibration text shipped in the exllamav2 wheel; the embedded default), or paths to local
``.txt`` / ``.jsonl`` / ``.json.gz`` files. ``wikitext2`` and ``c4`` are read from a local copy
laid out like ``shared/data`` when ``BINARYMOS_DATA_DIR`` (or ``data_dir``) is set, else through
Hugging Face ``datasets``.

Splits never overlap: WikiText-2 has its own train/validation/test; of the local C4 sample,
documents 0-1099 are the test set (GPTQ's ``c4_new`` evaluation), 1100-1199 validation and
the rest training text.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import zipfile
from pathlib import Path

import torch

DEFAULT_DATA = "calib"
C4_TEST_DOCS = 1100
C4_VALID_DOCS = 100

WIKITEXT_FILES = {  # split -> candidate file names, full split first
    "train": ("wiki.train.raw", "wiki.train.first1MB.txt"),
    "validation": ("wiki.valid.raw", "wiki.valid.first100KB.txt"),
    "test": ("wiki.test.raw",),
}
C4_LOCAL = "c4/c4-validation-sample-2k.json.gz"


class DataError(ValueError):
    pass


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit or os.environ.get("BINARYMOS_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist")
    return path


OFFLINE_HINT = "BINARYMOS_DATA_DIR or --data-dir (a local copy laid out like shared/data)"


def _hf_datasets():
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"this text needs either {OFFLINE_HINT} or `pip install datasets` and internet access")
    import datasets

    return datasets


def _load_dataset(*args, **kwargs) -> list[str]:
    """The "text" column of a Hugging Face dataset; a failure to get it (offline, most often) is a DataError that
    names the local alternative."""
    datasets = _hf_datasets()
    try:
        return list(datasets.load_dataset(*args, **kwargs)["text"])
    except Exception as err:  # datasets raises its own, the hub client's and the network's errors
        raise DataError(f"could not load {args[0]} through Hugging Face datasets ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); offline, set {OFFLINE_HINT}") from err


def _read_docs(path: Path) -> list[str]:
    """Documents of a local file: a .txt is one document; .jsonl / .json.gz hold one {"text": ...} per line."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix == ".txt" or path.suffix == ".raw" or path.suffix == ".utf8":
            return [path.read_text(encoding="utf-8")]
        opener = gzip.open if path.suffix == ".gz" else open
        if path.name.endswith((".jsonl", ".json.gz", ".jsonl.gz")):
            try:
                with opener(path, "rt", encoding="utf-8") as f:
                    return [json.loads(line)["text"] for line in f if line.strip()]
            except (OSError, json.JSONDecodeError, KeyError, TypeError, EOFError) as err:
                raise DataError(f"{path}: not JSON lines with a 'text' field ({err})") from err
    except UnicodeDecodeError as err:  # a binary file named .txt, say: the codec's message names no file
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
    raise DataError(f"{path}: unsupported text file (use .txt, .jsonl or .json.gz)")


def wikitext2(split: str, root: Path | None) -> list[str]:
    """WikiText-2 raw as its rows (lines), the form the field's scripts join with "\\n\\n"."""
    if root is not None:
        for name in WIKITEXT_FILES[split]:
            path = root / "wikitext-2-raw" / name
            if path.exists():
                return path.read_text(encoding="utf-8").split("\n")
        raise DataError(f"no WikiText-2 {split} file under {root / 'wikitext-2-raw'}")
    return _load_dataset("wikitext", "wikitext-2-raw-v1", split=split)


def c4(split: str, root: Path | None) -> list[str]:
    if root is not None:
        docs = _read_docs(root / C4_LOCAL)
        bounds = {"test": (0, C4_TEST_DOCS), "validation": (C4_TEST_DOCS, C4_TEST_DOCS + C4_VALID_DOCS),
                  "train": (C4_TEST_DOCS + C4_VALID_DOCS, len(docs))}
        lo, hi = bounds[split]
        return docs[lo:hi]
    if split == "train":
        return _load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    docs = _load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                         split="validation")
    return docs[:C4_TEST_DOCS] if split == "test" else docs[C4_TEST_DOCS:C4_TEST_DOCS + C4_VALID_DOCS]


def calib() -> list[str]:
    """The English calibration text (c4, wiki, technical) inside the exllamav2 wheel, read as files."""
    spec = importlib.util.find_spec("exllamav2")
    names = ("c4.utf8", "wiki.utf8", "technical.utf8")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "conversion" / "standard_cal_data"
        if folder.is_dir():
            return [(folder / n).read_text(encoding="utf-8") for n in names]
    wheels = sorted(Path(os.environ.get("BINARYMOS_WHEEL_DIR", ".")).glob("exllamav2-*.whl"))
    if wheels:
        with zipfile.ZipFile(wheels[-1]) as zf:
            return [zf.read(f"exllamav2/conversion/standard_cal_data/{n}").decode() for n in names]
    raise DataError("the calib text needs the exllamav2 wheel: pip install --no-deps exllamav2")


def documents(name: str, split: str = "train", root: str | os.PathLike | None = None) -> list[str]:
    """The documents of a named source (or a comma-separated list of sources) for one split."""
    if split not in ("train", "validation", "test"):
        raise DataError(f"unknown split {split!r}")
    local = data_dir(root)
    docs: list[str] = []
    for part in name.split(","):
        if part == "wikitext2":
            docs += ["\n".join(wikitext2(split, local))] if split == "train" else wikitext2(split, local)
        elif part == "c4":
            docs += c4(split, local)
        elif part == "c4_wiki":
            docs += documents("c4,wikitext2", split, root)
        elif part == "calib":
            if split != "train":
                raise DataError("calib is training text only; evaluate on wikitext2 or c4")
            docs += calib()
        elif Path(part).suffix in (".txt", ".jsonl", ".gz", ".raw", ".utf8") or Path(part).exists():
            docs += _read_docs(Path(part).expanduser())
        else:
            raise DataError(f"unknown data {part!r}: use wikitext2, c4, c4_wiki, calib or a .txt/.jsonl/.json.gz file")
    return docs


BOS_MODEL_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


def needs_bos(config) -> bool:
    """Whether the model only predicts well from a ``<bos>`` at the start of its input (Gemma's model types).

    Windows cut from one token stream start mid-text; only the first holds the tokenizer's BOS. On
    Gemma-3-270M (full precision, 512-token windows, WikiText-2/C4 text) windows 0..3 read perplexity
    14.5, 75.8, 95.7, 58.8 so cut, and 14.5, 26.0, 27.1, 27.9 with a BOS at the start of each.
    LLaMA-type models do without, and their windows stay the field's (comparable with the papers).
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return config.model_type in BOS_MODEL_TYPES or text_config.model_type in BOS_MODEL_TYPES


def leading_bos(config, tokenizer) -> int | None:
    """The id to put at the start of every window, block and sampled sequence: the BOS where needs_bos, else None."""
    return tokenizer.bos_token_id if needs_bos(config) else None


def cut_rows(ids: list[int], seq_len: int, bos_token_id: int | None, *caps: int | None) -> torch.Tensor:
    """Non-overlapping (N, seq_len) rows of ``ids``, at most each cap; with ``bos_token_id``, each row
    is that id followed by the next seq_len - 1 ids."""
    width = seq_len if bos_token_id is None else seq_len - 1
    if width < 1:
        raise DataError(f"rows of {seq_len} tokens leave no room for text after the BOS")
    n = len(ids) // width
    for cap in caps:
        n = min(n, cap) if cap else n
    rows = torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)
    if bos_token_id is None:
        return rows
    return torch.cat([torch.full((n, 1), bos_token_id, dtype=torch.long), rows], 1)


def token_blocks(tokenizer, docs: list[str], seq_len: int, bos_token_id: int | None = None) -> torch.Tensor:
    """Documents tokenized, joined with the EOS token and cut into (N, seq_len) training blocks;
    with ``bos_token_id``, each block is that id and the next seq_len - 1 tokens (see needs_bos)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        if doc.strip():
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
            if eos is not None:
                ids.append(eos)
    blocks = cut_rows(ids, seq_len, bos_token_id)
    if len(blocks) == 0:
        raise DataError(f"only {len(ids)} tokens of text: not one block of {seq_len}")
    return blocks


EVAL_SETS = ("wikitext2", "c4")


def eval_windows(tokenizer, name: str, seq_len: int = 2048, root=None, max_windows: int | None = None,
                 bos_token_id: int | None = None) -> torch.Tensor:
    """The field's perplexity windows, (N, seq_len), non-overlapping.

    wikitext2: the raw test split's rows joined with "\\n\\n", tokenized once (GPTQ/OneBit/BinaryMoS).
    c4: GPTQ's ``c4_new``: the first 1100 validation documents joined with " ", first 256 windows.

    With ``bos_token_id`` (models that need it, see needs_bos) the text is tokenized without special
    tokens and each window is that id followed by the next seq_len - 1 tokens of the stream.
    """
    if name == "wikitext2":
        text, limit = "\n\n".join(wikitext2("test", data_dir(root))), None
    elif name == "c4":
        text, limit = " ".join(c4("test", data_dir(root))), 256
    else:
        raise DataError(f"unknown evaluation set {name!r}: use {', '.join(EVAL_SETS)}")
    if bos_token_id is None:
        ids = tokenizer(text, return_tensors=None)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return cut_rows(ids, seq_len, bos_token_id, limit, max_windows)
