import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run through its interpreter (set before transformers imports triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from tinymodels import text, tokenizer

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    # the evaluation data beside the checkout, unless the caller points elsewhere
    shared = REPO.parent / "shared" / "data"
    if "PT2LLM_DATA_DIR" not in os.environ and shared.is_dir():
        os.environ["PT2LLM_DATA_DIR"] = str(shared)


@pytest.fixture
def one_thread():
    """One torch thread in this process (and, through tinymodels and the launcher, in the
    processes it starts), for tests that compare bytes written by different processes. With
    two threads those bytes differed now and then when processes competed for two cores (CI
    failed on it: about 1 run in 25 of one process under load, up to 1 in 4 with three ranks;
    the cause is not pinned down: MKL picks its threads per call, and neither MKL_CBWR nor
    MKL_DYNAMIC=FALSE alone cured the ranks); with one thread, 0 in 55 of those runs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    torch.manual_seed(0)
    tok = tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=200, intermediate_size=328, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=request.param == "llama")
    cfg = LlamaConfig(**common) if request.param == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(cfg)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d / "float")
    tok.save_pretrained(d / "float")
    (d / "calib.txt").write_text(text(1))
    return request.param, d
