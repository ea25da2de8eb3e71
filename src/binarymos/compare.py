"""`binarymos compare`: several methods (or recipe variants) at one token budget, side by side.

Each run is a job of `binarymos` subprocesses (train, then eval), at most ``parallel`` at once, each
with ``threads`` CPU threads and, with ``gpus``, its own GPU; every run shares the model, data, seed,
budget and evaluation. Results go to OUT/compare.json and OUT/compare.md. benchmarks/recipe_sweep.py
runs its recipe variants through the same ``study``.

Methods: ``fp`` (the model as it is) and ``sign`` (static sign(W) * mean|W|) are evaluated without
training; ``onebit`` is BinaryMoS with one expert; ``mosN`` BinaryMoS with N experts.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

UNTRAINED = ("fp", "sign")
CLI = [sys.executable, "-m", "binarymos.cli"]


def method_options(method: str) -> list[str] | None:
    """The `binarymos train` options of a method; None for the untrained fp and sign."""
    if method in UNTRAINED:
        return None
    if method == "onebit":
        return ["-E", "1"]
    match = re.fullmatch(r"mos([1-9]\d*)", method)
    if match is None:
        raise ValueError(f"unknown method {method!r}: use fp, sign, onebit or mosN (N experts, e.g. mos4)")
    return ["-E", match[1]]


def launch(commands: list[list[str]], log: Path, env: dict) -> subprocess.Popen:
    """Run the commands one after another (stopping at the first failure) in one background shell."""
    script = " && ".join(shlex.join(c) for c in commands)
    with open(log, "w") as f:
        return subprocess.Popen(["bash", "-c", script], stdout=f, stderr=subprocess.STDOUT, env=env)


def run_jobs(jobs: list[tuple[str, list[list[str]]]], out: Path, parallel: int = 1, threads: int = 1,
             deadline: float = float("inf"), gpus: list[str] = ()) -> dict[str, tuple[int | None, float]]:
    """Run (name, commands) jobs, at most ``parallel`` at once, until done or ``deadline`` (then killed).

    Job slot k gets GPU ``gpus[k % len(gpus)]`` (as CUDA_VISIBLE_DEVICES) and OMP_NUM_THREADS=threads:
    processes sharing the CPUs each with every thread stall. Returns name -> (exit code, wall seconds) for every
    job: -9 for one killed at the deadline, None for one the deadline left unstarted; its log is OUT/NAME.log.
    """
    pending, running, done = list(jobs), {}, {}
    while (pending or running) and time.time() < deadline:
        free = [k for k in range(parallel) if k not in {slot for _, slot, _ in running.values()}]
        while pending and free:
            name, commands = pending.pop(0)
            slot = free.pop(0)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            running[name] = (launch(commands, out / f"{name}.log", env), slot, time.time())
        for name, (proc, _, start) in list(running.items()):
            if proc.poll() is not None:
                done[name] = (proc.returncode, time.time() - start)
                del running[name]
        time.sleep(0.2)
    for name, (proc, _, start) in running.items():
        proc.kill()
        proc.wait()
        done[name] = (-9, time.time() - start)
    done.update((name, (None, 0.0)) for name, _ in pending)
    return done


def _commands(name: str, run, model: str, train_args: list[str], eval_args: list[str], out: Path) -> list[list[str]]:
    evaluate = CLI + ["eval", "--json", str(out / f"{name}.eval.json")] + eval_args
    if run == "fp":
        return [evaluate + ["--model", model]]
    if run == "sign":
        return [evaluate + ["--model", model, "--sign"]]
    train = CLI + ["train", "--model", model, "--out", str(out / name), "--log-every", "10",
                   "--save-every", "1000000000"] + train_args + run
    return [train, evaluate + ["--model", str(out / name / "model")]]


def _bytes(model: str, run, run_dir: Path, cache: dict) -> int | None:
    """The packed size (binarymos.footprint's computed bytes) of a run's method."""
    from .footprint import computed, load_config

    if run in UNTRAINED:
        key, experts = ("fp16" if run == "fp" else "sign"), 4
    elif (run_dir / "train_config.json").exists():
        experts = json.loads((run_dir / "train_config.json").read_text())["num_experts"]
        key = "onebit" if experts == 1 else "binarymos"
    else:
        return None
    if experts not in cache:
        cache[experts] = computed(load_config(model, builtin=False), experts)
    return cache[experts][key]


def _collect(name: str, run, model: str, out: Path, status: tuple[int | None, float], cache: dict) -> dict:
    code, seconds = status
    words = {0: "ok", -9: "killed at the deadline", None: "not started by the deadline"}
    result = {"status": words.get(code, f"failed (exit {code})"),
              "options": " ".join(run) if isinstance(run, list) else run, "job_minutes": round(seconds / 60, 2),
              "trained_tokens": 0, "train_minutes": 0.0}
    evaluation = out / f"{name}.eval.json"
    if evaluation.exists():
        result.update(next(iter(json.loads(evaluation.read_text()).values())))
    from .train import read_log

    records = read_log(out / name)
    if records:
        last = records[-1]
        # the training loop's own time: model loading and evaluation are not counted
        result.update(trained_tokens=last["tokens"], final_loss=last["loss"], final_kl=last["kl"],
                      train_minutes=last["train_seconds"] / 60)
    result["bytes"] = _bytes(model, run, out / name, cache)
    return result


def study(runs: dict, model: str, train_args: list[str], eval_args: list[str], out: str | Path,
          sets: list[str], device: str, parallel: int = 1, threads: int = 1, gpus: list[str] = (),
          deadline: float = float("inf")) -> dict:
    """Run every run (name -> "fp", "sign" or a list of train options) and write OUT/compare.{json,md}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, _commands(name, run, model, train_args, eval_args, out)) for name, run in runs.items()]
    t0 = time.time()
    codes = run_jobs(jobs, out, parallel, threads, t0 + deadline, gpus)
    cache: dict = {}
    report = {"model": model, "device": device, "parallel": parallel, "train_args": train_args,
              "eval_args": eval_args, "sets": sets, "wall_minutes": round((time.time() - t0) / 60, 2),
              "runs": {name: _collect(name, run, model, out, codes[name], cache) for name, run in runs.items()}}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    (out / "compare.md").write_text(table(report) + "\n")
    return report


def table(report: dict) -> str:
    """The markdown table of a study: perplexities, trained tokens, device-minutes of training, packed bytes."""
    sets, unit = report["sets"], "GPU" if report["device"].startswith("cuda") else "cpu"
    names = {"wikitext2": "WikiText-2", "c4": "C4"}
    lines = [f"{report['model']}, train options `{shlex.join(report['train_args'])}`, {report['parallel']} job(s) "
             f"at once on {report['device']}, {report['wall_minutes']} min wall",
             "", "| run | options | " + " | ".join(names.get(s, s) for s in sets)
             + f" | trained tokens | {unit}-minutes | model bytes | final KL | status |",
             "|---|---|" + "---:|" * (len(sets) + 4) + "---|"]
    for name, r in report["runs"].items():
        ppl = " | ".join(f"{r[s]:,.2f}" if s in r else "-" for s in sets)
        size = f"{r['bytes']:,}" if r["bytes"] is not None else "-"
        kl = f"{r['final_kl']:.3f}" if "final_kl" in r else "-"
        lines.append(f"| {name} | `{r['options']}` | {ppl} | {r['trained_tokens']:,} | {r['train_minutes']:.2f} "
                     f"| {size} | {kl} | {r['status']} |")
    return "\n".join(lines)
