"""Converters of the reference LLM releases: tiny synthetic checkpoints in the reference key layout, converted, must
reproduce a test-only re-implementation of the reference forward (written from the reference release's documented
layout) to float tolerance.

- Understanding (LLaVA-Qwen): stock Qwen2 blocks; 1 placeholder id -200 replaced by mm_projector(f̂) [S², H].
- Generation (LLaVA-Llama t2i): post-branch RMSNorm + QK-norm blocks (eager attention written out here), vocabulary =
  text rows + K code rows, VAR cascaded next-scale inputs, lvl_embed on every position, pos_1LC where each code is
  predicted, block-causal mask over the image span, left [PAD] window masked as keys with positions counted over it.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import llm.backbones  # noqa: F401
from llm.convert import (
    ReferenceCheckpointError,
    convert,
    convert_generation,
    convert_understanding,
    load_reference_state_dict,
    load_text_tokenizer,
    main,
)
from llm.modeling_tokenflow_mllm import TokenFlowMLLM
from tokenizer.configuration_tokenflow import TokenFlowConfig
from tokenizer.modeling_tokenflow import TokenFlowTokenizer

CODEBOOK = 256
CORPUS = ["a red circle above a blue square", "two green triangles", "a small yellow star on the left",
          "<img> </img> picture of shapes", "What is in the image? Describe it."] * 4


# ------------------------------------------------------------------------------------------------ synthetic files
def text_tokenizer(specials: list[str], **roles) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, padding_side="right", **roles)


@pytest.fixture(scope="module")
def image_tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = TokenFlowTokenizer(TokenFlowConfig.from_preset("tiny", codebook_size=CODEBOOK)).eval()
    path = tmp_path_factory.mktemp("image_tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_tokenizer(image_tokenizer_dir):
    return TokenFlowTokenizer.from_pretrained(str(image_tokenizer_dir)).eval()


def randn(*shape, std=0.2):
    return torch.randn(*shape) * std


@pytest.fixture(scope="module")
def understanding_reference(tmp_path_factory):
    """LLaVA-Qwen folder: config, 2 safetensors shards + index, tokenizer; projector and a vision-tower copy."""
    torch.manual_seed(1)
    tokenizer = text_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    backbone = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=len(tokenizer) + 5, rms_norm_eps=1e-6, rope_theta=1e6,
                    max_position_embeddings=512, tie_word_embeddings=False)
    qwen = Qwen2ForCausalLM(Qwen2Config(**backbone))
    state = {k: v.clone() for k, v in qwen.state_dict().items()}
    for name, p in state.items():  # RMSNorm weights away from 1, so a skipped norm would show
        if name.endswith("norm.weight"):
            p.add_(randn(*p.shape))
    state.update({"model.mm_projector.0.weight": randn(32, 40), "model.mm_projector.0.bias": randn(32),
                  "model.mm_projector.2.weight": randn(32, 32), "model.mm_projector.2.bias": randn(32),
                  "model.vision_tower.vision_tower.quantize.embedding_vqkd.weight": randn(CODEBOOK, 32)})
    path = tmp_path_factory.mktemp("llava_qwen")
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in shards.items():
        save_file({k: state[k].contiguous() for k in names}, str(path / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, names in shards.items() for k in names}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "mm_hidden_size": 40,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "", "image_aspect_ratio": "pad",
              "use_cache": False, "torch_dtype": "float32", "hidden_act": "silu", **backbone}
    (path / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(path)
    return path, state, config


GEN = dict(hidden=32, intermediate=64, layers=2, heads=4, head_dim=8, eps=1e-5, theta=10000.0)


@pytest.fixture(scope="module")
def generation_reference(tmp_path_factory, image_tokenizer):
    """LLaVA-Llama t2i folder: pytorch_model.bin in the reference key layout, config, tokenizer with [PAD] + vq tokens."""
    torch.manual_seed(2)
    tokenizer = text_tokenizer(["<unk>", "<s>", "</s>"], bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    text_rows = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [f"<vq_token_{i}>" for i in range(CODEBOOK)]})
    h, i, hd = GEN["hidden"], GEN["intermediate"], GEN["head_dim"]
    config = image_tokenizer.config
    state = {"model.embed_tokens.weight": randn(text_rows + CODEBOOK, h, std=1.0),
             "lm_head.weight": randn(text_rows + CODEBOOK, h),
             "model.norm.weight": 1 + randn(h),
             "model.mm_projector.0.weight": randn(h, 40), "model.mm_projector.0.bias": randn(h),
             "model.mm_projector.2.weight": randn(h, h), "model.mm_projector.2.bias": randn(h),
             "model.lvl_embed.weight": randn(len(config.scales) + 1, h, std=0.5),
             "model.pos_1LC": randn(config.num_tokens, h, std=0.5),
             "image_token_start": torch.tensor(text_rows), "image_token_end": torch.tensor(text_rows + CODEBOOK - 1)}
    for layer in range(GEN["layers"]):
        p = f"model.layers.{layer}."
        state.update({p + f"self_attn.{n}_proj.weight": randn(h, h) for n in "qkvo"})
        state.update({p + "self_attn.qknorm.query_norm.weight": 1 + randn(hd),
                      p + "self_attn.qknorm.key_norm.weight": 1 + randn(hd),
                      p + "mlp.gate_proj.weight": randn(i, h), p + "mlp.up_proj.weight": randn(i, h),
                      p + "mlp.down_proj.weight": randn(h, i),
                      p + "input_layernorm.weight": 1 + randn(h), p + "post_attention_layernorm.weight": 1 + randn(h)})
    path = tmp_path_factory.mktemp("t2i")
    torch.save(state, path / "pytorch_model.bin")
    reference_config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": h,
        "intermediate_size": i, "num_hidden_layers": GEN["layers"], "num_attention_heads": GEN["heads"],
        "num_key_value_heads": GEN["heads"], "rms_norm_eps": GEN["eps"], "rope_theta": GEN["theta"],
        "rope_scaling": None, "max_position_embeddings": 1024, "vocab_size": text_rows + CODEBOOK,
        "hidden_act": "silu", "tie_word_embeddings": False, "mm_hidden_size": 40, "vq_codebook_size": CODEBOOK,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_vq_type": "TOKEN_FLOW", "use_cache": False}
    (path / "config.json").write_text(json.dumps(reference_config))
    tokenizer.save_pretrained(path)
    return path, state, text_rows, tokenizer


# ------------------------------------------------------------------------------------------------ reference forwards
def reference_understanding_logits(state, config, ids: list[int], features: torch.Tensor) -> torch.Tensor:
    """LLaVA: text embeddings with the single -200 placeholder replaced by mm_projector(f̂) [S², H]; stock Qwen2."""
    fields = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta",
                                     "max_position_embeddings", "tie_word_embeddings")}
    qwen = Qwen2ForCausalLM(Qwen2Config(**fields)).eval()
    qwen.load_state_dict({k: v for k, v in state.items() if not k.startswith(("model.mm_", "model.vision_"))})
    projected = F.linear(F.gelu(F.linear(features, state["model.mm_projector.0.weight"],
                                         state["model.mm_projector.0.bias"])),
                         state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
    at = ids.index(-200)
    embed = state["model.embed_tokens.weight"]
    sequence = torch.cat([embed[ids[:at]], projected, embed[ids[at + 1:]]])[None]
    with torch.no_grad():
        return qwen(inputs_embeds=sequence).logits[0]


def rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def cascaded_inputs(tokenizer_state, scales, codes: torch.Tensor) -> torch.Tensor:
    """VAR teacher forcing, cascaded at low resolution: [B, N] codes → [B, N - 1, 40]."""
    entries = torch.cat([F.normalize(tokenizer_state["quantize.embedding_vqkd.weight"][codes], dim=-1),
                         F.normalize(tokenizer_state["quantize.embedding_vqgan.weight"][codes], dim=-1)], dim=-1)
    maps, start = [], 0
    for s in scales:
        maps.append(entries[:, start:start + s * s].reshape(-1, s, s, 40).permute(0, 3, 1, 2))
        start += s * s
    blocks, accumulated = [], maps[0]
    for k in range(len(scales) - 1):
        block = F.interpolate(accumulated, size=(scales[k + 1],) * 2, mode="bicubic", align_corners=False)
        blocks.append(block.flatten(2).transpose(1, 2))
        accumulated = block + maps[k + 1]
    return torch.cat(blocks, dim=1)


def reference_generation_logits(state, tokenizer_state, scales, ids, pad_id, image_start, codes):
    """t2i forward (reference §2.4-2.6) over ids [B, L] whose image span starts at each row's first code id."""
    batch, length = ids.shape
    num_codes = codes.shape[1]
    scale_of_code = torch.repeat_interleave(torch.arange(len(scales)), torch.tensor(scales) ** 2)
    x = state["model.embed_tokens.weight"][ids].clone()
    level = torch.zeros(batch, length, dtype=torch.long)
    position_rows = torch.full((batch, length), -1)
    inputs = F.linear(F.gelu(F.linear(cascaded_inputs(tokenizer_state, scales, codes),
                                      state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])),
                      state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
    allowed = torch.ones(length, length).tril().bool()[None] & (ids != pad_id)[:, None, :]
    allowed = allowed.clone()
    for b in range(batch):
        p0 = int((ids[b] >= image_start).nonzero()[0])
        x[b, p0:p0 + num_codes - 1] = inputs[b]
        x[b, p0 + num_codes - 1] = 0
        level[b, p0:p0 + num_codes - 1] = scale_of_code[1:] + 1
        position_rows[b, p0 - 1:p0 - 1 + num_codes] = torch.arange(num_codes)
        span = slice(p0 - 1, p0 - 1 + num_codes)
        allowed[b, span, span] = scale_of_code[:, None] >= scale_of_code[None, :]
    x = x + state["model.lvl_embed.weight"][level]
    x = x + torch.where((position_rows >= 0)[..., None], state["model.pos_1LC"][position_rows.clamp(min=0)], 0)
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]

    hd, heads = GEN["head_dim"], GEN["heads"]
    inv_freq = 1.0 / GEN["theta"] ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.arange(length).float()[:, None] * inv_freq  # positions 0..L-1, left pads included
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    for layer in range(GEN["layers"]):
        p = f"model.layers.{layer}."
        q, k, v = (F.linear(x, state[p + f"self_attn.{n}_proj.weight"]).view(batch, length, heads, hd).transpose(1, 2)
                   for n in "qkv")
        q = rms_norm(q, state[p + "self_attn.qknorm.query_norm.weight"], 1e-6)
        k = rms_norm(k, state[p + "self_attn.qknorm.key_norm.weight"], 1e-6)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask
        attention = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
        x = x + rms_norm(F.linear(attention, state[p + "self_attn.o_proj.weight"]), state[p + "input_layernorm.weight"],
                         GEN["eps"])
        mlp = F.linear(F.silu(F.linear(x, state[p + "mlp.gate_proj.weight"])) * F.linear(x, state[p + "mlp.up_proj.weight"]),
                       state[p + "mlp.down_proj.weight"])
        x = x + rms_norm(mlp, state[p + "post_attention_layernorm.weight"], GEN["eps"])
    return F.linear(rms_norm(x, state["model.norm.weight"], GEN["eps"]), state["lm_head.weight"])


