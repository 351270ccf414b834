"""The real SmolLM2-135M (fetched once into the cache): PT² with a small calibration
must beat naive ternary by a wide margin on WikiText-2."""

import pytest
import torch

from pt2llm import cli, data
from pt2llm.eval.perplexity import perplexity
from pt2llm.model import sources


@pytest.fixture(scope="module")
def smollm2():
    try:
        return sources.fetch_alias("smollm2-135m", progress=False)
    except sources.SourceError as e:
        pytest.skip(f"smollm2-135m cannot be fetched here: {e}")


@pytest.mark.slow
def test_pt2_is_far_better_than_rtn_on_smollm2(smollm2, tmp_path):
    if data.data_dir() is None:
        pytest.skip("PT2LLM_DATA_DIR is not set: no C4 calibration or WikiText-2 test text")
    common = ["--device", "cpu", "--no-progress"]
    assert cli.main(["quantize", str(smollm2), "--out", str(tmp_path / "pt2"), "--nsamples", "16",
                     "--seqlen", "512", *common]) == 0
    assert cli.main(["quantize", str(smollm2), "--out", str(tmp_path / "rtn"), "--method", "rtn", *common]) == 0
    import pt2llm
    ppl = {}
    for name in ("pt2", "rtn"):
        model, tok = pt2llm.load(tmp_path / name)
        ppl[name] = perplexity(model, tok, "wikitext2", seqlen=2048, limit_windows=3, progress=False)["ppl"]
    assert all(torch.isfinite(torch.tensor(v)) for v in ppl.values()), ppl
    assert ppl["pt2"] * 10 <= ppl["rtn"], ppl
