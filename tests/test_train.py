"""Distillation: the loss against its formula, a falling loss, determinism, kill-and-resume, NaN stop,
a time budget, SIGTERM."""
import json
import math
import signal
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from types import SimpleNamespace

from conftest import killed_after_first_checkpoint, sigterm_during_step

from binarymos import train as train_mod
from binarymos.train import TrainConfig, TrainingDivergedError, TrainingStopped, distillation_loss, lr_factor, train


def cfg(teacher_dir, text_file, out, **kw):
    base = dict(model=str(teacher_dir), data=str(text_file), out=str(out), seq_len=32, batch_size=2,
                max_steps=6, num_experts=2, save_every=3, lr_weight=1e-3, lr_scale=1e-2, device="cpu")
    return TrainConfig(**{**base, **kw})


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_matches_formula():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    hs = [torch.randn(2, 5, 4) for _ in range(3)]
    ht = [torch.randn(2, 5, 4) for _ in range(3)]
    student = SimpleNamespace(logits=s_logits, hidden_states=hs)
    teacher = SimpleNamespace(logits=t_logits, hidden_states=ht)
    p_t = torch.softmax(t_logits.double(), -1)
    kl_tokens = (p_t * (p_t.log() - torch.log_softmax(s_logits.double(), -1))).sum(-1)  # (2, 5)
    layers = [((a.double() - b.double()) ** 2).mean() for a, b in zip(hs[1:], ht[1:])]  # hidden_states[0]: embeddings
    ours = TrainConfig(hidden_weight=0.5)  # default recipe: per-token KL, MSE over the teacher's mean square
    loss, parts = distillation_loss(student, teacher, ours)
    normed = sum(m / (b.double() ** 2).mean() for m, b in zip(layers, ht[1:])) / len(layers)
    assert math.isclose(loss.item(), kl_tokens.mean().item() + 0.5 * normed.item(), rel_tol=1e-5)
    assert math.isclose(parts["kl"].item(), kl_tokens.mean().item(), rel_tol=1e-5)
    assert math.isclose(parts["hidden"].item(), normed.item(), rel_tol=1e-5) and not parts["kl"].requires_grad
    paper = TrainConfig(recipe="paper")  # KL batchmean, lambda 10 on the unnormalised sum of MSEs
    loss, _ = distillation_loss(student, teacher, paper)
    assert math.isclose(loss.item(), kl_tokens.sum().item() / 2 + 10 * sum(layers).item(), rel_tol=1e-5)


def test_paper_recipe_is_the_authors_setting():
    paper = TrainConfig(recipe="paper")
    assert (paper.lr_weight, paper.lr_scale, paper.kl_reduction, paper.hidden_weight, paper.hidden_norm,
            paper.warmup, paper.batch_size, paper.blockwise) == (2e-5, 2e-5, "batchmean", 10.0, "none", 0.03, 4, 0.0)
    assert TrainConfig(recipe="paper", lr_weight=1e-3).lr_weight == 1e-3  # explicit options win
    assert (TrainConfig().blockwise, TrainConfig(blockwise=0).blockwise) == (0.25, 0)  # ours: a quarter block-wise


def test_default_recipe_is_the_measured_one_and_its_batch_is_4_where_steps_replay_as_cuda_graphs():
    ours = TrainConfig()
    assert (ours.lr_weight, ours.lr_scale, ours.kl_reduction, ours.hidden_weight, ours.hidden_norm, ours.warmup,
            ours.batch_size) == (2e-4, 1e-2, "token", 3.0, "teacher", 0.03, 8)
    assert TrainConfig(cuda_graphs=True).batch_size == 4
    assert TrainConfig(cuda_graphs=True, batch_size=8).batch_size == 8  # an explicit batch wins


def test_lr_schedule_is_linear_warmup_then_cosine():
    total, warm = 100, 10
    assert lr_factor(0, total, warm) == pytest.approx(0.1)
    assert lr_factor(9, total, warm) == pytest.approx(1.0)
    assert lr_factor(55, total, warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(100, total, warm) == pytest.approx(0.0)


def test_tiny_run_lowers_the_distillation_loss_and_saves_a_loadable_model(teacher_dir, text_file, tmp_path):
    from binarymos.models import load_model

    student = train(cfg(teacher_dir, text_file, tmp_path / "run", max_steps=25, save_every=100))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 26))
    assert sum(r["loss"] for r in log[-5:]) < 0.8 * sum(r["loss"] for r in log[:5])
    assert {"kl", "hidden", "tokens_per_s", "lr_weight", "lr_scale"} <= set(log[0])
    loaded, _ = load_model(str(tmp_path / "run" / "model"))
    ids = torch.randint(0, 90, (1, 16))
    torch.testing.assert_close(loaded(ids).logits, student.eval()(ids).logits)