# ------------------------------------------------------------------------------------------------ tests
def test_understanding_converter_reproduces_reference_logits(understanding_reference, image_tokenizer_dir, tmp_path):
    path, state, config = understanding_reference
    output = tmp_path / "converted"
    main(["understanding", "--reference", str(path), "--image-tokenizer", str(image_tokenizer_dir),
          "--output", str(output)])
    model = TokenFlowMLLM.from_pretrained(str(output)).eval()
    processor = model.processor
    assert model.config.understanding_features == "joint"

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
        add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n")
    inputs = processor(text=prompt, images=[image])
    with torch.no_grad():
        ours = model(**inputs).logits[0]
        features = model.image_tokenizer.understanding_features(inputs["pixel_values"])[0]  # f̂ [S², 40]

    ids = processor.tokenizer(prompt)["input_ids"]
    ids = [-200 if t == processor.image_token_id else t for t in ids]
    reference = reference_understanding_logits(state, config, ids, features)
    assert ours.shape[0] == reference.shape[0] == len(ids) - 1 + model.num_image_slots
    torch.testing.assert_close(ours[:, : reference.shape[1]], reference, rtol=1e-4, atol=1e-4)

    # A non-square image is padded to a square with (127, 127, 127), centred, then resized (the reference's "pad").
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    square = Image.new("RGB", (50, 50), (127, 127, 127))
    square.paste(wide, (0, 10))
    by_hand = np.asarray(square.resize((64, 64), resample=Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    pixels = processor(text="<image>", images=[wide])["pixel_values"][0]
    torch.testing.assert_close(pixels, torch.from_numpy(by_hand).permute(2, 0, 1), rtol=0, atol=1e-6)
    assert model.config.image_resize_mode == "pad"


def test_generation_converter_reproduces_reference_logits(generation_reference, image_tokenizer):
    path, state, text_rows, reference_tokenizer = generation_reference
    reference_config = json.loads((path / "config.json").read_text())
    model, processor = convert_generation(load_reference_state_dict(path), reference_config, image_tokenizer,
                                          load_text_tokenizer(path))
    assert model.config.text_config.model_type == "tokenflow_postnorm_llama"
    tokenizer = processor.tokenizer
    assert len(tokenizer) == text_rows + 3  # reference text rows + <image>, <boi>, <eoi>; no vq tokens left
    scales, num_codes = image_tokenizer.scales, image_tokenizer.config.num_tokens
    captions = ["a red circle above a blue square", "two green triangles"]
    codes = torch.randint(0, CODEBOOK, (2, num_codes), generator=torch.Generator().manual_seed(3))

    # Reference rows: [PAD] window (left), BOS caption <img> pieces, N code ids, </img> pieces, EOS.
    pad_id = reference_tokenizer.pad_token_id
    close = reference_tokenizer("</img>", add_special_tokens=False)["input_ids"]
    reference_rows, our_rows = [], []
    for caption, row_codes in zip(captions, codes):
        prompt = [reference_tokenizer.bos_token_id] + reference_tokenizer(caption)["input_ids"] + \
            reference_tokenizer("<img>", add_special_tokens=False)["input_ids"]
        reference_rows.append([pad_id] * (24 - len(prompt)) + prompt + (text_rows + row_codes).tolist() + close +
                              [reference_tokenizer.eos_token_id])
        ours = processor.drawing_prompt_ids(caption)
        assert ours == prompt[:-1] + [processor.boi_token_id]  # <boi> stands in for the last <img> piece
        our_rows.append(ours + [processor.image_token_id] * num_codes + [processor.eoi_token_id])
    reference_ids = torch.tensor(reference_rows)
    input_ids, attention_mask = processor.pad_sequences(our_rows, padding_side="left")

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, generation_indices=codes)
    reference = reference_generation_logits(state, image_tokenizer.state_dict(), scales, reference_ids, pad_id,
                                            text_rows, codes)
    tail = len(close)  # the reference positions after the first </img> piece, which <eoi> stands in for
    for b in range(2):
        real = int(attention_mask[b].sum())
        reference_b = reference[b, reference_ids.shape[1] - tail - real: reference_ids.shape[1] - tail]
        # every real position: text logits over the reference's text rows (lvl_embed row 0 folded into embeddings)
        torch.testing.assert_close(out.logits[b, -real:, :text_rows], reference_b[:, :text_rows], rtol=1e-4,
                                   atol=1e-4)
        # image-code logits at all N code-predicting positions (<boi> + N - 1 slots) = every scale
        p0 = int((reference_ids[b] >= text_rows).nonzero()[0])
        torch.testing.assert_close(out.image_logits[b], reference[b, p0 - 1: p0 - 1 + num_codes, text_rows:],
                                   rtol=1e-4, atol=1e-4)


def test_generation_converter_round_trips_and_draws_identically_with_cache(generation_reference, image_tokenizer_dir,
                                                                          tmp_path):
    path, _, _, _ = generation_reference
    model, processor = convert("generation", path, image_tokenizer_dir, tmp_path / "t2i")
    loaded = TokenFlowMLLM.from_pretrained(str(tmp_path / "t2i")).eval()
    assert loaded.processor.drawing_prompt("x") == processor.drawing_prompt("x")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    kwargs = dict(processor=loaded.processor, temperature=0.0, cfg_scale=2.0, seed=0, num_scales=3)
    with torch.no_grad():
        cached = loaded.generate_image("a red circle", use_cache=True, **kwargs).indices
        recomputed = loaded.generate_image("a red circle", use_cache=False, **kwargs).indices
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=0)


