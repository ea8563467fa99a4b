"""The unified model: one causal LM that reads images and draws them through one TokenFlow tokenizer.

    model, processor = llm.build_tiny(seed=0)          # or TokenFlowMLLM.from_pretrained(local_dir)
    model.generate(**processor(text=..., images=...))   # answers about images
    model.generate_image("a red circle", seed=0)        # draws
    reply = llm.chat(model, messages, processor, draw=None, seed=None, stop=None)   # both, in one conversation

Importing the package registers the post-norm Llama backbone and TokenFlowMLLM with the transformers Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from . import backbones
from .build import assemble, build_tiny
from .chat import ChatReply, chat
from .configuration_tokenflow_mllm import TokenFlowMLLMConfig
from .generation import ImageGenerationOutput, resolve_seed, sampler_defaults, save_png
from .modeling_tokenflow_mllm import FrozenTokenFlowTokenizer, TokenFlowMLLM, TokenFlowMLLMOutput
from .processing_tokenflow_mllm import TokenFlowProcessor, add_image_special_tokens
from .text_tokenizer import build_shapesworld_text_tokenizer

AutoConfig.register(TokenFlowMLLMConfig.model_type, TokenFlowMLLMConfig, exist_ok=True)
AutoModel.register(TokenFlowMLLMConfig, TokenFlowMLLM, exist_ok=True)
AutoModelForCausalLM.register(TokenFlowMLLMConfig, TokenFlowMLLM, exist_ok=True)
AutoProcessor.register(TokenFlowMLLMConfig, TokenFlowProcessor, exist_ok=True)

__all__ = [
    "ChatReply",
    "FrozenTokenFlowTokenizer",
    "ImageGenerationOutput",
    "TokenFlowMLLM",
    "TokenFlowMLLMConfig",
    "TokenFlowMLLMOutput",
    "TokenFlowProcessor",
    "add_image_special_tokens",
    "assemble",
    "backbones",
    "build_shapesworld_text_tokenizer",
    "build_tiny",
    "chat",
    "resolve_seed",
    "sampler_defaults",
    "save_png",
]