def test_same_seed_same_run_and_kill_then_resume_reaches_the_same_weights(teacher_dir, text_file, tmp_path, monkeypatch):
    full = trainable(train(cfg(teacher_dir, text_file, tmp_path / "full")))
    again = trainable(train(cfg(teacher_dir, text_file, tmp_path / "again")))
    assert all(torch.equal(full[n], again[n]) for n in full)

    killed_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(teacher_dir, text_file, tmp_path / "killed"))
    monkeypatch.undo()
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"] == 3
    resumed = trainable(train(cfg(teacher_dir, text_file, tmp_path / "killed", resume=True)))
    assert all(torch.equal(full[n], resumed[n]) for n in full)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_hard_kill_after_the_checkpoint_leaves_a_log_that_reads_as_one_history(teacher_dir, text_file, tmp_path,
                                                                                  monkeypatch):
    killed_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(teacher_dir, text_file, tmp_path / "run"))
    monkeypatch.undo()
    log = tmp_path / "run" / "log.jsonl"
    # what a SIGKILL leaves: steps 4 and 5 logged after the step-3 checkpoint, the second line cut short
    log.write_text(log.read_text() + '{"step": 4, "tokens": 1, "loss": 9.0}\n{"step": 5, "tok')
    train(cfg(teacher_dir, text_file, tmp_path / "run", resume=True))
    lines = log.read_text().splitlines()
    assert lines[4] == '{"step": 5, "tok'  # the cut line stays apart: the resumed records start on their own lines
    resumed = [json.loads(line) for line in lines[5:]]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    records = train_mod.read_log(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[3:] == resumed  # the steps trained again, not the ones the kill lost
    assert train_mod.read_log(tmp_path / "no-run") == []


def test_the_log_reader_skips_what_does_not_parse_and_keeps_records_without_a_step(tmp_path):
    (tmp_path / "log.jsonl").write_bytes(b'{"step": 1}\n{"note": "x"}\n[1, 2]\n\xff\xfe\n{"step": null}\n'
                                         b'{"step": 2}\n{"step": 1, "again": true}\n{"st')
    assert train_mod.read_log(tmp_path) == [{"step": 1}, {"note": "x"}, {"step": None}, {"step": 1, "again": True}]


def test_a_run_directory_names_its_model_and_its_model_names_its_run(tmp_path, monkeypatch):
    run, plain, unfinished = tmp_path / "run", tmp_path / "plain", tmp_path / "unfinished"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (plain / "model").mkdir(parents=True)  # a model of its own, with a folder named model/ inside
    (plain / "config.json").write_text("{}")
    unfinished.mkdir()
    (unfinished / "train_config.json").write_text("{}")  # killed before its model was saved
    assert train_mod.run_model(run) == run / "model" and train_mod.run_model(run / "model") == run / "model"
    assert train_mod.run_model(plain) == plain and train_mod.run_model(unfinished) == unfinished
    assert train_mod.run_of(run) == run and train_mod.run_of(run / "model") == run
    assert train_mod.run_of(plain) is None and train_mod.run_of(plain / "model") is None
    assert train_mod.run_of(unfinished) is None
    (tmp_path / "latest").symlink_to(run / "model")  # a link to the model, and the model's folder as "."
    assert train_mod.run_of(tmp_path / "latest") == run.resolve()
    monkeypatch.chdir(run / "model")
    assert train_mod.run_of(".") == run.resolve()


def test_resuming_with_other_settings_is_refused_and_changes_nothing(teacher_dir, text_file, tmp_path, monkeypatch):
    sigterm_during_step(monkeypatch, 1)
    with pytest.raises(TrainingStopped):
        train(cfg(teacher_dir, text_file, tmp_path / "run", save_every=100))
    monkeypatch.undo()
    kept = {name: (tmp_path / "run" / name).read_bytes() for name in ("checkpoint.pt", "train_config.json", "log.jsonl")}
    with pytest.raises(ValueError, match=r"started with num_experts 2 \(given 4\), seed 0 \(given 1\)"):
        train(cfg(teacher_dir, text_file, tmp_path / "run", num_experts=4, seed=1, resume=True))
    assert kept == {name: (tmp_path / "run" / name).read_bytes() for name in kept}
    # where it runs and how fast may change: the same run goes on, and says so in its log
    train(cfg(teacher_dir, text_file, tmp_path / "run", save_every=2, log_every=2, resume=True))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4, 6]


def test_sigterm_saves_the_finished_step_and_resume_reaches_the_same_weights(teacher_dir, text_file, tmp_path,
                                                                             monkeypatch):
    full = trainable(train(cfg(teacher_dir, text_file, tmp_path / "full", save_every=100)))
    sigterm_during_step(monkeypatch, 3)
    with pytest.raises(TrainingStopped, match="after step 4.*--resume"):
        train(cfg(teacher_dir, text_file, tmp_path / "run", save_every=100))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.undo()
    resumed = trainable(train(cfg(teacher_dir, text_file, tmp_path / "run", save_every=100, resume=True)))
    assert all(torch.equal(full[n], resumed[n]) for n in full)


def test_time_budget_logs_its_last_step_whatever_log_every(teacher_dir, text_file, tmp_path):
    train(cfg(teacher_dir, text_file, tmp_path / "run", max_steps=None, max_minutes=1.5 / 60, log_every=10**6,
              blockwise=0))  # (with a block-wise phase its last step is logged too)
    final = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert final["step"] > 0 and [r["step"] for r in log] == [final["step"]]
    assert log[0]["tokens"] == 64 * final["step"] and log[0]["train_seconds"] <= final["seconds"] + 5e-4  # logged to the ms


