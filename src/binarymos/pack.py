"""The packed 1-bit file: a Hugging Face directory whose binarized layers hold their signs 8 per byte.

`pack` binarizes (or takes a trained binarized model), swaps every binarized layer for its packed
inference form and writes safetensors shards, ``config.json`` with a ``quantization_config``
(``quant_method: "binarymos"``), the tokenizer and, last, ``manifest.json``: the sha256 and size
of every tensor file. The manifest is the commit mark: a directory without it, or whose files do
not match it, does not load. docs/PACKING.md is the format's specification.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import secrets
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from .convert import METHODS, BinaryMoSConfig, binarize, binarized_layers
from .models import move_into_place
from .nn import BinaryMoSLinear, PackedBinaryMoSLinear, SignLinear, pack_signs

FORMAT_VERSION = 1
QUANT_METHOD = "binarymos"
# How the signs are laid out: nn.pack_signs. Written to config.json and checked on load.
PACKING = {"container": "uint8", "signs_per_byte": 8, "axis": "input", "bit_order": "lsb_first",
           "bit_one_means": "+1 (w >= 0)", "row_padding": "zero bits up to a multiple of 8 inputs"}
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8",
                      torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}
MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"  # where a sharded pack maps each tensor to its file
DEFAULT_SHARD_SIZE = "2GB"


class PackFormatError(ValueError):
    """A packed directory that is incomplete, corrupted, of another format version or inconsistent."""


class BinaryMoSQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a packed model: what was binarized and how the bits are laid out."""

    def __init__(self, method: str = "mos", num_experts: int = 4, modules_to_not_convert: list[str] | None = None,
                 dtype: str = "float16", packing: dict | None = None, format_version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD, **unknown):
        self.quant_method = quant_method
        self.format_version = format_version
        self.method = method
        self.num_experts = num_experts
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.dtype = dtype
        self.packing = dict(PACKING if packing is None else packing)
        self._check(unknown)

    def _check(self, unknown: dict) -> None:
        where = "quantization_config"
        if self.quant_method != QUANT_METHOD:
            raise PackFormatError(f"{where}: quant_method is {self.quant_method!r}, not {QUANT_METHOD!r}")
        if self.format_version != FORMAT_VERSION:
            raise PackFormatError(f"{where}: format_version {self.format_version} is not supported; this binarymos "
                                  f"reads version {FORMAT_VERSION} (repack the model with this binarymos)")
        if unknown:
            raise PackFormatError(f"{where}: unknown keys {sorted(unknown)} for format version {FORMAT_VERSION}")
        if self.packing != PACKING:
            raise PackFormatError(f"{where}: packing {self.packing} is not the supported layout {PACKING}")
        if self.dtype not in STORAGE_DTYPES:
            raise PackFormatError(f"{where}: dtype {self.dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
        if self.method not in METHODS or not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise PackFormatError(f"{where}: method {self.method!r} with num_experts {self.num_experts!r} "
                                  f"is not valid (methods {METHODS}, num_experts an integer >= 1)")

    @property
    def storage_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.dtype]

    def binarize_config(self) -> BinaryMoSConfig:
        return BinaryMoSConfig(num_experts=self.num_experts, method=self.method,
                               modules_to_not_convert=self.modules_to_not_convert)


