"""One LLM training stage, end to end: options → model → what trains → data → Trainer → save_pretrained folder.

Stage 1 (`pretrain`) trains only what connects the images to a frozen backbone: the understanding and generation
projectors, the scale and position embeddings, the image head, and the rows of the new special tokens in the input
embeddings and the text head. Stage 2 (`sft`) trains the backbone too, fully or through LoRA adapters (the
connectors, the image head and the new token rows stay fully trainable). The TokenFlow tokenizer is always frozen.

The output folder holds the final `save_pretrained` model (loadable with `TokenFlowMLLM.from_pretrained`, also after
ZeRO-3), `run_config.yaml` (every resolved option), `trainable_parameters.md`, `train_log.csv`, `loss_curve.png`,
TensorBoard logs and `samples/`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from llm.build import BACKBONE_SHAPES

from .arguments import _peek_option, parse_counts, parse_stage_args, parse_weights, resolved_options
from .time_budget import TimeBudgetCallback
from .toolkit import load_options_file, single_process_launch_env
from .trainer import check_resume_run_options, last_complete_checkpoint

logger = logging.getLogger("train")


def _names(value: str) -> list[str]:
    """'a, b,c' → ['a', 'b', 'c']."""
    return [name.strip() for name in value.split(",") if name.strip()]


def start_cpu_deepspeed_state() -> list[str]:
    """Start the process group of a DeepSpeed run on CPU and return the options that make the training arguments
    use it.

    Left to the training arguments, accelerate's process state finds no backend for DeepSpeed without a GPU and
    counts one process whatever the launch: every process then believes it is rank 0 of 1, DeepSpeed's "auto"
    train_batch_size is filled for a world of one (and refused by DeepSpeed for two), and every process writes the
    checkpoints. Here the state is built with the CPU accelerator's backend (gloo) and marked as DeepSpeed's; the
    training arguments take it as it is (`accelerator_config.use_configured_state`)."""
    from accelerate.state import AcceleratorState, PartialState
    from deepspeed.accelerator import get_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)  # a state left by an earlier run in this process
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read by PartialState: start the group through DeepSpeed
    try:
        state = PartialState(backend=get_accelerator().communication_backend_name())
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    logger.info("DeepSpeed on CPU: process %d of %d", state.process_index, state.num_processes)
    return ["--accelerator-config", json.dumps({"use_configured_state": True})]


def uses_deepspeed(argv: list[str]) -> bool:
    """Whether this run trains under DeepSpeed (the default; `--deepspeed none` turns it off)."""
    value = _peek_option(argv, "deepspeed")
    if value is None and _peek_option(argv, "config") is not None:
        value = load_options_file(_peek_option(argv, "config")).get("deepspeed")
    return str(value).lower() not in ("none", "", "false", "no") if value is not None else True


# ---------------------------------------------------------------------------------------------------- model

def load_image_tokenizer(path: str):
    """The frozen TokenFlow tokenizer of --tokenizer: a `save_pretrained` folder."""
    from tokenizer import TokenFlowTokenizer

    if os.path.isfile(path):
        raise ValueError(
            f"--tokenizer {path!r} is a file; pass a TokenFlowTokenizer folder (convert a reference .pt file first: "
            f"python -m tokenizer.convert --checkpoint {path} --preset clipb-256|siglip-384 --output DIR)")
    return TokenFlowTokenizer.from_pretrained(path)  # names a missing folder or a folder of another model


def load_text_tokenizer(backbone: str, chat_format: str):
    """The text tokenizer of --backbone: the ShapesWorld word-level one for a built-in shape, else the folder's."""
    from transformers import AutoTokenizer

    import llm

    if backbone in BACKBONE_SHAPES:
        return llm.build_shapesworld_text_tokenizer(chat_format=chat_format)
    if os.path.isdir(backbone):
        return AutoTokenizer.from_pretrained(backbone)
    raise ValueError(f"--backbone {backbone!r} is neither a local model folder nor one of {', '.join(BACKBONE_SHAPES)}")


