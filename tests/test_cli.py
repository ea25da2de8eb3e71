"""The `binarymos train` and `eval` verbs end to end, and one-line errors for bad input."""
import json

import pytest
import torch
from conftest import exit_status, killed_after_first_checkpoint, sigterm_during_step

from binarymos.cli import main


def run(capsys, *argv):
    code = exit_status(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_reports_perplexity_before_and_after(teacher_dir, text_file, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, _ = run(capsys, "train", "--model", str(teacher_dir), "--data", str(text_file), "--out", str(out_dir),
                       "-E", "2", "--seq-len", "32", "--batch-size", "2", "--max-steps", "3", "--device", "cpu",
                       "--ppl", "wikitext2", "--eval-seq-len", "64", "--eval-windows", "2")
    assert code == 0
    results = json.loads((out_dir / "results.json").read_text())
    assert results["eval_seq_len"] == 64 and results["eval_windows"] == 2
    rows = results["perplexity"]
    assert list(rows) == ["full precision", "static sign", "BinaryMoS (E=2) before training", "BinaryMoS (E=2) trained"]
    assert all(value > 1 for row in rows.values() for value in row.values())
    assert "| static sign |" in out and (out_dir / "model" / "config.json").exists()


def test_train_reports_the_runs_own_start_before_training(teacher_dir, text_file, tmp_path, capsys):
    """The "before training" row is the student train starts from, its experts' random spread included."""
    from binarymos.eval import perplexity
    from binarymos.train import TrainConfig, prepare

    options = dict(model=str(teacher_dir), data=str(text_file), num_experts=2, seq_len=32, batch_size=2, max_steps=1,
                   device="cpu", expert_init_noise=0.5, seed=3)
    code, _, _ = run(capsys, "train", "--model", str(teacher_dir), "--data", str(text_file), "--out", str(tmp_path / "r"),
                     "-E", "2", "--seq-len", "32", "--batch-size", "2", "--max-steps", "1", "--device", "cpu",
                     "--expert-init-noise", "0.5", "--seed", "3", "--ppl", "wikitext2", "--eval-seq-len", "64",
                     "--eval-windows", "2")
    assert code == 0
    reported = json.loads((tmp_path / "r" / "results.json").read_text())["perplexity"]["BinaryMoS (E=2) before training"]
    _, student, tokenizer, _ = prepare(TrainConfig(**options, out=str(tmp_path / "p")))
    expected = perplexity(student, tokenizer, "wikitext2", 64, 2, None)
    assert reported["wikitext2"] == pytest.approx(expected, rel=1e-5)


def test_eval_prints_and_writes_perplexity(teacher_dir, tmp_path, capsys):
    code, out, _ = run(capsys, "eval", "--model", str(teacher_dir), "--ppl", "wikitext2,c4", "--eval-seq-len", "64",
                       "--eval-windows", "2", "--device", "cpu", "--json", str(tmp_path / "r.json"))
    assert code == 0
    values = json.loads((tmp_path / "r.json").read_text())[str(teacher_dir)]
    assert set(values) == {"wikitext2", "c4"} and all(v > 1 for v in values.values())
    assert "wikitext2 ppl" in out


def test_eval_sign_of_a_packed_model_is_a_one_line_error(tmp_path, capsys):
    """--sign binarizes a full-precision model; a packed E=2 one would have been evaluated as it is, as "sign"."""
    from conftest import tiny_model
    from pack_helpers import binarized, packed_dir

    directory = packed_dir(binarized(tiny_model("llama")), tmp_path / "packed")
    code, _, err = run(capsys, "eval", "--model", str(directory), "--sign", "--ppl", "wikitext2", "--device", "cpu")
    assert code == 2 and err.count("\n") == 1
    assert "binarized already (PackedBinaryMoSLinear); binarize sign takes a full-precision model" in err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "/no/such/model"], "no such file or directory"),
    (["eval", "--model", "/no/such/model.gguf"], "no such file or directory"),
    (["train", "--data", "nosuchdata", "--max-steps", "1"], "unknown data"),
    (["train", "--data", "/no/such/text.txt", "--max-steps", "1"], "no such file"),
    (["train", "-E", "0"], "argument --num-experts/-E: must be an integer >= 1, got '0'"),
    (["pack", "m", "--out", "o", "-E", "0"], "argument --num-experts/-E: must be an integer >= 1"),  # was E=4
    (["eval", "--eval-windows", "0"], "argument --eval-windows: must be an integer >= 1"),
    (["eval", "--eval-windows", "-1"], "argument --eval-windows: must be an integer >= 1"),
    (["eval", "--eval-seq-len", "1"], "argument --eval-seq-len: must be an integer >= 2"),  # was perplexity nan
    (["eval", "--ppl", ""], "argument --ppl: names no evaluation set"),  # did nothing, exit 0
    (["generate", "m", "hi", "--temperature", "nan"], "argument --temperature: must be a finite number"),
    (["generate", "m", "hi", "--top-p", "inf"], "argument --top-p: must be a finite number"),
    (["plan", "--config", "llama-7b", "--gpu-memory", "0GB"], "--gpu-memory: the size '0GB' is not > 0"),
    (["plan", "--config", "llama-7b", "--gpu-memory", "lots"], "--gpu-memory: cannot read the size 'lots'"),
    (["analyze", "run", "--out", "o", "--text", " "], "analyze: --text is empty"),
    (["eval", "--device", "cuda:99"], "--device cuda:99: this machine has"),
    (["train", "--resume", "--out", "/tmp/binarymos-no-such-run"], "no checkpoint"),
    (["train", "--lr-weight", "nan", "--max-steps", "1"], "lr_weight, lr_scale, grad_clip must be > 0"),
    (["train", "--kl-weight", "-1", "--max-steps", "1"], "must be >= 0 (all finite)"),
    (["train", "--warmup", "2", "--max-steps", "1"], "warmup a fraction in [0, 1]"),
    (["train", "--ste-clip", "nan", "--max-steps", "1"], "ste_clip > 0"),
])
def test_bad_input_is_one_line_error(argv, message, teacher_dir, capsys):
    if argv[0] == "train" and "--model" not in argv:
        argv = argv + ["--model", str(teacher_dir), "--device", "cpu"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("binarymos: error: ") and message in err


def test_train_options_default_to_the_training_configs_defaults():
    """`binarymos train` with no options trains what train(TrainConfig()) trains."""
    import dataclasses

    from binarymos.cli import build_parser
    from binarymos.train import TrainConfig

    args = vars(build_parser().parse_args(["train"]))
    assert {f.name: args[f.name] for f in dataclasses.fields(TrainConfig)} == \
        {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def test_train_resume_needs_only_the_run_directory(teacher_dir, text_file, tmp_path, capsys, monkeypatch):
    options = ["--model", str(teacher_dir), "--data", str(text_file), "-E", "2", "--seq-len", "32", "--batch-size", "2",
               "--max-steps", "4", "--save-every", "2", "--lr-weight", "1e-3", "--device", "cpu"]
    assert run(capsys, "train", *options, "--out", str(tmp_path / "full"))[0] == 0
    killed_after_first_checkpoint(monkeypatch)
    assert run(capsys, "train", *options, "--out", str(tmp_path / "killed"))[0] == 130
    monkeypatch.undo()
    assert run(capsys, "train", "--out", str(tmp_path / "killed"), "--resume")[0] == 0
    full, resumed = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("full", "killed"))
    assert resumed["step"] == 4 and resumed["config"] == {**full["config"], "out": str(tmp_path / "killed"),
                                                         "resume": True}
    assert all(torch.equal(full["trainable"][k], resumed["trainable"][k]) for k in full["trainable"])
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "killed"), "--resume", "-E", "3")
    assert code == 2 and "started with num_experts 2 (given 3)" in err
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "killed"), "--resume", "-E", "4")  # the default
    assert code == 2 and "started with num_experts 2 (given 4)" in err



