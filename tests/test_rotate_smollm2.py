"""The real SmolLM2-135M (fetched once into the cache): rotated, it gives the same logits."""
import pytest
import torch

from pt2llm.model import sources
from pt2llm.rotate import fold, online


@pytest.mark.slow
def test_rotated_smollm2_gives_the_same_logits():
    try:
        model, _, _ = sources.load_float("smollm2-135m", torch.float32, progress=False)
    except sources.SourceError as e:
        pytest.skip(f"smollm2-135m cannot be loaded here: {e}")
    x = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
        record = fold.rotate_model(model, seed=0)
        out = model(x).logits
    assert record["untied_lm_head"] and len(record["online"]) == 60
    assert isinstance(model.model.layers[29].mlp.down_proj.input_transform, online.OnlineHadamard)
    assert isinstance(model.model.layers[29].self_attn.o_proj.input_transform, online.OnlineHadamard)
    # float32 rounding only: measured max |diff| about 1e-4 on logits of magnitude 34
    assert (out - ref).abs().max() <= 2e-5 * ref.abs().max()
    assert (out - ref).norm() <= 2e-6 * ref.norm()
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
