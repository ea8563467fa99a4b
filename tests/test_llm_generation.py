"""Text generation with images, next-scale drawing (cache vs recompute, CFG, top-k/top-p, seeds, previews, PNG
metadata), chat-and-draw, and sampler-setting errors."""

import json
import threading

import pytest
import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

import llm
from llm.generation import save_png
from unimodal.shapesworld import ShapesWorld

PROMPTS = ["a red circle", "two blue squares in the top left"]  # different lengths → left padding


@pytest.fixture(scope="module")
def tiny():
    return llm.build_tiny(seed=0)


@pytest.fixture(scope="module")
def image():
    return ShapesWorld("train", size=64, num_samples=1)[0].image


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.chunks.append("end")


def test_text_generate_with_images_cache_and_streaming(tiny, image):
    model, processor = tiny
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                             add_generation_prompt=True) for q in ("What colour?", "Which shape is it?")]
    inputs = processor(text=prompts, images=[image, image])
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    full = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6, use_cache=False)
    assert torch.equal(cached, full)
    # Generation follows the model: the first new token is the argmax of a plain forward's last logits.
    with torch.no_grad():
        first = model(**inputs).logits[:, -1].argmax(-1)
    assert torch.equal(cached[:, inputs["input_ids"].shape[1]], first)

    streamer = Collect()
    single = processor(text=prompts[0], images=[image])
    out = model.generate(**single, max_new_tokens=4, min_new_tokens=4, do_sample=False, streamer=streamer)
    streamed = [token for chunk in streamer.chunks[1:-1] for token in chunk]
    assert streamer.chunks[-1] == "end" and streamed == out[0, single["input_ids"].shape[1]:].tolist()


def test_text_generation_never_emits_the_image_placeholder(tiny, image):
    model, processor = tiny
    image_token = model.config.image_token_id
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                            "text": "What colour?"}]}], add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image])
    favour = model.language_model.get_output_embeddings().register_forward_hook(
        lambda module, args, logits: logits.index_add(-1, torch.tensor([image_token]),
                                                       torch.full((*logits.shape[:-1], 1), 1e4)))
    try:
        with torch.no_grad():
            assert model(**inputs).logits[0, -1].argmax() == image_token  # the model would pick <image> first
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        favour.remove()
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    assert len(new_tokens) == 3 and image_token not in new_tokens.tolist()


@pytest.mark.parametrize("backbone", ["qwen2", "llama"])
def test_cached_drawing_equals_full_recompute(backbone):
    model, processor = llm.build_tiny(seed=0, backbone=backbone)
    kwargs = dict(cfg_scale=2.0, cfg_schedule="linear", num_images_per_prompt=1)
    greedy = model.generate_image(PROMPTS, temperature=0, seed=0, **kwargs)
    greedy_full = model.generate_image(PROMPTS, temperature=0, seed=0, use_cache=False, **kwargs)
    assert greedy.indices.shape == (2, 130)
    assert torch.equal(greedy.indices, greedy_full.indices)
    sampled = model.generate_image(PROMPTS, top_k=50, top_p=0.9, temperature=1.3, seed=11, **kwargs)
    sampled_full = model.generate_image(PROMPTS, top_k=50, top_p=0.9, temperature=1.3, seed=11, use_cache=False,
                                        **kwargs)
    assert torch.equal(sampled.indices, sampled_full.indices)
    assert not torch.equal(sampled.indices, greedy.indices)


def first_scale_logits(model, processor, prompt):
    """Image logits at <boi> of one unpadded prompt: [K]."""
    ids = torch.tensor([processor.drawing_prompt_ids(prompt)])
    with torch.no_grad():
        return model(input_ids=ids).image_logits[0, -1]


