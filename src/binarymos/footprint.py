"""How many bytes a model takes: measured for a directory, computed for any Hugging Face config.

Counting convention (docs/PACKING.md): the bytes of the stored tensors, nothing else. Every weight
that stays dense (embeddings, LM head unless tied, norms, biases, position embeddings) is 16-bit;
a binarized (out x in) weight becomes its packed signs, out * ceil(in / 8) bytes, plus its 16-bit
extras. GB = 10^9 bytes. This reproduces the paper's memory table within 3 %.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .convert import BinaryMoSConfig, binarize, binarized_layers

_LLAMA = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, tie_word_embeddings=False)
_LLAMA_13B = dict(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40)
BUILTIN_CONFIGS = {
    "llama-7b": dict(_LLAMA, max_position_embeddings=2048),
    "llama-13b": dict(_LLAMA_13B, max_position_embeddings=2048),
    "llama-2-7b": dict(_LLAMA, max_position_embeddings=4096),
    "llama-2-13b": dict(_LLAMA_13B, max_position_embeddings=4096),
    "llama-3-8b": dict(_LLAMA, vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0),
    "mistral-7b": dict(_LLAMA, model_type="mistral", intermediate_size=14336, num_key_value_heads=8,
                       max_position_embeddings=32768),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen2.5-14b": dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama-2-70b": dict(_LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
}
GB, GIB = 10**9, 2**30


class FootprintError(ValueError):
    pass


def load_config(name: str, builtin: bool = True):
    """A built-in name (not with ``builtin=False``, for a model that must exist), a config.json, a directory
    holding one, or any model name ``binarymos train`` takes (an alias such as smollm2-135m, a .gguf, a hub id);
    its quantization_config is ignored."""
    from transformers import AutoConfig

    from .models import ModelNotFoundError, loadable

    if builtin and name in BUILTIN_CONFIGS:
        kwargs = dict(BUILTIN_CONFIGS[name])
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    path = Path(name)
    if not (path.is_file() and path.suffix == ".json"):
        try:
            source = loadable(name)
        except ModelNotFoundError:
            source = None
        if isinstance(source, str):  # a hub id
            return _hub_config(source)
        path = source / "config.json" if source is not None else path
    if not path.is_file():
        raise FootprintError(f"{name}: {_NOT_A_CONFIG}")
    config_dict = json.loads(path.read_text())
    config_dict.pop("quantization_config", None)
    if "model_type" not in config_dict:
        raise FootprintError(f"{path}: no model_type")
    return AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)


_NOT_A_CONFIG = f"not a built-in config ({', '.join(BUILTIN_CONFIGS)}), a config.json nor a local model"


def _hub_config(name: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as err:  # no such repository, or no hub and nothing cached
        raise FootprintError(f"{name}: {_NOT_A_CONFIG}, and the hub gives no config for it "
                             f"({str(err).strip().splitlines()[0]})") from err
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def binarizable(config, modules_to_not_convert=()) -> tuple[int, list[tuple[int, int]]]:
    """(parameters of the model, (in, out) of every linear layer binarize converts), from a meta-device model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # a tied LM head counts once
    binarize(model, BinaryMoSConfig(method="sign", modules_to_not_convert=list(modules_to_not_convert)),
             from_weights=False)
    return params, [(m.in_features, m.out_features) for m in binarized_layers(model).values()]


def packed_layer_bytes(in_features: int, out_features: int, scheme: str, num_experts: int = 4) -> int:
    """Bytes of one binarized weight: packed signs plus its 16-bit extras (the bias stays dense, counted apart).

    sign: one scale per output row. mos: E input and E output scale vectors, and a router (in x E) unless E = 1.
    """
    signs = out_features * ((in_features + 7) // 8)
    if scheme == "sign":
        return signs + 2 * out_features
    router = 2 * num_experts * in_features if num_experts > 1 else 0
    return signs + 2 * num_experts * (in_features + out_features) + router


def computed(config, num_experts: int = 4, modules_to_not_convert=()) -> dict[str, int]:
    """Bytes of fp16, the static sign baseline, OneBit (E=1) and BinaryMoS (E=num_experts)."""
    params, layers = binarizable(config, modules_to_not_convert)
    dense = 2 * (params - sum(i * o for i, o in layers))
    schemes = {"sign": ("sign", 1), "onebit": ("mos", 1), "binarymos": ("mos", num_experts)}
    out = {"fp16": 2 * params}
    for key, (scheme, experts) in schemes.items():
        out[key] = dense + sum(packed_layer_bytes(i, o, scheme, experts) for i, o in layers)
    return out


def measured(directory: str | Path) -> dict[str, int]:
    """Bytes of the tensors stored in a directory's safetensors files, and of the files themselves. In a packed
    directory those are the files its manifest lists, each of the size listed (a pack cut short or with files left
    from another write is an error, not a smaller or larger footprint)."""
    from .pack import MANIFEST, check_sizes, read_header

    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        files = [directory / f for f in sorted(check_sizes(directory))]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FootprintError(f"{directory}: no .safetensors files")
    tensor_bytes = sum(info["data_offsets"][1] - info["data_offsets"][0]
                       for f in files for info in read_header(f)[1].values())
    return {"tensor_bytes": tensor_bytes, "file_bytes": sum(f.stat().st_size for f in files), "files": len(files)}


def report(config_name: str | None = None, directory: str | None = None, num_experts: int | None = None) -> dict:
    """Computed footprints (of ``config_name``, else of the directory's config) and, for a directory, measured."""
    quant = {}
    if directory is not None:
        config_path = Path(directory) / "config.json"
        if not config_path.is_file():
            raise FootprintError(f"{directory}: no config.json")
        quant = json.loads(config_path.read_text()).get("quantization_config") or {}
    experts = num_experts if num_experts is not None else quant.get("num_experts", 4)
    if experts < 1:
        raise FootprintError(f"num_experts must be >= 1, got {experts}")
    config = load_config(config_name or str(directory))
    result = {"config": config_name or str(directory), "num_experts": experts,
              "bytes": computed(config, experts, quant.get("modules_to_not_convert", ()))}
    result["ratio_vs_fp16"] = {k: round(result["bytes"]["fp16"] / v, 3) for k, v in result["bytes"].items()}
    if directory is not None:
        result["measured"] = measured(directory)
    return result


def format_table(result: dict) -> str:
    labels = {"fp16": "fp16", "sign": "sign (static)", "onebit": "OneBit (E=1)",
              "binarymos": f"BinaryMoS (E={result['num_experts']})"}
    fp16 = result["bytes"]["fp16"]
    rows = [(labels[k], v) for k, v in result["bytes"].items()]
    if "measured" in result:
        rows += [("measured: tensors", result["measured"]["tensor_bytes"]),
                 ("measured: files", result["measured"]["file_bytes"])]
    lines = [f"footprint of {result['config']} (GB = 10^9 bytes)", "| format | bytes | GB | GiB | vs fp16 |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {b:,} | {b / GB:.2f} | {b / GIB:.2f} | {fp16 / b:.2f}x |" for name, b in rows]
    return "\n".join(lines)
