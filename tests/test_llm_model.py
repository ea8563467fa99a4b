"""TokenFlowMLLM modeling: inputs of slots and spans, the attention mask through the model, losses, backbones."""

import pytest
import torch
import torch.nn.functional as F

import llm
from llm.modeling_tokenflow_mllm import sincos_2d
from llm.processing_tokenflow_mllm import IGNORE_INDEX
from unimodal.shapesworld import ShapesWorld


@pytest.fixture(scope="module")
def tiny():
    return llm.build_tiny(seed=0)


@pytest.fixture(scope="module")
def world():
    return ShapesWorld("train", size=64, num_samples=4)


def random_indices(model, rows=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.tokenizer_config.codebook_size, (rows, model.num_image_codes),
                         generator=generator)


def capture_decoder_inputs(model):
    """Hook recording the kwargs of every backbone decoder call."""
    calls = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls, handle


def mixed_conversations(model, world):
    s0, s1, s2 = world[0], world[1], world[2]
    vqa = [{"role": "user", "content": [{"type": "image", "image": s0.image}, {"type": "image", "image": s1.image},
                                        {"type": "text", "text": s0.vqa[0].question}]},
           {"role": "assistant", "content": s0.vqa[0].answer}]
    t2i = [{"role": "user", "content": s2.captions[0]},
           {"role": "assistant", "content": [{"type": "image", "indices": random_indices(model, seed=1)[0]}]}]
    text = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "a red circle"}]
    return [vqa, t2i, text]


def test_vocabulary_gains_only_image_tokens_and_pad():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"a": 0, "red": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    before = len(tokenizer)
    ids = llm.add_image_special_tokens(tokenizer)
    assert len(tokenizer) == before + 4  # <image>, <boi>, <eoi> and a pad, nothing else
    assert sorted(ids.values()) == list(range(before, before + 4))
    assert llm.add_image_special_tokens(tokenizer) == ids  # idempotent


@pytest.mark.parametrize("backbone", ["qwen2", "llama"])
def test_build_backbones_heads_and_frozen_tokenizer(backbone):
    model, processor = llm.build_tiny(seed=0, backbone=backbone)
    assert model.language_model.config.model_type == backbone
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer)
    assert model.image_head.weight.shape == (2048, 64)  # hidden → K, separate from the text head
    assert model.get_output_embeddings().weight.shape[0] == len(processor.tokenizer)
    model.train()
    assert model.language_model.training and not model.image_tokenizer.training
    assert not any(p.requires_grad for p in model.image_tokenizer.parameters())
    model.eval()
    # Same seed → same weights; another seed → different ones.
    again, _ = llm.build_tiny(seed=0, backbone=backbone)
    other, _ = llm.build_tiny(seed=1, backbone=backbone)
    assert torch.equal(model.image_head.weight, again.image_head.weight)
    assert not torch.equal(model.image_head.weight, other.image_head.weight)


def test_understanding_slots_hold_projected_features(tiny, world):
    model, processor = tiny
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}],
        add_generation_prompt=True)
    inputs = processor(text=prompt, images=[world[0].image, world[1].image])
    features = model.get_image_features(inputs["pixel_values"])
    assert features.shape == (2, 64, 40)
    calls, handle = capture_decoder_inputs(model)
    with torch.no_grad():
        model(input_ids=inputs["input_ids"], image_features=features)
    handle.remove()
    embeds = calls[0]["inputs_embeds"][0]
    slots = (inputs["input_ids"][0] == processor.image_token_id).nonzero().flatten()
    assert len(slots) == 2 * 64
    expected = model.understanding_projector(features[..., :32]).reshape(128, -1)  # images in reading order
    torch.testing.assert_close(embeds[slots], expected)
    text = (inputs["input_ids"][0] != processor.image_token_id).nonzero().flatten()
    torch.testing.assert_close(embeds[text], model.get_input_embeddings()(inputs["input_ids"][0, text]))


def test_sincos_positions_tell_every_slot_apart():
    table = sincos_2d(8, 64)
    assert table.shape == (64, 64) and table.abs().max() <= 1
    distances = torch.cdist(table, table) + torch.eye(64) * 10
    assert distances.min() > 0.1