def test_cfg_and_filters_equal_brute_force(tiny):
    model, processor = tiny
    cond = first_scale_logits(model, processor, PROMPTS[0])
    uncond = first_scale_logits(model, processor, "")
    # A random model barely reads the prompt, so a large weight is needed for guidance to change the greedy choice.
    cfg = 1000.0
    guided = (1 + cfg) * cond - cfg * uncond
    assert guided.argmax() != cond.argmax()
    greedy = model.generate_image(PROMPTS[0], temperature=0, cfg_scale=cfg, cfg_schedule="constant", num_scales=1,
                                  seed=0)
    assert greedy.indices.tolist() == [[int(guided.argmax())]]
    # The linear ramp gives no guidance at the 1x1 scale.
    ramp = model.generate_image(PROMPTS[0], temperature=0, cfg_scale=cfg, cfg_schedule="linear", num_scales=1, seed=0)
    assert ramp.indices.tolist() == [[int(cond.argmax())]]

    cfg = 3.0
    guided = (1 + cfg) * cond - cfg * uncond
    draws = model.generate_image(PROMPTS[0], top_k=4, top_p=1.0, cfg_scale=cfg, cfg_schedule="constant",
                                 num_scales=1, num_images_per_prompt=24, seed=1).indices.flatten()
    top4 = set(guided.topk(4).indices.tolist())
    assert set(draws.tolist()) <= top4 and len(set(draws.tolist())) > 1

    def nucleus_at(temperature: float, top_p: float = 0.8) -> set[int]:
        probs = (guided / temperature).softmax(-1)
        order = probs.argsort(descending=True)
        mass_before = probs[order].cumsum(0) - probs[order]
        return set(order[mass_before < top_p].tolist())

    # The coldest temperature whose nucleus holds a handful of codes on this random model's logit scale.
    temperature = next(t for t in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6) if 1 < len(nucleus_at(t)) < 100)
    nucleus = nucleus_at(temperature)
    draws = model.generate_image(PROMPTS[0], top_k=0, top_p=0.8, temperature=temperature, cfg_scale=cfg,
                                 cfg_schedule="constant", num_scales=1, num_images_per_prompt=24, seed=2).indices
    assert set(draws.flatten().tolist()) <= nucleus and len(set(draws.flatten().tolist())) > 1


def test_seeds_metadata_previews_and_partial_scales(tiny, tmp_path):
    model, processor = tiny
    previews = []
    first = model.generate_image(PROMPTS, seed=7, num_images_per_prompt=2, cfg_scale=1.5,
                                 callback=lambda k, images: previews.append((k, images)))
    again = model.generate_image(PROMPTS, seed=7, num_images_per_prompt=2, cfg_scale=1.5)
    generator = torch.Generator().manual_seed(7)
    with_generator = model.generate_image(PROMPTS, generator=generator, num_images_per_prompt=2, cfg_scale=1.5)
    other = model.generate_image(PROMPTS, seed=8, num_images_per_prompt=2, cfg_scale=1.5)
    assert torch.equal(first.indices, again.indices) and torch.equal(first.indices, with_generator.indices)
    assert not torch.equal(first.indices, other.indices)
    assert first.indices.shape == (4, 130) and first.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert [k for k, _ in previews] == list(range(6))
    assert all(len(images) == 4 and images[0].size == (64, 64) for _, images in previews)
    # The last preview is the final image; the first is the decoded 1x1 scale alone.
    assert previews[-1][1][0].tobytes() == first.images[0].tobytes()
    coarse = model.decode_images(first.indices[:, :1])
    assert previews[0][1][3].tobytes() == coarse[3].tobytes()

    path = tmp_path / "drawn.png"
    save_png(first.images[2], str(path))
    loaded = Image.open(path)
    assert loaded.text["prompt"] == PROMPTS[1] and loaded.text["seed"] == "7"
    settings = json.loads(loaded.text["settings"])
    assert settings["cfg_scale"] == 1.5 and settings["index"] == 2 and settings["top_k"] == 600

    partial = model.generate_image(PROMPTS, seed=7, num_images_per_prompt=2, num_scales=3, cfg_scale=1.5)
    assert partial.indices.shape == (4, 14)
    assert torch.equal(partial.indices, first.indices[:, :14])


@pytest.mark.parametrize("settings, message", [
    ({"top_p": 0.0}, "top_p must be in"), ({"top_p": 1.5}, "top_p must be in"),
    ({"temperature": -1.0}, "temperature must be"), ({"cfg_scale": -0.5}, "cfg_scale must be"),
    ({"top_k": -1}, "top_k must be"), ({"cfg_schedule": "cosine"}, "schedule must be one of"),
    ({"num_scales": 7}, r"num_scales must be an int in \[1, 6\]"), ({"num_scales": 0}, "num_scales must be"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be"),
])
def test_sampler_setting_errors(tiny, settings, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        model.generate_image("a red circle", seed=0, **settings)


def test_drawing_prompt_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="reserved token"):
        model.generate_image("a <boi> circle", seed=0)
    with pytest.raises(ValueError, match="pass generator or seed"):
        model.generate_image("x", seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="non-empty list of strings"):
        model.generate_image([], seed=0)


def force_boi(model, processor):
    """Make `<boi>` win every text step (a hook on the text head)."""
    boi = processor.boi_token_id

    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., boi] += 1e4
        return logits

    return model.get_output_embeddings().register_forward_hook(hook)


