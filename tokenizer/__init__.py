"""TokenFlow image tokenizer: dual codebook (semantic + pixel halves, one shared index), multi-scale residual."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_tokenflow import TokenFlowConfig
from .image_processing_tokenflow import TokenFlowImageProcessor
from .modeling_tokenflow import TokenFlowEncoderOutput, TokenFlowOutput, TokenFlowTokenizer
from .quantizer import DualCodebookQuantizer, MultiScaleResidualQuantizer

AutoConfig.register(TokenFlowConfig.model_type, TokenFlowConfig, exist_ok=True)
AutoModel.register(TokenFlowConfig, TokenFlowTokenizer, exist_ok=True)
AutoImageProcessor.register(TokenFlowConfig, image_processor_classes={"pil": TokenFlowImageProcessor}, exist_ok=True)

__all__ = [
    "DualCodebookQuantizer",
    "MultiScaleResidualQuantizer",
    "TokenFlowConfig",
    "TokenFlowEncoderOutput",
    "TokenFlowImageProcessor",
    "TokenFlowOutput",
    "TokenFlowTokenizer",
]