def test_a_run_started_with_cuda_graphs_resumes_without_them(teacher_dir, text_file, tmp_path, capsys, monkeypatch):
    """--cuda-graphs changes how fast a run trains, not what: a run started with it (on a GPU whose model's step a
    graph could not hold, say) resumes with --no-cuda-graphs, here on the CPU."""
    options = ["--model", str(teacher_dir), "--data", str(text_file), "-E", "2", "--seq-len", "32", "--batch-size", "2",
               "--max-steps", "4", "--save-every", "2", "--device", "cpu", "--out", str(tmp_path / "run")]
    killed_after_first_checkpoint(monkeypatch)
    assert run(capsys, "train", *options)[0] == 130
    monkeypatch.undo()
    settings = tmp_path / "run" / "train_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "cuda_graphs": True}))
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "run"), "--resume")
    assert code == 2 and "cuda_graphs needs one process on a GPU" in err
    assert run(capsys, "train", "--out", str(tmp_path / "run"), "--resume", "--no-cuda-graphs")[0] == 0
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4

def test_train_cache_teacher_builds_the_cache_and_a_resume_may_leave_it_out(teacher_dir, text_file, tmp_path, capsys,
                                                                          monkeypatch):
    """--cache-teacher reaches the run (its cache's size in the run's settings), and a resume without it continues."""
    options = ["--model", str(teacher_dir), "--data", str(text_file), "-E", "2", "--seq-len", "32", "--batch-size", "2",
               "--max-steps", "4", "--save-every", "2", "--device", "cpu", "--out", str(tmp_path / "run")]
    killed_after_first_checkpoint(monkeypatch)
    assert run(capsys, "train", *options, "--cache-teacher")[0] == 130
    monkeypatch.undo()
    settings = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert settings["cache_teacher"] is True and settings["teacher_cache_gb"] > 0
    assert run(capsys, "train", "--out", str(tmp_path / "run"), "--resume", "--no-cache-teacher")[0] == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["cache_teacher"] is False