def test_chat_draws_when_the_model_emits_boi_and_looks_at_it_later(tiny, image):
    model, processor = tiny
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Draw this."}]}]
    handle = force_boi(model, processor)
    try:
        reply = llm.chat(model, messages, seed=3, max_new_tokens=5, do_sample=False,
                         image_settings={"cfg_scale": 2.0, "top_k": 100})
    finally:
        handle.remove()
    assert len(reply.images) == 1 and reply.images[0].size == (64, 64)
    assert reply.indices[0].shape == (130,)
    assert reply.images[0].info["seed"] == "3"
    item = reply.messages[-1]["content"][-1]
    assert item["type"] == "image" and item["in_history"] and torch.equal(item["indices"], reply.indices[0])

    # The drawing is the one generate_image's sampler makes from the same prompt, image features and seed.
    encoded = processor.encode_conversation(messages, add_generation_prompt=True)
    prompt = encoded["input_ids"].tolist() + [processor.boi_token_id]
    rows = [prompt, processor.drawing_prompt_ids(None)]
    ids, mask = processor.pad_sequences(rows)
    features = model.get_image_features(encoded["understanding_images"][0][1][None])
    expected = model.draw_indices(ids, mask, 1, image_features=features, cfg_scale=2.0, top_k=100,
                                  generator=torch.Generator().manual_seed(3))
    assert torch.equal(reply.indices[0], expected[0])

    # Next turn: the drawn image is looked at from its indices (no <boi> span, no pixel re-encoding).
    follow_up = reply.messages + [{"role": "user", "content": "What colour is it?"}]
    calls = []
    original = model.image_features_from_indices
    model.image_features_from_indices = lambda indices: calls.append(indices) or original(indices)
    try:
        answer = llm.chat(model, follow_up, max_new_tokens=3, do_sample=False)
    finally:
        del model.image_features_from_indices
    assert answer.images == [] and len(calls) == 1 and torch.equal(calls[0][0], reply.indices[0])
    assert answer.messages[-1]["role"] == "assistant"


def test_chat_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="last message must be the user's"):
        llm.chat(model, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with pytest.raises(ValueError, match="max_images must be 0"):
        llm.chat(model, [{"role": "user", "content": "hi"}], max_images=2)
    with pytest.raises(ValueError, match="top_p must be in"):
        llm.chat(model, [{"role": "user", "content": "hi"}], image_settings={"top_p": 2.0})
    with pytest.raises(ValueError, match="draw must be None"):
        llm.chat(model, [{"role": "user", "content": "hi"}], draw="yes")
    with pytest.raises(ValueError, match="draw=True needs max_images=1"):
        llm.chat(model, [{"role": "user", "content": "hi"}], draw=True, max_images=0)
    with pytest.raises(ValueError, match=r"unknown image_settings \['num_scales'\]"):
        llm.chat(model, [{"role": "user", "content": "hi"}], image_settings={"num_scales": 2})
    with pytest.raises(ValueError, match="seed must be an int"):
        llm.chat(model, [{"role": "user", "content": "hi"}], seed=-3)


def force_token(model, token_id):
    """Make `token_id` win every text step (a hook on the text head)."""

    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., token_id] += 1e4
        return logits

    return model.get_output_embeddings().register_forward_hook(hook)


def test_chat_draw_forces_or_forbids_a_drawing(tiny):
    model, processor = tiny
    messages = [{"role": "user", "content": "hello"}]
    settings = {"cfg_scale": 2.0, "top_k": 100}
    handle = force_token(model, processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))  # the model answers in text
    try:
        decided = llm.chat(model, messages, seed=5, max_new_tokens=4, do_sample=False, image_settings=settings)
        forced = llm.chat(model, messages, seed=5, max_new_tokens=4, do_sample=False, image_settings=settings,
                          draw=True)
    finally:
        handle.remove()
    assert decided.images == [] and not decided.stopped
    assert len(forced.images) == 1 and forced.indices[0].shape == (130,) and not forced.stopped
    assert forced.images[0].info["seed"] == "5" and forced.images[0].info["prompt"] == "hello"
    assert json.loads(forced.images[0].info["settings"])["top_k"] == 100
    # The forced drawing is the sampler's drawing of the conversation with <boi> appended to the opened turn.
    prompt = processor.encode_conversation(messages, add_generation_prompt=True)["input_ids"].tolist()
    batch = processor.drawing_batch([prompt + [processor.boi_token_id]])
    expected = model.draw_indices(batch["input_ids"], batch["attention_mask"], 1, cfg_scale=2.0, top_k=100,
                                  generator=torch.Generator().manual_seed(5))
    assert torch.equal(forced.indices[0], expected[0])

    handle = force_token(model, processor.boi_token_id)  # the model wants to draw
    try:
        text_only = llm.chat(model, messages, seed=5, max_new_tokens=4, do_sample=False, draw=False)
    finally:
        handle.remove()
    assert text_only.images == [] and text_only.text != ""


