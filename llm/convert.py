"""Convert the reference TokenFlow LLM releases into `save_pretrained` folders of TokenFlowMLLM + TokenFlowProcessor.

    python -m llm.convert understanding --reference Tokenflow-llava-qwen2.5-14B-finetuning \
        --image-tokenizer tokenflow_siglip_32k.pt --output tokenflow-mllm-i2t
    python -m llm.convert generation --reference TokenFlow-t2i \
        --image-tokenizer tokenflow_clipb_32k_enhanced.pt --output tokenflow-mllm-t2i

Inputs (all local):
    --reference        the reference checkpoint folder (config.json, weights as model.safetensors, sharded
                       model.safetensors.index.json, pytorch_model.bin or a sharded .bin index, and its tokenizer
                       files). A single weights file is accepted too when --reference-config and --text-tokenizer are
                       given.
    --image-tokenizer  the matching TokenFlow tokenizer: a reference .pt (converted with `tokenizer.convert`, preset
                       siglip-384 for understanding and clipb-256 for generation unless --preset says otherwise) or a
                       folder written by `TokenFlowTokenizer.save_pretrained`. Codes are not interchangeable between
                       tokenizers: the generation model's image head must match the tokenizer's codebook.
    --text-tokenizer   a tokenizer folder, when the reference folder holds none.

Key checks are strict: every reference tensor is either mapped or explicitly dropped, and a missing, unknown or
mis-shaped tensor raises `ReferenceCheckpointError` listing them.

Understanding model (LLaVA-Qwen layout, `model_type` "llava_qwen"; "llava_llama" for Vicuna/Llama backbones)
===========================================================================================================
    model.embed_tokens / model.layers.* / model.norm / lm_head   → language_model.*  (stock Qwen2 / Llama, as is)
    model.mm_projector.0.{weight,bias}                           → understanding_projector.linear_1.*
    model.mm_projector.2.{weight,bias}                           → understanding_projector.linear_2.*
    model.vision_tower.*                                         → dropped (the tokenizer comes from --image-tokenizer)
    model.layers.*.self_attn.rotary_emb.inv_freq                 → dropped (recomputed)

The reference splices the 729 (S²) vectors `mm_projector(f̂)` at one placeholder, with f̂ the tokenizer's accumulated
quantized features of both halves (40-d), under plain causal attention and 1-D positions. Ours expands `<image>` into
S² slots holding `understanding_projector(f̂)` with the same attention and positions, so
`understanding_features="joint"` reproduces the reference logits exactly. The text tokenizer gains `<image>`, `<boi>`,
`<eoi>`; for Qwen2.5 their ids fall inside the padded embedding rows (152064 > 151665 used), otherwise the
embeddings grow (new rows = mean of the old ones). The reference has no drawing part: generation projector, scale and
position embeddings and image head are freshly initialised (seeded), so this model answers but cannot draw until
trained. Chat template: ChatML for Qwen (the reference's `qwen_2_5` conversation), Vicuna for Llama. Images are padded
to a square with (127, 127, 127) before the resize, as the reference runs its understanding model
(`image_aspect_ratio: pad`): the converted config sets `image_resize_mode="pad"`.

Generation model (LLaVA-Llama layout with post-branch-norm + QK-norm blocks, vocabulary 32001 + K)
==================================================================================================
The backbone becomes `llm.backbones.PostNormLlamaForCausalLM` (model_type "tokenflow_postnorm_llama"), whose keys
equal the reference's, so blocks map 1:1. With T = 32001 text rows (Llama's 32000 + `[PAD]`) and K codebook rows::

    model.layers.* / model.norm                     → language_model.model.*  (incl. self_attn.qknorm.*)
    model.embed_tokens.weight[:T] + lvl_embed[0]    → language_model.model.embed_tokens.weight[:T]
    model.embed_tokens.weight[T:]                   → dropped (the reference overwrites image positions)
    lm_head.weight[:T]                              → language_model.lm_head.weight[:T]
    lm_head.weight[T:]  (code c at row T + c)       → image_head.weight (row c)
    model.mm_projector.{0,2}.*                      → generation_projector.linear_{1,2}.*
    model.lvl_embed.weight  [L+1, H]                → scale_embedding.weight: row 0 = 0, row k = lvl[k+1]
                                                      (k = 1..L-1), row L = lvl[0]
    model.pos_1LC           [N, H]                  → position_embedding (as is: row j where code j is predicted)
    image_token_start / image_token_end             → checked (must be T and T + K - 1), dropped

Why the level embedding moves (reference §2.4 vs `llm.modeling_tokenflow_mllm`):
- The reference adds `lvl_embed[0]` to *every* position whose predicted scale is 0 or that predicts text: all text
  tokens, the last `<img>` piece (which predicts code 0) and the zero end slot. We add nothing to text, so row 0 is
  folded into every text embedding row (including the new `<boi>` / `<eoi>` rows); our scale row 0 (added at `<boi>`)
  is then zero, and our end-slot row L carries `lvl[0]` (the end slot is a zero vector, not a text token).
- The block that predicts scale k ≥ 1 gets `lvl[k+1]` in the reference (row 1 is never used) and our row k.
- `pos_1LC[j]` sits where code j is predicted in both (the last `<img>` piece / our `<boi>` holds row 0).

Prompt correspondence ("SOS" conditioning): the reference prompt is `[PAD]*pad, BOS, caption, <img>` where `<img>`
is plain text (a few pieces), and its last piece predicts code 0. Our `<boi>` takes the place of that last piece: its
input row is the reference row of the last `<img>` piece (+ lvl[0]), so `BOS caption <img-without-last-piece> <boi>`
gives the reference logits for every code. Likewise `<eoi>` takes the place of the first `</img>` piece (input and
output rows copied from it: the reference's zero end slot predicts that piece); `<boi>`'s output row is the first
`<img>` piece's, `<image>`'s rows are the mean of the text rows. The reference masks its left `[PAD]`s as keys and
uses positions 0..len-1 including them; RoPE scores depend only on position differences, so dropping the pads (ours
count positions over real tokens) gives the same logits to float precision. The converted chat template renders
`BOS {prompt}<img-without-last-piece><boi>`; the converter checks that it tokenizes to the reference ids of a sample
caption and says so if it does not (tokenization across the caption/`<img>` boundary is tokenizer dependent).
Differences that are sampling choices, not weights: the reference truncates captions to 128 tokens, uses an
SD-style negative prompt as the unconditional CFG row (ours: the empty prompt) and has no KV cache.

The understanding projector of the generation model is freshly initialised (`understanding_features="joint"`).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.initialization import no_init_weights

from tokenizer.configuration_tokenflow import TokenFlowConfig
from tokenizer.convert import extract_state_dict, listing, state_dict_mismatches, tokenizer_from_state_dict
from tokenizer.modeling_tokenflow import TokenFlowTokenizer
from unimodal.checkpoints import load_tensor_file
from unimodal.cli import run_main

from . import backbones  # noqa: F401  (registers the post-norm Llama backbone with the Auto classes)
from .configuration_tokenflow_mllm import TokenFlowMLLMConfig
from .modeling_tokenflow_mllm import TokenFlowMLLM
from .processing_tokenflow_mllm import (
    BOI_TOKEN,
    CHAT_TEMPLATES,
    TokenFlowProcessor,
    add_image_special_tokens,
)

KINDS = ("understanding", "generation")
DEFAULT_PRESETS = {"understanding": "siglip-384", "generation": "clipb-256"}
# Understanding releases: reference model_type → (our backbone model_type, chat format).
UNDERSTANDING_BACKBONES = {"llava_qwen": ("qwen2", "chatml"), "llava_llama": ("llama", "vicuna")}
GENERATION_MODEL_TYPES = ("llava_llama",)
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# Tensors a reference file may hold that carry nothing the converted model needs.
ALWAYS_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
VQ_TOKEN = re.compile(r"^<vq_token_\d+>$")
IMG_OPEN, IMG_CLOSE = "<img>", "</img>"
SAMPLE_CAPTION = "a red circle above a blue square"


class ReferenceCheckpointError(ValueError):
    """The reference checkpoint does not have the layout the converter expects."""


# ---------------------------------------------------------------------------------------------------- loading inputs
def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return dict(load_tensor_file(path))
    raise ReferenceCheckpointError(f"{str(path)!r} is not a weights file; expected .safetensors, .bin or an index .json")


def _load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ReferenceCheckpointError(f"{str(index_path)!r} has no 'weight_map'; not a sharded checkpoint index")
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise ReferenceCheckpointError(f"shard {shard!r} listed in {str(index_path)!r} does not exist")
        state_dict.update(_load_weights_file(shard_path))
    missing = set(weight_map) - set(state_dict)
    if missing:
        raise ReferenceCheckpointError(f"the index lists tensors absent from their shards: {listing(missing)}")
    return state_dict


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a reference checkpoint: a folder (first of WEIGHT_FILES found), a weights file or an index."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return load_reference_state_dict(path / name)
        raise ReferenceCheckpointError(f"no weights in {str(path)!r}; expected one of {WEIGHT_FILES}")
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint {str(path)!r} does not exist")
    if path.name.endswith(".index.json"):
        return _load_sharded(path)
    return _load_weights_file(path)


def load_reference_config(path: str | Path) -> dict:
    """The reference `config.json` (path to it or to its folder) as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"reference config {str(path)!r} does not exist; pass --reference-config")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_image_tokenizer(path: str | Path, preset: str) -> TokenFlowTokenizer:
    """The TokenFlow tokenizer from a reference `.pt` (architecture `preset`) or a `save_pretrained` folder."""
    path = Path(path)
    if path.is_dir():
        return TokenFlowTokenizer.from_pretrained(str(path)).eval()
    if not path.is_file():
        raise FileNotFoundError(f"image tokenizer {str(path)!r} does not exist (a reference .pt or a folder)")
    checkpoint = load_tensor_file(path)
    return tokenizer_from_state_dict(extract_state_dict(checkpoint), preset)