def test_sincos2d_positions_mark_slots_only_and_survive_save_load(world, tmp_path):
    plain, processor = llm.build_tiny(seed=0)
    placed, _ = llm.build_tiny(seed=0, understanding_positions="sincos2d")
    inputs = processor(text="<image>where is the circle?", images=[world[0].image])
    features = plain.get_image_features(inputs["pixel_values"])
    embeds = {}
    for name, model in (("plain", plain), ("placed", placed)):
        with torch.no_grad():
            embeds[name], _ = model.embed_inputs(inputs["input_ids"], image_features=features)
    slots = inputs["input_ids"][0] == processor.image_token_id
    assert torch.equal(embeds["plain"][0, ~slots], embeds["placed"][0, ~slots])  # text untouched
    added = (embeds["placed"] - embeds["plain"])[0, slots]  # [S², hidden]
    assert added.shape[0] == 64
    distances = torch.cdist(added, added) + torch.eye(64) * 1e3
    assert distances.min() > 1e-2 * added.norm(dim=-1).mean()  # every slot of the 8×8 grid is told apart
    # At the projected features' magnitude: same root mean square per image.
    projected = embeds["plain"][0, slots]
    torch.testing.assert_close(added.pow(2).mean().sqrt(), projected.pow(2).mean().sqrt())
    placed.save_pretrained(tmp_path)
    loaded = type(placed).from_pretrained(tmp_path)
    assert loaded.config.understanding_positions == "sincos2d"
    with torch.no_grad():
        again, _ = loaded.embed_inputs(inputs["input_ids"], image_features=features)
    torch.testing.assert_close(again, embeds["placed"])
    with pytest.raises(ValueError, match="understanding_positions='rope'"):
        llm.TokenFlowMLLMConfig(text_config=plain.config.text_config, tokenizer_config=plain.config.tokenizer_config,
                                understanding_positions="rope", image_token_id=1, boi_token_id=2, eoi_token_id=3)


