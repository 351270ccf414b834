"""pt2llm: post-training ternarization of large language models (PT²-LLM).

`pt2llm.load(DIR)` loads a quantized folder; after `import pt2llm`,
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` does too.
"""
__version__ = "0.1.0"

from .checkpoint import load  # noqa: E402
from .nn import TernaryLinear  # noqa: E402
from . import hf as _hf  # noqa: E402,F401  (registers the transformers quantizer)

__all__ = ["load", "TernaryLinear", "__version__"]