def test_strict_key_checks_name_the_offending_tensors(generation_reference, understanding_reference, image_tokenizer):
    path, state, _, _ = generation_reference
    config = json.loads((path / "config.json").read_text())
    broken = dict(state)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(ReferenceCheckpointError, match=r"missing keys \(1\).*up_proj[\s\S]*unexpected keys \(1\).*"
                                                        r"self_attn\.extra"):
        convert_generation(broken, config, image_tokenizer, load_text_tokenizer(path))
    wrong_codebook = TokenFlowTokenizer(TokenFlowConfig.from_preset("tiny", codebook_size=CODEBOOK * 2))
    with pytest.raises(ReferenceCheckpointError, match="vq_codebook_size=256 but the image tokenizer has 512"):
        convert_generation(state, config, wrong_codebook, load_text_tokenizer(path))
    without_pos = {k: v for k, v in state.items() if k != "model.pos_1LC"}
    with pytest.raises(ReferenceCheckpointError, match="pos_1LC"):
        convert_generation(without_pos, config, image_tokenizer, load_text_tokenizer(path))

    qwen_path, qwen_state, qwen_config = understanding_reference
    with pytest.raises(ReferenceCheckpointError, match="mm_projector.2.bias"):
        convert_understanding({k: v for k, v in qwen_state.items() if k != "model.mm_projector.2.bias"}, qwen_config,
                              image_tokenizer, load_text_tokenizer(qwen_path))
    with pytest.raises(ReferenceCheckpointError, match="model_type='llava_mpt'"):
        convert_understanding(qwen_state, {**qwen_config, "model_type": "llava_mpt"}, image_tokenizer,
                              load_text_tokenizer(qwen_path))


def test_image_tokenizer_from_reference_pt(understanding_reference, tmp_path):
    """A reference-style tokenizer .pt (state dict under `ema`) is converted with the named preset and bundled."""
    path, _, _ = understanding_reference
    torch.manual_seed(4)
    tokenizer = TokenFlowTokenizer(TokenFlowConfig.from_preset("tiny"))
    torch.save({"ema": tokenizer.state_dict(), "step": torch.tensor(7)}, tmp_path / "tokenflow_tiny.pt")
    model, processor = convert("understanding", path, tmp_path / "tokenflow_tiny.pt", preset="tiny")
    assert processor.num_image_slots == model.num_image_slots == 64
    for name, tensor in tokenizer.state_dict().items():
        torch.testing.assert_close(model.image_tokenizer.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="preset='clipb'"):
        convert("understanding", path, tmp_path / "tokenflow_tiny.pt", preset="clipb")
