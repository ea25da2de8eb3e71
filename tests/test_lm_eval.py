"""`binarymos eval --tasks`: lm-evaluation-harness 0.4 on a local multiple-choice task, checked by hand."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pack_helpers import binarized, encode, packed_dir, reference, tiny_lm, tiny_tokenizer

from binarymos import cli

pytest.importorskip("lm_eval")
REPO = Path(__file__).resolve().parents[1]
TASK = "binarymos_tiny_mc"


def choice_logprobs(model, question, choices):
    """log p(" " + choice | question) for each choice, summed over its tokens, in float64."""
    out = []
    for choice in choices:
        context, continuation = encode(question), encode(" " + choice)
        with torch.no_grad():
            logits = model(torch.tensor([context + continuation])).logits[0].double()
        logp = torch.log_softmax(logits[len(context) - 1:-1], dim=-1)
        out.append(logp[torch.arange(len(continuation)), continuation].sum().item())
    return np.array(out)


def expected_accuracy(model):
    data = REPO / "tests" / "lm_eval_tasks" / f"{TASK}.jsonl"
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    acc, acc_norm = [], []
    for doc in docs:
        lls = choice_logprobs(model, doc["question"], doc["choices"])
        lengths = np.array([len(c) for c in doc["choices"]], dtype=float)
        acc.append(lls.argmax() == doc["answer"])
        acc_norm.append((lls / lengths).argmax() == doc["answer"])
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}


def test_local_task_through_lm_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    model = binarized(tiny_lm("llama"))
    want = expected_accuracy(reference(model))
    directory = packed_dir(model, tmp_path / "packed")
    out = tmp_path / "results.json"
    assert cli.main(["eval", "--model", str(directory), "--tasks", TASK, "--task-path", "tests/lm_eval_tasks",
                     "--device", "cpu", "--json", str(out)]) == 0
    got = json.loads(out.read_text())[str(directory)][TASK]
    assert got == pytest.approx(want, abs=1e-9)
    assert f"| {TASK} |" in capsys.readouterr().out


def test_unknown_task(tmp_path, capsys):
    directory = packed_dir(binarized(tiny_lm("llama")), tmp_path / "packed")
    assert cli.main(["eval", "--model", str(directory), "--tasks", "no_such_task", "--device", "cpu"]) == 2
    assert "unknown lm-eval task(s): no_such_task" in capsys.readouterr().err


def test_paper_names_the_fields_six_tasks(monkeypatch):
    import lm_eval

    from binarymos.harness import zero_shot

    asked = []

    def simple_evaluate(model, tasks, **kwargs):  # the six need their data from the hub: stand in for the run
        asked.extend(tasks)
        return {"results": {t: {"acc,none": 0.5, "acc_norm,none": 0.25} for t in tasks}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    got = zero_shot(tiny_lm("llama"), tiny_tokenizer(), ["paper", "piqa"])
    assert asked == ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge"]
    assert got["winogrande"] == {"acc": 0.5, "acc_norm": 0.25}
