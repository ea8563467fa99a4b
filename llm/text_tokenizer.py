"""A small text tokenizer for ShapesWorld, built from scratch offline in well under a second.

Byte-level BPE (any UTF-8 text encodes, nothing is ever unknown) whose merges are learnt from a fixed corpus of
ShapesWorld captions, questions, answers and drawing prompts plus the chat templates' fixed phrases, so the world's
sentences take few tokens. The corpus is generated from fixed seeds and the trainer is deterministic, so every
call returns the same vocabulary.

Special tokens (ids in this order, before the learnt merges):

    <|endoftext|>  pad         <|im_start|> <|im_end|>  ChatML turns     <s> </s>  Vicuna BOS / EOS
    <image> <boi> <eoi>        the image tokens of `llm.processing_tokenflow_mllm.IMAGE_SPECIAL_TOKENS`
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from unimodal.shapesworld import PROMPT_TAGS, Rng, make_captions, make_prompt, make_vqa, sample_scene

TEXT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>")
IMAGE_TOKENS = ("<image>", "<boi>", "<eoi>")
CHAT_PHRASES = (
    "system\nYou are a helpful assistant.\n", "user\n", "assistant\n",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: ASSISTANT:",
    "Draw a picture of this. What is in the image? Describe the image.",
)


def shapesworld_corpus(num_scenes: int = 200, seed: int = 0) -> list[str]:
    """Captions, questions, answers and drawing prompts of `num_scenes` ShapesWorld scenes (no rendering)."""
    lines = list(CHAT_PHRASES)
    for index in range(num_scenes):
        scene_seed = seed * 1_000_003 + index
        scene = sample_scene(Rng(scene_seed, "scene"))
        lines += make_captions(scene, Rng(scene_seed, "captions"))
        for pair in make_vqa(scene, Rng(scene_seed, "vqa")):
            lines += [pair.question, pair.answer]
        lines += [make_prompt(tag, Rng(scene_seed, f"prompt/{tag}")).text for tag in PROMPT_TAGS]
    return lines


def build_shapesworld_text_tokenizer(vocab_size: int = 640, chat_format: str = "chatml") -> PreTrainedTokenizerFast:
    """The ShapesWorld byte-level BPE tokenizer, wrapped for transformers.

    Args:
        vocab_size: total vocabulary size including the 256 byte symbols and the special tokens.
        chat_format: `"chatml"` (pad `<|endoftext|>`, EOS `<|im_end|>`, no BOS) or `"vicuna"` (BOS `<s>`, EOS `</s>`,
            pad `<|endoftext|>`); sets the special-token roles only, the chat template is set by the processor.

    Returns:
        A `PreTrainedTokenizerFast` with `<image>`, `<boi>`, `<eoi>` already added as special tokens.
    """
    if chat_format not in ("chatml", "vicuna"):
        raise ValueError(f"chat_format={chat_format!r}; allowed: 'chatml', 'vicuna'")
    specials = list(TEXT_SPECIAL_TOKENS + IMAGE_TOKENS)
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} must be at least {256 + len(specials)} (bytes + special tokens)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    bpe.train_from_iterator(shapesworld_corpus(), trainer=trainer)
    roles = {"pad_token": "<|endoftext|>"}
    if chat_format == "chatml":
        roles.update(eos_token="<|im_end|>")
    else:
        roles.update(bos_token="<s>", eos_token="</s>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, padding_side="left", **roles)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)})
    return tokenizer


__all__ = ["IMAGE_TOKENS", "TEXT_SPECIAL_TOKENS", "build_shapesworld_text_tokenizer", "shapesworld_corpus"]
