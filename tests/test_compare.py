"""`binarymos compare` on a tiny model, its job runner, and one-line errors of the issue-5 options."""
import json
import time

import pytest
from transformers import AutoModelForCausalLM

from binarymos.cli import main
from binarymos.compare import method_options, run_jobs, study
from binarymos.convert import decoder_blocks


def packed_bytes(model_dir, experts):
    """Bytes by docs/PACKING.md's rule, counted from the model itself: dense tensors 16-bit, each decoder
    linear as packed signs plus its 16-bit scales (static sign: one per row; BinaryMoS: E per side + router)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    linears = [m for m in decoder_blocks(model)[1].modules() if m.__class__.__name__ == "Linear"]
    dense = 2 * (sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for m in linears))
    signs = sum(m.out_features * -(-m.in_features // 8) for m in linears)
    if experts is None:
        return dense + signs + sum(2 * m.out_features for m in linears)
    router = sum(2 * experts * m.in_features for m in linears) if experts > 1 else 0
    return dense + signs + router + sum(2 * experts * (m.in_features + m.out_features) for m in linears)


def test_tiny_compare_writes_json_and_a_table(teacher_dir, text_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(teacher_dir), "--methods", "sign,mos2", "--max-tokens", "128",
                 "--data", str(text_file), "--train-args=--seq-len 32 --batch-size 2", "--ppl", "wikitext2",
                 "--eval-seq-len", "64", "--eval-windows", "2", "--device", "cpu", "--parallel", "2",
                 "--threads", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["device"] == "cpu" and list(report["runs"]) == ["sign", "mos2"]
    sign, mos2 = report["runs"]["sign"], report["runs"]["mos2"]
    assert sign["status"] == mos2["status"] == "ok", (out / "mos2.log").read_text()[-2000:]
    assert sign["wikitext2"] > 1 and mos2["wikitext2"] > 1
    assert (sign["trained_tokens"], mos2["trained_tokens"]) == (0, 128)  # 2 steps of 2 x 32 tokens
    assert mos2["train_minutes"] > 0 and mos2["final_kl"] >= 0
    assert sign["bytes"] == packed_bytes(teacher_dir, None) and mos2["bytes"] == packed_bytes(teacher_dir, 2)
    table = (out / "compare.md").read_text()
    assert "| cpu-minutes |" in table and table.count("| ok |") == 2
    assert f"| sign | `sign` | {sign['wikitext2']:,.2f} | 0 |" in table
    assert f"| mos2 | `-E 2` | {mos2['wikitext2']:,.2f} | 128 |" in table
    assert table in capsys.readouterr().out


def test_methods_map_to_train_options():
    assert [method_options(m) for m in ("fp", "sign", "onebit", "mos2", "mos8")] == [
        None, None, ["-E", "1"], ["-E", "2"], ["-E", "8"]]
    for bad in ("mos0", "mos", "gptq"):
        with pytest.raises(ValueError, match="unknown method"):
            method_options(bad)


def test_runner_gives_each_slot_its_gpu_and_kills_at_the_deadline(tmp_path):
    gpu = lambda n: [["bash", "-c", f"echo $CUDA_VISIBLE_DEVICES $OMP_NUM_THREADS > {tmp_path / n}"]]
    jobs = [("a", gpu("a")), ("b", gpu("b")), ("slow", [["sleep", "30"]])]
    start = time.time()
    codes = run_jobs(jobs, tmp_path, parallel=2, threads=3, deadline=time.time() + 3, gpus=["5", "7"])
    assert time.time() - start < 10 and codes["slow"][0] == -9
    assert codes["a"][0] == codes["b"][0] == 0
    assert {(tmp_path / n).read_text().split()[0] for n in "ab"} == {"5", "7"}  # two slots at once: both GPUs
    assert (tmp_path / "a").read_text().split()[1] == "3"


def test_jobs_the_deadline_leaves_unstarted_are_reported_and_the_study_still_written(teacher_dir, tmp_path):
    jobs = [("slow", [["sleep", "30"]]), ("late", [["touch", str(tmp_path / "late-ran")]])]
    codes = run_jobs(jobs, tmp_path, parallel=1, deadline=time.time() + 1)
    assert codes == {"slow": (-9, pytest.approx(1, abs=1)), "late": (None, 0.0)}
    assert not (tmp_path / "late-ran").exists()
    report = study({"fp": "fp", "sign": "sign"}, str(teacher_dir), [], ["--ppl", "wikitext2"], tmp_path / "study",
                   ["wikitext2"], "cpu", deadline=0)
    assert {r["status"] for r in report["runs"].values()} == {"not started by the deadline"}
    assert json.loads((tmp_path / "study" / "compare.json").read_text())["runs"].keys() == {"fp", "sign"}
    assert "not started by the deadline" in (tmp_path / "study" / "compare.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["compare", "--methods", "fp,gptq", "--max-tokens", "10"], "unknown method 'gptq'"),
    (["compare", "--methods", "mos2", "--max-tokens", "10", "--train-args=--resume"], "cannot hold --resume"),
    (["train", "--data", "teacher+teacher", "--max-steps", "1"], "bad data"),
    (["train", "--teacher-temperature", "-1", "--max-steps", "1"], "teacher_temperature must be >= 0"),
    (["analyze", "/no/such/run", "--out", "/tmp/binarymos-no-such-out"], "neither a run directory"),
])
def test_bad_input_is_one_line_error(argv, message, teacher_dir, capsys):
    code = main(argv + ["--model", str(teacher_dir), "--device", "cpu"] if argv[0] != "analyze" else argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("binarymos: error: ") and message in err


@pytest.mark.parametrize("option", [["--parallel", "-1"], ["--parallel", "0"], ["--threads", "0"],
                                    ["--deadline", "0"], ["--deadline", "nan"]])
def test_compare_refuses_slots_threads_and_deadlines_that_run_nothing(option, teacher_dir, tmp_path, capsys):
    """--parallel -1 waited forever for a free slot; a deadline of 0 or NaN started nothing and exited 0."""
    code = main(["compare", "--model", str(teacher_dir), "--max-tokens", "10", "--out", str(tmp_path / "c"), *option])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--parallel and --threads must be >= 1" in err


def test_compare_into_an_earlier_comparison_is_refused_and_keeps_it(teacher_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text('{"earlier": true}')
    code = main(["compare", "--model", str(teacher_dir), "--max-tokens", "10", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "holds a comparison already" in err
    assert (out / "compare.json").read_text() == '{"earlier": true}'


def test_compare_with_failed_runs_writes_its_table_and_exits_2(teacher_dir, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("binarymos.compare.run_jobs", lambda jobs, *a, **k: {name: (1, 0.5) for name, _ in jobs})
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(teacher_dir), "--methods", "fp,mos2", "--max-tokens", "10",
                 "--data", str(text_file), "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and "failed (exit 1)" in captured.out
    assert captured.err.count("\n") == 1 and "2 of 2 runs failed (fp, mos2)" in captured.err
    assert {r["status"] for r in json.loads((out / "compare.json").read_text())["runs"].values()} == {"failed (exit 1)"}


def test_bad_train_args_of_compare_are_one_line_errors(teacher_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--model", str(teacher_dir), "--max-tokens", "10", "--train-args=--no-such-option"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--no-such-option" in err


def test_compare_at_a_time_budget_trains_each_method_for_its_minutes(teacher_dir, text_file, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(teacher_dir), "--methods", "onebit", "--max-minutes", "0.03",
                 "--data", str(text_file), "--train-args=--seq-len 32 --batch-size 2", "--ppl", "wikitext2",
                 "--eval-seq-len", "64", "--eval-windows", "1", "--device", "cpu", "--out", str(out)])
    assert code == 0
    onebit = json.loads((out / "compare.json").read_text())["runs"]["onebit"]
    log = [json.loads(line) for line in (out / "onebit" / "log.jsonl").read_text().splitlines()]
    assert onebit["status"] == "ok" and onebit["trained_tokens"] == log[-1]["tokens"] == 64 * log[-1]["step"] > 0
    assert onebit["train_minutes"] == log[-1]["train_seconds"] / 60 and onebit["train_minutes"] > 0.02
