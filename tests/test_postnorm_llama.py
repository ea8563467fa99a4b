"""Post-norm Llama with QK-norm: equal to a from-the-definition re-implementation, cache-consistent, Auto-loadable."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from llm.backbones import PostNormLlamaConfig, PostNormLlamaForCausalLM, PostNormLlamaModel

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 64, 4, 2, 16, 2, 128


def tiny_config(**overrides) -> PostNormLlamaConfig:
    settings = dict(
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        qk_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    settings.update(overrides)
    return PostNormLlamaConfig(**settings)


def tiny_model(attn_implementation: str = "sdpa") -> PostNormLlamaForCausalLM:
    model = PostNormLlamaForCausalLM(tiny_config()).eval()
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():  # norms start at ones; make them matter so a misplaced norm cannot go unnoticed
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model


# ----------------------------------------------------------------------------------------------- definition


def rms_norm(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta=10000.0):
    """Rotate pairs (i, i + D/2) of the last dim by angle position * theta^(-2i/D)."""
    dim = x.shape[-1]
    half = dim // 2
    out = torch.empty_like(x)
    for pos in range(x.shape[-2]):
        for i in range(half):
            angle = positions[pos] * theta ** (-2 * i / dim)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., pos, i], x[..., pos, i + half]
            out[..., pos, i] = a * c - b * s
            out[..., pos, i + half] = b * c + a * s
    return out


def reference_logits(model, input_ids):
    """Plain torch from the block definition: x += norm_in(attn(x)); x += norm_post(mlp(x)), QK-norm before RoPE."""
    weights = {k: v.double() for k, v in model.state_dict().items()}
    eps, qk_eps = model.config.rms_norm_eps, model.config.qk_norm_eps
    length = input_ids.shape[1]
    x = weights["model.embed_tokens.weight"][input_ids]  # [B, L, C]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(LAYERS):
        w = {k.removeprefix(f"model.layers.{i}."): v for k, v in weights.items() if k.startswith(f"model.layers.{i}.")}
        q = (x @ w["self_attn.q_proj.weight"].T).unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)
        k = (x @ w["self_attn.k_proj.weight"].T).unflatten(-1, (KV_HEADS, HEAD_DIM)).transpose(1, 2)
        v = (x @ w["self_attn.v_proj.weight"].T).unflatten(-1, (KV_HEADS, HEAD_DIM)).transpose(1, 2)
        q = rope(rms_norm(q, w["self_attn.qknorm.query_norm.weight"], qk_eps), list(range(length)))
        k = rope(rms_norm(k, w["self_attn.qknorm.key_norm.weight"], qk_eps), list(range(length)))
        heads = []
        for h in range(HEADS):
            g = h // (HEADS // KV_HEADS)  # query head h reads key/value head g
            scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(HEAD_DIM)
            scores = scores.masked_fill(~causal, float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, g])
        attention = torch.cat(heads, dim=-1) @ w["self_attn.o_proj.weight"].T
        x = x + rms_norm(attention, w["input_layernorm.weight"], eps)
        gate = x @ w["mlp.gate_proj.weight"].T
        mlp = (gate * torch.sigmoid(gate) * (x @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T
        x = x + rms_norm(mlp, w["post_attention_layernorm.weight"], eps)
    x = rms_norm(x, weights["model.norm.weight"], eps)
    return x @ weights["lm_head.weight"].T


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_logits_equal_definition(attn_implementation):
    model = tiny_model(attn_implementation)
    input_ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        logits = model(input_ids).logits
    torch.testing.assert_close(logits.double(), reference_logits(model, input_ids), atol=1e-5, rtol=1e-5)


def test_reference_state_dict_keys():
    keys = set(PostNormLlamaForCausalLM(tiny_config()).state_dict())
    for i in range(LAYERS):
        assert f"model.layers.{i}.self_attn.qknorm.query_norm.weight" in keys
        assert f"model.layers.{i}.self_attn.qknorm.key_norm.weight" in keys
    model = PostNormLlamaForCausalLM(tiny_config())
    assert model.state_dict()["model.layers.0.self_attn.qknorm.key_norm.weight"].shape == (HEAD_DIM,)
    assert model.model.layers[0].self_attn.qknorm.query_norm.variance_epsilon == 1e-6


def test_cached_greedy_generation_equals_uncached():
    model = tiny_model()
    prompt = torch.randint(2, VOCAB, (2, 5))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 15)
    assert torch.equal(cached, uncached)


def test_auto_classes_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PostNormLlamaConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is PostNormLlamaForCausalLM
    assert loaded.config.qk_norm_eps == model.config.qk_norm_eps
    input_ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is PostNormLlamaModel
    torch.testing.assert_close(base.state_dict()["layers.1.self_attn.qknorm.key_norm.weight"],
                               model.state_dict()["model.layers.1.self_attn.qknorm.key_norm.weight"], atol=0, rtol=0)