def build_model(args, hf_deepspeed_config=None):
    """A new TokenFlowMLLM (+ processor) from --backbone and --tokenizer, or the --init-from checkpoint.

    Under ZeRO-3, `from_pretrained` of a saved TokenFlowMLLM partitions every parameter from construction on
    (`zero.Init`). A new model is instead built whole, outside `zero.Init`, and DeepSpeed partitions it when its engine
    starts: its parts come from different constructors (backbone, loaded tokenizer, fresh adapters), and building only
    some of them partitioned would leave the model half partitioned. Backbones too large to build whole on every
    process go through stage 1 with ZeRO-2 (the backbone is frozen there) and reach ZeRO-3 as a saved folder."""
    from transformers import AutoProcessor

    import llm

    if args.init_from:
        if not os.path.isdir(args.init_from):
            raise FileNotFoundError(f"--init-from {args.init_from!r} is not a folder")
        model = llm.TokenFlowMLLM.from_pretrained(args.init_from)
        processor = AutoProcessor.from_pretrained(args.init_from)
        return model, processor
    with outside_zero3_init(hf_deepspeed_config):
        return build_new_model(args)


@contextmanager
def outside_zero3_init(hf_deepspeed_config):
    """Within it, transformers builds models whole although `hf_deepspeed_config` (the Trainer's, which transformers
    registers globally when the training arguments are made) is ZeRO-3."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    if hf_deepspeed_config is None or not hf_deepspeed_config.is_zero3():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_deepspeed_config)


def build_new_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    import llm

    image_tokenizer = load_image_tokenizer(args.tokenizer)
    text_tokenizer = load_text_tokenizer(args.backbone, args.chat_format)
    if args.backbone in BACKBONE_SHAPES:
        config_class = Qwen2Config if args.chat_format == "chatml" else LlamaConfig
        shape = dict(BACKBONE_SHAPES[args.backbone])
        if args.initializer_range is not None:
            shape["initializer_range"] = args.initializer_range
        backbone_config = config_class(vocab_size=len(text_tokenizer), max_position_embeddings=max(args.max_length, 1024),
                                       tie_word_embeddings=False, **shape)
        language_model = AutoModelForCausalLM.from_config(backbone_config, attn_implementation="sdpa")
        if args.embedding_init_std is not None:
            with torch.no_grad():
                language_model.get_input_embeddings().weight.normal_(0.0, args.embedding_init_std)
    else:
        language_model = AutoModelForCausalLM.from_pretrained(args.backbone, attn_implementation="sdpa")
    return llm.assemble(language_model, text_tokenizer, image_tokenizer, args.chat_format,
                        understanding_features=args.understanding_features,
                        understanding_positions=args.understanding_positions,
                        understanding_projector_type=args.understanding_projector,
                        image_placement=args.image_placement)


def new_token_ids(model) -> list[int]:
    config = model.config
    return [config.image_token_id, config.boi_token_id, config.eoi_token_id]


def train_rows_only(weight: torch.nn.Parameter, rows: list[int]) -> None:
    """Make only `rows` of an embedding/head matrix learn: the gradient of every other row is zeroed (with no
    weight decay on it, Adam then leaves those rows exactly unchanged)."""
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[rows] = 1
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))
    weight._trainable_rows = len(rows)  # read by `parameter_table`


def configure_trainable(model, stage: str, args) -> object:
    """Set requires_grad for `stage` (see the module docstring); returns the model to train (peft-wrapped backbone
    inside for LoRA)."""
    model.requires_grad_(True)
    model.image_tokenizer.requires_grad_(False)
    rows = new_token_ids(model)
    if stage == "pretrain":
        model.language_model.requires_grad_(False)
        train_rows_only(model.language_model.get_input_embeddings().weight, rows)
        train_rows_only(model.language_model.get_output_embeddings().weight, rows)
    elif args.lora:
        from peft import LoraConfig, get_peft_model

        targets = _names(args.lora_targets)
        present = {name.rsplit(".", 1)[-1] for name, _ in model.language_model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ValueError(f"--lora-targets {missing} are not modules of the backbone; some present: "
                             f"{sorted(present)[:20]}")
        lora_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                 target_modules=targets, bias="none")
        model.language_model = get_peft_model(model.language_model, lora_config)
        base = model.language_model.get_base_model()
        train_rows_only(base.get_input_embeddings().weight, rows)
        train_rows_only(base.get_output_embeddings().weight, rows)
    return model


def parameter_table(model) -> str:
    """Markdown table of trainable/frozen parameter counts per top-level module."""
    groups: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        top = ".".join(name.split(".")[:2]) if name.startswith("language_model.") else name.split(".")[0]
        counts = groups.setdefault(top, [0, 0])
        counts[0 if param.requires_grad else 1] += param.numel()
    lines = ["| module | trainable | frozen |", "|---|---:|---:|"]
    for top, (trainable, frozen) in groups.items():
        lines.append(f"| {top} | {trainable:,} | {frozen:,} |")
    total_t = sum(v[0] for v in groups.values())
    total_f = sum(v[1] for v in groups.values())
    lines.append(f"| **total** | **{total_t:,}** | **{total_f:,}** |")
    row_masked = [(name, p) for name, p in model.named_parameters() if hasattr(p, "_trainable_rows")]
    if row_masked:
        lines.append("")
        lines += [f"`{name}` counts as trainable above, but only {p._trainable_rows} of its {p.shape[0]:,} rows learn "
                  f"(the new tokens; {p._trainable_rows * p.shape[1]:,} parameters): the other rows' gradients are "
                  "masked to zero." for name, p in row_masked]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- data

def build_dataset(stage: str, args, seed: int, image_placement: str = "before_text",
                  slot_label_side: int | None = None):
    """--data / --mixture → one map-style dataset of conversations; ShapesWorld lays its looked-at images out as
    `image_placement` says (the trained model's `config.image_placement`) and, with `slot_label_side` (the model's
    grid of understanding slots), labels each slot of them (`ShapesWorldConversations`)."""
    from .conversations import (
        CaptionConversations, LlavaConversations, MixtureDataset, PretokenizedConversations,
        ShapesWorldConversations, TextConversations,
    )

    sources = {}
    for spec in [s.strip() for s in args.data.split(",") if s.strip()]:
        kind, _, path = spec.partition(":")
        if kind == "shapesworld":
            tasks = parse_weights(args.shapesworld_tasks, "--shapesworld-tasks")
            question_types = _names(args.question_types) if args.question_types else None
            reasoned = _names(args.reasoned_answers) if args.reasoned_answers else ()
            extra = parse_counts(args.extra_questions, "--extra-questions")
            source = ShapesWorldConversations(stage, "train", num_samples=args.num_samples, seed=seed, tasks=tasks,
                                              max_questions=args.questions_per_image,
                                              cfg_drop_prob=args.cfg_drop_prob, curriculum_steps=args.curriculum_steps,
                                              image_placement=image_placement,
                                              question_types=question_types, reasoned_types=reasoned,
                                              slot_label_side=slot_label_side, extra_questions=extra)
        elif not path:
            raise ValueError(f"--data source {spec!r} needs a path (e.g. llava:data/train.json)")
        elif kind == "llava":
            source = LlavaConversations(path, args.image_folder)
        elif kind == "captions":
            source = CaptionConversations(path, mode="both" if stage == "pretrain" else "t2i",
                                          image_folder=args.image_folder, seed=seed, cfg_drop_prob=args.cfg_drop_prob)
        elif kind == "text":
            source = TextConversations(path)
        elif kind == "pretokenized":
            source = PretokenizedConversations(path, cfg_drop_prob=args.cfg_drop_prob, image_placement=image_placement)
        else:
            raise ValueError(f"unknown --data kind {kind!r} in {spec!r}; allowed: shapesworld, llava, captions, text, "
                             "pretokenized")
        if kind in sources:
            raise ValueError(f"--data names {kind!r} twice; give one source of each kind")
        sources[kind] = source
    if not sources:
        raise ValueError("--data names no source")
    if "pretokenized" in sources and set(sources) - {"pretokenized", "text"}:
        # A batch holds images as pixels or as indices, never both (the model takes one kind per forward).
        raise ValueError(f"--data mixes pretokenized with {sorted(set(sources) - {'pretokenized', 'text'})}, whose "
                         "images are pixels; pre-tokenize those too (train/pretokenize.py takes the same --data) or "
                         "train on them without pretokenized")
    if len(sources) == 1:
        return next(iter(sources.values()))
    weights = parse_weights(args.mixture, "--mixture") or {name: 1.0 for name in sources}
    return MixtureDataset(sources, weights, num_samples=args.num_samples, seed=seed)


# ---------------------------------------------------------------------------------------------------- run

def run_stage(stage: str, argv: list[str] | None = None) -> str:
    """Train one stage; returns the output folder (a `save_pretrained` model)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if uses_deepspeed(argv):
        single_process_launch_env()
        if not torch.cuda.is_available() and not any(_peek_option(argv, name) for name in ("accelerator_config",
                                                                                             "accelerator-config")):
            argv += start_cpu_deepspeed_state()
    stage_args, training_args = parse_stage_args(stage, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    from transformers import set_seed

    from .conversations import check_pretokenized_tokenizer, check_slot_labels
    from .trainer import ConversationCollator, CsvLogCallback, LossPlotCallback, SampleCallback, TokenFlowTrainer

    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output_dir / "logs"))
    zero3 = training_args.deepspeed is not None and "zero3" in str(training_args.deepspeed)
    if zero3 and stage_args.lora:
        raise ValueError("--lora with ZeRO-3 is not supported (adapters cannot be merged into partitioned weights); "
                         "use --deepspeed zero2")
    set_seed(training_args.seed)
    model, processor = build_model(stage_args, getattr(training_args, "hf_deepspeed_config", None))
    if stage_args.slot_loss_weight:
        from unimodal.shapesworld.labels import SLOT_LABEL_CLASSES

        model.add_slot_head(list(SLOT_LABEL_CLASSES), stage_args.slot_loss_weight)
    elif model.slot_head is not None:
        model.config.slot_loss_weight = 0.0  # the head stays (and is saved) but nothing supervises it in this run
    if stage_args.scale_reveal_prob is not None:
        model.add_reveal_projector(stage_args.scale_reveal_prob)
    model = configure_trainable(model, stage, stage_args)
    if training_args.gradient_checkpointing:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    dataset = build_dataset(stage, stage_args, training_args.data_seed if training_args.data_seed is not None
                            else training_args.seed, model.config.image_placement,
                            model.config.tokenizer_config.grid_size if stage_args.slot_loss_weight else None)
    check_pretokenized_tokenizer(dataset, model.image_tokenizer)
    if stage_args.slot_loss_weight:
        check_slot_labels(dataset, model.config.tokenizer_config.grid_size)

    options = resolved_options(stage_args, training_args) | {"stage": stage}
    if training_args.should_save:
        (output_dir / "run_config.yaml").write_text(yaml.safe_dump(options, sort_keys=True))
        (output_dir / "trainable_parameters.md").write_text(parameter_table(model))
    logger.info("stage %s: %s", stage, parameter_table(model).splitlines()[-1])

    trainer = TokenFlowTrainer(
        model=model, args=training_args, train_dataset=dataset,
        data_collator=ConversationCollator(processor, stage_args.max_length), processing_class=processor,
        max_skip_fraction=stage_args.max_skip_fraction,
        sample_ids_dir=output_dir / "sample_ids" if stage_args.record_sample_ids else None,
        callbacks=[CsvLogCallback(output_dir / "train_log.csv"),
                   LossPlotCallback(output_dir / "train_log.csv", output_dir / "loss_curve.png"),
                   SampleCallback(processor, output_dir / "samples", stage_args.sample_every,
                                  stage_args.num_sample_prompts, enabled=not zero3)])
    if stage_args.max_minutes is not None:
        trainer.add_callback(TimeBudgetCallback(stage_args.max_minutes))

    resume = resolve_resume(stage_args.resume, output_dir)
    if resume:
        logger.info("resuming from %s", resume)
        check_resume_run_options(resume, options, stage_args.strict_resume)
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, model, processor, stage_args, output_dir)
    logger.info("saved %s model to %s", stage, output_dir)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # Every rank leaves together and the backend's threads are joined here, not torn down at interpreter exit
        # (which can abort a finished run).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return str(output_dir)


def resolve_resume(resume: str, output_dir: Path) -> str | None:
    """--resume value → the checkpoint folder to continue from (None: start fresh)."""
    if resume in ("no", "none", "false", "False", ""):
        return None
    if resume == "auto":
        return last_complete_checkpoint(output_dir)
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume {resume!r} is not a checkpoint folder (or use auto / no)")
    return resume


def save_final(trainer, model, processor, args, output_dir: Path) -> None:
    """The final `save_pretrained` folder (weights gathered from every rank under ZeRO-3)."""
    if args.lora:
        from peft import PeftModel

        if isinstance(model.language_model, PeftModel):
            if not args.merge_lora and trainer.args.should_save:
                model.language_model.save_pretrained(str(output_dir / "lora_adapter"))
            model.language_model = model.language_model.merge_and_unload()
    trainer.save_model(str(output_dir))
    if trainer.args.should_save:
        processor.save_pretrained(str(output_dir))
