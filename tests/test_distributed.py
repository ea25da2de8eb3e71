"""The FSDP2 and DDP paths on the CPU: 2 torchrun ranks over gloo against one plain process.

One torchrun launch per strategy (2 ranks, OMP_NUM_THREADS=1) runs a 6-step distillation and a second
one that is killed right after its step-3 checkpoint; the plain-process references run in the test process.
The reference for a 2-rank run with batch 2 is one process with batch 2 and grad_accum 2: the same
micro-batches, so the same loss and weights up to rounding. A second launch runs the command line
with --ppl on the text a tied-embedding teacher writes.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from binarymos.train import TrainConfig, train

WORKER = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist, transformers
    from binarymos import train as train_mod
    from binarymos.nn import BinaryMoSLinear
    from binarymos.train import TrainConfig, train

    base, root = json.loads(sys.argv[1]), sys.argv[2]
    calls = {"from_pretrained": 0, "from_linear": 0}  # reading the weights, binarizing them
    def counted(cls, name):
        real = getattr(cls, name)
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        setattr(cls, name, call)
    counted(transformers.AutoModelForCausalLM, "from_pretrained")
    counted(BinaryMoSLinear, "from_linear")
    student = train(TrainConfig(**base, out=f"{root}/full"))
    rank = dist.get_rank()
    with open(f"{root}/calls-rank{rank}.json", "w") as f:
        json.dump(calls, f)
    torch.save(dict(student.named_buffers()), f"{root}/buffers-rank{rank}.pt")
    local = lambda tensors: sum(getattr(t, "to_local", lambda: t)().numel() * t.element_size() for t in tensors)
    params = [p for p in student.parameters()]
    with open(f"{root}/bytes-rank{rank}.json", "w") as f:
        json.dump({"params": local(params), "trainable": local(p for p in params if p.requires_grad)}, f)

    real_save = train_mod.save_checkpoint
    def save_then_die(*args, **kwargs):  # killed right after the first checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt
    train_mod.save_checkpoint = save_then_die
    try:
        train(TrainConfig(**base, out=f"{root}/killed"))
    except KeyboardInterrupt:
        pass
    dist.destroy_process_group()
''')

CLI_WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    from binarymos import cli, synth, train as train_mod

    root, rank = sys.argv[1], os.environ["RANK"]
    sampled, real_sample, real_prepare = [], synth.sample, train_mod.prepare
    def counted_sample(*args, **kwargs):
        sampled.append(1)
        return real_sample(*args, **kwargs)
    def prepare_keeping_blocks(*args, **kwargs):
        prepared = real_prepare(*args, **kwargs)
        torch.save(prepared[3], f"{root}/blocks-rank{rank}.pt")
        return prepared
    synth.sample, train_mod.prepare = counted_sample, prepare_keeping_blocks
    code = cli.main(sys.argv[2:])
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump({"code": code, "sampled": len(sampled)}, f)
''')


def base_cfg(teacher_dir, text_file, **kw):
    return dict(model=str(teacher_dir), data=str(text_file), seq_len=32, batch_size=2, max_steps=6, num_experts=2,
                save_every=3, lr_weight=1e-3, lr_scale=1e-2, device="cpu", **kw)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_weights(got: dict, want: dict) -> None:
    """Latent weights to 1e-5; scales and routers to 5e-4: AdamW normalises their near-zero gradients, so
    rounding differences of the gradient reduction grow to a fraction of lr_scale (1e-2) per step."""
    for name in want:
        latent = name.endswith(".weight") and ".router." not in name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5 if latent else 5e-4, msg=name)


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def torchrun(root: Path, worker: str, *args: str, **env) -> dict[str, dict[str, str]]:
    """Run ``worker`` on 2 gloo ranks; rank -> {"stdout": ..., "stderr": ...} of its redirected output."""
    (root / "worker.py").write_text(worker)
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
               **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--log-dir", str(root / "logs"), "--redirects", "3", str(root / "worker.py"), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    logs = {p.parent.name: {p.stem: p.read_text() for p in p.parent.glob("std*.log")}
            for p in (root / "logs").rglob("stderr.log")}
    assert done.returncode == 0, done.stderr[-3000:] + "\n".join(log["stderr"] for log in logs.values())[-3000:]
    return logs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, teacher_dir, text_file):
    root = tmp_path_factory.mktemp("two_ranks")
    logs = torchrun(root, WORKER, json.dumps(base_cfg(teacher_dir, text_file)), str(root))
    return root, {rank: log["stderr"] for rank, log in logs.items()}


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory, teacher_dir, text_file):
    root = tmp_path_factory.mktemp("ddp_ranks")
    torchrun(root, WORKER, json.dumps(base_cfg(teacher_dir, text_file, strategy="ddp")), str(root))
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, text_file):
    """One plain process, the same global batch (2 x grad_accum 2) and seed."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return out, trainable(train(TrainConfig(**base_cfg(teacher_dir, text_file, grad_accum=2), out=str(out))))


