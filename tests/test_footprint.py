"""Footprint: the paper's memory table, byte counts by hand, and computed == measured for a packed model."""
import json
import struct

import pytest
from conftest import tiny_model
from pack_helpers import binarized, packed_dir

from binarymos import cli
from binarymos.footprint import computed, load_config, report

# SPEC.md, the paper's memory table, in GB
PAPER = {"llama-7b": {"fp16": 13.51, "onebit": 1.37, "binarymos": 1.40},
         "llama-13b": {"fp16": 26.20, "onebit": 2.29, "binarymos": 2.33}}


@pytest.mark.parametrize("name", PAPER)
def test_paper_memory_table_within_3_percent(name):
    got = computed(load_config(name), num_experts=4)
    for scheme, paper_gb in PAPER[name].items():
        assert abs(got[scheme] / 1e9 - paper_gb) / paper_gb < 0.03, (scheme, got[scheme] / 1e9, paper_gb)


def test_llama_2_7b_by_hand():
    h, m, layers, vocab, experts = 4096, 11008, 32, 32000, 4
    linears = [(h, h)] * 4 + [(h, m), (h, m), (m, h)]  # q k v o, gate up (in, out), down
    weights = layers * sum(i * o for i, o in linears)
    dense = 2 * (2 * vocab * h + (2 * layers + 1) * h)  # embeddings, LM head, norms in fp16
    signs = layers * sum(o * i // 8 for i, o in linears)
    scales = 2 * layers * sum(i + o for i, o in linears)
    router = 2 * layers * sum(i for i, _ in linears)
    rows = 2 * layers * sum(o for _, o in linears)
    assert computed(load_config("llama-2-7b"), experts) == {
        "fp16": 2 * weights + dense, "sign": dense + signs + rows, "onebit": dense + signs + scales,
        "binarymos": dense + signs + experts * (scales + router)}


@pytest.mark.parametrize("arch, num_experts, method", [("llama", 3, "mos"), ("gpt2", 1, "mos"), ("opt", 1, "sign")])
def test_computed_equals_measured_tensor_bytes(arch, num_experts, method, tmp_path):
    """Computed from config.json == the tensor bytes in the files; the files add only their headers."""
    directory = packed_dir(binarized(tiny_model(arch), num_experts, method), tmp_path / "packed", "20KB")
    result = report(directory=str(directory))
    key = {"sign": "sign", "mos": "onebit" if num_experts == 1 else "binarymos"}[method]
    assert result["bytes"][key] == result["measured"]["tensor_bytes"]
    headers = sum(8 + struct.unpack("<Q", f.read_bytes()[:8])[0] for f in directory.glob("*.safetensors"))
    assert result["measured"]["file_bytes"] - result["measured"]["tensor_bytes"] == headers


def test_cli_footprint(tmp_path, capsys):
    assert cli.main(["footprint", "--config", "llama-2-13b", "--json", "-E", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_experts"] == 2 and result["bytes"] == computed(load_config("llama-2-13b"), 2)
    assert result["ratio_vs_fp16"]["fp16"] == 1.0

    directory = packed_dir(binarized(tiny_model("llama")), tmp_path / "packed")
    assert cli.main(["footprint", str(directory)]) == 0
    table = capsys.readouterr().out
    assert "BinaryMoS (E=2)" in table and "measured: files" in table

    assert cli.main(["footprint", "--config", "no-such-model"]) == 2
    assert "not a built-in config" in capsys.readouterr().err


def test_a_hub_id_is_read_from_the_hub_and_builtin_false_skips_the_builtin_names(monkeypatch):
    import transformers
    from transformers import LlamaConfig

    from binarymos.footprint import FootprintError

    asked = []

    def from_pretrained(name, **kwargs):
        asked.append(name)
        if name == "org/missing":
            raise OSError("org/missing is not a local folder and is not a valid model identifier\nmore")
        return LlamaConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=4, quantization_config={"quant_method": "binarymos"})

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    config = load_config("org/model")
    assert asked == ["org/model"] and config.hidden_size == 48 and not hasattr(config, "quantization_config")
    assert load_config("llama-2-7b").hidden_size == 4096 and asked == ["org/model"]  # the built-in, no hub
    assert load_config("llama-2-7b", builtin=False).hidden_size == 48 and asked[-1] == "llama-2-7b"
    with pytest.raises(FootprintError, match=r"org/missing: not a built-in config .* no config for it \(org/missing "
                                             r"is not a local folder and is not a valid model identifier\)$"):
        load_config("org/missing")


def test_footprint_of_a_pack_checks_its_files_against_the_manifest(tmp_path):
    """A shard cut short or a stray file left beside the pack is an error, not a smaller or larger footprint."""
    directory = packed_dir(binarized(tiny_model("llama")), tmp_path / "packed", "20KB")
    shards = sorted(directory.glob("*.safetensors"))
    assert len(shards) > 1
    whole = report(directory=str(directory))["measured"]
    assert whole["file_bytes"] == sum(f.stat().st_size for f in shards)

    (directory / "old-00001.safetensors").write_bytes(shards[0].read_bytes())
    assert cli.main(["footprint", str(directory)]) == 2
    (directory / "old-00001.safetensors").unlink()
    shards[-1].write_bytes(shards[-1].read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated or replaced"):
        report(directory=str(directory))