def test_conv_projector_is_two_3x3_convolutions_over_the_slot_grid(tmp_path):
    model, _ = llm.build_tiny(seed=0, understanding_features="joint", understanding_projector_type="conv2x_gelu")
    projector = model.understanding_projector
    assert model.config.understanding_projector == "conv2x_gelu" and model.config.projector_type == "mlp2x_gelu"
    assert isinstance(model.generation_projector, llm.modeling_tokenflow_mllm.MultimodalProjector)
    features = torch.randn(2, 64, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = projector(features)
        # The definition, written out on the [N, C, 8, 8] grid of raster-ordered slots.
        grid = features.transpose(1, 2).reshape(2, 40, 8, 8)
        hidden = F.gelu(F.conv2d(grid, projector.conv_1.weight, projector.conv_1.bias, padding=1))
        expected = F.conv2d(hidden, projector.conv_2.weight, projector.conv_2.bias, padding=1)
        torch.testing.assert_close(out, expected.flatten(2).transpose(1, 2))
        # Receptive field 5×5: a change at slot (2, 3) reaches rows and columns within 2 of it, nothing else.
        changed = features.clone()
        changed[0, 2 * 8 + 3] += 1.0
        moved = (projector(changed) - out)[0].abs().sum(-1).reshape(8, 8) > 0
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(moved, ((rows - 2).abs() <= 2) & ((cols - 3).abs() <= 2))
    assert torch.equal((projector(changed) - out)[1], torch.zeros(64, out.shape[-1]))  # other images untouched
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config.understanding_projector_type == "conv2x_gelu"
    torch.testing.assert_close(loaded.understanding_projector(features), out)
    with pytest.raises(ValueError, match="understanding_projector_type='conv5x5'"):
        llm.TokenFlowMLLMConfig(text_config=model.config.text_config, tokenizer_config=model.config.tokenizer_config,
                                understanding_projector_type="conv5x5", image_token_id=1, boi_token_id=2,
                                eoi_token_id=3)


@pytest.mark.parametrize("mode, reads_pixel_half", [("semantic", False), ("joint", True)])
def test_understanding_feature_modes(world, mode, reads_pixel_half):
    model, processor = llm.build_tiny(seed=0, understanding_features=mode)
    assert model.understanding_projector.linear_1.in_features == (32 if mode == "semantic" else 40)
    inputs = processor(text="<image>what?", images=[world[0].image])
    features = model.get_image_features(inputs["pixel_values"])
    changed = features.clone()
    changed[..., 32:] += 1.0  # the pixel half only
    with torch.no_grad():
        a = model(input_ids=inputs["input_ids"], image_features=features).logits
        b = model(input_ids=inputs["input_ids"], image_features=changed).logits
    assert torch.equal(a, b) != reads_pixel_half


def test_span_inputs_match_definition(tiny):
    model, processor = tiny
    indices = random_indices(model, seed=3)
    example = processor.encode_conversation(
        [{"role": "user", "content": "draw"}, {"role": "assistant", "content": [{"type": "image", "indices": indices[0]}]}])
    ids = example["input_ids"][None]
    calls, handle = capture_decoder_inputs(model)
    with torch.no_grad():
        model(input_ids=ids, generation_indices=indices)
    handle.remove()
    embeds = calls[0]["inputs_embeds"][0]
    boi = int((ids[0] == processor.boi_token_id).nonzero())
    scales, n = model.scales, model.num_image_codes
    scale_of_code = [k for k, s in enumerate(scales) for _ in range(s * s)]
    teacher = model.image_tokenizer.next_scale_inputs(indices)[0]  # [N-1, 40]
    for offset in range(n + 2):
        position = boi + offset
        if offset == 0:
            expected = model.get_input_embeddings().weight[processor.boi_token_id]
        elif offset < n:
            expected = model.generation_projector(teacher[offset - 1])
        elif offset == n:
            expected = torch.zeros_like(embeds[position])
        else:
            expected = model.get_input_embeddings().weight[processor.eoi_token_id]
        if offset < n:
            expected = expected + model.scale_embedding.weight[scale_of_code[offset]] + model.position_embedding[offset]
        elif offset == n:
            expected = expected + model.scale_embedding.weight[len(scales)]
        torch.testing.assert_close(embeds[position], expected, msg=f"span offset {offset}")
    # Text before the span gets nothing added.
    torch.testing.assert_close(embeds[:boi], model.get_input_embeddings()(ids[0, :boi]))


def brute_force_mask(input_ids, padding, boi_id, scales):
    """attend[q][k] per position, from the span layout written out by hand."""
    length = len(input_ids)
    n = sum(s * s for s in scales)
    block = [None] * length  # (span number, scale) of code-predicting span positions
    span = -1
    for p, token in enumerate(input_ids):
        if token == boi_id:
            span += 1
            offset, start = 0, p
            for k, s in enumerate(scales):
                for _ in range(s * s):
                    block[start + offset] = (span, k)
                    offset += 1
            assert offset == n
    mask = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        for k in range(length):
            same_block = block[q] is not None and block[q] == block[k]
            mask[q, k] = (padding[k] and (k <= q or same_block)) or k == q
    return mask


def test_mask_of_packed_sequence_with_two_spans(tiny):
    model, processor = tiny
    draw = [{"role": "user", "content": "draw"}, {"role": "assistant", "content": [{"type": "image", "indices": random_indices(model, seed=4)[0]}]},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": [{"type": "image", "indices": random_indices(model, seed=5)[0]}]}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a star"}]
    batch = processor.collate([processor.encode_conversation(draw), processor.encode_conversation(short)],
                              padding_side="left")
    calls, handle = capture_decoder_inputs(model)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    mask = calls[0]["attention_mask"]
    assert mask.dtype == torch.bool and mask.shape[:2] == (2, 1)
    for row in range(2):
        expected = brute_force_mask(batch["input_ids"][row].tolist(), batch["attention_mask"][row].bool().tolist(),
                                    processor.boi_token_id, model.scales)
        assert torch.equal(mask[row, 0], expected)
    assert int((batch["input_ids"][0] == processor.boi_token_id).sum()) == 2


