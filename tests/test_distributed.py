"""The FSDP2 path on the CPU: 2 torchrun ranks over gloo against one plain process.

One torchrun launch (2 ranks, OMP_NUM_THREADS=1) runs a 6-step distillation and a second one that is
killed right after its step-3 checkpoint; the plain-process references run in the test process.
The reference for a 2-rank run with batch 2 is one process with batch 2 and grad_accum 2: the same
micro-batches, so the same loss and weights up to rounding.
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
    import torch, torch.distributed as dist
    from binarymos import train as train_mod
    from binarymos.train import TrainConfig, train

    base, root = json.loads(sys.argv[1]), sys.argv[2]
    student = train(TrainConfig(**base, out=f"{root}/full"))
    rank = dist.get_rank()
    local = lambda tensors: sum(t.to_local().numel() * t.element_size() for t in tensors)
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


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, teacher_dir, text_file):
    root = tmp_path_factory.mktemp("two_ranks")
    (root / "worker.py").write_text(WORKER)
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--log-dir", str(root / "logs"), "--redirects", "3", str(root / "worker.py"),
           json.dumps(base_cfg(teacher_dir, text_file)), str(root)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    rank_logs = {p.parent.name: p.read_text() for p in (root / "logs").rglob("stderr.log")}
    assert done.returncode == 0, done.stderr[-3000:] + "\n".join(rank_logs.values())[-3000:]
    return root, rank_logs


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