def test_a_model_whose_weights_file_is_cut_short_is_a_one_line_error(teacher_dir, tmp_path, capsys):
    import shutil

    broken = shutil.copytree(teacher_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    code, _, err = run(capsys, "generate", str(broken), "hello", "--device", "cpu")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"binarymos: error: {broken}: cannot load a model (")


@pytest.mark.parametrize("damage", [b"not a checkpoint\n", None])  # another file; a checkpoint cut short
def test_resuming_from_a_damaged_checkpoint_is_a_one_line_error_that_keeps_the_file(damage, teacher_dir, text_file,
                                                                                     tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, "train", "--model", str(teacher_dir), "--data", str(text_file), "--seq-len", "32",
               "--batch-size", "2", "--max-steps", "2", "--device", "cpu", "--out", str(out))[0] == 0
    checkpoint = out / "checkpoint.pt"
    damaged = damage or checkpoint.read_bytes()[:1000]
    checkpoint.write_bytes(damaged)
    code, _, err = run(capsys, "train", "--out", str(out), "--resume")
    assert code == 2 and err.count("\n") == 1
    assert f"{checkpoint}: not a readable checkpoint (" in err
    assert checkpoint.read_bytes() == damaged and (out / "model").is_dir()  # nothing saved is touched


@pytest.mark.parametrize("settings, message", [(None, "train_config.json is missing or empty, so the run's settings "
                                                       "are unknown"),
                                               ("[4]", "train_config.json: not a run's settings (a JSON object")])