def test_time_budget_stops_on_time_follows_the_schedule_over_time_and_resumes_the_clock(teacher_dir, text_file,
                                                                                          tmp_path, monkeypatch):
    budget = 6.0  # seconds: long enough for > 6 steps, and the slack below for a step, when other work loads the CPU
    run = cfg(teacher_dir, text_file, tmp_path / "run", max_steps=None, max_minutes=budget / 60, warmup=0.1)
    sigterm_during_step(monkeypatch, 2)
    with pytest.raises(TrainingStopped):
        train(run)
    kept = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert kept["step"] == 3 and 0 < kept["seconds"] < budget
    monkeypatch.undo()
    train(TrainConfig(**{**vars(run), "resume": True}))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, len(log) + 1)) and len(log) > 6
    seconds = [r["train_seconds"] for r in log]
    assert seconds == sorted(seconds) and seconds[3] > kept["seconds"]  # the resumed run continues the clock
    final = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert final["step"] == len(log) and budget <= final["seconds"] < budget + 3.0  # stopped at the first step
    assert seconds[-2] < budget  # boundary past the budget: the last step started before it
    # LR at each step: linear warm-up over the first 10 % of the time, then cosine to 0 at the budget, at the
    # clock of the step's start: between the previous step's end time and its own (both in the log)
    def factor(seconds):
        t = min(seconds / budget, 1.0)
        return t / 0.1 if t < 0.1 else 0.5 * (1 + math.cos(math.pi * (t - 0.1) / 0.9))

    for before, record in zip(log[3:], log[4:]):
        a, b = factor(before["train_seconds"] - 0.001), factor(record["train_seconds"])  # logged to the ms
        crosses_peak = before["train_seconds"] < 0.1 * budget < record["train_seconds"]
        low, high = min(a, b), (1.0 if crosses_peak else max(a, b))
        assert 1e-3 * low - 1e-9 <= record["lr_weight"] <= 1e-3 * high + 1e-9
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(teacher_dir, text_file, tmp_path, monkeypatch):
    real_loss = train_mod.distillation_loss
    calls = {"n": 0}

    def nan_at_third_step(*args):
        calls["n"] += 1
        loss, parts = real_loss(*args)
        return (loss * float("nan"), parts) if calls["n"] == 3 else (loss, parts)

    monkeypatch.setattr(train_mod, "distillation_loss", nan_at_third_step)
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 2.*checkpoint.pt"):
        train(cfg(teacher_dir, text_file, tmp_path / "run", save_every=1))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(teacher_dir, text_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg(teacher_dir, text_file, tmp_path / "none", resume=True))
    train(cfg(teacher_dir, text_file, tmp_path / "run", max_steps=1, save_every=1))
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg(teacher_dir, text_file, tmp_path / "run", max_steps=1))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="recipe"):
        TrainConfig(recipe="fast")
    with pytest.raises(ValueError, match="num_experts"):
        TrainConfig(num_experts=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="one budget"):
        TrainConfig(max_steps=3, max_minutes=1)
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(max_minutes=0)
    for budget in (dict(max_steps=0), dict(max_tokens=0), dict(epochs=0)):  # a run of no steps: refused up front
        with pytest.raises(ValueError, match="max_steps and max_tokens must be >= 1"):
            TrainConfig(**budget)


def test_grad_checkpointing_is_on_only_where_the_plan_does_not_fit(monkeypatch, teacher_dir):
    from transformers import AutoConfig

    from binarymos import distributed
    from binarymos.plan import count, estimate
    from binarymos.train import needs_grad_checkpointing

    config = AutoConfig.from_pretrained(teacher_dir)
    cfg = TrainConfig(model=str(teacher_dir), seq_len=32, batch_size=2)
    need = estimate(count(config, cfg.num_experts), 1, 32, 2)["total"]
    gpu = distributed.Env(device=torch.device("cuda", 0))
    for memory, expected in ((need / 0.75 * 1.01, False), (need / 0.75 * 0.99, True)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, m=memory: SimpleNamespace(total_memory=m))
        assert needs_grad_checkpointing(cfg, config, gpu) is expected
    narrow = estimate(count(config, cfg.num_experts), 1, 32, 2, residual=2)["total"]  # bf16_compute's activations
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=narrow / 0.75 * 1.01))
    assert needs_grad_checkpointing(TrainConfig(model=str(teacher_dir), seq_len=32, batch_size=2, bf16_compute=True),
                                    config, gpu) is False
    assert needs_grad_checkpointing(cfg, config, gpu) is True
    with pytest.raises(ValueError, match="cuda_graphs: this run needs gradient checkpointing"):
        needs_grad_checkpointing(replace(cfg, cuda_graphs=True), config, gpu)
    assert needs_grad_checkpointing(cfg, config, distributed.Env(device=torch.device("cpu"))) is False
    assert needs_grad_checkpointing(TrainConfig(grad_checkpointing=True), config, distributed.Env()) is True