def load_text_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The reference text tokenizer (fast) without the generation release's `<vq_token_i>` entries.

    Those 32768 tokens stand for image codes; here codes have their own head, so they are removed from the vocabulary
    (they are the last added ids, so every text id keeps its value).
    """
    path = Path(path)
    if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no text tokenizer files ({', '.join(TOKENIZER_FILES)}) in {str(path)!r}; pass "
                                "--text-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not tokenizer.is_fast:
        raise ReferenceCheckpointError(f"the tokenizer in {str(path)!r} has no fast version; the processor needs one")
    vq_ids = sorted(i for i, token in tokenizer.added_tokens_decoder.items() if VQ_TOKEN.match(token.content))
    if not vq_ids:
        return tokenizer
    first = vq_ids[0]
    if vq_ids != list(range(first, first + len(vq_ids))) or first + len(vq_ids) != len(tokenizer):
        raise ReferenceCheckpointError(
            f"the <vq_token_i> entries of {str(path)!r} are not the last {len(vq_ids)} ids of the vocabulary")
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if not VQ_TOKEN.match(t["content"])]
    specials = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                if getattr(tokenizer, name) is not None}
    text_only = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                        padding_side=tokenizer.padding_side, **specials)
    if len(text_only) != first:
        raise ReferenceCheckpointError(
            f"removing the <vq_token_i> entries left {len(text_only)} tokens, expected {first}")
    return text_only


# ---------------------------------------------------------------------------------------------------- key handling
def _pop_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Removes and returns the entries under `prefix` (with the prefix stripped)."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    return {k[len(prefix):]: state_dict.pop(k) for k in keys}


def _pop_required(state_dict: dict[str, torch.Tensor], names: list[str], what: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise ReferenceCheckpointError(f"the {what} checkpoint lacks {listing(missing)}")
    return [state_dict.pop(n) for n in names]


def check_tensors(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, torch.Tensor], what: str) -> None:
    """Raises `ReferenceCheckpointError` naming every missing, unexpected and mis-shaped tensor."""
    mismatches = state_dict_mismatches(expected, given)
    if mismatches:
        raise ReferenceCheckpointError("\n".join([f"{what} does not match the expected layout"] + mismatches))


def _check_backbone_tensors(text_config, weights: Mapping[str, torch.Tensor], what: str) -> None:
    """Checks the `language_model.*` entries of `weights` against the backbone `text_config` builds."""
    with torch.device("meta"):
        backbone = AutoModelForCausalLM.from_config(text_config)
    expected = {f"language_model.{k}": tuple(v.shape) for k, v in backbone.state_dict().items()}
    check_tensors(expected, {k: v for k, v in weights.items() if k.startswith("language_model.")},
                  f"{what} (backbone tensors)")


def _reference_tensors(reference_state_dict: Mapping[str, torch.Tensor], what: str
                       ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The reference tensors without the always-dropped ones and the vision tower, and its projector popped out."""
    state_dict = {k: v for k, v in reference_state_dict.items() if not ALWAYS_DROPPED.search(k)}
    _pop_prefix(state_dict, "model.vision_tower.")
    return state_dict, _pop_required(state_dict, PROJECTOR_KEYS, what)


