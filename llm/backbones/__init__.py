"""Backbone options beyond stock transformers models; importing this package registers them with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .postnorm_llama import PostNormLlamaConfig, PostNormLlamaForCausalLM, PostNormLlamaModel

AutoConfig.register(PostNormLlamaConfig.model_type, PostNormLlamaConfig)
AutoModel.register(PostNormLlamaConfig, PostNormLlamaModel)
AutoModelForCausalLM.register(PostNormLlamaConfig, PostNormLlamaForCausalLM)

__all__ = ["PostNormLlamaConfig", "PostNormLlamaForCausalLM", "PostNormLlamaModel"]
