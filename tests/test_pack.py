"""The packed 1-bit directory: bit-exact round trip for every architecture, the stored bits, validation errors."""
import copy
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from conftest import ARCHS, MORE_TINY, tiny_config, tiny_model
from pack_helpers import binarized, logits, packed_dir, reference, tiny_tokenizer
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import binarymos
from binarymos import BinaryMoSConfig, binarize, cli
from binarymos.convert import binarized_layers
from binarymos.nn import PackedBinaryMoSLinear
from binarymos.pack import PackFormatError, pack_model, save


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_exact(arch, tmp_path):
    model = binarized(tiny_model(arch))
    want = logits(reference(model))
    loaded = binarymos.load(packed_dir(model, tmp_path / "packed"), device="cpu", dtype=torch.float32)
    assert any(isinstance(m, PackedBinaryMoSLinear) for m in loaded.modules())
    assert torch.equal(logits(loaded), want)


@pytest.mark.parametrize("arch", MORE_TINY)
def test_more_families_binarize_every_projection_and_round_trip_bit_exactly(arch, tmp_path):
    model = tiny_model(arch)
    dense = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".0." in name}
    model = binarized(model)
    assert dense == {name for name in binarized_layers(model) if ".0." in name}  # every projection of block 0
    want = logits(reference(model))
    assert torch.equal(logits(binarymos.load(packed_dir(model, tmp_path / "packed"), device="cpu")), want)


def test_a_mixture_of_experts_keeps_its_experts_in_full_precision_where_asked(tmp_path):
    """modules_to_not_convert on a Mixtral-like model's experts: the attention projections alone are binarized (the
    router stays in full precision in any case) and the model round-trips."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral", num_local_experts=2, num_experts_per_tok=1)).eval()
    model = binarize(model, BinaryMoSConfig(num_experts=2, modules_to_not_convert=["*.mlp.experts"])).eval()
    assert sorted(name.split(".", 3)[3] for name in binarized_layers(model) if ".0." in name) == \
        ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    want = logits(reference(model))
    assert torch.equal(logits(binarymos.load(packed_dir(model, tmp_path / "packed"), device="cpu")), want)


@pytest.mark.parametrize("arch, num_experts, method", [("llama", 1, "mos"), ("gpt2", 1, "sign"), ("qwen2", 1, "sign")])
def test_onebit_and_sign_round_trip(arch, num_experts, method, tmp_path):
    model = binarized(tiny_model(arch), num_experts, method)
    want = logits(reference(model))
    directory = packed_dir(model, tmp_path / "packed")
    assert torch.equal(logits(binarymos.load(directory, device="cpu")), want)
    names = load_file(directory / "model.safetensors").keys()
    assert not any(name.endswith(".router") for name in names)  # E = 1: the gate is constant
    if method == "sign":
        assert not any(name.endswith(".scale_in") for name in names)


@pytest.mark.parametrize("tokens", [1, 2, 5])  # 1-2: the CPU's byte-table product; 5: the unpacked signs
def test_packed_sign_layer_is_sign_times_row_mean_abs_in_float64(tokens):
    from binarymos.nn import SignLinear
    from binarymos.pack import PackedSignLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(37, 11)
    layer = PackedSignLinear.from_sign(SignLinear.from_linear(linear), dtype=torch.float32)
    w, x = linear.weight.detach().double(), torch.randn(tokens, 37)
    want = (x.double() @ torch.where(w >= 0, 1.0, -1.0).double().T) * w.abs().mean(1) + linear.bias.detach().double()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_stored_bits_and_dtypes(tmp_path):
    """Signs 8 per byte along the input, LSB first, 1 = (w >= 0), rows zero-padded; everything else fp16."""
    config = tiny_config("llama")
    config.intermediate_size = 36  # down_proj: 36 inputs, 5 bytes a row, 4 padding bits
    torch.manual_seed(0)
    model = binarized(AutoModelForCausalLM.from_config(config, dtype=torch.float32), num_experts=3)
    latent = {name: layer.weight.detach().clone() for name, layer in binarized_layers(model).items()}
    stored = load_numpy(packed_dir(model, tmp_path / "packed") / "model.safetensors")
    for name, weight in latent.items():
        packed = stored[f"{name}.packed_weight"]
        assert packed.dtype == np.uint8 and packed.shape == (weight.shape[0], -(-weight.shape[1] // 8))
        bits = np.unpackbits(packed, axis=1, bitorder="little")
        assert (bits[:, :weight.shape[1]] == (weight.numpy() >= 0)).all()
        assert not bits[:, weight.shape[1]:].any()
        assert stored[f"{name}.scale_in"].shape == stored[f"{name}.router"].shape == (3, weight.shape[1])
    assert {a.dtype for name, a in stored.items() if not name.endswith("packed_weight")} == {np.dtype(np.float16)}


def test_sharded_save_and_transformers_round_trip(tmp_path):
    """Plain AutoModelForCausalLM.from_pretrained loads a sharded pack; its save_pretrained writes the pack again."""
    model = binarized(tiny_model("qwen3"))
    want = logits(reference(model))
    first = packed_dir(model, tmp_path / "first", max_shard_size="10KB")
    index = json.loads((first / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1

    loaded = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32)
    assert torch.equal(logits(loaded), want)
    assert AutoModelForCausalLM.from_pretrained(first).dtype == torch.float16  # "auto": the stored dtype

    loaded.save_pretrained(tmp_path / "second", max_shard_size="10KB")
    second = tmp_path / "second"
    before = {k: v for f in first.glob("*.safetensors") for k, v in load_file(f).items()}
    after = {k: v for f in second.glob("*.safetensors") for k, v in load_file(f).items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    config = json.loads((second / "config.json").read_text())
    assert config["quantization_config"] == json.loads((first / "config.json").read_text())["quantization_config"]
    assert torch.equal(logits(binarymos.load(second, device="cpu")), want)


@pytest.fixture(scope="module")
def good_pack(tmp_path_factory):
    return packed_dir(binarized(tiny_model("llama")), tmp_path_factory.mktemp("good") / "packed")


def _tensor_range(path, name):
    """Byte range of a tensor in a safetensors file, read from its header by hand."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8:8 + length])[name]["data_offsets"]
    return 8 + length + start, 8 + length + end