def test_two_ranks_match_one_process_with_the_same_global_batch(two_ranks, reference):
    from binarymos.models import load_model

    (root, _), (ref_run, ref_weights) = two_ranks, reference
    ours, ref = log(root / "full"), log(ref_run)
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in ref]
    for a, b in zip(ours, ref):
        for key in ("loss", "kl", "hidden"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    model, _ = load_model(str(root / "full" / "model"))  # gathered from the shards by rank 0
    assert_same_weights(trainable(model), ref_weights)


def test_two_rank_checkpoint_resumes_in_one_process(two_ranks, reference, teacher_dir, text_file):
    (root, _), (_, ref_weights) = two_ranks, reference
    killed = root / "killed"
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-00000003"]
    assert [r["step"] for r in log(killed)] == [1, 2, 3]
    cfg = TrainConfig(**base_cfg(teacher_dir, text_file), out=str(killed), resume=True)  # grad_accum 1, as given
    resumed = trainable(train(cfg))
    assert cfg.grad_accum == 2  # rescaled to keep the checkpoint's global batch of 4 sequences
    assert [r["step"] for r in log(killed)] == [1, 2, 3, 4, 5, 6]
    assert_same_weights(resumed, ref_weights)


def test_only_rank_0_writes_the_log_and_the_progress_bar(two_ranks):
    root, rank_logs = two_ranks
    assert [r["step"] for r in log(root / "full")] == [1, 2, 3, 4, 5, 6]
    assert set(rank_logs) == {"0", "1"}
    assert "distil" in rank_logs["0"] and "distil" not in rank_logs["1"]
    assert sorted(p.name for p in (root / "full").iterdir()) == ["checkpoints", "log.jsonl", "model",
                                                                 "train_config.json"]


def test_each_rank_holds_the_planned_half_of_the_student(two_ranks, teacher_dir):
    from binarymos.footprint import load_config
    from binarymos.plan import count, estimate

    root, _ = two_ranks
    counts = count(load_config(str(teacher_dir)), num_experts=2)
    terms = estimate(counts, gpus=2, seq_len=32, batch=2, a=4, teacher_bytes=4)["terms"]
    ranks = [json.loads((root / f"bytes-rank{r}.json").read_text()) for r in (0, 1)]
    assert sum(r["params"] for r in ranks) == 2 * terms["weights"]  # fp32: the whole student, once
    assert sum(r["trainable"] for r in ranks) == 2 * terms["gradients"]
    for r in ranks:  # dim-0 chunks: a rank holds half, give or take the uneven rows
        assert r["params"] == pytest.approx(terms["weights"], rel=0.1)


def test_only_rank_0_reads_and_binarizes_the_weights_the_others_build_on_meta(two_ranks, teacher_dir):
    from binarymos.models import load_model

    root, _ = two_ranks
    calls = [json.loads((root / f"calls-rank{r}.json").read_text()) for r in (0, 1)]
    assert calls[0]["from_pretrained"] == 1 and calls[0]["from_linear"] > 0
    assert calls[1] == {"from_pretrained": 0, "from_linear": 0}
    # non-persistent buffers (rotary inv_freq) are in no state dict: rank 1 got rank 0's, not meta garbage
    want = dict(load_model(str(teacher_dir))[0].named_buffers())
    for r in (0, 1):
        got = torch.load(root / f"buffers-rank{r}.pt", weights_only=True)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), r


@pytest.fixture(scope="module")
def tied_teacher_dir(tmp_path_factory):
    """The tiny LLaMA with its LM head tied to its embeddings (as SmolLM2's is)."""
    from conftest import tiny_config
    from pack_helpers import ALPHABET, SPECIALS, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.vocab_size, config.tie_word_embeddings = len(SPECIALS) + len(ALPHABET), True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = tmp_path_factory.mktemp("tied")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


TEACHER_TEXT = ["--data", "teacher", "--teacher-samples", "8", "--seq-len", "32", "-E", "2", "--batch-size", "2",
                "--max-steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tied_teacher_dir):
    """`binarymos train --data teacher --ppl wikitext2` on 2 ranks, with a fresh teacher-text cache."""
    root = tmp_path_factory.mktemp("cli")
    argv = ["train", "--model", str(tied_teacher_dir), *TEACHER_TEXT, "--out", str(root / "run"),
            "--ppl", "wikitext2", "--eval-seq-len", "32", "--eval-windows", "4"]
    logs = torchrun(root, CLI_WORKER, str(root), *argv, BINARYMOS_CACHE=str(root / "cache"))
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in ranks] == [0, 0], logs["0"]["stderr"][-2000:]
    return root, logs, ranks


def test_teacher_text_is_sampled_once_by_rank_0_and_every_rank_trains_on_it(cli_run, tied_teacher_dir):
    from binarymos import synth
    from binarymos.models import load_model

    root, _, ranks = cli_run
    assert [r["sampled"] for r in ranks] == [1, 0]
    assert len(list((root / "cache" / "teacher").iterdir())) == 1
    teacher, tokenizer = load_model(str(tied_teacher_dir))
    want = synth.as_blocks(synth.sample(teacher, tokenizer, count=8, seq_len=32), 32)
    for r in (0, 1):
        assert torch.equal(torch.load(root / f"blocks-rank{r}.pt", weights_only=True), want), r


