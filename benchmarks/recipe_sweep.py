"""Train several recipe variants side by side (one process each, on one GPU) at one token budget
and tabulate WikiText-2 / C4 perplexity by the field's protocol.

    python benchmarks/recipe_sweep.py --variants paper,quick,default --max-tokens 2000000 --out runs/sweep

Each variant is a list of `binarymos train` options (VARIANTS below); every run shares the model,
data, seed, budget and evaluation. Results go to OUT/sweep.json and OUT/sweep.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    # the authors' setting: KL batchmean, lambda 10 unnormalised MSE, lr 2e-5
    "paper": ["--recipe", "paper"],
    # the "quick untuned variant": lr 5e-4 everywhere, per-token KL, normalised per-layer MSE
    "quick": ["--lr-weight", "5e-4", "--lr-scale", "5e-4", "--hidden-weight", "1"],
    "default": [],
    "w5e-5_s1e-3": ["--lr-weight", "5e-5", "--lr-scale", "1e-3"],
    "w2e-4_s2e-3": ["--lr-weight", "2e-4", "--lr-scale", "2e-3"],
    "w1e-4_s5e-3": ["--lr-weight", "1e-4", "--lr-scale", "5e-3"],
    "w1e-4_s1e-3_kl": ["--lr-weight", "1e-4", "--lr-scale", "1e-3", "--hidden-weight", "0"],
    "w1e-4_s1e-3_h10": ["--lr-weight", "1e-4", "--lr-scale", "1e-3", "--hidden-weight", "10"],
    "w1e-4_s1e-3_seq512": ["--lr-weight", "1e-4", "--lr-scale", "1e-3", "--seq-len", "512", "--batch-size", "16"],
    "w3e-5_s3e-3": ["--lr-weight", "3e-5", "--lr-scale", "3e-3"],
    "w1e-5_s1e-3": ["--lr-weight", "1e-5", "--lr-scale", "1e-3"],
    "w0_s3e-3": ["--lr-weight", "0", "--lr-scale", "3e-3"],
    "w0_s5e-3": ["--lr-weight", "0", "--lr-scale", "5e-3"],
    "w1e-4_s1e-2": ["--lr-weight", "1e-4", "--lr-scale", "1e-2"],
    "w1e-4_s5e-3_kl": ["--lr-weight", "1e-4", "--lr-scale", "5e-3", "--hidden-weight", "0"],
    "w1e-4_s5e-3_b2": ["--lr-weight", "1e-4", "--lr-scale", "5e-3", "--batch-size", "2"],
    "w1e-4_s1e-2_b2": ["--lr-weight", "1e-4", "--lr-scale", "1e-2", "--batch-size", "2"],
    "w1e-4_s2e-2_b2": ["--lr-weight", "1e-4", "--lr-scale", "2e-2", "--batch-size", "2"],
    "w2e-4_s1e-2_b2": ["--lr-weight", "2e-4", "--lr-scale", "1e-2", "--batch-size", "2"],
}


def launch(commands: list[list[str]], log: Path, threads: int) -> subprocess.Popen:
    """Run the commands one after another (stopping at the first failure) in one background shell."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    script = " && ".join(shlex.join(c) for c in commands)
    return subprocess.Popen(["bash", "-c", script], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def run_jobs(jobs, out: Path, parallel: int, threads: int, deadline: float) -> dict[str, int]:
    """Run (name, commands) jobs, at most `parallel` at once, until done or the deadline (then killed)."""
    pending, running, codes = list(jobs), {}, {}
    while (pending or running) and time.time() < deadline:
        while pending and len(running) < parallel:
            name, cmd = pending.pop(0)
            running[name] = launch(cmd, out / f"{name}.log", threads)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                codes[name] = proc.returncode
                del running[name]
        time.sleep(2)
    for name, proc in running.items():
        proc.kill()
        codes[name] = -9
    return codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="paper,quick,default")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="c4_wiki")
    ap.add_argument("--num-experts", default="4")
    ap.add_argument("--max-tokens", default="2000000")
    ap.add_argument("--ppl", default="wikitext2,c4")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=3, help="OMP threads per process")
    ap.add_argument("--baselines", action="store_true", help="also evaluate full precision")
    ap.add_argument("--train-extra", default="", help="options added to every training run")
    ap.add_argument("--eval-extra", default="", help="options added to every evaluation")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds; runs still going then are killed")
    ap.add_argument("--out", default="runs/sweep")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "binarymos.cli"]
    names = args.variants.split(",")
    train = lambda n: cli + ["train", "--model", args.model, "--data", args.data, "--num-experts", args.num_experts,
                             "--max-tokens", args.max_tokens, "--out", str(out / n), "--log-every", "10",
                             "--save-every", "1000000"] + args.train_extra.split() + VARIANTS[n]
    evaluate = lambda model, n: cli + ["eval", "--model", model, "--ppl", args.ppl,
                                       "--json", str(out / f"{n}.eval.json")] + args.eval_extra.split()
    subprocess.run(cli + ["eval", "--model", args.model, "--ppl", ""], check=True)  # caches a .gguf's conversion once
    jobs = [(n, [train(n), evaluate(str(out / n / "model"), n)]) for n in names]
    if args.baselines:
        jobs.append(("fp", [evaluate(args.model, "fp")]))
    t0 = time.time()
    run_jobs(jobs, out, args.parallel, args.threads, t0 + args.deadline)
    train_minutes = (time.time() - t0) / 60
    results = {}
    for name in names + (["fp"] if args.baselines else []):
        path = out / f"{name}.eval.json"
        results[name] = next(iter(json.loads(path.read_text()).values())) if path.exists() else None
        log = out / name / "log.jsonl"
        if log.exists():
            last = json.loads(log.read_text().splitlines()[-1])
            results[name] = {**(results[name] or {}), "final_loss": last["loss"], "tokens": last["tokens"],
                             "tokens_per_s": last["tokens_per_s"]}
    sets = args.ppl.split(",")
    lines = [f"wall time: {train_minutes:.1f} min ({args.parallel} runs at once)",
             "| variant | options | " + " | ".join(sets) + " | final loss | tokens | tok/s |", "|---" * (len(sets) + 5) + "|"]
    for name, r in results.items():
        r = r or {}
        lines.append(f"| {name} | `{' '.join(VARIANTS.get(name, []))}` | "
                     + " | ".join(f"{r[s]:,.1f}" if s in r else "failed" for s in sets)
                     + f" | {r.get('final_loss', '-')} | {r.get('tokens', '-')} | {r.get('tokens_per_s', '-')} |")
    (out / "sweep.json").write_text(json.dumps(results, indent=2))
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
