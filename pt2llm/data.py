"""Text for calibration and evaluation, by name or path, and token windows.

Named sets are read from $PT2LLM_DATA_DIR (laid out like the project's shared data
folder; see its README.md), or from the Hugging Face hub through `datasets` when it is
installed and reachable. Calibration and evaluation never share documents: calibration
`c4` is C4 docs 0-999; evaluation `c4` is docs 1000-1999 joined with "\\n\\n";
evaluation `wikitext2` is the raw test file read whole.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .speed import cache_arg

CALIB_SETS = ("c4", "wikitext2", "ptb")
EVAL_SETS = ("wikitext2", "c4", "ptb")


class DataError(ValueError):
    """Data cannot be found or is unusable (message says where we looked)."""


def data_dir() -> Path | None:
    d = os.environ.get("PT2LLM_DATA_DIR")
    return Path(d) if d else None


def _local(rel: str) -> Path | None:
    d = data_dir()
    if d is not None and (d / rel).is_file():
        return d / rel
    return None


def _c4_docs(lo: int, hi: int) -> list[str] | None:
    p = _local("c4/c4_validation_2k.parquet")
    if p is None:
        return None
    import pyarrow.parquet as pq
    return pq.read_table(p, columns=["text"]).column("text").to_pylist()[lo:hi]


def _from_hub(name: str, split: str) -> str | None:
    """The paper's own sources, when `datasets` and the hub are available; else None."""
    try:
        import datasets  # noqa: F401
        from datasets import load_dataset
    except ImportError:
        return None
    try:
        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return "\n\n".join(rows)
        if name == "ptb":
            rows = load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"]
            return "\n\n".join(rows)
        if name == "c4":
            rows = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                split="validation")["text"]
            return "\n\n".join(rows[:1000] if split == "train" else rows[1000:2000])
    except Exception:  # offline, or the hub refused: treated as "not found"
        return None
    return None


def _missing(name: str, purpose: str, rel: str) -> DataError:
    where = f"$PT2LLM_DATA_DIR/{rel}" + ("" if data_dir() else " ($PT2LLM_DATA_DIR is not set)")
    return DataError(f"{purpose} set {name!r} not found: looked in {where} and on the Hugging Face hub "
                     f"(needs `datasets` and a network)")


_FILES = {("calibration", "wikitext2"): "wikitext-2-raw/wiki.train.raw",
          ("evaluation", "wikitext2"): "wikitext-2-raw/wiki.test.raw",
          ("calibration", "ptb"): "ptb/ptb.train.txt",
          ("evaluation", "ptb"): "ptb/ptb.test.txt"}
_C4_FILE = "c4/c4_validation_2k.parquet"
_C4_DOCS = {"calibration": (0, 1000), "evaluation": (1000, 2000)}
_HUB_SPLIT = {"calibration": "train", "evaluation": "test"}


def _named_text(name: str, purpose: str) -> str:
    """A named set's text: $PT2LLM_DATA_DIR first, then the hub, else a DataError."""
    if name == "c4":
        rel = _C4_FILE
        docs = _c4_docs(*_C4_DOCS[purpose])
        text = "\n\n".join(docs) if docs is not None else None
    else:
        rel = _FILES[(purpose, name)]
        p = _local(rel)
        text = p.read_text(encoding="utf-8") if p else None
    if text is None:
        text = _from_hub(name, _HUB_SPLIT[purpose])
    if text is None:
        if (purpose, name) == ("calibration", "wikitext2"):
            rel += " (the test file is for evaluation only)"
        raise _missing(name, purpose, rel)
    return text


def calibration_text(name: str) -> str:
    """Text of a named calibration set, or of a text file at PATH."""
    if name in CALIB_SETS:
        return _named_text(name, "calibration")
    return read_text_file(name)


def eval_text(name: str) -> str:
    if name not in EVAL_SETS:
        raise DataError(f"unknown evaluation set {name!r}; expected one of {EVAL_SETS}")
    return _named_text(name, "evaluation")


def read_text_file(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"calibration {path!r} is neither a named set {CALIB_SETS + ('synthetic',)} nor a file")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"calibration file {path} is empty")
    if b"\0" in raw:
        raise DataError(f"calibration file {path} looks binary (it holds NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"calibration file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of the whole text's token ids (special tokens as the tokenizer adds)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    return ids.long()


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples windows of seqlen tokens at seeded random offsets: LongTensor [nsamples, seqlen]."""
    if nsamples <= 0 or seqlen <= 0:
        raise DataError(f"nsamples and seqlen must be positive (got {nsamples}, {seqlen})")
    if ids.numel() < nsamples * seqlen:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than the {nsamples * seqlen} "
                        f"asked for ({nsamples} x {seqlen}); use a longer text or smaller --nsamples/--seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


@torch.no_grad()
def synthetic_windows(model, tokenizer, nsamples: int, seqlen: int, seed: int, device="cpu",
                      batch: int = 16) -> torch.Tensor:
    """Calibration text sampled from the model itself (seeded): the offline fallback.
    Each window starts at a random vocabulary token and is sampled at temperature 1."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    out = []
    model.to(device)
    for b0 in range(0, nsamples, batch):
        nb = min(batch, nsamples - b0)
        ids = torch.randint(0, vocab, (nb, 1), generator=g)
        past = None
        key = cache_arg(model)
        cur = ids
        seq = [ids]
        for _ in range(seqlen - 1):
            o = model(input_ids=cur.to(device), **{key: past}, use_cache=True)
            past = o.past_key_values
            probs = torch.softmax(o.logits[:, -1].float().cpu(), dim=-1)
            cur = torch.multinomial(probs, 1, generator=g)
            seq.append(cur)
        out.append(torch.cat(seq, dim=1))
    model.to("cpu")
    return torch.cat(out)


def calibration_windows(name: str, tokenizer, nsamples: int, seqlen: int, seed: int,
                        model=None, device="cpu", text: str | None = None) -> torch.Tensor:
    """Calibration windows [nsamples, seqlen] from a named set, a PATH or `synthetic`;
    `text`, when given, is the set's text already read (by `calibration_text`)."""
    if nsamples <= 0:
        raise DataError(f"--nsamples must be positive, got {nsamples}")
    if seqlen <= 0:
        raise DataError(f"--seqlen must be positive, got {seqlen}")
    if name == "synthetic":
        return synthetic_windows(model, tokenizer, nsamples, seqlen, seed, device)
    text = calibration_text(name) if text is None else text
    return random_windows(tokenize(tokenizer, text), nsamples, seqlen, seed)