def test_tied_teacher_on_its_own_text_trains_as_one_process_does(cli_run, tied_teacher_dir, tmp_path, monkeypatch):
    from binarymos.cli import _train_config, build_parser

    monkeypatch.setenv("BINARYMOS_CACHE", str(tmp_path / "cache"))  # sampled anew
    args = build_parser().parse_args(["train", "--model", str(tied_teacher_dir), *TEACHER_TEXT, "--grad-accum", "2",
                                      "--out", str(tmp_path / "run")])
    train(_train_config(args))
    ours, ref = log(cli_run[0] / "run"), log(tmp_path / "run")
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in ref]
    for a, b in zip(ours, ref):
        for key in ("loss", "kl", "hidden"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_perplexity_is_reported_once_by_rank_0_from_the_saved_model(cli_run, tied_teacher_dir):
    from binarymos.eval import perplexity
    from binarymos.models import load_model

    root, logs, _ = cli_run
    assert logs["0"]["stdout"].count("| model | wikitext2 ppl |") == 1
    assert "ppl" not in logs["1"]["stdout"] and "saved" not in logs["1"]["stdout"]
    rows = json.loads((root / "run" / "results.json").read_text())["perplexity"]
    for name, model in (("full precision", tied_teacher_dir), ("BinaryMoS (E=2) trained", root / "run" / "model")):
        model, tokenizer = load_model(str(model))
        want = perplexity(model, tokenizer, "wikitext2", seq_len=32, max_windows=4)
        assert rows[name]["wikitext2"] == pytest.approx(want, rel=1e-6), name
        assert f"{want:,.2f}" in logs["0"]["stdout"]


def test_ddp_ranks_match_one_process_with_the_same_global_batch(ddp_ranks, reference):
    from binarymos.models import load_model

    (ref_run, ref_weights), run = reference, ddp_ranks / "full"
    assert json.loads((run / "train_config.json").read_text())["strategy"] == "ddp"
    ours, ref = log(run), log(ref_run)
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in ref]
    for a, b in zip(ours, ref):
        for key in ("loss", "kl", "hidden"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    model, _ = load_model(str(run / "model"))  # rank 0's replica, saved as one process saves
    assert_same_weights(trainable(model), ref_weights)


def test_ddp_checkpoint_resumes_in_one_process(ddp_ranks, reference, teacher_dir, text_file):
    killed = ddp_ranks / "killed"
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-00000003"]
    cfg = TrainConfig(**base_cfg(teacher_dir, text_file), out=str(killed), resume=True)
    resumed = trainable(train(cfg))
    assert cfg.grad_accum == 2 and [r["step"] for r in log(killed)] == [1, 2, 3, 4, 5, 6]
    assert_same_weights(resumed, reference[1])


def test_ddp_ranks_hold_the_whole_student_and_only_rank_0_reads_the_weights(ddp_ranks, teacher_dir):
    from binarymos.footprint import load_config
    from binarymos.plan import count, estimate

    terms = estimate(count(load_config(str(teacher_dir)), num_experts=2), gpus=1, seq_len=32, batch=2)["terms"]
    for r in (0, 1):
        held = json.loads((ddp_ranks / f"bytes-rank{r}.json").read_text())
        assert held == {"params": terms["weights"], "trainable": terms["gradients"]}
    calls = [json.loads((ddp_ranks / f"calls-rank{r}.json").read_text()) for r in (0, 1)]
    assert calls[0]["from_pretrained"] == 1 and calls[1] == {"from_pretrained": 0, "from_linear": 0}


@pytest.mark.parametrize("memory_over_plan, want", [(1 / 0.75 * 1.01, "ddp"), (1 / 0.75 * 0.99, "fsdp")])
def test_auto_strategy_replicates_where_the_one_gpu_plan_fits_three_quarters_of_the_gpu(
        monkeypatch, teacher_dir, memory_over_plan, want):
    from types import SimpleNamespace

    from binarymos.distributed import Env
    from binarymos.footprint import load_config
    from binarymos.plan import count, estimate
    from binarymos.train import choose_strategy

    config = load_config(str(teacher_dir))
    cfg = TrainConfig(model=str(teacher_dir), seq_len=64, batch_size=2)
    # each DDP rank plans like one process (fp32 stream) that keeps its gradients (DDP's buckets)
    need = estimate(count(config, 4), gpus=2, seq_len=64, batch=2, strategy="ddp")["total_checkpointed"]
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=int(need * memory_over_plan)))
    gpu = Env(0, 2, torch.device("cuda", 0))
    assert choose_strategy(cfg, config, gpu) == want
    assert choose_strategy(TrainConfig(strategy="fsdp"), config, gpu) == "fsdp"
    assert choose_strategy(cfg, config, Env(0, 2, torch.device("cpu"))) == "fsdp"  # no GPU to plan against


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy must be one of auto, ddp, fsdp"):
        TrainConfig(strategy="zero3")
