"""Drawing a scale in rounds: revealed codes in the model (zero start, loss, training draws), the sampler's rounds
(cache vs recompute, the keep schedule, the surest draws kept) and their errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import llm
from llm.modeling_tokenflow_mllm import random_scale_reveal
from llm.sampling import keep_at_random

PROMPTS = ["a red circle", "two blue squares in the top left"]  # different lengths → left padding


def reveal_model(seed: int = 0, std: float = 0.5):
    """A tiny model with a reveal projector that does something (random, not zero)."""
    model, processor = llm.build_tiny(seed=seed)
    model.add_reveal_projector(0.5)
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.reveal_projector.weight, std=std)
    return model, processor


def drawing_batch(processor, indices: torch.Tensor) -> dict:
    """Teacher-forced drawing conversations of `indices` [M, N] under the prompt 'x'."""
    return processor.collate([processor.encode_conversation([
        {"role": "user", "content": [{"type": "text", "text": "x"}]},
        {"role": "assistant", "content": [{"type": "image", "indices": row}]}]) for row in indices])


def test_a_new_reveal_projector_changes_nothing():
    model, processor = llm.build_tiny(seed=0)
    before = model.generate_image(PROMPTS, seed=3, cfg_scale=2.0).indices
    model.add_reveal_projector(0.5)
    assert model.config.scale_reveal_prob == 0.5 and not model.reveal_projector.weight.any()
    assert torch.equal(model.generate_image(PROMPTS, seed=3, cfg_scale=2.0).indices, before)
    batch = drawing_batch(processor, before)
    revealed = torch.rand(before.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        plain = model(**batch).image_logits
        shown = model(**batch, revealed_codes=revealed).image_logits
    assert torch.equal(plain, shown)


@pytest.mark.parametrize("sampler", [dict(temperature=0), dict(top_k=50, top_p=0.9, temperature=1.3)])
def test_rounds_with_the_cache_equal_a_full_recompute(sampler):
    model, _ = reveal_model()
    kwargs = dict(cfg_scale=2.0, cfg_schedule="linear", seed=5, **sampler)
    cached = model.generate_image(PROMPTS, scale_rounds=3, **kwargs).indices
    recomputed = model.generate_image(PROMPTS, scale_rounds=3, use_cache=False, **kwargs).indices
    assert cached.shape == (2, 130) and torch.equal(cached, recomputed)
    # The reveals reach the draws: the same greedy drawing in one round differs.
    if sampler["temperature"] == 0:
        assert not torch.equal(model.generate_image(PROMPTS, scale_rounds=1, **kwargs).indices, cached)


def test_rounds_keep_codes_on_the_schedule_and_never_change_them(monkeypatch):
    model, _ = reveal_model()
    shown = []
    reveal_embeddings = model.reveal_embeddings

    def spy(codes, revealed):
        shown.append((codes.clone(), revealed.clone()))
        return reveal_embeddings(codes, revealed)

    monkeypatch.setattr(model, "reveal_embeddings", spy)
    rounds = 3
    indices = model.generate_image(PROMPTS, scale_rounds=rounds, seed=1, cfg_scale=2.0).indices
    # One call per later round of every scale with more than one code; conditional and unconditional rows agree.
    expected_counts = [math.ceil(s * s * r / rounds) for s in model.scales if s > 1 for r in range(1, min(rounds, s * s))]
    assert [int(revealed[0].sum()) for _, revealed in shown] == expected_counts
    starts = model.config.tokenizer_config.prefix_lengths
    calls = iter(shown)
    for k, side in enumerate(model.scales):
        if side == 1:
            continue
        final = indices[:, starts[k - 1]:starts[k]]
        previous = None
        for _ in range(1, min(rounds, side * side)):
            codes, revealed = next(calls)
            half = codes.shape[0] // 2
            assert torch.equal(codes[:half], codes[half:]) and torch.equal(revealed[:half], revealed[half:])
            # A kept code is the one the drawing ends with, and stays kept.
            assert torch.equal(codes[:half][revealed[:half]], final[revealed[:half]])
            if previous is not None:
                assert bool((revealed[:half] | ~previous).all())
            previous = revealed[:half]


def test_keep_at_random_adds_new_codes_uniformly():
    generator = torch.Generator().manual_seed(0)
    kept = torch.zeros(4000, 6, dtype=torch.bool)
    kept[:, 0] = True
    out = keep_at_random(kept, 3, generator)
    assert bool(out[:, 0].all()) and bool((out.sum(1) == 3).all())
    rates = out[:, 1:].float().mean(0)  # two of the five others, each with probability 0.4
    assert torch.allclose(rates, torch.full((5,), 0.4), atol=0.03), rates
    again = keep_at_random(kept, 3, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_random_scale_reveal_spares_the_first_scale_and_mixes_fractions():
    scales = [1, 2, 3, 4, 6, 8]
    generator = torch.Generator().manual_seed(0)
    assert not random_scale_reveal(50, scales, 0.0, generator=generator).any()
    reveal = random_scale_reveal(4000, scales, 1.0, generator=generator)
    assert reveal.shape == (4000, sum(s * s for s in scales)) and not reveal[:, 0].any()
    last = reveal[:, -64:].float().mean(1)  # the 8×8 scale: one uniform fraction per span
    assert abs(float(last.mean()) - 0.5) < 0.03
    assert float((last < 0.1).float().mean()) > 0.05 and float((last > 0.9).float().mean()) > 0.05
    half = random_scale_reveal(4000, scales, 0.5, generator=generator)
    untouched = (~half).all(1).float().mean()
    assert 0.45 < float(untouched) < 0.56  # the spans not picked (plus the few picked ones that show nothing)


def test_image_loss_counts_only_the_hidden_codes():
    model, processor = reveal_model()
    indices = model.generate_image(PROMPTS, seed=2, cfg_scale=0).indices
    batch = drawing_batch(processor, indices)
    revealed = torch.rand(indices.shape, generator=torch.Generator().manual_seed(1)) < 0.4
    with torch.no_grad():
        out = model(**batch, revealed_codes=revealed)
    logits = out.image_logits.reshape(-1, out.image_logits.shape[-1])
    by_hand = F.cross_entropy(logits[~revealed.flatten()], indices.flatten()[~revealed.flatten()])
    assert torch.allclose(out.image_loss, by_hand)


def test_training_mode_draws_the_reveals_itself():
    model, processor = reveal_model()
    model.config.scale_reveal_prob = 1.0
    indices = model.generate_image(PROMPTS, seed=2, cfg_scale=0).indices
    batch = drawing_batch(processor, indices)
    model.train()
    torch.manual_seed(7)
    trained = model(**batch).image_loss
    model.eval()
    torch.manual_seed(7)
    revealed = random_scale_reveal(2, model.scales, 1.0)
    with torch.no_grad():
        given = model(**batch, revealed_codes=revealed).image_loss
        plain = model(**batch).image_loss
    assert torch.allclose(trained, given) and not torch.allclose(given, plain)
    # At probability 0 nothing is shown, yet the projector runs (a data-parallel run needs every process to use it).
    model.config.scale_reveal_prob = 0.0
    model.train()
    model.zero_grad()
    loss = model(**batch).image_loss
    loss.backward()
    assert torch.allclose(loss, plain) and model.reveal_projector.weight.grad is not None
    model.eval()


def test_round_errors():
    model, _ = llm.build_tiny(seed=0)
    with pytest.raises(ValueError, match="scale_rounds=2 needs a model trained with revealed codes"):
        model.generate_image("a red circle", seed=0, scale_rounds=2)
    with pytest.raises(ValueError, match="scale_rounds must be an int >= 1"):
        model.generate_image("a red circle", seed=0, scale_rounds=0)
    with pytest.raises(ValueError, match="revealed codes need a model trained to read them"):
        model.reveal_embeddings(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"scale reveal probability 1.5 must be in \[0, 1\]"):
        model.add_reveal_projector(1.5)
    with pytest.raises(ValueError, match=r"scale_reveal_prob=2.0 must be None or a number in \[0, 1\]"):
        llm.TokenFlowMLLMConfig(**{**model.config.to_dict(), "scale_reveal_prob": 2.0})
