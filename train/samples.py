"""What a run shows people while it trains: a few held-out questions answered and prompts drawn, on disk.

    OUTPUT_DIR/samples/step-N/answers.md     question, expected answer, model answer (ShapesWorld validation)
    OUTPUT_DIR/samples/step-N/drawings.png   drawn images under their prompts (fixed seeds)
"""

from __future__ import annotations

from pathlib import Path

import torch

from unimodal.shapesworld import ShapesPrompts, ShapesWorld, contact_sheet

SAMPLE_SEED = 1234


@torch.no_grad()
def answer_questions(model, processor, images: list, questions: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy single-turn answers: one image and one question per row, batched with left padding."""
    prompts = [processor.apply_chat_template([{"role": "user", "content": processor.user_content(q)}],
                                             add_generation_prompt=True) for q in questions]
    inputs = processor(text=prompts, images=list(images), padding_side="left").to(model.device)
    tokenizer = processor.tokenizer
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def write_samples(model, processor, out_dir: str | Path, num_prompts: int = 4) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = model.config.tokenizer_config.image_size
    world = ShapesWorld("validation", size=size, num_samples=num_prompts)
    samples = [world[i] for i in range(num_prompts)]
    questions = [s.vqa[0] for s in samples]
    answers = answer_questions(model, processor, [s.image for s in samples], [q.question for q in questions])
    lines = ["| question | expected | answer |", "|---|---|---|"]
    lines += [f"| {q.question} | {q.answer} | {a} |" for q, a in zip(questions, answers)]
    (out_dir / "answers.md").write_text("\n".join(lines) + "\n")

    prompts = ShapesPrompts("validation", size=size, num_samples=num_prompts)
    texts = [prompts.prompt(i).text for i in range(num_prompts)]
    drawn = model.generate_image(texts, processor=processor, seed=SAMPLE_SEED)
    contact_sheet(drawn.images, texts, tile=128).save(out_dir / "drawings.png")