def test_block_causal_attention_is_what_the_model_computes(tiny):
    """Changing a code changes the outputs of its own scale block's positions and later ones, never earlier ones."""
    model, processor = tiny
    indices = random_indices(model, seed=6)
    ids = processor.encode_conversation(
        [{"role": "user", "content": "draw"}, {"role": "assistant", "content": [{"type": "image", "indices": indices[0]}]}]
    )["input_ids"][None]
    boi = int((ids[0] == processor.boi_token_id).nonzero())
    changed = indices.clone()
    changed[0, 5:14] = (changed[0, 5:14] + 1) % 2048  # codes of scale 2 (3x3) → the input block of scale 3
    with torch.no_grad():
        a = model(input_ids=ids, generation_indices=indices).image_logits[0]
        b = model(input_ids=ids, generation_indices=changed).image_logits[0]
    differs = (a - b).abs().amax(-1) > 0
    # Scale 3 (4x4) is predicted at offsets 14..29 from inputs built on codes up to scale 2.
    assert not differs[:14].any()
    assert differs[14:30].all()


def test_losses_count_only_intended_positions(world):
    model, processor = llm.build_tiny(seed=0, text_loss_weight=0.5, image_loss_weight=2.0)
    conversations = mixed_conversations(model, world)
    examples = [processor.encode_conversation(c) for c in conversations]
    batch = processor.collate(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "generation_indices"}
    assert batch["pixel_values"].shape[0] == 2

    # Labels: only the assistant turns (answer + turn end), <boi>/<eoi> included, slots and padding excluded.
    supervised = [processor.decode([t for t in row.tolist() if t != IGNORE_INDEX]) for row in batch["labels"]]
    answer = conversations[0][1]["content"]
    assert supervised == [f"{answer}<|im_end|>", "<boi><eoi><|im_end|>", "a red circle<|im_end|>"]

    hidden = []
    handle = model.get_decoder().register_forward_hook(lambda m, a, out: hidden.append(out.last_hidden_state))
    out = model(**batch)
    handle.remove()
    logits = model.get_output_embeddings()(hidden[0])
    text_terms = []
    for b in range(3):
        for t in range(batch["input_ids"].shape[1] - 1):
            target = int(batch["labels"][b, t + 1])
            if target != IGNORE_INDEX:
                text_terms.append(F.cross_entropy(logits[b, t], torch.tensor(target)))
    text_loss = torch.stack(text_terms).mean()
    boi = int((batch["input_ids"][1] == processor.boi_token_id).nonzero())
    image_logits = model.image_head(hidden[0][1, boi:boi + model.num_image_codes])
    image_loss = F.cross_entropy(image_logits, batch["generation_indices"][0])
    torch.testing.assert_close(out.text_loss, text_loss)
    torch.testing.assert_close(out.image_loss, image_loss)
    torch.testing.assert_close(out.loss, 0.5 * text_loss + 2.0 * image_loss)

    out.loss.backward()
    assert model.understanding_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.generation_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.position_embedding.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.image_tokenizer.parameters())


def test_generation_pixel_values_are_encoded_targets(tiny, world):
    model, processor = tiny
    image = world[3].image
    example = processor.encode_conversation(
        [{"role": "user", "content": "draw"}, {"role": "assistant", "content": [{"type": "image", "image": image}]}])
    batch = processor.collate([example])
    assert "generation_pixel_values" in batch
    with torch.no_grad():
        from_pixels = model(**batch)
        indices = model.encode_generation_targets(batch["generation_pixel_values"])
        from_indices = model(input_ids=batch["input_ids"], labels=batch["labels"], generation_indices=indices)
    torch.testing.assert_close(from_pixels.loss, from_indices.loss)


def test_image_indices_feed_drawn_images_without_reencoding(tiny):
    model, processor = tiny
    indices = random_indices(model, rows=1, seed=7)
    inputs = processor(text="<image>what colour?", images=[indices[0]])
    assert torch.equal(inputs["image_indices"], indices)
    features = model.image_tokenizer.indices_to_understanding_features(indices)
    with torch.no_grad():
        a = model(**inputs).logits
        b = model(input_ids=inputs["input_ids"], image_features=features).logits
    assert torch.equal(a, b)


