"""Zero-shot accuracy with lm-evaluation-harness 0.4 (imported only when asked for).

The field's six tasks are piqa, hellaswag, boolq, winogrande, arc_easy and arc_challenge; they
download their data, so they need a network. A local task (YAML plus JSON data, as in
tests/lm_eval_tasks/) runs offline through ``include_path``.
"""
from __future__ import annotations

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")
METRICS = ("acc", "acc_norm")


def zero_shot(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
              batch_size: int = 1) -> dict[str, dict[str, float]]:
    """{task: {"acc": ..., "acc_norm": ...}} of ``model`` (a loaded Hugging Face causal LM), zero-shot; the task
    name "paper" stands for the field's six (PAPER_TASKS)."""
    tasks = list(dict.fromkeys(t for name in tasks for t in (PAPER_TASKS if name == "paper" else (name,))))
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"zero-shot tasks need lm-evaluation-harness 0.4 with its HF wrapper ({err}): "
                          "pip install 'lm_eval[hf]>=0.4'") from err
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit,
                                      task_manager=manager, log_samples=False)
    return {task: {metric: results["results"][task][f"{metric},none"]
                   for metric in METRICS if f"{metric},none" in results["results"][task]}
            for task in tasks}