def _flip_byte(d):
    path, name = d / "model.safetensors", "model.layers.1.mlp.down_proj.packed_weight"
    start, _ = _tensor_range(path, name)
    data = bytearray(path.read_bytes())
    data[start] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(d):
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _edit_config(**changes):
    def edit(d):
        config = json.loads((d / "config.json").read_text())
        config["quantization_config"].update(changes)
        (d / "config.json").write_text(json.dumps(config))
    return edit


def _set_quantization_config(value):
    def edit(d):
        config = json.loads((d / "config.json").read_text())
        config["quantization_config"] = value
        (d / "config.json").write_text(json.dumps(config))
    return edit


CORRUPTIONS = {
    "flipped byte": (_flip_byte, r"model\.safetensors: tensor model\.layers\.1\.mlp\.down_proj\.packed_weight "
                                 r"is corrupted"),
    "truncated": (_truncate, r"model\.safetensors: \d+ bytes, the manifest says \d+ \(truncated"),
    "wrong version": (_edit_config(format_version=2), r"config\.json: quantization_config: format_version 2 is not"),
    "other layout": (_edit_config(packing={"container": "int32"}), r"packing .* is not the supported layout"),
    "mismatched experts": (_edit_config(num_experts=3), r"model\.safetensors: tensor model\.layers\.0\.\S+ "
                                                        r"has shape \[2, \d+\], config\.json implies \[3, \d+\]"),
    "no manifest": (lambda d: (d / "manifest.json").unlink(), r"manifest\.json: missing"),
    # a pack whose config lost its quantization_config must not load as a float model with fresh weights
    "no quantization_config": (_set_quantization_config(None), r"config\.json: its binarymos quantization_config is "
                                                               r"missing or damaged"),
    "quantization_config a string": (_set_quantization_config("x"), r"quantization_config is missing or damaged"),
    "stray shard": (lambda d: shutil.copy(d / "model.safetensors", d / "model-extra.safetensors"),
                    r"model-extra\.safetensors: not listed in manifest\.json"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_damaged_pack_is_refused(case, good_pack, tmp_path):
    damage, message = CORRUPTIONS[case]
    directory = shutil.copytree(good_pack, tmp_path / "damaged")
    damage(directory)
    with pytest.raises(ValueError, match=message):
        binarymos.load(directory, device="cpu")


@pytest.mark.parametrize("weight_map", ["garbage", [1, 2], {"model.embed_tokens.weight": "nope.safetensors"}])
def test_damaged_index_of_a_sharded_pack_is_refused(weight_map, tmp_path):
    directory = packed_dir(binarized(tiny_model("llama")), tmp_path / "sharded", max_shard_size="10KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    (directory / "model.safetensors.index.json").write_text(json.dumps(dict(index, weight_map=weight_map)))
    with pytest.raises(PackFormatError, match=r"model\.safetensors\.index\.json: damaged \(its weight_map must map"):
        binarymos.load(directory, device="cpu")


def test_cli_reports_damage_in_one_line(good_pack, tmp_path, capsys):
    directory = shutil.copytree(good_pack, tmp_path / "damaged")
    _flip_byte(directory)
    assert cli.main(["generate", str(directory), "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "down_proj.packed_weight is corrupted" in err


def test_cli_reports_a_library_error_from_a_damaged_header_in_one_line(good_pack, tmp_path, capsys):
    """A byte of the safetensors header changed so that a tensor entry loses its offsets: the KeyError raised deep
    in the loading is one line naming it, exit 2."""
    directory = shutil.copytree(good_pack, tmp_path / "damaged")
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes().replace(b'"data_offsets"', b'"data_offsetz"', 1))
    assert cli.main(["generate", str(directory), "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("binarymos: error: KeyError: 'data_offsets' (BINARYMOS_DEBUG=1")


def test_pack_refuses_to_overwrite_its_own_source(tmp_path, capsys, monkeypatch):
    source = _save_hf(tiny_model("llama"), tmp_path / "fp")
    before = sorted(p.name for p in source.iterdir())
    for out in (source, tmp_path):  # the source itself, and a directory holding it
        assert cli.main(["pack", str(source), "--out", str(out), "-E", "2", "--overwrite"]) == 2
        assert "--overwrite would delete it" in capsys.readouterr().err
    assert sorted(p.name for p in source.iterdir()) == before
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # `--out .` would pack into the current directory's place
    assert cli.main(["pack", str(source), "--out", ".", "-E", "2", "--overwrite"]) == 2
    assert "is or holds the current directory: --overwrite would delete it" in capsys.readouterr().err
    assert work.is_dir() and not any(work.iterdir())


def test_pack_overwrite_replaces_a_file(tmp_path):
    source = _save_hf(tiny_model("llama"), tmp_path / "fp")
    out = tmp_path / "out"
    out.write_text("a file")
    assert cli.main(["pack", str(source), "--out", str(out), "-E", "2", "--overwrite"]) == 0
    assert binarymos.load(out, device="cpu") is not None and sorted(p.name for p in tmp_path.iterdir()) == ["fp", "out"]


@pytest.mark.parametrize("option, message", [({"num_experts": 0}, "num_experts must be an integer >= 1"),
                                             ({"max_shard_size": 0}, "the size 0 is not > 0"),
                                             ({"max_shard_size": "0GB"}, "the size '0GB' is not > 0")])
def test_pack_refuses_zero_experts_and_empty_shards(option, message, tmp_path):
    """pack(num_experts=0) packed E=4 (0 read as left out); a shard size of 0 failed only after binarizing."""
    from binarymos.pack import pack

    source = _save_hf(tiny_model("llama"), tmp_path / "fp")
    with pytest.raises(ValueError, match=message):
        pack(str(source), tmp_path / "out", **option)
    assert not (tmp_path / "out").exists()


def _save_hf(model, directory):
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def test_cli_pack_run_directory(tmp_path, capsys):
    """A run directory (RUN/model holds the trained binarized model) packs bit-exactly; --out is protected."""
    model = binarized(tiny_model("mistral"))
    want = logits(reference(model))
    run = tmp_path / "run"
    _save_hf(model, run / "model")
    out = tmp_path / "packed"
    assert cli.main(["pack", str(run), "--out", str(out)]) == 0
    assert torch.equal(logits(binarymos.load(out, device="cpu")), want)
    assert AutoTokenizer.from_pretrained(out)("hello").input_ids == tiny_tokenizer()("hello").input_ids
    assert not list(tmp_path.glob("packed.tmp-*"))

    capsys.readouterr()
    assert cli.main(["pack", str(run), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["pack", str(run), "--out", str(out), "--overwrite", "-E", "3"]) == 2
    assert "trained with num_experts=2, not 3" in capsys.readouterr().err
    assert cli.main(["pack", str(run), "--out", str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["dtype"] == "bfloat16"


def test_cli_pack_plain_model_as_sign_baseline(tmp_path):
    model = tiny_model("gpt2")
    source = _save_hf(model, tmp_path / "hf")
    want = logits(reference(binarize(copy.deepcopy(model), BinaryMoSConfig(method="sign"))))
    assert cli.main(["pack", str(source), "--out", str(tmp_path / "packed"), "--method", "sign"]) == 0
    assert torch.equal(logits(binarymos.load(tmp_path / "packed", device="cpu")), want)


def test_pack_writes_a_model_card(tmp_path):
    from binarymos.pack import pack

    run = tmp_path / "run"
    _save_hf(binarized(tiny_model("llama"), num_experts=2), run / "model")
    (run / "train_config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M", "data": "c4_wiki",
                                                       "recipe": "default"}))
    log = '{"step": 1, "tokens": 2048}\n{"step": 2, "tokens": 4096}\n{"step": 3, "tok'  # the last line cut off by a kill
    (run / "log.jsonl").write_text(log)
    results = {"full precision": {"wikitext2": 22.23, "c4": 28.11}, "BinaryMoS (E=2) trained": {"wikitext2": 68.06,
                                                                                                "c4": 1093.89}}
    (run / "results.json").write_text(json.dumps({"eval_seq_len": 2048, "eval_windows": 40, "perplexity": results}))
    card = (pack(str(run), tmp_path / "packed") / "README.md").read_text()
    assert "in windows of 2048 tokens, the first 40 of each set" in card and "| model | wikitext2 | c4 |" in card
    assert "| BinaryMoS (E=2) trained | 68.06 | 1,093.89 |" in card
    (run / "results.json").write_text(json.dumps({"eval_seq_len": 2048, "perplexity": results}))  # edited by hand
    card = (pack(str(run), tmp_path / "packed", overwrite=True) / "README.md").read_text()
    assert "in windows of 2048 tokens, every window the protocol takes of each set" in card
    (run / "results.json").write_text(json.dumps(results))  # as written before the windows were recorded
    card = (pack(str(run), tmp_path / "packed", overwrite=True) / "README.md").read_text()
    assert "on windows it did not record" in card and "| BinaryMoS (E=2) trained | 68.06 | 1,093.89 |" in card
    stored = sum(t.numel() * t.element_size() for t in load_file(tmp_path / "packed" / "model.safetensors").values())
    fp16 = 2 * sum(p.numel() for p in tiny_model("llama").parameters())
    assert card.startswith("---\nlibrary_name: transformers\n") and "\nbase_model: HuggingFaceTB/SmolLM2-135M\n" in card
    assert "BinaryMoS's 2 scaling experts" in card and "`c4_wiki`" in card and "4,096 tokens" in card
    assert f"| stored | {stored:,} bytes of tensors" in card and f"fp16 model's {fp16:,} |" in card
    assert 'from_pretrained("packed")' in card and str(tmp_path) not in card  # no local paths on a public card

    (run / "results.json").write_text('{"eval_seq_len": 2048, "perplex')  # damaged: the card goes without it
    (run / "log.jsonl").unlink()
    card = (pack(str(run / "model"), tmp_path / "packed", overwrite=True) / "README.md").read_text()
    assert "## Perplexity" not in card and "recipe `default` |" in card  # and no token count without a log
    shutil.copytree(run / "model", tmp_path / "copied")  # a trained model away from its run
    card = (pack(str(tmp_path / "copied"), tmp_path / "packed", overwrite=True) / "README.md").read_text()
    assert "| training | trained; its run's settings are not beside it |" in card and "base_model" not in card

    _save_hf(tiny_model("gpt2"), run / "plain")  # a plain model, even inside a run directory, is binarized now
    card = (pack(str(run / "plain"), tmp_path / "sign", method="sign") / "README.md").read_text()
    assert "not trained" in card and "static sign baseline" in card and "base_model" not in card


def test_interrupted_pack_leaves_nothing_that_loads(tmp_path, monkeypatch):
    import binarymos.pack as pack

    def killed(*args):
        raise KeyboardInterrupt

    source = _save_hf(binarized(tiny_model("llama")), tmp_path / "model")
    monkeypatch.setattr(pack, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        pack.pack(str(source), tmp_path / "packed")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    with pytest.raises(KeyboardInterrupt):  # a save into place (save_pretrained) stopped before its manifest
        save(pack_model(binarized(tiny_model("llama"))), tmp_path / "partial")
    with pytest.raises(PackFormatError, match="manifest.json: missing"):
        binarymos.load(tmp_path / "partial", device="cpu")


def test_a_finished_directory_replaces_the_old_one_whole(tmp_path, monkeypatch):
    """pack and train's save put a new model where an old one is; until the new one is in place the old one stays."""
    import os

    from binarymos.models import move_into_place

    out, tmp = tmp_path / "model", tmp_path / "model.tmp"
    out.mkdir()
    (out / "old.safetensors").write_text("old")
    tmp.mkdir()
    (tmp / "new.safetensors").write_text("new")
    rename = os.rename

    def interrupted(src, dst):  # a kill between the two renames
        rename(src, dst)
        if dst != out:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        move_into_place(tmp, out)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("model.old-")]
    assert len(aside) == 1 and (aside[0] / "old.safetensors").read_text() == "old"  # nothing lost
    monkeypatch.setattr(os, "rename", rename)
    rename(aside[0], out)
    move_into_place(tmp, out)
    assert [p.name for p in out.iterdir()] == ["new.safetensors"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "model"]