def test_grad_checkpointing_trains_the_same_weights(teacher_dir, text_file, tmp_path):
    plain = trainable(train(cfg(teacher_dir, text_file, tmp_path / "plain", max_steps=3, grad_checkpointing=False)))
    recomputed = train(cfg(teacher_dir, text_file, tmp_path / "ckpt", max_steps=3, grad_checkpointing=True))
    name = "is_activation_checkpointing" if hasattr(recomputed, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(recomputed, name) is False  # switched off for saving
    recomputed = trainable(recomputed)
    assert all(torch.allclose(plain[n], recomputed[n], atol=1e-6) for n in plain)


def test_bf16_compute_trains_and_gives_back_a_float32_model(teacher_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from binarymos.models import load_model

    student = train(cfg(teacher_dir, text_file, tmp_path / "run", max_steps=8, bf16_compute=True))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log) and log[-1]["loss"] < log[0]["loss"]
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    embeddings = AutoModelForCausalLM.from_pretrained(teacher_dir).get_input_embeddings().weight
    torch.testing.assert_close(student.get_input_embeddings().weight, embeddings.to(torch.bfloat16).float(),
                               rtol=0, atol=0)  # trained in bf16, given back as float32
    loaded, _ = load_model(str(tmp_path / "run" / "model"))
    ids = torch.randint(0, 90, (1, 16))
    torch.testing.assert_close(loaded(ids).logits, student.eval()(ids).logits)


def test_compile_compiles_student_and_teacher_and_trains_the_same_weights(teacher_dir, text_file, tmp_path,
                                                                          monkeypatch):
    compiled = []
    real_compile = torch.compile

    def traced(fn, *args, **kwargs):  # dynamo and autograd tracing as on a GPU, without inductor's slow CPU codegen
        compiled.append(fn)
        return real_compile(fn, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", traced)
    plain = trainable(train(cfg(teacher_dir, text_file, tmp_path / "plain", max_steps=2, blockwise=0)))
    assert compiled == []
    student = train(cfg(teacher_dir, text_file, tmp_path / "compiled", max_steps=2, compile=True, blockwise=0))
    assert len(compiled) == 2 and student._compiled_call_impl is not None  # the teacher and the student
    weights = trainable(student)
    assert weights.keys() == plain.keys()  # compiled in place: parameter names unchanged
    # traced kernels round differently, and Adam's first steps magnify that on near-zero router gradients
    # (up to 3e-4 seen): 1e-3 is a tenth of one step at lr_scale 1e-2, far below what a wrong gradient moves
    assert all(torch.allclose(plain[n], weights[n], atol=1e-3) for n in plain)
    compiled.clear()
    student = train(cfg(teacher_dir, text_file, tmp_path / "teacher", max_steps=1, compile="teacher", blockwise=0))
    assert len(compiled) == 1 and student._compiled_call_impl is None  # the teacher alone
    with pytest.raises(ValueError, match="compile must be one of none, teacher, all"):
        TrainConfig(compile="student")


def three_block_pair(model_type="llama"):
    """A tiny teacher of three blocks and a copy of it whose first block's weights are perturbed."""
    import copy

    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    config.num_hidden_layers = 3
    if getattr(config, "layer_types", None):  # Gemma: one attention type per block
        config.layer_types = config.layer_types[:1] * 3
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.model.layers[0].parameters():
            p.add_(0.5 * torch.randn_like(p))
    return teacher, student


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_teacher_forced_blocks_feed_each_student_block_the_teachers_input(model_type):
    from binarymos.train import TeacherForcedBlocks

    teacher, student = three_block_pair(model_type)
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        reference = teacher(input_ids=ids, output_hidden_states=True).hidden_states  # inputs of blocks 0, 1, 2
        free = student(input_ids=ids, output_hidden_states=True).hidden_states
        with TeacherForcedBlocks(teacher, student) as forced:
            t_out, s_out = teacher(input_ids=ids), student(input_ids=ids)
            s_pairs, t_pairs = forced.outputs(s_out, t_out)
    assert len(s_pairs.hidden_states) == len(t_pairs.hidden_states) == 4 and s_pairs.logits is s_out.logits
    for i in (0, 1):  # the teacher's block outputs are its next blocks' inputs
        torch.testing.assert_close(t_pairs.hidden_states[i + 1], reference[i + 1])
    assert not torch.allclose(free[2], reference[2], atol=1e-3)  # the perturbed first block's error runs on freely
    assert not torch.allclose(s_pairs.hidden_states[1], t_pairs.hidden_states[1], atol=1e-3)  # block 0 differs
    for i in (2, 3):  # blocks 1 and 2 are the teacher's, fed the teacher's inputs: the teacher's outputs
        torch.testing.assert_close(s_pairs.hidden_states[i], t_pairs.hidden_states[i])
    with torch.no_grad():  # the hooks are gone after the block
        torch.testing.assert_close(student(input_ids=ids, output_hidden_states=True).hidden_states[2], free[2])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_teacher_forced_blocks_keep_each_blocks_gradient_to_its_own_output(checkpointing):
    from binarymos.train import TeacherForcedBlocks, enable_checkpointing

    teacher, student = three_block_pair()
    student.train()
    if checkpointing:
        enable_checkpointing(student)
        assert any(getattr(m, "gradient_checkpointing", False) for m in student.model.layers)
    ids = torch.randint(3, 100, (2, 12))
    with TeacherForcedBlocks(teacher, student) as forced:
        with torch.no_grad():
            t_out = teacher(input_ids=ids)
        s_pairs, _ = forced.outputs(student(input_ids=ids), t_out)
        s_pairs.hidden_states[2].pow(2).sum().backward()  # a loss on block 1's output alone
    grads = [[p.grad for p in block.parameters()] for block in student.model.layers]
    assert all(g is None for g in grads[0] + grads[2])  # nothing flows into the block before or after
    assert any(g is not None and g.abs().sum() > 0 for g in grads[1])



def test_teacher_forced_blocks_with_a_teacher_share_mix_the_two_inputs_and_pass_gradient_back():
    """Block 1's input is share x the teacher's input to it + (1 - share) x the student's block-0 output, and a
    loss on block 1 alone then trains block 0 too, by (1 - share) of its gradient: none at share 1."""
    from binarymos.train import TeacherForcedBlocks

    teacher, student = three_block_pair()
    ids = torch.randint(3, 100, (2, 12))
    grads = {}
    for share in (0.25, 1.0):
        student.zero_grad(set_to_none=True)
        seen = {}
        with TeacherForcedBlocks(teacher, student, torch.tensor(share)) as forced:
            seeing = student.model.layers[1].register_forward_pre_hook(  # after the replacing hook: block 1's input
                lambda m, args, kwargs: seen.update(input=args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True)
            with torch.no_grad():
                t_out = teacher(input_ids=ids)
            s_pairs, _ = forced.outputs(student(input_ids=ids), t_out)
            expected = share * forced.teacher_in[1].double() + (1 - share) * forced.student_out[0].double()
            torch.testing.assert_close(seen["input"].double(), expected, rtol=1e-6, atol=1e-6)
            s_pairs.hidden_states[2].pow(2).sum().backward()  # block 1's output alone
        seeing.remove()
        grads[share] = [p.grad for p in student.model.layers[0].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads[0.25])
    assert all(g is None or not g.any() for g in grads[1.0])



def test_the_last_blockwise_step_is_logged_whatever_the_log_interval(teacher_dir, text_file, tmp_path):
    train(cfg(teacher_dir, text_file, tmp_path / "run", max_steps=8, blockwise=0.25, log_every=4))
    # steps 0 and 1 of 8 block-wise (1/8 < 0.25): the second is logged as the phase ends, then every 4th and the last
    assert [(r["step"], r.get("blockwise", False)) for r in train_mod.read_log(tmp_path / "run")] == \
        [(2, True), (4, False), (8, False)]

def test_blockwise_anneal_hands_each_block_its_own_input_linearly_after_the_blockwise_phase(teacher_dir, text_file,
                                                                                            tmp_path):
    train(cfg(teacher_dir, text_file, tmp_path / "run", max_steps=8, blockwise=0.25, blockwise_anneal=0.5))
    log = train_mod.read_log(tmp_path / "run")
    assert [r.get("blockwise", False) for r in log] == [True] * 6 + [False] * 2
    # steps 0-5 at progress 0, 1/8, ..., 5/8: the teacher's share 1 until 0.25, then 1 - (progress - 0.25) / 0.5
    assert [r.get("teacher_share") for r in log] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, None, None]
    assert all(math.isfinite(r["loss"]) for r in log)
    for bad in (dict(blockwise=0.25, blockwise_anneal=-0.1), dict(blockwise=0.5, blockwise_anneal=0.6),
                dict(blockwise=0, blockwise_anneal=0.2)):
        with pytest.raises(ValueError, match="blockwise_anneal"):
            TrainConfig(**bad)

def test_blockwise_trains_block_by_block_then_end_to_end(teacher_dir, text_file, tmp_path):
    train(cfg(teacher_dir, text_file, tmp_path / "run", max_steps=4, blockwise=0.5))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r.get("blockwise", False) for r in log] == [True, True, False, False]
    assert all(math.isfinite(r["loss"]) and r["hidden"] > 0 for r in log)
    for bad in (dict(blockwise=1.5), dict(blockwise=0.5, hidden_weight=0.0), dict(blockwise=0.5, compile="teacher")):
        with pytest.raises(ValueError, match="blockwise"):
            TrainConfig(**bad)


def test_cuda_graphs_are_refused_where_a_graph_cannot_capture_the_step(teacher_dir, text_file, tmp_path):
    for bad in (dict(compile="teacher", blockwise=0), dict(grad_checkpointing=True)):
        with pytest.raises(ValueError, match="cuda_graphs captures the eager step"):
            TrainConfig(cuda_graphs=True, **bad)
    with pytest.raises(ValueError, match="cuda_graphs needs one process on a GPU .*1 on cpu"):
        train(cfg(teacher_dir, text_file, tmp_path / "run", cuda_graphs=True))
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


def test_cuda_graphs_capture_of_a_step_it_cannot_hold_ends_with_one_line_that_says_why(monkeypatch):
    """What a CUDA graph refuses (a host sync inside the step, say) breaks the capture, whose end then raises again:
    the option's own error names the operation that broke it."""
    from contextlib import contextmanager

    from binarymos.train import GraphedStep

    capturing = []

    @contextmanager
    def breaking_capture(graph):
        capturing.append(True)
        try:
            yield
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", breaking_capture)
    weight = torch.nn.Parameter(torch.ones(3))
    warmed = []

    def compute(batches, blockwise):
        if capturing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
        warmed.append(blockwise)
        (weight * batches[0]).sum().backward()
        return torch.zeros(4)

    step = GraphedStep(compute, torch.optim.SGD([weight], lr=0.1))
    with pytest.raises(RuntimeError, match=r"^cuda_graphs: .*cannot be captured as a CUDA graph \(CUDA error: "
                                           r"operation not permitted when stream is capturing\); train without it "
                                           r"\(--resume --no-cuda-graphs"):
        step([torch.ones(3)], False)
    assert warmed == [False] * 3 and weight.grad is None  # warmed up on the phase's step, its gradients dropped


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operators that read a tensor's value on the host: on a GPU each is a wait for it, and a CUDA graph
    cannot hold one (.item() and a tensor's truth value, nonzero, boolean-mask indexing and selection, unique)."""

    READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
             "aten::unique_consecutive", "aten::unique_dim", "aten::repeat_interleave.Tensor", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        indexing = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)
        masks = func in indexing and any(i is not None and i.dtype == torch.bool for i in args[1])
        if masks or func.name() in self.READS:
            self.seen.append(func.name())
        return func(*args, **(kwargs or {}))


def test_host_reads_sees_what_a_cuda_graph_cannot_hold():
    x = torch.tensor([1.0, -2.0, 3.0])
    with HostReads() as reads:
        x.sum().item(), bool(x[0] > 0), x[x > 0], torch.nonzero(x), (x + 1).exp(), torch.equal(x, x)
    assert reads.seen == ["aten::_local_scalar_dense", "aten::_local_scalar_dense", "aten::index.Tensor",
                          "aten::nonzero", "aten::equal"]

    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * grad.sum().item()

    a = torch.ones(3, requires_grad=True)
    with HostReads() as reads:
        y = ReadsInBackward.apply(a).sum()
        assert reads.seen == []
        y.backward()  # the backward's operators are seen too
    assert reads.seen == ["aten::_local_scalar_dense"]


def prepared_tiny(arch, text_file, tmp_path):
    """(the run's config, train.prepare's result) for a tiny model of ``arch`` saved under tmp_path."""
    from pack_helpers import tiny_lm, tiny_tokenizer

    from binarymos.train import prepare

    tiny_lm(arch).save_pretrained(tmp_path / arch)
    tiny_tokenizer().save_pretrained(tmp_path / arch)
    config = cfg(tmp_path / arch, text_file, tmp_path / "run")
    return config, prepare(config)


def test_cuda_graphs_step_reads_no_tensor_value_on_the_host_in_any_architecture(arch, text_file, tmp_path,
                                                                                 monkeypatch):
    """What a CUDA graph needs, checked on the CPU for every architecture: the training step (both models' forward,
    the loss, the backward, the clipping) reads no tensor's value on the host, in either phase, as a capture runs
    it (transformers skips its checks of a mask's values while a stream captures)."""
    from binarymos.train import step_gradients

    config, (teacher, student, _, blocks) = prepared_tiny(arch, text_file, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for blockwise in (True, False):
        with HostReads() as reads:
            stats = step_gradients(teacher, student, [blocks[:2]], config, blockwise,
                                   torch.autocast("cpu", enabled=False))
        assert reads.seen == [] and torch.isfinite(stats).all()
        student.zero_grad(set_to_none=True)


def test_checkpoints_hold_the_optimizer_state_an_eager_adamw_loads(tmp_path):
    """A captured update keeps each group's learning rate as a GPU tensor, capturable, and its step counts on the GPU;
    a checkpoint holds plain floats, non-capturable groups and host step counts, whatever the run's device."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 0.1, "base_lr": 0.1}])
    weight.grad = torch.ones(3)
    optimizer.step()
    optimizer.param_groups[0].update(lr=torch.tensor(0.5), capturable=True)  # as GraphedStep.update leaves them
    state = train_mod.portable_optimizer_state(optimizer)
    assert state["param_groups"][0]["lr"] == 0.5 and isinstance(state["param_groups"][0]["lr"], float)
    assert state["param_groups"][0]["capturable"] is False and state["state"][0]["step"].device.type == "cpu"
    assert optimizer.param_groups[0]["capturable"] is True  # the live optimizer is left as it is
    torch.testing.assert_close(state["state"][0]["exp_avg"], 0.1 * torch.ones(3))  # (1 - beta1) x the gradient


@pytest.mark.parametrize("on_host", [False, True])
def test_teacher_cache_steps_compute_what_steps_with_the_teachers_forward_compute(arch, text_file, tmp_path, on_host):
    """Every architecture, both phases and the annealed one: a step whose teacher outputs come from the cache (token ids
    and all gathered by block index) has the loss terms, norm and gradients of the step that runs the teacher on
    those blocks' ids; each distinct tensor of the teacher's forward is kept once. The same where the cache does not
    fit the device and stays on the host: the step reads its blocks from the device's window."""
    import copy

    from binarymos.train import TeacherCache, step_gradients

    config, (teacher, student, _, blocks) = prepared_tiny(arch, text_file, tmp_path)
    off = torch.autocast("cpu", enabled=False)
    cache = TeacherCache(teacher, blocks, 3, off, fits=lambda nbytes: not on_host, host_fits=lambda nbytes: True)
    assert cache.on_host == on_host
    if not on_host:
        assert torch.equal(cache.ids, blocks) and all(len(t) == len(blocks) for t in cache.tensors)
    if arch == "llama":  # the embeddings, each block's output, the final norm's output
        assert len(set(cache.roles.values())) == teacher.config.num_hidden_layers + 2
    reference = copy.deepcopy(student)
    index = torch.tensor([len(blocks) - 1, 1])
    for step, (blockwise, share) in enumerate(((True, None), (True, torch.tensor(0.25)), (False, None))):
        if on_host and step == 1:  # other blocks in the window meanwhile
            cache.batches([torch.tensor([0, 2])])
            assert torch.equal(cache.ids, blocks[[0, 2]])
        batch = cache.batches([index])
        assert torch.equal(batch[0], torch.arange(2) if on_host else index)
        cached = step_gradients(cache, student, batch, config, blockwise, off, teacher_share=share)
        live = step_gradients(teacher, reference, [blocks[index]], config, blockwise, off, teacher_share=share)
        torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-7)
        grads = {n: q.grad for n, q in reference.named_parameters() if q.requires_grad}
        for name, p in student.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7)
        student.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)


