"""Does a distilled student fit the text it trained on better than unseen text of the same kind?

Per-token KL(teacher || student) and both models' perplexity on the first N training blocks (which a run of many
epochs has seen many times) and on the first N windows of each evaluation set. A KL on the training blocks far
below the KL on WikiText-2 and C4 says the run is limited by its data, not by the student.

    PYTHONPATH=src python benchmarks/heldout_kl.py --teacher /tmp/smollm2.gguf --students RUN/model,... \
        --data c4_wiki --windows 32 --out heldout.md
"""
import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from binarymos.data import documents, eval_windows, leading_bos, token_blocks
from binarymos.models import load_model
from binarymos.train import kl_sum


@torch.no_grad()
def scores(teacher, student, windows: torch.Tensor, device: str) -> tuple[float, float, float]:
    """(KL per token, student perplexity, teacher perplexity) over the windows, one at a time."""
    kl = nll_s = nll_t = 0.0
    tokens = 0
    for ids in windows.split(1):
        ids = ids.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            s, t = student(input_ids=ids).logits.float(), teacher(input_ids=ids).logits.float()
        kl += kl_sum(s, t).item()
        nll_s += F.cross_entropy(s[0, :-1], ids[0, 1:], reduction="sum").item()
        nll_t += F.cross_entropy(t[0, :-1], ids[0, 1:], reduction="sum").item()
        tokens += ids.shape[1]
    targets = tokens - len(windows)
    return kl / tokens, math.exp(nll_s / targets), math.exp(nll_t / targets)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--students", required=True, help="comma-separated trained model directories")
    parser.add_argument("--data", default="c4_wiki", help="the runs' training data")
    parser.add_argument("--windows", type=int, default=32, help="windows of each set")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    teacher, tokenizer = load_model(args.teacher, dtype=torch.float32, device=args.device)
    bos = leading_bos(teacher.config, tokenizer)
    sets = {"training blocks": token_blocks(tokenizer, documents(args.data, "train"), args.seq_len, bos)[:args.windows]}
    for name in ("wikitext2", "c4"):
        sets[name] = eval_windows(tokenizer, name, args.seq_len, max_windows=args.windows, bos_token_id=bos)
    rows = ["| student | text | windows | KL per token | student ppl | teacher ppl |", "|---|---|---:|---:|---:|---:|"]
    for path in args.students.split(","):
        student, _ = load_model(path, dtype=torch.float32, device=args.device)
        student.eval()
        for name, windows in sets.items():
            kl, ppl_s, ppl_t = scores(teacher, student, windows, args.device)
            rows.append(f"| {Path(path).parent.name or path} | {name} | {len(windows)} | {kl:.3f} | {ppl_s:.2f} | "
                        f"{ppl_t:.2f} |")
            print(rows[-1], flush=True)
        del student
    table = "\n".join(rows) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
