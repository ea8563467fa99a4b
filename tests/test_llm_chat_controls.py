"""`llm.chat`'s draw / stop controls, `sampler_defaults` and `resolve_seed`."""

import threading

import pytest
import torch

import llm
from llm.generation import DEFAULT_SAMPLER, resolve_seed, sampler_defaults

DRAW = [{"role": "user", "content": "a red circle"}]


@pytest.fixture(scope="module")
def tiny():
    return llm.build_tiny(seed=0)


def test_draw_true_draws_at_once_and_matches_the_sampler(tiny):
    model, processor = tiny
    reply = llm.chat(model, DRAW, draw=True, seed=5, max_new_tokens=2, do_sample=False,
                     image_settings={"cfg_scale": 2.0, "top_k": 50})
    assert len(reply.images) == 1 and reply.indices[0].shape == (processor.num_image_codes,)
    assert reply.images[0].info["seed"] == "5" and not reply.stopped
    prompt = processor.encode_conversation(DRAW, add_generation_prompt=True)["input_ids"].tolist()
    ids, mask = processor.pad_sequences([prompt + [processor.boi_token_id], processor.drawing_prompt_ids(None)])
    expected = model.draw_indices(ids, mask, 1, cfg_scale=2.0, top_k=50, generator=torch.Generator().manual_seed(5))
    assert torch.equal(reply.indices[0], expected[0])


def test_draw_false_never_draws(tiny):
    model, processor = tiny
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, logits: logits.index_fill(-1, torch.tensor([processor.boi_token_id]), 1e4))
    try:
        forced = llm.chat(model, DRAW, max_new_tokens=3, do_sample=False, image_settings={"cfg_scale": 0.0})
        text_only = llm.chat(model, DRAW, draw=False, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert len(forced.images) == 1  # the hook does make the model emit <boi>
    # <boi> is suppressed, so the model answers in text instead.
    assert text_only.images == [] and [item["type"] for item in text_only.messages[-1]["content"]] == ["text"]


def test_stop_ends_text_and_drawing(tiny):
    model, processor = tiny
    stop = threading.Event()
    stop.set()
    reply = llm.chat(model, DRAW, stop=stop, max_new_tokens=20, do_sample=False)
    assert reply.stopped and reply.text == "" and reply.images == []

    scales_done = []
    stop = threading.Event()

    def after_scale(k, previews):
        scales_done.append(k)
        if k == 1:
            stop.set()

    reply = llm.chat(model, DRAW, draw=True, stop=stop, seed=0, image_settings={"callback": after_scale})
    assert reply.stopped and reply.images == [] and scales_done == [0, 1]
    assert reply.messages[-1] == {"role": "assistant", "content": []}


def test_sampler_defaults_come_from_the_generation_config(tiny):
    model, _ = tiny
    assert sampler_defaults(model) == DEFAULT_SAMPLER
    model.generation_config.image_sampling = {"cfg_scale": 3.0, "top_k": 10}
    try:
        assert sampler_defaults(model) == {**DEFAULT_SAMPLER, "cfg_scale": 3.0, "top_k": 10}
        model.generation_config.image_sampling = {"guidance": 1.0}
        with pytest.raises(ValueError, match="unknown keys"):
            sampler_defaults(model)
    finally:
        del model.generation_config.image_sampling


def test_resolve_seed():
    assert resolve_seed(7) == 7 and resolve_seed(2**64 - 1) == 2**64 - 1
    assert 0 <= resolve_seed(None) < 2**64
    for bad in (-1, 2**64, 1.5, True, "3"):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
            resolve_seed(bad)


def test_text_never_holds_image_slots_or_eoi(tiny):
    """A model that favours `<image>` / `<eoi>` in text must not put them in its answer (a later drawing's prompt
    would then hold a stray slot)."""
    model, processor = tiny
    banned = [processor.image_token_id, processor.eoi_token_id]
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, logits: logits.index_fill(-1, torch.tensor(banned), 1e4))
    tokens = []

    class Collect:
        def put(self, value):
            tokens.extend(value.flatten().tolist())

        def end(self):
            pass

    try:
        reply = llm.chat(model, DRAW, max_new_tokens=4, do_sample=False, streamer=Collect())
    finally:
        handle.remove()
    prompt_length = processor.encode_conversation(DRAW, add_generation_prompt=True)["input_ids"].shape[0]
    generated = tokens[prompt_length:]
    assert generated and not set(generated) & set(banned)
    assert reply.images == []
