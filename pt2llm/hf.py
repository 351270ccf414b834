"""transformers integration: after `import pt2llm`, AutoModelForCausalLM.from_pretrained(DIR)
loads a pt2llm folder (quant_method "pt2llm") with TernaryLinear modules."""
from __future__ import annotations

from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import QUANT_METHOD, replace_linears, upgrade_linears


class PT2LLMConfig(QuantizationConfigMixin):
    """Carries a pt2llm folder's `quantization_config` unchanged."""

    def __init__(self, **kwargs):
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        for k, v in kwargs.items():
            setattr(self, k, v)

    def to_dict(self):
        return dict(self.__dict__)


class PT2LLMHfQuantizer(HfQuantizer):
    """Pre-quantized checkpoints only: swaps the listed linears for TernaryLinear shells
    before the weights are loaded into them."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        qc = self.quantization_config.to_dict()
        qc.setdefault("modules", [])
        replace_linears(model, qc)

    def _process_model_after_weight_loading(self, model, **kwargs):
        upgrade_linears(model)  # format 1: codes repacked into format 2; format 3: perm and signs unpacked
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self):
        return False


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(PT2LLMConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(PT2LLMHfQuantizer)