def test_model_errors(tiny, world):
    model, processor = tiny
    inputs = processor(text="<image>what?", images=[world[0].image])
    with pytest.raises(ValueError, match="1 images of 64 slots.*2 images were given"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.cat([inputs["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="0 images were given"):
        model(input_ids=inputs["input_ids"])
    small, small_processor = llm.build_tiny(seed=0, max_position_embeddings=100)
    long_prompt = small_processor(text="<image><image>what?", images=[world[0].image, world[1].image])
    with pytest.raises(ValueError, match="max_position_embeddings=100"):
        small(**long_prompt)
    draw = processor.encode_conversation(
        [{"role": "user", "content": "draw"}, {"role": "assistant", "content": [{"type": "image", "indices": random_indices(model)[0]}]}])
    with pytest.raises(ValueError, match="no generation_indices"):
        model(input_ids=draw["input_ids"][None])


def test_forward_with_parameters_cast_to_bf16_and_fp32_buffers(world):
    """DeepSpeed's bf16 engine casts the parameters and leaves the buffers fp32 (the tokenizer's input scaling is
    one): pixels given in fp32 still reach every layer in its weights' dtype, and the losses stay finite."""
    model, processor = llm.build_tiny(seed=0)
    assert any(name.endswith("scaling_layer.shift") for name, _ in model.image_tokenizer.named_buffers())
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    understand = processor.collate([processor.encode_conversation(c) for c in mixed_conversations(model, world)])
    draw = processor.collate([processor.encode_conversation(
        [{"role": "user", "content": "draw"},
         {"role": "assistant", "content": [{"type": "image", "image": world[3].image}]}])])
    assert understand["pixel_values"].dtype == draw["generation_pixel_values"].dtype == torch.float32
    with torch.no_grad():
        outputs = [model(**understand), model(**draw)]
    assert all(torch.isfinite(loss) for out in outputs for loss in (out.text_loss, out.image_loss))


@pytest.mark.parametrize("slot_head", [False, True])
def test_run_every_branch_calls_the_same_modules_for_any_batch_and_changes_no_gradient(world, monkeypatch, slot_head):
    """Under data parallelism every process must call the same modules in the same order (DeepSpeed gathers and
    reduces per module) and, under ZeRO-3, read the same parameters by attribute (`module.weight` in a forward gathers
    a partitioned parameter on the spot): with run_every_branch a text-only, a looking and a drawing batch make the
    same calls and reads, and the loss and the gradients of the branches a batch uses are what they are without it."""
    model, processor = llm.build_tiny(seed=0, slot_label_classes=[3, 4] if slot_head else None)
    model.train()
    conversations = mixed_conversations(model, world)
    batches = [processor.collate([processor.encode_conversation(c)]) for c in conversations]
    if slot_head:  # the looking batch supervises the slot head; the others leave it unused
        batches[0]["slot_labels"] = torch.randint(0, 3, (2, 2, model.num_image_slots))
    calls = []
    hooks = [module.register_forward_pre_hook(lambda m, *_, name=name: calls.append(name))
             for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    parameter_names, module_getattr = {id(p): n for n, p in model.named_parameters()}, torch.nn.Module.__getattr__

    def recording_getattr(module, name):
        value = module_getattr(module, name)
        if isinstance(value, torch.nn.Parameter) and id(value) in parameter_names:
            calls.append(f"read {parameter_names[id(value)]}")
        return value

    monkeypatch.setattr(torch.nn.Module, "__getattr__", recording_getattr)
    sequences = []
    for batch in batches:
        calls.clear()
        model.zero_grad()
        out = model(**batch, run_every_branch=True)
        sequences.append(list(calls))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        plain = model(**batch)
        plain.loss.backward()
        torch.testing.assert_close(out.loss, plain.loss)
        for name, param in model.named_parameters():
            if param.grad is not None:
                torch.testing.assert_close(grads[name], param.grad, msg=name)
            elif name in grads:
                assert not grads[name].any(), name  # an unused branch: a zero gradient instead of none
        assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    for handle in hooks:
        handle.remove()
    assert sequences[0] == sequences[1] == sequences[2]
    assert any(name.startswith("image_tokenizer.") for name in sequences[0])
    assert "read image_tokenizer.quantize.embedding_vqkd.weight" in sequences[0]  # the codebook search reads it


def with_slot_labels(model, processor, conversation, labels):
    """`conversation`'s batch with `labels` ([R, S²] or None per looked-at image) on its image items."""
    items = [item for message in conversation if isinstance(message["content"], list)
             for item in message["content"] if item["type"] == "image" and message["role"] != "assistant"]
    for item, rows in zip(items, labels, strict=True):
        item["slot_labels"] = rows
    return processor.collate([processor.encode_conversation(conversation)])


def test_slot_loss_is_the_slot_heads_cross_entropy_at_each_understanding_slot(world, tmp_path):
    model, processor = llm.build_tiny(seed=0, slot_label_classes=[3, 5], slot_loss_weight=0.7)
    num_slots = model.num_image_slots
    generator = torch.Generator().manual_seed(0)
    labels = torch.stack([torch.randint(0, 3, (num_slots,), generator=generator),
                          torch.randint(0, 5, (num_slots,), generator=generator)])
    labels[1, :5] = IGNORE_INDEX
    vqa = mixed_conversations(model, world)[0]  # two looked-at images; only the first is labelled
    batch = with_slot_labels(model, processor, vqa, [labels, None])
    assert batch["slot_labels"].shape == (2, 2, num_slots)
    assert torch.equal(batch["slot_labels"][0], labels) and batch["slot_labels"][1].eq(IGNORE_INDEX).all()

    hidden = []
    handle = model.get_decoder().register_forward_hook(lambda m, a, out: hidden.append(out.last_hidden_state))
    out = model(**batch)
    handle.remove()
    slots = (batch["input_ids"][0] == model.config.image_token_id).nonzero().flatten()[:num_slots]  # image 1
    logits = model.slot_head(hidden[0][0, slots])
    expected = F.cross_entropy(logits[:, :3], labels[0]) + F.cross_entropy(logits[5:, 3:], labels[1, 5:])
    torch.testing.assert_close(out.slot_loss, expected)
    torch.testing.assert_close(out.loss, out.text_loss + 0.7 * expected)
    out.loss.backward()
    assert model.slot_head.weight.grad.abs().sum() > 0
    assert model.understanding_projector.linear_1.weight.grad.abs().sum() > 0  # the slots learn to say it

    model.save_pretrained(tmp_path / "m")
    loaded = llm.TokenFlowMLLM.from_pretrained(tmp_path / "m")
    assert loaded.config.slot_label_classes == [3, 5] and loaded.config.slot_loss_weight == 0.7
    assert torch.equal(loaded.slot_head.weight, model.slot_head.weight)

    with pytest.raises(ValueError, match=r"slot_labels must have shape \[N_img, 2, 64\]"):
        model(**{**batch, "slot_labels": batch["slot_labels"][:, :1]})
    with pytest.raises(ValueError, match="slot_labels hold 1 images but the input looks at 2"):
        model(**{**batch, "slot_labels": batch["slot_labels"][:1]})
    with pytest.raises(ValueError, match="pass labels too"):
        model(**{k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="no slot_head"):
        llm.build_tiny(seed=0)[0](**batch)
    with pytest.raises(ValueError, match=r"slot_labels must be integer \[R, 64\]"):
        with_slot_labels(model, processor, mixed_conversations(model, world)[0], [torch.zeros(2, 9).long(), None])
    with pytest.raises(ValueError, match="slot_label_classes=\\[1\\]"):
        llm.build_tiny(seed=0, slot_label_classes=[1])


def test_add_slot_head_gives_a_model_one_and_keeps_an_existing_one():
    model, _ = llm.build_tiny(seed=0)
    assert model.slot_head is None and model.config.slot_label_classes is None
    model.add_slot_head([7, 9, 9], weight=0.5)
    assert model.slot_head.weight.shape == (25, model.config.text_config.hidden_size)
    assert model.config.slot_label_classes == [7, 9, 9] and model.config.slot_loss_weight == 0.5
    head = model.slot_head
    model.add_slot_head([7, 9, 9], weight=2.0)
    assert model.slot_head is head and model.config.slot_loss_weight == 2.0
    with pytest.raises(ValueError, match=r"reads classes \[7, 9, 9\], not \[7, 9\]"):
        model.add_slot_head([7, 9])
    with pytest.raises(ValueError, match="must be a non-empty list"):
        llm.build_tiny(seed=0)[0].add_slot_head([])
