"""`binarymos analyze` on a tiny trained run: decodable PNGs and gating scores equal to softmax(x W_R)."""
import json
import shutil

import pytest
import torch
from pack_helpers import SPECIALS, encode, tiny_lm, tiny_tokenizer

from binarymos.analyze import analyze, blockwise_phase
from binarymos.cli import main
from binarymos.models import load_model
from binarymos.train import TrainConfig, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(teacher_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze") / "run"
    train(TrainConfig(model=str(teacher_dir), data=str(text_file), out=str(out), seq_len=32, batch_size=2,
                      max_steps=6, num_experts=2, lr_scale=5e-2, device="cpu", save_every=100))
    return out


def test_analyze_draws_readable_pngs_and_the_gates_of_the_chosen_layers(run_dir, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "pictures"
    text = "The cat sat."
    assert main(["analyze", str(run_dir), "--out", str(out), "--layers", "0,*.1.mlp.down_proj", "--text", text]) == 0
    for name in ("gates.png", "scales.png", "loss.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
        pixels = imread(out / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 0.05
    summary = json.loads((out / "analyze.json").read_text())
    assert summary["tokens"] == list(text) and summary["log_records"] == 6
    assert list(summary["gates"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    # block 0's q_proj reads the first norm of the embeddings: its gates computed here, apart from the model's forward
    model, tokenizer = load_model(str(run_dir / "model"))
    block = model.model.layers[0]
    with torch.no_grad():
        x = block.input_layernorm(model.model.embed_tokens(torch.tensor(tokenizer(text)["input_ids"])))
        expected = torch.softmax(x @ block.self_attn.q_proj.router.weight.T, -1)
    torch.testing.assert_close(torch.tensor(summary["gates"]["model.layers.0.self_attn.q_proj"]), expected)
    assert all(v["s_in"] > 0 and v["s_out"] > 0 for v in summary["relative_spread"].values())


def test_a_runs_model_directory_is_analysed_with_its_runs_loss_curve(run_dir, tmp_path):
    summary = analyze(run_dir / "model", tmp_path / "pictures", layers="0")
    assert summary["log_records"] == 6 and (tmp_path / "pictures" / "loss.png").read_bytes()[:8] == PNG_MAGIC
    # the default recipe's first quarter block-wise: steps 0 and 1 of 6 (1/6 < 0.25), 2 x 32 tokens each
    assert summary["blockwise_until_tokens"] == 2 * (2 * 32)



def test_no_plots_writes_the_numbers_alone_with_every_layers_expert_spread(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "numbers"
    assert main(["analyze", str(run_dir), "--out", str(out), "--no-plots"]) == 0
    assert [p.name for p in out.iterdir()] == ["analyze.json"]
    summary = json.loads((out / "analyze.json").read_text())
    state = load_file(run_dir / "model" / "model.safetensors")
    layers = sorted(k[: -len(".scale_in")] for k in state if k.endswith(".scale_in"))
    assert sorted(summary["expert_spread"]) == layers
    for name in layers:  # the channels' std over the experts / the layer's mean |scale|, both scales, in float64
        s = torch.cat([state[f"{name}.scale_in"], state[f"{name}.scale_out"]], dim=1).double()
        expected = (s.std(0).mean() / s.abs().mean()).item()
        assert summary["expert_spread"][name] == pytest.approx(expected, rel=1e-5) and expected > 0  # trained apart
    assert summary["expert_spread_mean"] == pytest.approx(sum(summary["expert_spread"].values()) / len(layers))
    assert f"mean spread {summary['expert_spread_mean']:.4f}" in capsys.readouterr().out


def test_blockwise_phase_ends_where_the_teachers_inputs_and_the_anneal_end():
    records = [{"tokens": 10, "blockwise": True}, {"tokens": 20, "blockwise": True, "teacher_share": 1.0},
               {"tokens": 30, "blockwise": True, "teacher_share": 0.5}, {"tokens": 40}]
    assert blockwise_phase(records) == (20, 30)
    assert blockwise_phase(records[:2] + records[3:]) == (20, 20) and blockwise_phase(records[3:]) == (0, 0)

@pytest.mark.parametrize("layers, message", [("7", "block 7 out of range"), ("*.nothing", "no BinaryMoS layer")])
def test_bad_layers_are_one_line_errors(run_dir, tmp_path, capsys, layers, message):
    assert main(["analyze", str(run_dir), "--out", str(tmp_path), "--layers", layers]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_model_without_binarymos_layers_is_refused(teacher_dir, tmp_path, capsys):
    assert main(["analyze", str(teacher_dir), "--out", str(tmp_path)]) == 2
    assert "no BinaryMoS layers" in capsys.readouterr().err


def test_a_gemma_run_is_analysed_after_its_bos_and_the_bos_is_the_first_label(text_file, tmp_path):
    teacher, run = tmp_path / "gemma", tmp_path / "run"
    tiny_lm("gemma3_text").save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    train(TrainConfig(model=str(teacher), data=str(text_file), out=str(run), seq_len=32, batch_size=2, max_steps=1,
                      num_experts=2, device="cpu", save_every=100))
    text = "The cat sat."
    assert main(["analyze", str(run), "--out", str(tmp_path / "pictures"), "--layers", "0", "--text", text]) == 0
    summary = json.loads((tmp_path / "pictures" / "analyze.json").read_text())
    assert summary["tokens"] == ["<s>", *text]
    model = load_model(str(run / "model"))[0]
    block = model.model.layers[0]
    with torch.no_grad():  # Gemma's embedding scales by sqrt(hidden size) itself
        x = block.input_layernorm(model.model.embed_tokens(torch.tensor([SPECIALS.index("<s>"), *encode(text)])))
        expected = torch.softmax(x @ block.self_attn.q_proj.router.weight.T, -1)
    torch.testing.assert_close(torch.tensor(summary["gates"]["model.layers.0.self_attn.q_proj"]), expected)


def test_a_log_without_loss_terms_draws_no_loss_curve(run_dir, tmp_path):
    """A log.jsonl of some other tool's records: the gates and scales are still drawn and analyze.json written."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)  # the module's run stays as it is for the other tests
    (run / "log.jsonl").write_text('{"step": 1, "note": "not a training record"}\n')
    summary = analyze(run, tmp_path / "pictures", layers="0")
    assert summary["log_records"] == 1 and json.loads((tmp_path / "pictures" / "analyze.json").read_text())
    assert not (tmp_path / "pictures" / "loss.png").exists()
    assert (tmp_path / "pictures" / "gates.png").read_bytes()[:8] == PNG_MAGIC


def test_log_lines_without_tokens_or_with_odd_values_are_left_out_of_the_loss_curve(run_dir, tmp_path):
    """Lines edited by hand (no token count, a loss that is text, booleans) drew a KeyError or a matplotlib error."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "log.jsonl").write_text('{"step": 1, "tokens": 64, "loss": 2.0, "kl": 1.5, "hidden": 0.5, "blockwise": true}\n'
                                   '{"step": 2, "loss": 1.9, "blockwise": true}\n'
                                   '{"step": 3, "tokens": 192, "loss": "low", "kl": 1.2, "hidden": true}\n'
                                   '{"step": 4, "tokens": 256, "loss": 1.5, "kl": 1.1, "hidden": 0.4}\n')
    summary = analyze(run, tmp_path / "pictures", layers="0")
    assert summary["log_records"] == 4 and summary["blockwise_until_tokens"] == 64
    assert (tmp_path / "pictures" / "loss.png").read_bytes()[:8] == PNG_MAGIC