def test_resuming_a_run_without_readable_settings_is_a_one_line_error(settings, message, teacher_dir, text_file,
                                                                      tmp_path, capsys):
    """Without its train_config.json a resumed run took every default, the default model's too."""
    out = tmp_path / "run"
    assert run(capsys, "train", "--model", str(teacher_dir), "--data", str(text_file), "--seq-len", "32",
               "--batch-size", "2", "--max-steps", "2", "--device", "cpu", "--out", str(out))[0] == 0
    config = out / "train_config.json"
    config.unlink() if settings is None else config.write_text(settings)
    saved = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = run(capsys, "train", "--out", str(out), "--resume", "--max-steps", "3")
    assert code == 2 and err.count("\n") == 1 and message in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == saved


def test_a_model_whose_config_is_not_json_is_a_one_line_error_naming_it(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama", ')
    code, _, err = run(capsys, "eval", "--model", str(tmp_path / "m"), "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and f"{tmp_path / 'm'}: cannot load a model (Expecting" in err


def test_a_model_without_its_tokenizer_is_a_one_line_error_naming_it(tmp_path, capsys):
    from conftest import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "m")  # config and weights, no tokenizer files
    code, _, err = run(capsys, "eval", "--model", str(tmp_path / "m"), "--device", "cpu")
    assert code == 2 and err.count("\n") == 1
    assert f"{tmp_path / 'm'}: cannot load its tokenizer; are its tokenizer files there?" in err


def test_train_into_a_finished_run_without_its_checkpoint_is_refused(teacher_dir, text_file, tmp_path, capsys):
    """The model and log of a run whose checkpoint.pt is gone are not overwritten by a new run."""
    options = ["--model", str(teacher_dir), "--data", str(text_file), "--seq-len", "32", "--batch-size", "2",
               "--max-steps", "1", "--device", "cpu", "--out", str(tmp_path / "run")]
    assert run(capsys, "train", *options)[0] == 0
    (tmp_path / "run" / "checkpoint.pt").unlink()
    saved = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    code, _, err = run(capsys, "train", *options)
    assert code == 2 and err.count("\n") == 1 and "holds a run already" in err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == saved


def test_train_options_given_tells_a_default_given_on_purpose_from_one_left_out():
    from binarymos.cli import _train_options_given

    argv = ["train", "--out", "r", "--resume", "-E", "4", "--no-grad-checkpointing", "--eval-windows", "3"]
    assert _train_options_given(argv) == {"out", "resume", "num_experts", "grad_checkpointing"}


def test_resuming_a_run_whose_settings_are_damaged_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "train_config.json").write_text('{"model": "x"')
    code, _, err = run(capsys, "train", "--out", str(tmp_path), "--resume")
    assert code == 2 and err.count("\n") == 1 and "train_config.json: not a run's settings" in err


def test_train_strategy_reaches_the_training_config():
    from binarymos.cli import _train_config, build_parser

    for strategy in ("auto", "ddp", "fsdp"):
        assert _train_config(build_parser().parse_args(["train", "--strategy", strategy])).strategy == strategy
    assert _train_config(build_parser().parse_args(["train"])).strategy == "auto"


@pytest.mark.parametrize("argv", [["eval", "--ppl", "ptb"], ["train", "--max-steps", "many"], ["nosuchverb"],
                                  ["train", "--strategy", "zero3"]])
def test_bad_arguments_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("binarymos: error: ") and err.count("\n") == 1


def test_train_stopped_by_sigterm_exits_143_with_one_line_and_keeps_the_step(teacher_dir, text_file, tmp_path, capsys,
                                                                     monkeypatch):
    argv = ["train", "--model", str(teacher_dir), "--data", str(text_file), "--out", str(tmp_path / "run"),
            "-E", "2", "--seq-len", "32", "--batch-size", "2", "--max-minutes", "0.5", "--device", "cpu"]
    sigterm_during_step(monkeypatch, 0)
    code, _, err = run(capsys, *argv)
    assert code == 143 and err.splitlines()[-1].startswith("binarymos: stopped by SIGTERM after step 1; ")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 1


def test_version_is_the_packages(capsys):
    import tomllib
    from pathlib import Path

    version = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"binarymos {version}\n"