class PackedSignLinear(nn.Module):
    """Inference form of SignLinear (the static sign baseline): packed signs, one 16-bit scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=torch.float16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed_weight", torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.uint8,
                                                          device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_sign(cls, layer: SignLinear, dtype: torch.dtype = torch.float16) -> "PackedSignLinear":
        packed = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.weight.device, dtype)
        packed.packed_weight.copy_(pack_signs(layer.weight))
        packed.scale.copy_(layer.scale)
        if layer.bias is not None:
            packed.bias.copy_(layer.bias)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The packed layer's kernels (binarymos.kernels) as for OneBit, with s_in = 1 and s_out = the static
        scale: the unpacked layer's numbers, without unpacking the weight on every call."""
        from .kernels import binary_mos_linear

        ones = self.scale.new_ones(1, self.in_features)
        return binary_mos_linear(x, self.packed_weight, None, ones, self.scale[None], self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


PACKED_LAYERS = (PackedBinaryMoSLinear, PackedSignLinear)


# ---------------------------------------------------------------- model <-> packed model

def pack_layers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every binarized layer of ``model`` with its packed form (16-bit tensors in ``dtype``), in place."""
    for name, layer in binarized_layers(model).items():
        if isinstance(layer, BinaryMoSLinear):
            packed = PackedBinaryMoSLinear.from_binarized(layer, dtype)
        else:
            packed = PackedSignLinear.from_sign(layer, dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed)
    return model


def pack_model(model: nn.Module, dtype: str = "float16") -> nn.Module:
    """A binarized model (``binarize`` or a trained one) -> its packed inference form, in place."""
    trained = getattr(model.config, "binarymos", None)
    if trained is None:
        raise ValueError(f"{type(model).__name__} is not binarized: run binarymos.binarize on it first")
    qconfig = BinaryMoSQuantConfig(method=trained["method"], num_experts=trained["num_experts"],
                                   modules_to_not_convert=trained["modules_to_not_convert"], dtype=dtype)
    pack_layers(model, qconfig.storage_dtype).to(qconfig.storage_dtype).eval()
    del model.config.binarymos  # its content lives on in quantization_config
    model.config.quantization_config = qconfig
    return model


def build_skeleton(model: nn.Module, qconfig: BinaryMoSQuantConfig) -> nn.Module:
    """Give a freshly built (meta) model the packed layers ``qconfig`` describes, before its weights load."""
    dtype = next(model.parameters()).dtype
    binarize(model, qconfig.binarize_config(), from_weights=False)
    del model.config.binarymos
    return pack_layers(model, dtype)


def saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as it is written: without tied copies (the LM head that shares the embedding)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {name: t for name, t in model.state_dict().items() if name not in tied}


# ---------------------------------------------------------------- writing

def pack(source: str, out: str | os.PathLike, num_experts: int | None = None, method: str | None = None,
         dtype: str = "float16", max_shard_size: int | str = DEFAULT_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Pack ``source`` (a run directory, a trained binarized model, or any causal LM to binarize) into ``out``.

    Atomic: everything is written to ``OUT.tmp-XXXX`` and renamed to ``out`` at the end.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite")
    for kept, what in ((Path(source), f"the source {source}"), (Path.cwd(), "the current directory")):
        if kept.exists() and kept.resolve().is_relative_to(out.resolve()):
            raise FileExistsError(f"{out} is or holds {what}: --overwrite would delete it; choose another --out")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    parse_size(max_shard_size)  # before the minutes of binarizing, not after
    model, tokenizer, trained = _binarized(source, num_experts, method)
    pack_model(model, dtype)
    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        save(model, tmp, tokenizer, max_shard_size)
        (tmp / "README.md").write_text(model_card(tmp, source, out.name, trained))
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _json_object(path: Path) -> dict | None:
    """A JSON object file's content; None where it is missing, damaged or not an object (the card goes without)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return content if isinstance(content, dict) else None


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def _shown(name: str) -> str:
    """A model or run as a public card names it: a Hub id in full, a local path by its last part only."""
    return f"`{name}`" if _is_hub_id(name) else f"`{Path(name).name}`"


def _perplexity_section(run: Path | None) -> list[str]:
    """The card's lines for the perplexities `binarymos train --ppl` measured in the run (none without them)."""
    results = None if run is None else _json_object(run / "results.json")
    rows = (results or {}).get("perplexity", results)  # written before the windows were recorded: the rows alone
    if not rows or not all(isinstance(values, dict) for values in rows.values()):
        return []
    sets = list(next(iter(rows.values())))
    if "eval_seq_len" in results:
        windows = (f"the first {results['eval_windows']}" if results.get("eval_windows")
                   else "every window the protocol takes")
        how = f", in windows of {results['eval_seq_len']} tokens, {windows} of each set"
    else:
        how = ", on windows it did not record"
    return ["## Perplexity", "",
            f"As `binarymos train --ppl` measured it{how} (the field's protocol: 2048 tokens, all of WikiText-2's "
            "test split, the first 256 of C4's).", "",
            "| model | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets),
            *(f"| {label} | " + " | ".join(f"{values.get(s, float('nan')):,.2f}" for s in sets) + " |"
              for label, values in rows.items()), ""]


def model_card(directory: Path, source: str, name: str, trained: bool) -> str:
    """README.md of a packed directory, as the Hub shows it: what it holds, where it comes from, how to load it.
    ``trained``: the source was a trained binarized model (else it was binarized when packed)."""
    from .footprint import report
    from .train import read_log, run_of

    quant = json.loads((directory / "config.json").read_text())["quantization_config"]
    experts = quant["num_experts"]
    what = {"sign": "one static scale per output row (the static sign baseline: sign(W) times the row's mean |W|)",
            "mos": "OneBit's input and output scale vectors (BinaryMoS with one expert)" if experts == 1 else
                   f"BinaryMoS's {experts} scaling experts, which a router mixes per token"}[quant["method"]]
    run = run_of(source) if trained else None
    settings = (_json_object(run / "train_config.json") or {}) if run else {}
    if not trained:
        origin, base = "not trained: binarized when packed", source
    elif not settings:
        origin, base = "trained; its run's settings are not beside it", ""
    else:
        tokens = next((record["tokens"] for record in reversed(read_log(run)) if "tokens" in record), None)
        origin = (f"distilled from {_shown(str(settings.get('model')))} on {_shown(str(settings.get('data')))}, "
                  f"recipe `{settings.get('recipe')}`" + (f", {tokens:,} tokens" if tokens is not None else ""))
        base = str(settings.get("model"))
    sizes = report(directory=str(directory))
    stored, fp16 = sizes["measured"]["tensor_bytes"], sizes["bytes"]["fp16"]
    front = ["---", "library_name: transformers", "tags:", "- binarymos", "- 1-bit", "- binarization"]
    front += [f"base_model: {base}"] if _is_hub_id(base) else []
    return "\n".join(front + ["---", "", f"# {name}", "",
        f"A 1-bit model packed by binarymos from {_shown(source)}: every linear layer of its decoder blocks keeps "
        f"only the signs of its weights, 8 per byte, and {what}; scales, router and the layers left dense in "
        f"{quant['dtype']}.", "",
        "| | |", "|---|---|",
        f"| training | {origin} |",
        f"| stored | {stored:,} bytes of tensors ({stored / 1e6:,.1f} MB), {fp16 / stored:.1f}x less than the "
        f"fp16 model's {fp16:,} |", "",
        *_perplexity_section(run), "## Use", "", "```python",
        "import binarymos  # registers the binarymos quantizer with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
        f'or `binarymos generate {name} "The history of"`; its perplexity by the field\'s protocol: '
        f"`binarymos eval --model {name} --ppl wikitext2,c4`.", ""])


def _binarized(source: str, num_experts: int | None, method: str | None):
    """(binarized model, tokenizer, whether it was trained) from a run directory, a trained model, or a plain
    model binarized now."""
    from .models import load_model
    from .train import run_model

    path = run_model(source)
    if is_packed(path):
        raise ValueError(f"{source} is packed already")
    model, tokenizer = load_model(str(path) if path.exists() else source)
    trained = getattr(model.config, "binarymos", None)
    if trained is None:
        config = BinaryMoSConfig(num_experts=4 if num_experts is None else num_experts, method=method or "mos")
        return binarize(model, config).eval(), tokenizer, False
    for key, asked in (("num_experts", num_experts), ("method", method)):
        if asked is not None and asked != trained[key]:
            raise ValueError(f"{source} was trained with {key}={trained[key]}, not {asked}")
    return model.eval(), tokenizer, True


def save(model: nn.Module, directory: str | os.PathLike, tokenizer=None,
         max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Write a packed model to ``directory``: shards, index, config, generation config, tokenizer, manifest.

    The manifest goes last, after the previous one is removed, so an interrupted save never loads.
    """
    qconfig = getattr(model.config, "quantization_config", None)
    if not isinstance(qconfig, BinaryMoSQuantConfig):
        raise ValueError("not a packed binarymos model: pack it with binarymos.pack.pack_model first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in [directory / MANIFEST, *directory.glob("model*.safetensors*")]:
        old.unlink(missing_ok=True)
    tensors = {name: (t.to(qconfig.storage_dtype) if t.is_floating_point() else t).detach().cpu().contiguous()
               for name, t in saved_tensors(model).items()}
    files = _write_shards(tensors, directory, parse_size(max_shard_size))
    config = copy.deepcopy(model.config)
    config.dtype = qconfig.dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_manifest(directory, files)
    return directory


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_bytes: int) -> list[str]:
    """Greedy shards of at most ``max_bytes`` (one tensor larger than that gets a shard of its own)."""
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {tensor: file for file, shard in zip(names, shards) for tensor in shard}}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for file, shard in zip(names, shards):
        save_file(shard, directory / file, metadata={"format": "pt"})
    return names


def parse_size(size: int | str) -> int:
    """Bytes in 2000000, "500MB", "2GB" (powers of 1000) or "1GiB" (powers of 1024)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not match or match[2].upper() not in units:
        raise ValueError(f"cannot read the size {size!r}: use e.g. 2GB, 500MB or 1GiB")
    size_bytes = int(float(match[1]) * units[match[2].upper()])
    if size_bytes < 1:
        raise ValueError(f"the size {size!r} is not > 0")
    return size_bytes


# ---------------------------------------------------------------- manifest and validation

def _sha256(path: Path, start: int = 0, length: int | None = None) -> str:
    digest, remaining = hashlib.sha256(), length
    with open(path, "rb") as f:
        f.seek(start)
        while remaining is None or remaining > 0:
            chunk = f.read(1 << 24 if remaining is None else min(1 << 24, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining = None if remaining is None else remaining - len(chunk)
    return digest.hexdigest()


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data, {tensor: {dtype, shape, data_offsets}}) of a safetensors file, read without torch."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PackFormatError(f"{path}: truncated (no safetensors header)")
        (length,) = struct.unpack("<Q", head)
        if length > path.stat().st_size - 8:
            raise PackFormatError(f"{path}: truncated or corrupted safetensors header")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PackFormatError(f"{path}: corrupted safetensors header ({err})") from err
    header.pop("__metadata__", None)
    return 8 + length, header


def _tensor_digests(path: Path) -> dict[str, str]:
    start, header = read_header(path)
    return {name: _sha256(path, start + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0])
            for name, info in header.items()}


def write_manifest(directory: Path, files: list[str]) -> None:
    """sha256 and size of every tensor file, and of every tensor in it (to name the one that is damaged)."""
    manifest = {"format": "binarymos-packed", "format_version": FORMAT_VERSION,
                "files": {file: {"bytes": (directory / file).stat().st_size, "sha256": _sha256(directory / file),
                                 "tensors": _tensor_digests(directory / file)} for file in files}}
    tmp = directory / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise PackFormatError(f"{path}: missing; the directory is not a complete binarymos pack "
                              "(an interrupted write?)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PackFormatError(f"{path}: corrupted ({err})") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PackFormatError(f"{path}: format_version {manifest.get('format_version')} is not supported; "
                              f"this binarymos reads version {FORMAT_VERSION}")
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise PackFormatError(f"{path}: lists no tensor files")
    return manifest


def check_sizes(directory: Path) -> dict[str, dict]:
    """The manifest's tensor files, each there with the size it lists and no other .safetensors file beside them
    (cheap: no checksum); returns the manifest's {file: entry}."""
    listed = read_manifest(directory)["files"]
    stray = sorted({p.name for p in directory.glob("*.safetensors")} - set(listed))
    if stray:
        raise PackFormatError(f"{directory / stray[0]}: not listed in {MANIFEST} (left from another write?)")
    for file, entry in listed.items():
        path = directory / file
        if not path.is_file():
            raise PackFormatError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise PackFormatError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
    return listed


def verify_files(directory: Path) -> dict[str, dict]:
    """Check every tensor file against the manifest, sizes and checksums; returns {file: header}."""
    headers = {}
    for file, entry in check_sizes(directory).items():
        path = directory / file
        if _sha256(path) != entry["sha256"]:
            raise PackFormatError(_damage(path, entry["tensors"]))
        headers[file] = read_header(path)[1]
    return headers


def check_index(directory: Path) -> None:
    """A sharded pack's index must map tensor names to files the manifest lists: transformers reads it before the
    quantizer checks anything, and fails on a damaged one with an AttributeError or a missing file naming no index."""
    path = directory / INDEX
    if not path.exists():
        return
    weight_map = (_json_object(path) or {}).get("weight_map")
    listed = read_manifest(directory)["files"]
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f in listed for f in weight_map.values()):
        raise PackFormatError(f"{path}: damaged (its weight_map must map tensor names to the files {MANIFEST} lists)")


def _damage(path: Path, expected: dict[str, str]) -> str:
    """Name what differs in a file whose checksum does not match."""
    found = _tensor_digests(path)
    for name, digest in expected.items():
        if found.get(name) != digest:
            return f"{path}: tensor {name} is corrupted (sha256 mismatch)"
    return f"{path}: corrupted safetensors header (sha256 mismatch)"


def check_tensors(directory: Path, headers: dict[str, dict], model: nn.Module, qconfig: BinaryMoSQuantConfig) -> None:
    """Every stored tensor must be one the config's model has, of its shape and stored dtype, and none missing."""
    expected = saved_tensors(model)
    found = {}
    for file, header in headers.items():
        for name, info in header.items():
            where = f"{directory / file}: tensor {name}"
            if name not in expected:
                raise PackFormatError(f"{where} is not part of the model config.json describes")
            t = expected[name]
            shape = list(t.shape)
            stored = qconfig.storage_dtype if t.is_floating_point() else t.dtype
            dtype = SAFETENSORS_DTYPES.get(stored, str(stored))
            if info["shape"] != shape:
                raise PackFormatError(f"{where} has shape {info['shape']}, config.json implies {shape} "
                                      f"(method={qconfig.method}, num_experts={qconfig.num_experts})")
            if info["dtype"] != dtype:
                raise PackFormatError(f"{where} is {info['dtype']}, the format stores it as {dtype}")
            found[name] = file
    missing = sorted(set(expected) - set(found))
    if missing:
        raise PackFormatError(f"{directory}: tensor {missing[0]} is in no file ({len(missing)} missing)")


def is_packed(path: str | os.PathLike) -> bool:
    """True for a directory whose config.json declares a binarymos quantization_config, or that holds a binarymos
    manifest (a pack whose config was damaged: loading it then says what is wrong, instead of reading the directory
    as a full-precision model with fresh weights)."""
    return (Path(path) / MANIFEST).is_file() or _quantization_config(Path(path)) is not None


def _quantization_config(directory: Path) -> dict | None:
    """The binarymos quantization_config of the directory's config.json; None where there is none or it is damaged."""
    quant = (_json_object(directory / "config.json") or {}).get("quantization_config")
    return quant if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD else None


# ---------------------------------------------------------------- loading

def load(directory: str | os.PathLike, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None) -> nn.Module:
    """The packed model in ``directory``, validated, in eval mode.

    device: default cuda when available, else cpu. dtype: the compute dtype of the 16-bit tensors;
    default float32 on CPU (the unpacked model's numbers: bit-exact from 3 tokens a call on, within float32 rounding
    for 1-2 through byte tables), the stored 16-bit dtype elsewhere.
    """
    from transformers import AutoModelForCausalLM

    from . import hf_quantizer  # noqa: F401  (registers the quantizer with transformers)

    directory = Path(directory)
    if not is_packed(directory):
        raise PackFormatError(f"{directory}: not a packed binarymos directory (no binarymos quantization_config "
                              "in config.json); make one with `binarymos pack`")
    quant = _quantization_config(directory)
    if quant is None:
        raise PackFormatError(f"{directory / 'config.json'}: its binarymos quantization_config is missing or damaged "
                              f"(a packed directory: {MANIFEST} is there)")
    try:
        qconfig = BinaryMoSQuantConfig.from_dict(quant)
    except PackFormatError as err:
        raise PackFormatError(f"{directory / 'config.json'}: {err}") from None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else qconfig.storage_dtype
    check_index(directory)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
    return model.to(device).eval()