def _projector(weights: list[torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`mm_projector.{0,2}.{weight,bias}` (Sequential(Linear, GELU, Linear)) → our MultimodalProjector keys."""
    w1, b1, w2, b2 = weights
    return {f"{prefix}.linear_1.weight": w1, f"{prefix}.linear_1.bias": b1,
            f"{prefix}.linear_2.weight": w2, f"{prefix}.linear_2.bias": b2}


PROJECTOR_KEYS = [f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]


def backbone_config(reference_config: Mapping, model_type: str, **overrides):
    """Our backbone config from the reference's: its architecture fields, without the LLaVA extras."""
    config_class = type(AutoConfig.for_model(model_type))
    known = set(config_class().to_dict()) | {"rope_theta", "rope_scaling"}
    dropped = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
               "use_cache", "auto_map"}
    fields = {k: v for k, v in reference_config.items() if k in known and k not in dropped}
    if fields.get("rope_scaling", 0) is None:
        del fields["rope_scaling"]
    fields.update(overrides)
    return config_class(**fields)


def _fresh_init(model: TokenFlowMLLM, names: list[str], seed: int) -> None:
    """Initialises the named adapter parts (which the reference does not have) with the model's own init, seeded."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name in names:
            if name == "position_embedding":
                model._init_weights(model)  # the model-level branch initialises only the position embedding
            else:
                getattr(model, name).apply(model._init_weights)
    finally:
        torch.random.set_rng_state(generator_state)


def _build(config: TokenFlowMLLMConfig, image_tokenizer: TokenFlowTokenizer, text_tokenizer: PreTrainedTokenizerFast,
           weights: dict[str, torch.Tensor], fresh: list[str], seed: int,
           dtype: torch.dtype | None) -> tuple[TokenFlowMLLM, TokenFlowProcessor]:
    """Builds the model without random init, loads `weights` + the tokenizer strictly, initialises `fresh` parts and
    casts the LLM parts to `dtype` (None: the dtype of the reference weights; the tokenizer stays fp32); returns it
    with its processor attached."""
    if dtype is None:
        dtype = weights["language_model.lm_head.weight"].dtype
    with no_init_weights():
        language_model = AutoModelForCausalLM.from_config(config.text_config)
        model = TokenFlowMLLM(config, language_model=language_model, image_tokenizer=image_tokenizer)
    weights = dict(weights)
    weights.update({f"image_tokenizer.{k}": v for k, v in image_tokenizer.state_dict().items()})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not any(k == name or k.startswith(name + ".") for name in fresh)}
    check_tensors(expected, weights, "the converted state dict")
    model.load_state_dict(weights, strict=False)
    _fresh_init(model, fresh, seed)
    model.to(dtype)
    model.image_tokenizer.float()
    model.processor = TokenFlowProcessor.from_model_config(config, text_tokenizer)
    return model.eval(), model.processor


def _add_rows(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """Grows [V, H] to [rows, H] with mean rows (as `resize_token_embeddings(mean_resizing=True)` does, simplified)."""
    if rows <= matrix.shape[0]:
        return matrix
    mean = matrix.float().mean(0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean.expand(rows - matrix.shape[0], -1)], dim=0)


# ---------------------------------------------------------------------------------------------------- understanding
def convert_understanding(
    reference_state_dict: dict[str, torch.Tensor],
    reference_config: Mapping,
    image_tokenizer: TokenFlowTokenizer,
    text_tokenizer: PreTrainedTokenizerFast,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[TokenFlowMLLM, TokenFlowProcessor]:
    """The reference understanding model (LLaVA-Qwen / LLaVA-Llama layout) as a TokenFlowMLLM and its processor.

    `text_tokenizer` is modified in place (image tokens and chat template added). See the module docstring.
    """
    model_type = reference_config.get("model_type")
    if model_type not in UNDERSTANDING_BACKBONES:
        raise ReferenceCheckpointError(
            f"reference model_type={model_type!r}; understanding releases are {sorted(UNDERSTANDING_BACKBONES)}")
    backbone_type, chat_format = UNDERSTANDING_BACKBONES[model_type]
    mm_hidden = reference_config.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != image_tokenizer.config.code_dim:
        raise ReferenceCheckpointError(
            f"the reference projector reads {mm_hidden}-d features but the image tokenizer's codes are "
            f"{image_tokenizer.config.code_dim}-d; pass the tokenizer the model was trained with")
    state_dict, projector = _reference_tensors(reference_state_dict, "understanding")

    special_ids = add_image_special_tokens(text_tokenizer)
    text_tokenizer.chat_template = CHAT_TEMPLATES[chat_format]
    reference_rows = state_dict.get("model.embed_tokens.weight", torch.empty(0, 0)).shape[0]
    vocab_size = max(reference_rows, len(text_tokenizer))
    text_config = backbone_config(reference_config, backbone_type, vocab_size=vocab_size,
                                  pad_token_id=special_ids["pad_token_id"])
    if text_config.tie_word_embeddings and "lm_head.weight" not in state_dict:
        state_dict["lm_head.weight"] = state_dict.get("model.embed_tokens.weight")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state_dict:
            state_dict[key] = _add_rows(state_dict[key], vocab_size)
    weights = {f"language_model.{k}": v for k, v in state_dict.items()}
    _check_backbone_tensors(text_config, weights, "the reference understanding checkpoint")
    weights.update(_projector(projector, "understanding_projector"))
    # The reference runs its understanding model on images padded to a square (`image_aspect_ratio: pad`).
    config = TokenFlowMLLMConfig(text_config=text_config, tokenizer_config=image_tokenizer.config,
                                 understanding_features="joint", image_resize_mode="pad", **special_ids)
    fresh = ["generation_projector", "scale_embedding", "position_embedding", "image_head"]
    return _build(config, image_tokenizer, text_tokenizer, weights, fresh, seed, dtype)


# ---------------------------------------------------------------------------------------------------- generation
def reference_drawing_template(img_prefix: str) -> str:
    """Chat template rendering a drawing turn as the reference sees it: `BOS {user text}{img_prefix}<boi><eoi>EOS`."""
    return (
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- else -%}<image>{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- generation -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- else -%}" + json.dumps(img_prefix).join(("{{ ", " }}")) + "<boi><eoi>"
        "{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ eos_token }}"
        "{%- endgeneration -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def _pieces(text_tokenizer, text: str) -> list[int]:
    ids = text_tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ReferenceCheckpointError(f"the text tokenizer encodes {text!r} to no tokens")
    return ids


def reference_prompt_ids(text_tokenizer, caption: str) -> list[int]:
    """The ids the reference feeds for `caption` before its image (without the left `[PAD]` window):
    `encode(caption)` with BOS forced first, then the pieces of `<img>`."""
    ids = text_tokenizer(caption)["input_ids"]
    bos = text_tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids + _pieces(text_tokenizer, IMG_OPEN)


def _img_prefix_text(text_tokenizer, boi_id: int) -> tuple[str, bool]:
    """Text between the user's caption and `<boi>` whose tokenization reproduces the reference's `<img>` pieces
    (all but the last) after a sample caption; returns (text, whether it matched)."""
    processor_ids = reference_prompt_ids(text_tokenizer, SAMPLE_CAPTION)[:-1] + [boi_id]
    decoded = text_tokenizer.decode(_pieces(text_tokenizer, IMG_OPEN)[:-1])
    candidates = [decoded, " " + decoded.lstrip(), decoded.strip()]
    for candidate in candidates:
        text = (text_tokenizer.bos_token or "") + SAMPLE_CAPTION + candidate + BOI_TOKEN
        if text_tokenizer(text, add_special_tokens=False)["input_ids"] == processor_ids:
            return candidate, True
    return candidates[0], False


def convert_generation(
    reference_state_dict: dict[str, torch.Tensor],
    reference_config: Mapping,
    image_tokenizer: TokenFlowTokenizer,
    text_tokenizer: PreTrainedTokenizerFast,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[TokenFlowMLLM, TokenFlowProcessor]:
    """The reference text-to-image model as a TokenFlowMLLM on the post-norm Llama backbone, and its processor.

    `text_tokenizer` must be the reference's without the `<vq_token_i>` entries (`load_text_tokenizer`); it is
    modified in place. See the module docstring for the mapping.
    """
    tokenizer_config = image_tokenizer.config
    _check_generation_config(reference_config, tokenizer_config)
    state_dict, projector = _reference_tensors(reference_state_dict, "generation")
    embed, lm_head, lvl, pos = _pop_required(
        state_dict, ["model.embed_tokens.weight", "lm_head.weight", "model.lvl_embed.weight", "model.pos_1LC"],
        "generation")
    text_rows = _check_generation_tensors(state_dict, embed, lm_head, lvl, pos, tokenizer_config, len(text_tokenizer))

    # Reference ids of the pieces our special tokens stand in for (read before the tokens are added).
    img_open, img_close = _pieces(text_tokenizer, IMG_OPEN), _pieces(text_tokenizer, IMG_CLOSE)
    special_ids = add_image_special_tokens(text_tokenizer)
    stand_ins = {special_ids["boi_token_id"]: (img_open[-1], img_open[0]),
                 special_ids["eoi_token_id"]: (img_close[0], img_close[0])}
    text_embed, text_head = _text_rows(embed, lm_head, text_rows, len(text_tokenizer), stand_ins)
    text_config = backbone_config(reference_config, "tokenflow_postnorm_llama", vocab_size=len(text_tokenizer),
                                  pad_token_id=special_ids["pad_token_id"], qk_norm_eps=1e-6)
    weights = {f"language_model.{k}": v for k, v in state_dict.items()}
    # The reference adds level row 0 to every text position; we add nothing to text, so it is folded in here.
    weights["language_model.model.embed_tokens.weight"] = text_embed + lvl[0]
    weights["language_model.lm_head.weight"] = text_head
    weights["image_head.weight"] = lm_head[text_rows:]
    weights.update(_projector(projector, "generation_projector"))
    weights["scale_embedding.weight"] = torch.cat([torch.zeros_like(lvl[:1]), lvl[2:], lvl[:1]])
    weights["position_embedding"] = pos
    _check_backbone_tensors(text_config, weights, "the reference generation checkpoint")

    img_prefix, matched = _img_prefix_text(text_tokenizer, special_ids["boi_token_id"])
    text_tokenizer.chat_template = reference_drawing_template(img_prefix)
    config = TokenFlowMLLMConfig(text_config=text_config, tokenizer_config=tokenizer_config,
                                 understanding_features="joint", **special_ids)
    if not matched:
        print(f"note: the drawing prompt tokenizes differently from the reference's separate encodes of the caption "
              f"and {IMG_OPEN!r} for the sample {SAMPLE_CAPTION!r}; the weights are exact, prompts may differ by a "
              "piece at the caption boundary")
    return _build(config, image_tokenizer, text_tokenizer, weights, ["understanding_projector"], seed, dtype)


def _check_generation_config(reference_config: Mapping, tokenizer_config: TokenFlowConfig) -> None:
    model_type = reference_config.get("model_type")
    if model_type not in GENERATION_MODEL_TYPES:
        raise ReferenceCheckpointError(
            f"reference model_type={model_type!r}; the generation release is one of {GENERATION_MODEL_TYPES}")
    for field, ours in (("vq_codebook_size", tokenizer_config.codebook_size),
                        ("mm_hidden_size", tokenizer_config.code_dim)):
        if reference_config.get(field) not in (None, ours):
            raise ReferenceCheckpointError(
                f"reference {field}={reference_config[field]} but the image tokenizer has {ours}; pass the tokenizer "
                "the model was trained with (codes are not interchangeable)")


def _check_generation_tensors(state_dict: dict[str, torch.Tensor], embed: torch.Tensor, lm_head: torch.Tensor,
                              lvl: torch.Tensor, pos: torch.Tensor, tokenizer_config: TokenFlowConfig,
                              text_vocab_size: int) -> int:
    """Checks the shapes that tie the checkpoint to the image tokenizer (and pops the image-token range markers);
    returns T, the number of text rows of embed_tokens / lm_head."""
    codebook_size, num_codes = tokenizer_config.codebook_size, tokenizer_config.num_tokens
    num_scales = len(tokenizer_config.scales)
    if embed.shape != lm_head.shape or lm_head.shape[0] <= codebook_size:
        raise ReferenceCheckpointError(
            f"embed_tokens {tuple(embed.shape)} and lm_head {tuple(lm_head.shape)} must have the same shape with more "
            f"than codebook_size={codebook_size} rows (text rows followed by one row per code)")
    text_rows = lm_head.shape[0] - codebook_size
    for name, want in (("image_token_start", text_rows), ("image_token_end", text_rows + codebook_size - 1)):
        if name in state_dict:
            got = int(state_dict.pop(name))
            if got != want:
                raise ReferenceCheckpointError(
                    f"{name}={got} but the vocabulary ({lm_head.shape[0]} rows) and codebook ({codebook_size}) put it "
                    f"at {want}; the image tokenizer does not match this checkpoint")
    if tuple(lvl.shape[:1]) != (num_scales + 1,) or tuple(pos.shape[:1]) != (num_codes,):
        raise ReferenceCheckpointError(
            f"lvl_embed has {lvl.shape[0]} rows and pos_1LC {pos.shape[0]}, but the image tokenizer's {num_scales} "
            f"scales {tokenizer_config.scales} need {num_scales + 1} and {num_codes}")
    if text_vocab_size != text_rows:
        raise ReferenceCheckpointError(
            f"the text tokenizer has {text_vocab_size} tokens but the checkpoint has {text_rows} text rows "
            f"({lm_head.shape[0]} - {codebook_size} codes); use the reference tokenizer without its <vq_token_i> "
            "entries")
    return text_rows


def _text_rows(embed: torch.Tensor, lm_head: torch.Tensor, text_rows: int, vocab_size: int,
               stand_ins: Mapping[int, tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The text part of embed_tokens / lm_head grown to `vocab_size` rows; each new special id in `stand_ins` copies
    the input and output rows of the reference pieces it stands in for (`new id → (input row, output row)`)."""
    text_embed = _add_rows(embed[:text_rows], vocab_size).clone()
    text_head = _add_rows(lm_head[:text_rows], vocab_size).clone()
    for new_id, (input_row, output_row) in stand_ins.items():
        if new_id >= text_rows:
            text_embed[new_id], text_head[new_id] = embed[input_row], lm_head[output_row]
    return text_embed, text_head


# ---------------------------------------------------------------------------------------------------- entry point
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONVERTERS = {"understanding": convert_understanding, "generation": convert_generation}


def convert(
    kind: str,
    reference: str | Path,
    image_tokenizer: str | Path,
    output: str | Path | None = None,
    preset: str | None = None,
    reference_config: str | Path | None = None,
    text_tokenizer: str | Path | None = None,
    dtype: str = "auto",
    seed: int = 0,
) -> tuple[TokenFlowMLLM, TokenFlowProcessor]:
    """Load the reference files, convert, and (if `output` is given) `save_pretrained` model + processor there."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {KINDS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {sorted(DTYPES)}")
    preset = preset or DEFAULT_PRESETS[kind]
    if preset not in TokenFlowConfig.available_presets():
        raise ValueError(f"preset={preset!r}; allowed: {TokenFlowConfig.available_presets()}")
    reference = Path(reference)
    folder = reference if reference.is_dir() else reference.parent
    config = load_reference_config(reference_config if reference_config is not None else folder)
    model, processor = CONVERTERS[kind](
        load_reference_state_dict(reference), config, load_image_tokenizer(image_tokenizer, preset),
        load_text_tokenizer(text_tokenizer if text_tokenizer is not None else folder), dtype=DTYPES[dtype], seed=seed)
    if output is not None:
        model.save_pretrained(output)
    return model, processor


# The command line: one option per parameter of `convert` (each option's dest is the parameter's name).
CLI_OPTIONS = {
    "--reference": dict(required=True, help="reference checkpoint folder (or weights file / index)"),
    "--image-tokenizer": dict(required=True, help="TokenFlow tokenizer: reference .pt or folder"),
    "--output": dict(required=True, help="output folder (save_pretrained)"),
    "--preset": dict(choices=TokenFlowConfig.available_presets(), default=None,
                     help="architecture of a .pt image tokenizer (default: siglip-384 / clipb-256 by kind)"),
    "--reference-config": dict(default=None, help="config.json when --reference is a file elsewhere"),
    "--text-tokenizer": dict(default=None, help="tokenizer folder if the reference folder has none"),
    "--dtype": dict(choices=sorted(DTYPES), default="auto",
                    help="weight dtype of the LLM parts (auto: as stored); the image tokenizer stays fp32"),
    "--seed": dict(type=int, default=0, help="seed of the parts the reference does not have"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llm.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS, help="which reference release the checkpoint is")
    for flag, options in CLI_OPTIONS.items():
        parser.add_argument(flag, **options)
    args = parser.parse_args(argv)
    model, _ = convert(**vars(args))
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: {args.kind} model, {count:,} parameters, backbone "
          f"{model.config.text_config.model_type}, image tokenizer scales {model.scales}")


if __name__ == "__main__":
    run_main(main)
