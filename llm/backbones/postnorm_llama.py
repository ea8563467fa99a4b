"""Llama with the reference text-to-image model's block: QK-norm and post-branch RMSNorm.

Two changes to a stock Llama decoder layer, everything else (RoPE, MLP, final norm, attention dispatch to
sdpa / eager / flex, KV cache, ``generate``) is transformers' Llama:

1. QK-norm: after the q/k projections are split into heads and before RoPE, queries and keys each go through an
   RMSNorm over ``head_dim`` (eps ``qk_norm_eps``, one weight vector shared by all heads, computed in fp32).
   The weights live at ``model.layers.{i}.self_attn.qknorm.query_norm.weight`` and ``...key_norm.weight``, the
   keys of the reference checkpoint, so its state dict loads 1:1.
2. Post-branch norm: attention and MLP read the un-normalised residual stream and their outputs are normalised
   before being added::

       x = x + input_layernorm(attention(x))
       x = x + post_attention_layernorm(mlp(x))

   The two norms keep Llama's names, so a stock Llama checkpoint loads too (as an initialisation only: its
   blocks were trained with pre-norm).

Importing ``llm.backbones`` registers ``PostNormLlamaConfig`` (``model_type="tokenflow_postnorm_llama"``) with
``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``.
"""

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

__all__ = [
    "PostNormLlamaConfig",
    "PostNormLlamaForCausalLM",
    "PostNormLlamaModel",
    "PostNormLlamaPreTrainedModel",
]


@strict
class PostNormLlamaConfig(LlamaConfig):
    r"""``LlamaConfig`` plus ``qk_norm_eps`` (float, defaults to 1e-6): epsilon of the per-head query/key RMSNorm."""

    model_type = "tokenflow_postnorm_llama"

    qk_norm_eps: float = 1e-6


class QKNorm(nn.Module):
    """RMSNorm over ``head_dim`` for queries and keys, one weight vector each, shared across heads."""

    def __init__(self, head_dim: int, eps: float) -> None:
        super().__init__()
        self.query_norm = LlamaRMSNorm(head_dim, eps=eps)
        self.key_norm = LlamaRMSNorm(head_dim, eps=eps)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``query [B, H, L, D]``, ``key [B, H_kv, L, D]`` -> the same shapes, normalised over ``D``."""
        return self.query_norm(query), self.key_norm(key)


class PostNormLlamaAttention(LlamaAttention):
    def __init__(self, config: PostNormLlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.qknorm = QKNorm(self.head_dim, eps=config.qk_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        query_states, key_states = self.qknorm(query_states, key_states)  # before RoPE, as in the reference
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class PostNormLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: PostNormLlamaConfig, layer_idx: int) -> None:
        # LlamaDecoderLayer.__init__ hard-codes its attention class, so the same modules are built here with ours
        # (instead of building Llama's and replacing it, which would initialise every projection twice).
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = PostNormLlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = hidden_states + self.input_layernorm(attn_output)
        return hidden_states + self.post_attention_layernorm(self.mlp(hidden_states))


class PostNormLlamaPreTrainedModel(LlamaPreTrainedModel):
    config: PostNormLlamaConfig
    _no_split_modules = ["PostNormLlamaDecoderLayer"]
    _can_record_outputs = {
        "hidden_states": PostNormLlamaDecoderLayer,
        "attentions": PostNormLlamaAttention,
    }


class PostNormLlamaModel(PostNormLlamaPreTrainedModel, LlamaModel):
    """``LlamaModel`` whose layers are ``PostNormLlamaDecoderLayer``; forward is Llama's."""

    def __init__(self, config: PostNormLlamaConfig) -> None:
        # LlamaModel.__init__ hard-codes its decoder layer: same modules, built here with ours.
        PostNormLlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [PostNormLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class PostNormLlamaForCausalLM(PostNormLlamaPreTrainedModel, LlamaForCausalLM):
    """``LlamaForCausalLM`` over a ``PostNormLlamaModel``; forward and generation are Llama's."""

    def __init__(self, config: PostNormLlamaConfig) -> None:
        # LlamaForCausalLM.__init__ hard-codes its base model: same modules, built here with ours.
        PostNormLlamaPreTrainedModel.__init__(self, config)
        self.model = PostNormLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