def test_chat_stop_event(tiny):
    model, processor = tiny
    messages = [{"role": "user", "content": "hello"}]
    stop = threading.Event()
    stop.set()
    reply = llm.chat(model, messages, seed=1, max_new_tokens=8, stop=stop, draw=True)
    assert reply.stopped and reply.images == [] and reply.text == ""
    assert reply.messages[-1] == {"role": "assistant", "content": []}

    # Set between text tokens (from a streamer, as another thread would): generation ends right there.
    class StopAfterTwo(Collect):
        def put(self, value):
            super().put(value)
            if len(self.chunks) == 3:  # the prompt, then two new tokens
                stop.set()

    stop.clear()
    streamer = StopAfterTwo()
    reply = llm.chat(model, messages, max_new_tokens=8, min_new_tokens=8, do_sample=False, stop=stop,
                     streamer=streamer, draw=False)
    new_tokens = [token for chunk in streamer.chunks[1:-1] for token in chunk]
    # generate checks its stopping criteria one step late (deferred stop checks), so one more token may come.
    assert reply.stopped and 2 <= len(new_tokens) <= 3

    # Set between drawing scales: the drawing is cut short and left out of the reply.
    stop.clear()
    scales_seen = []
    settings = {"callback": lambda k, previews: scales_seen.append(k) or (k == 1 and stop.set())}
    reply = llm.chat(model, messages, seed=1, draw=True, stop=stop, image_settings=settings)
    assert reply.stopped and reply.images == [] and scales_seen == [0, 1]
    stop.clear()
    drawn = model.generate_image("a red circle", seed=1, stop=stop, callback=settings["callback"])
    assert drawn.stopped and drawn.indices.shape == (1, 5) and drawn.images[0].size == (64, 64)  # the coarse image


def test_sampler_defaults_come_from_the_checkpoint(tmp_path):
    from llm.generation import DEFAULT_SAMPLER, sampler_defaults, set_sampler_defaults

    model, _ = llm.build_tiny(seed=0)
    assert sampler_defaults(model) == DEFAULT_SAMPLER
    chosen = {"cfg_scale": 3.0, "cfg_schedule": "constant", "top_k": 40, "top_p": 0.9, "temperature": 0.7,
              "scale_rounds": 1, "self_check": 4}
    assert set_sampler_defaults(model, top_k=40) == {**DEFAULT_SAMPLER, "top_k": 40}
    assert set_sampler_defaults(model, **chosen) == chosen
    with pytest.raises(ValueError, match="top_p must be in"):
        set_sampler_defaults(model, top_p=0)
    with pytest.raises(ValueError, match="self_check must be an int >= 1"):
        set_sampler_defaults(model, self_check=0)
    model.save_pretrained(tmp_path)
    loaded = llm.TokenFlowMLLM.from_pretrained(tmp_path)
    assert sampler_defaults(loaded) == chosen
    drawn = loaded.generate_image("a red circle", seed=0, num_scales=1, top_k=7)
    assert json.loads(drawn.images[0].info["settings"]) | {"top_k": 40} == {
        **chosen, "num_scales": 1, "num_images_per_prompt": 1, "index": 0}
    model.generation_config.image_sampling = {"top_k": -1}
    with pytest.raises(ValueError, match="top_k must be"):
        sampler_defaults(model)
    model.generation_config.image_sampling = {"topk": 5}
    with pytest.raises(ValueError, match=r"image_sampling has unknown keys \['topk'\]"):
        sampler_defaults(model)


def test_resolve_seed():
    from llm.generation import resolve_seed

    assert resolve_seed(0) == 0 and resolve_seed(2**64 - 1) == 2**64 - 1  # torch's whole seed range
    torch.manual_seed(0)
    first = resolve_seed(None)
    torch.manual_seed(0)
    assert resolve_seed(None) == first and 0 <= first < 2**64
    for bad in (-1, 2**64, 1.5, True, "3"):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
            resolve_seed(bad)


def test_a_prefix_keeps_the_coarse_scales_and_redraws_the_rest(tiny):
    model, _ = tiny
    first = model.generate_image(PROMPTS, seed=4, cfg_scale=2.0).indices
    prefix = first[:, :14]  # scales 1, 2 and 3
    again = model.generate_image(PROMPTS, seed=9, cfg_scale=2.0, prefix=prefix)
    full = model.generate_image(PROMPTS, seed=9, cfg_scale=2.0, prefix=prefix, use_cache=False)
    assert torch.equal(again.indices[:, :14], prefix) and torch.equal(again.indices, full.indices)
    assert not torch.equal(again.indices[:, 14:], first[:, 14:])  # the finer scales are drawn anew
    # Keeping every scale gives the drawing back.
    assert torch.equal(model.generate_image(PROMPTS, seed=9, cfg_scale=2.0, prefix=first).indices, first)
    with pytest.raises(ValueError, match="codes of whole scales"):
        model.generate_image(PROMPTS, seed=0, prefix=first[:, :10])
    with pytest.raises(ValueError, match=r"prefix codes must lie in \[0, 2048\)"):
        model.generate_image(PROMPTS, seed=0, prefix=prefix + 5000)
