"""Self-checked drawing: draw several candidates, keep the one the model's own understanding supports best.

A unified model can read what it draws. For a prompt whose requirements can be put as questions (ShapesWorld's
prompts: `unimodal.shapesworld.prompt_checks`, e.g. "How many stars are there?" → "3" for "a photo of three
stars"), every candidate drawing is looked at from its indices (no pixel re-encoding) and scored by the
log-likelihood the model gives the expected answers:

    score(candidate) = Σ_checks log p(answer | candidate, question[, the model's own reasoning])

For question types the model answers with a reasoning first (relation: "the circle is in the top row and the
square is in the bottom row, so yes"), the reasoning is the model's greedy reply to that candidate and only the
answer after it is scored. The candidate with the highest score is kept (the first on ties). Prompts without checks
are drawn once, as without self-check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from unimodal.shapesworld import REASONED_TYPES, QAPair, prompt_checks
from unimodal.shapesworld.language import REASONING_SEPARATOR

if TYPE_CHECKING:
    from .processing_tokenflow_mllm import TokenFlowProcessor

# Longest reasoning a reasoned reply gives before its answer, in tokens (ShapesWorld's are about 25).
MAX_REASONING_TOKENS = 48


def drawing_checks(prompt: str) -> list[QAPair]:
    """The questions a drawing of `prompt` must answer, with their answers ([] when the prompt states none that
    can be asked)."""
    return prompt_checks(prompt)


def _suffix_length(head: list[int], text: list[int]) -> int:
    """Tokens of `text` after its common prefix with `head` (a token merged across the boundary counts as the
    answer's)."""
    common = 0
    while common < min(len(head), len(text)) and head[common] == text[common]:
        common += 1
    return len(text) - common


def _question_prompt(processor: "TokenFlowProcessor", question: str) -> str:
    return processor.apply_chat_template([{"role": "user", "content": processor.user_content(question)}],
                                         add_generation_prompt=True)


@torch.no_grad()
def _reasonings(model, processor: "TokenFlowProcessor", prompts: list[str], images: list[torch.Tensor]) -> list[str]:
    """The model's greedy reply to each prompt, cut after its last reasoning separator ("" when it gave none)."""
    batch = processor(text=prompts, images=images, padding_side="left").to(model.device)
    output = model.generate(**batch, do_sample=False, max_new_tokens=MAX_REASONING_TOKENS,
                            eos_token_id=processor.turn_end_ids + [processor.boi_token_id],
                            suppress_tokens=[processor.image_token_id, processor.eoi_token_id],
                            pad_token_id=processor.tokenizer.pad_token_id)
    replies = processor.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [reasoning_prefix(r) for r in replies]


def reasoning_prefix(reply: str) -> str:
    """`reply` up to and including its last reasoning separator ("" when it gives no reasoning)."""
    head, separator, _ = reply.strip().rpartition(REASONING_SEPARATOR)
    return head + separator


@torch.no_grad()
def answer_log_likelihoods(model, processor: "TokenFlowProcessor", images: Sequence[torch.Tensor],
                           checks: Sequence[QAPair], batch_size: int = 64) -> torch.Tensor:
    """[len(images), len(checks)]: log p(check.answer | image, check.question), the image given as its indices
    [N]; reasoned question types (`REASONED_TYPES`) condition on the model's own greedy reasoning first."""
    if not checks:
        raise ValueError("answer_log_likelihoods needs at least one check")
    rows = [(image, check) for image in images for check in checks]
    prompts = [_question_prompt(processor, check.question) for _, check in rows]
    prefixes = [""] * len(rows)
    reasoned = [r for r, (_, check) in enumerate(rows) if check.type in REASONED_TYPES]
    for start in range(0, len(reasoned), batch_size):
        chunk = reasoned[start:start + batch_size]
        for r, reasoning in zip(chunk, _reasonings(model, processor, [prompts[r] for r in chunk],
                                                   [rows[r][0] for r in chunk])):
            prefixes[r] = reasoning
    tokenizer, scores = processor.tokenizer, []
    for start in range(0, len(rows), batch_size):
        chunk = range(start, min(start + batch_size, len(rows)))
        heads = [prompts[r] + prefixes[r] for r in chunk]
        texts = [h + rows[r][1].answer for h, r in zip(heads, chunk)]
        answer_lengths = [_suffix_length(tokenizer(h, add_special_tokens=False)["input_ids"],
                                         tokenizer(t, add_special_tokens=False)["input_ids"])
                          for h, t in zip(heads, texts)]
        # Left padding ends every row at the same position, so only the last few positions' logits are needed.
        full = processor(text=texts, images=[rows[r][0] for r in chunk], padding_side="left").to(model.device)
        keep = max(answer_lengths) + 1
        log_probs = model(**full, logits_to_keep=keep).logits.float().log_softmax(-1)  # [B, keep, V]
        for b, answer_length in enumerate(answer_lengths):
            targets = full["input_ids"][b, -answer_length:]
            scores.append(log_probs[b, keep - 1 - answer_length:keep - 1].gather(1, targets[:, None]).sum())
    return torch.stack(scores).view(len(images), len(checks)).cpu()


def best_candidate(model, processor: "TokenFlowProcessor", candidates: torch.Tensor,
                   checks: Sequence[QAPair]) -> tuple[int, torch.Tensor]:
    """(the row of `candidates` [C, N] whose summed answer log-likelihood is highest, first on ties; the scores [C])."""
    scores = answer_log_likelihoods(model, processor, list(candidates), checks).sum(1)
    return int(scores.argmax()), scores


__all__ = ["MAX_REASONING_TOKENS", "answer_log_likelihoods", "best_candidate", "drawing_checks", "reasoning_prefix"]
