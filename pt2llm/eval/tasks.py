"""Zero-shot tasks scored by lm-evaluation-harness, reading local files.

The seven tasks of the paper (PIQA, ARC-Easy, ARC-Challenge, HellaSwag, WinoGrande,
BoolQ, OpenBookQA) as lm-eval task configs whose data come from $PT2LLM_DATA_DIR
through `datasets`' local loaders ("json", and "text" for HellaSwag). Prompts, choices,
target delimiter and metrics follow lm-eval's standard task of the same name; where the
local file's format forces a difference, the TASKS entry says so (docs/results/README.md
lists them all). lm-eval does the scoring: log-likelihood of each choice, acc, and
acc_norm (log-likelihood divided by the choice's length in characters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .. import data

# The paper's seven, in its table order.
PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa")


@dataclass(frozen=True)
class TaskSpec:
    file: str               # under $PT2LLM_DATA_DIR
    loader: str             # datasets' packaged builder
    metrics: tuple          # lm-eval metric names this task reports
    differences: str        # how it departs from lm-eval's standard task


TASKS = {
    "piqa": TaskSpec("piqa/valid.jsonl", "json", ("acc", "acc_norm"),
                     "official validation file with its separate label file; identical prompt "
                     "'Question: {goal}\\nAnswer:' and choices [sol1, sol2]"),
    "arc_easy": TaskSpec("arc_easy/arc_easy.jsonl", "json", ("acc", "acc_norm"),
                         "llm-foundry's preprocessed test split (query 'Question: {stem}', 4 choices, gold index); "
                         "prompt rebuilt as lm-eval's 'Question: {question}\\nAnswer:'; every row here has exactly "
                         "4 choices (the original ARC has a few rows with 3 or 5; how llm-foundry treated them "
                         "is not documented)"),
    "arc_challenge": TaskSpec("arc_challenge/arc_challenge.jsonl", "json", ("acc", "acc_norm"),
                              "as arc_easy"),
    "hellaswag": TaskSpec("hellaswag/hellaswag_val_full.txt.bz2", "text", ("acc", "acc_norm"),
                          "llama.cpp's 6-line text form of the full validation split: context is "
                          "activity_label + ': ' + ctx with ctx_b not capitalised, and only [header], [step], "
                          "[substeps] and [title] tags removed (lm-eval capitalises ctx_b and removes every "
                          "[...] tag)"),
    "winogrande": TaskSpec("winogrande/winogrande.jsonl", "json", ("acc",),
                           "llm-foundry's partial-scoring form (context with each option, shared continuation): "
                           "the same requests lm-eval's winogrande builds from the raw sentence"),
    "boolq": TaskSpec("boolq/boolq.jsonl", "json", ("acc",),
                      "llm-foundry's 'Passage: ...\\nQuestion: ...?' rebuilt as lm-eval's "
                      "'{passage}\\nQuestion: {question}?\\nAnswer:' with choices no/yes"),
    "openbookqa": TaskSpec("openbookqa/openbook_qa.jsonl", "json", ("acc", "acc_norm"),
                           "llm-foundry's preprocessed test split; same prompt (the bare question stem)"),
}

# The metric each task contributes to the mean: acc_norm where lm-eval reports it (the
# convention of the GPTQ-family tables for ARC, HellaSwag, PIQA and OpenBookQA), acc otherwise.
MEAN_METRIC = {t: ("acc_norm" if "acc_norm" in s.metrics else "acc") for t, s in TASKS.items()}


class TaskError(ValueError):
    pass


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise TaskError("--tasks: empty list")
    if names == ["all"]:
        return list(PAPER_TASKS)
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise TaskError(f"--tasks {','.join(bad)}: unknown; expected a comma-separated list of "
                        f"{', '.join(PAPER_TASKS)} (or 'all')")
    return names


def _file(name: str) -> Path:
    root = data.data_dir()
    if root is None:
        raise data.DataError(f"task {name}: $PT2LLM_DATA_DIR is not set (the zero-shot tasks are read from it)")
    p = root / TASKS[name].file
    if not p.is_file():
        raise data.DataError(f"task {name}: {p} not found")
    return p


# --- per-task document shaping (pure functions of one row) -------------------------------

def _arc_text(doc):
    q = doc["query"]
    return (q if q.startswith("Question: ") else "Question: " + q) + "\nAnswer:"


def _boolq_text(doc):
    q = doc["query"]
    passage, _, question = q.removeprefix("Passage: ").rpartition("\nQuestion: ")
    return f"{passage}\nQuestion: {question.rstrip().removesuffix('?')}?\nAnswer:"


def _hellaswag_docs(lines):
    """Six lines a task: context, gold label, four endings."""
    lines = list(lines)
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise data.DataError(f"hellaswag: {len(lines)} lines, not a multiple of 6")
    return [{"query": lines[i], "choices": lines[i + 2:i + 6], "gold": int(lines[i + 1])}
            for i in range(0, len(lines), 6)]


def _piqa_labels(path: Path) -> list[int]:
    return [int(x) for x in (path.parent / "valid-labels.lst").read_text().split()]


def task_config(name: str) -> dict:
    """An lm-eval TaskConfig dict for one of TASKS, reading the local file."""
    import datasets

    path = _file(name)
    spec = TASKS[name]
    cfg = {
        "task": f"pt2llm_{name}",
        "dataset_path": spec.loader,
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in spec.metrics],
        "metadata": {"version": 1.0},
    }
    if name == "piqa":
        labels = _piqa_labels(path)

        def process(ds):
            if len(ds) != len(labels):
                raise data.DataError(f"piqa: {len(ds)} rows but {len(labels)} labels")
            return ds.add_column("label", labels)
        cfg |= {"process_docs": process, "doc_to_text": lambda d: f"Question: {d['goal']}\nAnswer:",
                "doc_to_choice": lambda d: [d["sol1"], d["sol2"]], "doc_to_target": lambda d: d["label"]}
    elif name in ("arc_easy", "arc_challenge"):
        cfg |= {"doc_to_text": _arc_text, "doc_to_choice": lambda d: d["choices"], "doc_to_target": lambda d: d["gold"]}
    elif name == "hellaswag":
        cfg |= {"process_docs": lambda ds: datasets.Dataset.from_list(_hellaswag_docs(ds["text"])),
                "doc_to_text": lambda d: d["query"], "doc_to_choice": lambda d: d["choices"],
                "doc_to_target": lambda d: d["gold"]}
    elif name == "winogrande":
        # partial scoring: the "text" is the gold context's index, the choices are the two
        # contexts, the target is the shared continuation (lm-eval's winogrande does the same)
        cfg |= {"doc_to_text": lambda d: d["gold"], "doc_to_choice": lambda d: d["context_options"],
                "doc_to_target": lambda d: d["continuation"]}
    elif name == "boolq":
        cfg |= {"doc_to_text": _boolq_text, "doc_to_choice": lambda d: ["no", "yes"],
                "doc_to_target": lambda d: d["gold"]}
    elif name == "openbookqa":
        cfg |= {"doc_to_text": lambda d: d["query"], "doc_to_choice": lambda d: d["choices"],
                "doc_to_target": lambda d: d["gold"]}
    return cfg


def evaluate(model, tokenizer, names: list[str], *, limit: int | None = None, batch_size: int = 32,
             device: str = "cpu", progress: bool = True) -> dict:
    """Score `model` on the named tasks; returns {task: {metric: value, metric_stderr: ..., n: docs}}
    plus "mean" (over MEAN_METRIC of each task) when all seven are present."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise TaskError("zero-shot tasks need lm-evaluation-harness: pip install 'pt2llm[eval]'") from e
    import logging

    import datasets
    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        datasets.disable_progress_bars()
    configs = [task_config(n) for n in names]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    out = lm_eval.simple_evaluate(model=lm, tasks=configs, limit=limit, bootstrap_iters=0,
                                  log_samples=False, verbosity="WARNING")
    res = {}
    for n in names:
        r = out["results"][f"pt2llm_{n}"]
        docs = int(out["n-samples"][f"pt2llm_{n}"]["effective"])
        row = {}
        for m in TASKS[n].metrics:
            p = float(r[f"{m},none"])
            row[m] = p
            row[f"{m}_stderr"] = math.sqrt(p * (1 - p) / (docs - 1)) if docs > 1 else None  # of a mean of 0/1
        row["n"] = docs
        res[n] = row
    if set(PAPER_TASKS) <= set(names):
        res["mean"] = {"value": sum(res[t][MEAN_METRIC[t]] for t in PAPER_TASKS) / len(PAPER_TASKS),
                       "metrics": {t: MEAN_METRIC[t] for t in PAPER_TASKS}}
    return res
