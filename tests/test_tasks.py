"""Zero-shot task configs on the local files, and lm-eval's scores checked against an
independent scorer written here (log-likelihood of each choice, argmax)."""
import bz2
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from pt2llm import cli, data
from pt2llm.eval import tasks

pytestmark = pytest.mark.skipif(data.data_dir() is None, reason="needs $PT2LLM_DATA_DIR")


def _rows(rel):
    return [json.loads(x) for x in (data.data_dir() / rel).read_text().splitlines() if x.strip()]


def test_parse_tasks():
    assert tasks.parse_tasks("all") == list(tasks.PAPER_TASKS)
    assert tasks.parse_tasks("piqa, boolq") == ["piqa", "boolq"]
    with pytest.raises(tasks.TaskError, match="mmlu"):
        tasks.parse_tasks("piqa,mmlu")


def test_prompts_match_lm_eval_templates():
    # BoolQ: lm-eval's "{passage}\nQuestion: {question}?\nAnswer:" rebuilt from llm-foundry's form
    d = {"query": "Passage: Sky is blue. Really.\nQuestion: is the sky blue?", "choices": ["no", "yes"], "gold": 1}
    assert tasks._boolq_text(d) == "Sky is blue. Really.\nQuestion: is the sky blue?\nAnswer:"
    assert tasks._arc_text({"query": "Question: Why?"}) == "Question: Why?\nAnswer:"
    for row in _rows("boolq/boolq.jsonl")[:50]:
        t = tasks._boolq_text(row)
        assert t.endswith("?\nAnswer:") and "Passage:" not in t.split("\n")[0][:9] and t.count("\nQuestion: ") >= 1


def test_hellaswag_grouping_matches_file():
    lines = bz2.open(data.data_dir() / tasks.TASKS["hellaswag"].file, "rt", encoding="utf-8").read().split("\n")
    docs = tasks._hellaswag_docs(lines)
    assert len(docs) == 10042
    assert all(len(d["choices"]) == 4 and 0 <= d["gold"] < 4 for d in docs)
    assert docs[0]["query"] == lines[0] and docs[0]["choices"][docs[0]["gold"]] == lines[2 + int(lines[1])]
    with pytest.raises(data.DataError):
        tasks._hellaswag_docs(lines[:7])


def test_piqa_labels_line_up_with_llm_foundry_copy():
    """The official file + separate labels agree with llm-foundry's preprocessed copy."""
    path = data.data_dir() / tasks.TASKS["piqa"].file
    labels = tasks._piqa_labels(path)
    foundry = _rows("piqa/piqa.jsonl")
    assert len(labels) == len(foundry) == 1838
    assert labels == [r["gold"] for r in foundry]


def _loglik(model, tok, context, continuation):
    """Sum of log p(continuation tokens | context), tokenizing as lm-eval does: the whole
    string once, the continuation being what follows the context's tokens."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_lm_eval_scores_equal_an_independent_scorer(tmp_path):
    """A tiny random model: the per-document argmax choices lm-eval makes through our configs
    must equal ours (ARC-Easy: prompt, choices; WinoGrande: partial scoring)."""
    from tinymodels import tokenizer
    from transformers import LlamaConfig

    torch.manual_seed(0)
    tok = tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    n = 6
    got = tasks.evaluate(model, tok, ["arc_easy", "winogrande"], limit=n, batch_size=4, progress=False)
    arc = _rows("arc_easy/arc_easy.jsonl")[:n]
    acc = acc_norm = 0
    for d in arc:
        ctx = tasks._arc_text(d)
        ll = [_loglik(model, tok, ctx, " " + c) for c in d["choices"]]
        norm = [x / len(c) for x, c in zip(ll, d["choices"])]  # lm-eval: characters of the choice
        acc += max(range(len(ll)), key=ll.__getitem__) == d["gold"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == d["gold"]
    assert got["arc_easy"]["acc"] == pytest.approx(acc / n)
    assert got["arc_easy"]["acc_norm"] == pytest.approx(acc_norm / n)
    wino = _rows("winogrande/winogrande.jsonl")[:n]
    acc = sum(max(range(2), key=lambda i: _loglik(model, tok, d["context_options"][i], " " + d["continuation"]))
              == d["gold"] for d in wino)
    assert got["winogrande"]["acc"] == pytest.approx(acc / n)
    assert got["arc_easy"]["n"] == n and "mean" not in got
    p = got["winogrande"]["acc"]
    assert got["winogrande"]["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))


def test_eval_command_tasks_and_ppl_in_one_call(tiny, tmp_path, capsys):
    _, d = tiny
    out = tmp_path / "r.json"
    rc = cli.main(["eval", str(d / "float"), "--tasks", "winogrande,arc_easy", "--limit", "2", "--ppl", "wikitext2",
                   "--seqlen", "64", "--limit-windows", "1", "--device", "cpu", "--no-progress", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["results"][0]
    assert set(res["tasks"]) == {"winogrande", "arc_easy"} and res["tasks"]["arc_easy"]["n"] == 2
    assert res["wikitext2"]["windows"] == 1
    printed = capsys.readouterr().out
    assert "winogrande" in printed and "wikitext2" in printed


def test_eval_command_rejects_unknown_task(tiny, capsys):
    _, d = tiny
    assert cli.main(["eval", str(d / "float"), "--tasks", "piqa,nope", "--device", "cpu"]) == 2
    assert "nope" in capsys.readouterr().err
