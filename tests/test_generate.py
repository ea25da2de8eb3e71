"""`binarymos generate`: greedy continuation equals an argmax loop over the unpacked model; sampling is seeded."""
import os
import shutil

import pytest
import torch
from conftest import exit_status
from pack_helpers import binarized, decode, encode, packed_dir, reference, tiny_lm

from binarymos import cli

PROMPT = "The cat sat on"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    model = binarized(tiny_lm("llama"))
    return reference(model), packed_dir(model, tmp_path_factory.mktemp("gen") / "packed")


def greedy(model, ids, steps, eos):
    """Recompute the whole sequence for every token (no cache), take the argmax, stop at eos."""
    ids = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            token = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        ids.append(token)
        if token == eos:
            break
    return ids


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    not shutil.which(os.environ.get("CXX", "g++")), reason="torch.compile on the CPU needs C++"))])  # --compile
def test_greedy_matches_reference(packed, capsys, monkeypatch, compiled):
    from binarymos import kernels

    real, calls = kernels._compiled_table_sums, []
    monkeypatch.setattr(kernels, "CPU_COMPILE", False)  # restored afterwards: --compile sets it for the process
    monkeypatch.setattr(kernels, "_compiled_table_sums", lambda: lambda *a: calls.append(1) or real()(*a))
    ref, directory = packed
    options = ["--compile"] if compiled else []
    assert cli.main(["generate", str(directory), PROMPT, "--max-new-tokens", "12", "--device", "cpu", *options]) == 0
    assert kernels.CPU_COMPILE is compiled and (len(calls) > 0) is compiled  # the lookups ran compiled, or never
    prompt = encode(PROMPT)
    want = decode(greedy(ref, prompt, 12, ref.config.eos_token_id)[len(prompt):])
    assert capsys.readouterr().out == want + "\n"


def test_sampling_is_seeded(packed, capsys):
    _, directory = packed
    runs = []
    for _ in range(2):
        args = ["generate", str(directory), PROMPT, "--max-new-tokens", "16", "--temperature", "1.5", "--top-p",
                "0.9", "--seed", "7"]
        assert cli.main(args) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and len(runs[0]) > 1


@pytest.mark.parametrize("args, message", [(["--top-p", "0"], "top-p"), (["--temperature", "-1"], "--temperature >= 0"),
                                           (["--max-new-tokens", "0"], "max-new-tokens")])
def test_bad_arguments(packed, capsys, args, message):
    assert exit_status(["generate", str(packed[1]), PROMPT, *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_an_empty_prompt_without_a_start_token_is_a_one_line_error(packed, capsys):
    assert cli.main(["generate", str(packed[1]), "", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the prompt is empty and this tokenizer adds no start token" in err


def test_missing_model(tmp_path, capsys):
    assert cli.main(["generate", str(tmp_path / "nothing"), PROMPT]) == 2
    assert "no such file or directory" in capsys.readouterr().err