def test_teacher_cache_is_refused_where_it_cannot_stand_in_for_the_teacher(tmp_path):
    """Logits the head does not give alone (Gemma-2's final soft-capping, named in its config, or a scaling found by
    recomputing them) and a cache bigger than the GPU's room end with one line each, before anything is allocated
    for the cache."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from binarymos.train import TeacherCache

    off = torch.autocast("cpu", enabled=False)
    blocks = torch.randint(3, 100, (4, 12))
    capped = AutoModelForCausalLM.from_config(tiny_config("gemma2", head_dim=16, final_logit_softcapping=2.0)).eval()
    with pytest.raises(ValueError, match="logits are not its output head's output"):
        TeacherCache(capped, blocks, 2, off)
    seen = []
    llama = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    llama(input_ids=blocks, output_hidden_states=True)  # transformers' own hooks, installed at a first forward
    hooks = [(len(block._forward_hooks), len(block._forward_pre_hooks)) for block in llama.model.layers]
    with pytest.raises(ValueError, match=r"outputs for 4 blocks take 0\.0 GB, more than the device holds"):
        TeacherCache(llama, blocks, 2, off, fits=lambda nbytes: seen.append(nbytes))
    # 4 blocks x 12 tokens x 32 wide, float32: the embeddings, 2 block outputs and the final norm's
    assert seen == [4 * 12 * 32 * 4 * 4]
    assert [(len(block._forward_hooks), len(block._forward_pre_hooks)) for block in llama.model.layers] == hooks
    scaled = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()  # a scaling no config field names
    scaled.register_forward_hook(lambda module, args, out: setattr(out, "logits", out.logits * 1.01) or out)
    with pytest.raises(ValueError, match="logits are not its output head's output"):
        TeacherCache(scaled, blocks, 2, off)
    with pytest.raises(ValueError, match="cache_teacher runs the teacher once"):
        TrainConfig(cache_teacher=True, compile="teacher", blockwise=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_cache_teacher_trains_what_the_teachers_forward_trains(arch, teacher_dir, text_file, tmp_path, monkeypatch):
    """A whole run, block-wise, annealed and end to end: the same losses with the cache as without, and the cache's
    size in the run's settings; a cache the host has no room for is refused. Gemma too: sliding-window layers,
    embeddings scaled inside the model, a `<bos>` before every block."""
    if arch != "llama":
        from pack_helpers import tiny_lm, tiny_tokenizer

        teacher_dir = tmp_path / arch
        tiny_lm(arch).save_pretrained(teacher_dir)
        tiny_tokenizer().save_pretrained(teacher_dir)
    for cached in (False, True):
        train(cfg(teacher_dir, text_file, tmp_path / f"cached-{cached}", max_steps=8, blockwise=0.25,
                  blockwise_anneal=0.25, cache_teacher=cached))
    live, cached = (train_mod.read_log(tmp_path / f"cached-{c}") for c in (False, True))
    assert [r.get("blockwise", False) for r in cached] == [True] * 4 + [False] * 4
    for key in ("loss", "kl", "hidden"):
        torch.testing.assert_close(torch.tensor([r[key] for r in cached]), torch.tensor([r[key] for r in live]),
                                   rtol=1e-4, atol=1e-6)
    settings = json.loads((tmp_path / "cached-True" / "train_config.json").read_text())
    assert settings["cache_teacher"] and settings["teacher_cache_gb"] > 0 and settings["teacher_cache_on"] == "device"
    assert (tmp_path / "cached-True" / "model").is_dir()
    # a cache the device has no room for, on the host (as on a GPU; on the CPU both are the same memory), with two
    # micro-batches a step sharing the window: the same losses again
    original = train_mod.TeacherCache

    class HostCache(original):
        def __init__(self, *args, fits, host_fits):
            super().__init__(*args, fits=lambda nbytes: False, host_fits=lambda nbytes: True)

    monkeypatch.setattr(train_mod, "TeacherCache", HostCache)
    for cached in (False, True):
        train(cfg(teacher_dir, text_file, tmp_path / f"accum-{cached}", max_steps=4, blockwise=0.5, batch_size=1,
                  grad_accum=2, cache_teacher=cached))
    live, on_host = (train_mod.read_log(tmp_path / f"accum-{c}") for c in (False, True))
    for key in ("loss", "kl", "hidden"):
        torch.testing.assert_close(torch.tensor([r[key] for r in on_host]), torch.tensor([r[key] for r in live]),
                                   rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "accum-True" / "train_config.json").read_text())["teacher_cache_on"] == "host"
    monkeypatch.setattr(train_mod, "TeacherCache", original)
    # on the CPU the cache may take half of the host memory free: here none is
    monkeypatch.setattr(train_mod, "available_memory", lambda: 0)
    with pytest.raises(ValueError, match="more than the device holds beside the run"):
        train(cfg(teacher_dir, text_file, tmp_path / "no-room", cache_teacher=True))
    assert not (tmp_path / "no-room").exists()  # refused before the run wrote anything


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the KL kernel runs on a GPU")
def test_kl_sum_on_the_gpu_matches_float64():
    """train.kl_sum on a GPU (the Triton KL) at SmolLM2's vocabulary, bf16 logits: the sum and its gradient against
    the formulas in float64."""
    from binarymos.train import kl_sum

    g = torch.Generator(device="cuda").manual_seed(0)
    s = (6 * torch.randn(2, 1024, 49152, device="cuda", generator=g)).bfloat16().requires_grad_(True)
    t = (6 * torch.randn(2, 1024, 49152, device="cuda", generator=g)).bfloat16()
    kl = kl_sum(s, t)
    kl.backward()
    s64, t64 = s.detach().double(), t.double()
    log_ps, log_pt = s64.log_softmax(-1), t64.log_softmax(-1)
    torch.testing.assert_close(kl.double(), (log_pt.exp() * (log_pt - log_ps)).sum(), rtol=1e-5, atol=0)
    grad = log_ps.exp() - log_pt.exp()
    assert ((s.grad.double() - grad).abs() <= 2 ** -8 * grad.abs() + 1e-9).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("experts, accum, cached", [(1, 1, None), (2, 1, None), (2, 2, None), (2, 2, "device"),
                                                    (2, 2, "host")])
def test_cuda_graphs_step_replays_what_the_eager_step_computes(teacher_dir, text_file, tmp_path, experts, accum,
                                                               cached):
    """In float32 (no autocast), against the eager step of a copy of the student with the same weights: the
    loss terms, gradient norm and every clipped gradient, for new token ids and new weights at every replay, in
    both phases and after a phase comes back; with two micro-batches, their gradients summed in the graph; and with
    the teacher's outputs gathered from a TeacherCache by block index inside the graph, from the device or from a
    cache on the host through the device's window (the next step's blocks prefetched while a step runs)."""
    import copy

    from binarymos.train import GraphedStep, TeacherCache, prepare, step_gradients

    config = cfg(teacher_dir, text_file, tmp_path / "run", device="cuda", num_experts=experts)
    teacher, student, _, blocks = prepare(config)
    teacher.float()  # a GPU teacher comes in bf16
    reference = copy.deepcopy(student)
    off = torch.autocast("cuda", enabled=False)
    source = TeacherCache(teacher, blocks, 2, off, fits=lambda nbytes: cached == "device",
                          host_fits=lambda nbytes: True) if cached else teacher
    assert not cached or source.on_host == (cached == "host")
    params = [p for p in student.parameters() if p.requires_grad]
    graphed = GraphedStep(lambda batches, blockwise: step_gradients(source, student, batches, config, blockwise, off),
                          torch.optim.SGD(params, lr=0.0))
    for i, blockwise in enumerate((True, True, False, False, True)):
        with torch.no_grad():  # the replay must read the weights as they are now
            for p in params:
                p.add_(0.01 * torch.randn_like(p))
            reference.load_state_dict(student.state_dict())
        indices = [torch.tensor([4 * i + 2 * m, 4 * i + 2 * m + 1]) for m in range(accum)]
        batches = [blocks[index].cuda() for index in indices]
        replayed = graphed(source.batches(indices) if cached else batches, blockwise)
        if cached:  # the next step's blocks, while this one runs
            source.prefetch([torch.tensor([4 * i + 4 + 2 * m, 4 * i + 5 + 2 * m]) for m in range(accum)])
        replayed = replayed.clone()
        reference.zero_grad(set_to_none=True)
        eager = step_gradients(teacher, reference, batches, config, blockwise, off)
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-7)
        grads = {n: q.grad for n, q in reference.named_parameters() if q.requires_grad}
        for name, p in student.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("resumed", [False, True])
def test_cuda_graphs_update_replays_what_adamw_computes(teacher_dir, text_file, tmp_path, resumed):
    """GraphedStep.update against torch's eager AdamW on a copy of the student given the same gradients, in
    float32: the weights and the optimizer's moments after every step, for a learning rate that changes every step,
    from a fresh state or after one eager step of a non-capturable optimizer (a resumed run's state), and across a
    phase change (its new gradients).

    The copy takes the graphed step's gradients rather than computing its own: where a gradient is near AdamW's
    eps, the update turns its last bits into a visible difference (the router's, whose experts start equal, is
    rounding noise at first), and the step's test already compares the gradients."""
    import copy

    from binarymos.train import GraphedStep, param_groups, prepare, set_lr, step_gradients

    config = cfg(teacher_dir, text_file, tmp_path / "run", device="cuda", weight_decay=0.1)
    teacher, student, _, blocks = prepare(config)
    teacher.float()
    off = torch.autocast("cuda", enabled=False)
    if resumed:  # state on the host, as a checkpoint of an eager run leaves it
        eager = torch.optim.AdamW(param_groups(student, config), betas=(0.9, 0.95))
        step_gradients(teacher, student, [blocks[:2].cuda()], config, True, off)
        eager.step()
    reference = copy.deepcopy(student)
    optimizers = [torch.optim.AdamW(param_groups(model, config), betas=(0.9, 0.95)) for model in (student, reference)]
    for optimizer in optimizers if resumed else ():
        optimizer.load_state_dict(copy.deepcopy(eager.state_dict()))  # each its own tensors
    graphed = GraphedStep(lambda batches, blockwise: step_gradients(teacher, student, batches, config, blockwise, off),
                          optimizers[0])
    for i, blockwise in enumerate((True, True, False, False)):
        batches = [blocks[[2 * i + 2, 2 * i + 3]].cuda()]
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                set_lr(group, group["base_lr"] * (1 - 0.2 * i))
        graphed(batches, blockwise)
        for p, q in zip(student.parameters(), reference.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        graphed.update()
        optimizers[1].step()
        for (name, p), q in zip(student.named_parameters(), reference.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} at step {i}: {m}")
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(optimizers[0].state[p][key], optimizers[1].state[q][key],
                                               rtol=1e-5, atol=1e-12)
                assert float(optimizers[0].state[p]["step"]) == float(optimizers[1].state[q]["step"]) == i + 1 + resumed
    train_mod.save_checkpoint(tmp_path, student, optimizers[0], 5, config)  # an eager resume steps from it
    eager = torch.optim.AdamW(param_groups(student, config), betas=(0.9, 0.95))
    eager.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["optimizer"])
    step_gradients(teacher, student, [blocks[:2].cuda()], config, False, off)
    eager.step()
    assert float(eager.state[next(iter(eager.state))]["step"]) == 5 + resumed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_train_through_both_phases(teacher_dir, text_file, tmp_path):
    """A run with --cuda-graphs trains its block-wise steps as eager steps do (bf16 products: the two differ by
    rounding, which the end-to-end phase then amplifies; a missing update would change the second step on),
    then goes end to end and saves its model."""
    for graphs in (False, True):
        train(cfg(teacher_dir, text_file, tmp_path / f"graphs-{graphs}", device="cuda", max_steps=6, blockwise=0.5,
                  cuda_graphs=graphs))
    eager, graphed = (train_mod.read_log(tmp_path / f"graphs-{graphs}") for graphs in (False, True))
    assert [r.get("blockwise", False) for r in graphed] == [True] * 3 + [False] * 3
    torch.testing.assert_close(torch.tensor([r["loss"] for r in graphed[:3]]),
                               torch.tensor([r["loss"] for r in eager[:3]]), rtol=1e-3, atol=0)
    assert all(math.isfinite(r["loss"]) for r in graphed) and (tmp_path / "graphs-True" / "model").is_dir()
