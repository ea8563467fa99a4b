"""Options of the two LLM training stages: one YAML file per run, every option also a command-line flag.

    deepspeed train/sft.py --config run.yaml --max-steps 500 --lora true

Precedence: command line > `--config` file > the stage's defaults (`STAGE_DEFAULTS`) > dataclass defaults. The
options are our `StageArguments` plus every `transformers.TrainingArguments` field (`--learning-rate`,
`--per-device-train-batch-size`, `--deepspeed`, `--gradient-checkpointing`, ...); dashes and underscores are
interchangeable on the command line.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from llm.build import BACKBONE_SHAPES
from llm.configuration_tokenflow_mllm import IMAGE_PLACEMENTS, UNDERSTANDING_POSITIONS, UNDERSTANDING_PROJECTOR_TYPES

from .toolkit import load_options_file

logger = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
DEFAULT_TOKENIZER = REPO_DIR / "tokenizer" / "pretrained" / "shapesworld-tiny"
DEEPSPEED_CONFIGS = {name: str(PACKAGE_DIR / "configs" / f"{name}.json")
                     for name in ("zero2", "zero3", "zero3_offload")}
STAGES = ("pretrain", "sft")
STAGE1_OUTPUT = "outputs/pretrain"


@dataclass
class StageArguments:
    """What to train on and what to train; `TrainingArguments` says how."""

    config: str | None = field(default=None, metadata={"help": "YAML (or JSON) file of options for this run"})
    # ---- model
    init_from: str | None = field(default=None, metadata={
        "help": "a TokenFlowMLLM save_pretrained folder to start from (e.g. the stage-1 output); else a new model is "
                "built from --backbone and --tokenizer. Stage 2's default, auto, takes stage 1's default output "
                f"folder ({STAGE1_OUTPUT}) when it holds a saved model; none always builds a new model"})
    backbone: str = field(default="shapesworld-small", metadata={
        "help": "a local Hugging Face causal-LM folder, or a named random-init config: shapesworld-small, "
                "shapesworld-narrow, shapesworld-tiny, qwen2-0.5b-shaped"})
    chat_format: str = field(default="chatml", metadata={"help": "chat template of a new model: chatml or vicuna"})
    tokenizer: str = field(default=str(DEFAULT_TOKENIZER), metadata={
        "help": "the frozen TokenFlow tokenizer: a save_pretrained folder (or a reference .pt file)"})
    understanding_features: str = field(default="joint", metadata={
        "help": "a new model's understanding input: joint (all 40 dims of f̂, as the reference) or semantic (the 32-d "
                "half); joint slots carry about twice the shape information (python -m eval.probe cells)"})
    understanding_positions: str = field(default="sincos2d", metadata={
        "help": "a new model's 2-D positions of the understanding slots: sincos2d (a fixed sin/cos table of each "
                "slot's grid row and column, at the projected features' magnitude) or none (only the backbone's 1-D "
                "positions, as the reference); a model from --init-from keeps its own"})
    understanding_projector: str = field(default="conv2x_gelu", metadata={
        "help": "a new model's understanding projector: mlp2x_gelu (each slot alone, as the reference) or "
                "conv2x_gelu (two 3x3 convolutions over the slot grid: each slot also reads its neighbours)"})
    embedding_init_std: float | None = field(default=None, metadata={
        "help": "a new named backbone's input-embedding init std (default: its initializer_range). The "
                "understanding slots enter the residual stream at about 1 per dimension"})
    initializer_range: float | None = field(default=None, metadata={
        "help": "a new named backbone's init std of every linear layer and embedding, its own and the model's "
                "adapters and heads (default: 1/sqrt(width) for the shapesworld-* shapes, 0.088 at 128 wide, and 0.02 "
                "for qwen2-0.5b-shaped). Narrow decoders at 0.02 learn the question-conditioned lookups of VQA far "
                "later (see the README)"})
    image_placement: str = field(default="before_text", metadata={
        "help": "a new model's layout of an image the user shows: before_text (LLaVA's <image>\\n{question}) or "
                "after_text ({question}\\n<image>: the slots follow the question and can attend to it); prompts "
                "(eval, demo) and ShapesWorld training conversations follow the model's own setting"})
    resume: str = field(default="auto", metadata={
        "help": "auto: continue from the newest complete checkpoint in --output-dir if there is one; no: start "
                "fresh; or a checkpoint folder"})
    max_minutes: float | None = field(default=None, metadata={
        "help": "wall-clock budget of the training loop in minutes: when it is spent, save a checkpoint and the "
                "final model and stop (the LR schedule still follows --max-steps); unset: no limit"})
    strict_resume: bool = field(default=False, metadata={
        "help": "refuse to resume from a checkpoint saved with other options (else: a warning naming them)"})
    # ---- what trains
    lora: bool = field(default=False, metadata={"help": "stage 2: train LoRA adapters on the backbone (peft)"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={
        "help": "comma-separated backbone module names that get LoRA adapters"})
    merge_lora: bool = field(default=True, metadata={
        "help": "save the final model with the adapters merged (else the adapters are saved beside it)"})
    # ---- data
    data: str = field(default="shapesworld", metadata={
        "help": "comma-separated sources: shapesworld, llava:PATH, captions:PATH, text:PATH, pretokenized:DIR"})
    mixture: str | None = field(default=None, metadata={
        "help": "source weights, e.g. 'llava:0.6,captions:0.3,text:0.1' (names as in --data; default equal)"})
    image_folder: str | None = field(default=None, metadata={"help": "folder that image paths are relative to"})
    num_samples: int = field(default=20000, metadata={"help": "samples per epoch of the mixture"})
    shapesworld_tasks: str | None = field(default=None, metadata={
        "help": "ShapesWorld task weights over caption, vqa, t2i, text and describe (every object named cell by "
                "cell), e.g. 'vqa:0.5,t2i:0.4,describe:0.1'"})
    curriculum_steps: int = field(default=0, metadata={
        "help": "ShapesWorld: over the first N steps the most objects per scene rises from 1 to the world's maximum "
                "(the probe learned faster with one-object scenes first); 0 = no curriculum"})
    questions_per_image: int = field(default=3, metadata={
        "help": "ShapesWorld VQA: questions asked about one image in a conversation"})
    question_types: str | None = field(default=None, metadata={
        "help": "ShapesWorld VQA: ask only these comma-separated types (color, shape, count, position, relation, "
                "exists; default all), e.g. exists,relation,count"})
    extra_questions: str | None = field(default=None, metadata={
        "help": "ShapesWorld VQA: more questions of these types per conversation beside --questions-per-image, as "
                "type:count pairs, e.g. 'relation:2' (a type that is slow to learn is seen more often without "
                "taking questions from the others)"})
    reasoned_answers: str | None = field(default=None, metadata={
        "help": "ShapesWorld VQA: answer questions of these comma-separated types with their reasoning first (only "
                "relation has one: 'the red circle is in the left column and the blue square is in the center "
                "column, so yes'); the model learns to locate both objects, then compare. Graded on the final answer"})
    slot_loss_weight: float = field(default=0.0, metadata={
        "help": "ShapesWorld: weight of a per-slot loss on the understanding slots' last hidden states (a linear "
                "slot_head names each slot's shape, colour and cell); the dense supervision the VQA probe needed "
                "before yes/no questions left the answer prior. 0 = off"})
    scale_reveal_prob: float | None = field(default=None, metadata={
        "help": "train the model to draw a scale in rounds (the sampler's --scale-rounds): this fraction of drawn "
                "images shows a random part of each scale's own codes to the positions that predict them, and the "
                "image loss counts the hidden ones; adds a zero-initialised reveal projector to a model without one. "
                "Unset = the model's own setting (none for a model without the projector)"})
    cfg_drop_prob: float = field(default=0.1, metadata={"help": "probability of dropping a drawing prompt to ''"})
    max_length: int = field(default=512, metadata={"help": "longer samples are skipped and counted"})
    max_skip_fraction: float = field(default=0.1, metadata={
        "help": "stop the run when a data shard (one process, or one of its loader workers) has skipped more than "
                "this fraction of the samples it read, counted after its first 100 (1 = never stop)"})
    record_sample_ids: bool = field(default=False, metadata={
        "help": "each process appends the ids of the samples it trains on to OUTPUT_DIR/sample_ids/rank-R.jsonl"})
    # ---- observability
    sample_every: int = field(default=0, metadata={
        "help": "every N steps write a few answers and drawn images to OUTPUT_DIR/samples (0 = at the end only)"})
    num_sample_prompts: int = field(default=4, metadata={"help": "prompts/questions per sample sheet"})


# Stage defaults, applied under the config file and the command line.
STAGE_DEFAULTS = {
    # With a randomly initialised backbone (the ShapesWorld default) stage 1 can only align the adapters; most of
    # the CPU budget goes to stage 2, where the backbone learns.
    "pretrain": dict(output_dir=STAGE1_OUTPUT, learning_rate=1e-3, max_steps=250, num_samples=20000),
    "sft": dict(output_dir="outputs/sft", learning_rate=1e-3, max_steps=1100, num_samples=20000, init_from="auto"),
}
COMMON_DEFAULTS = dict(
    per_device_train_batch_size=16, lr_scheduler_type="cosine", warmup_steps=20, weight_decay=0.0,
    logging_steps=10, save_steps=200, save_total_limit=2, report_to=["tensorboard"], seed=0, data_seed=0,
    remove_unused_columns=False, dataloader_num_workers=0, max_grad_norm=1.0, adam_beta2=0.95, deepspeed="zero2",
)


def parse_stage_args(stage: str, argv: list[str] | None = None) -> tuple[StageArguments, TrainingArguments]:
    """Command line (+ `--config` file) → (StageArguments, TrainingArguments) for `stage`."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; allowed: {STAGES}")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((StageArguments, TrainingArguments))
    parser.prog = f"train/{stage}.py"
    defaults = {**COMMON_DEFAULTS, **STAGE_DEFAULTS[stage], "bf16": _cuda_available()}  # bf16 on GPU, fp32 on CPU
    config_path = _peek_option(argv, "config")
    if config_path is not None:
        known = {f.name for dc in (StageArguments, TrainingArguments) for f in dataclasses.fields(dc)}
        defaults.update(load_options_file(config_path, known))
    parser.set_defaults(**{k: v for k, v in defaults.items() if v is not None})
    namespace = parser.parse_args(argv)
    # DeepSpeed configs by name (zero2, zero3, zero3_offload) or path; "none" trains without DeepSpeed.
    deepspeed = getattr(namespace, "deepspeed", None)
    namespace.deepspeed = (None if str(deepspeed).lower() in ("none", "", "false", "no")
                           else DEEPSPEED_CONFIGS.get(deepspeed, deepspeed))
    if namespace.deepspeed is None and not _cuda_available():
        namespace.use_cpu = True
    stage_args, training_args = parser.parse_dict(vars(namespace))
    stage_args.init_from = resolve_init_from(stage_args.init_from)
    check_stage_args(stage, stage_args)
    check_intervals(training_args)
    return stage_args, training_args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _peek_option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg in (f"--{name}",) and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def resolve_init_from(value: str | None) -> str | None:
    """--init-from as given, with "auto" → stage 1's default output folder if it holds a saved model (else None)
    and "none" → None. Which one was taken is logged, since it decides whether stage 1's training is used."""
    if value is None or str(value).lower() in ("none", ""):
        return None
    if str(value).lower() != "auto":
        return value
    if (Path(STAGE1_OUTPUT) / "config.json").is_file():
        logger.info("--init-from auto: starting from the stage-1 model in %s", STAGE1_OUTPUT)
        return STAGE1_OUTPUT
    logger.warning("--init-from auto: no stage-1 model in %s (run train/pretrain.py first, or pass --init-from); "
                   "building a new model from --backbone and --tokenizer", STAGE1_OUTPUT)
    return None


def check_stage_args(stage: str, args: StageArguments) -> None:
    if args.lora and stage != "sft":
        raise ValueError("--lora is a stage-2 option (train/sft.py); stage 1 trains the adapters only")
    if args.chat_format not in ("chatml", "vicuna"):
        raise ValueError(f"--chat-format={args.chat_format!r}; allowed: chatml, vicuna")
    if args.understanding_features not in ("semantic", "joint"):
        raise ValueError(f"--understanding-features={args.understanding_features!r}; allowed: semantic, joint")
    if args.understanding_positions not in UNDERSTANDING_POSITIONS:
        raise ValueError(f"--understanding-positions={args.understanding_positions!r}; allowed: "
                         f"{', '.join(UNDERSTANDING_POSITIONS)}")
    if args.embedding_init_std is not None and not args.embedding_init_std > 0:
        raise ValueError(f"--embedding-init-std={args.embedding_init_std!r} must be > 0")
    if args.embedding_init_std is not None and args.backbone not in BACKBONE_SHAPES:
        raise ValueError(f"--embedding-init-std applies to a new named backbone ({', '.join(BACKBONE_SHAPES)}), not "
                         f"to {args.backbone!r}, whose trained embeddings are kept")
    if args.initializer_range is not None and not args.initializer_range > 0:
        raise ValueError(f"--initializer-range={args.initializer_range!r} must be > 0")
    if args.initializer_range is not None and args.backbone not in BACKBONE_SHAPES:
        raise ValueError(f"--initializer-range applies to a new named backbone ({', '.join(BACKBONE_SHAPES)}), not "
                         f"to {args.backbone!r}, whose trained weights are kept")
    if args.image_placement not in IMAGE_PLACEMENTS:
        raise ValueError(f"--image-placement={args.image_placement!r}; allowed: {', '.join(IMAGE_PLACEMENTS)}")
    if args.understanding_projector not in UNDERSTANDING_PROJECTOR_TYPES:
        raise ValueError(f"--understanding-projector={args.understanding_projector!r}; allowed: "
                         f"{', '.join(UNDERSTANDING_PROJECTOR_TYPES)}")
    if not 0 <= args.cfg_drop_prob <= 1:
        raise ValueError(f"--cfg-drop-prob={args.cfg_drop_prob!r} must be in [0, 1]")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError(f"--max-minutes={args.max_minutes!r} must be > 0 (leave it unset for no limit)")
    if not 0 <= args.max_skip_fraction <= 1:
        raise ValueError(f"--max-skip-fraction={args.max_skip_fraction!r} must be in [0, 1]")
    if args.curriculum_steps < 0:
        raise ValueError(f"--curriculum-steps={args.curriculum_steps!r} must be >= 0")
    if args.curriculum_steps and "shapesworld" not in [s.strip().partition(":")[0] for s in args.data.split(",")]:
        raise ValueError(f"--curriculum-steps {args.curriculum_steps} applies to ShapesWorld scenes, but --data "
                         f"{args.data!r} has no shapesworld source (pre-tokenized shards are fixed)")
    if args.scale_reveal_prob is not None and not 0 <= args.scale_reveal_prob <= 1:
        raise ValueError(f"--scale-reveal-prob={args.scale_reveal_prob!r} must be in [0, 1]")
    if not args.slot_loss_weight >= 0:
        raise ValueError(f"--slot-loss-weight={args.slot_loss_weight!r} must be >= 0")
    if args.slot_loss_weight and not {"shapesworld", "pretokenized"} & {s.strip().partition(":")[0]
                                                                         for s in args.data.split(",")}:
        raise ValueError(f"--slot-loss-weight {args.slot_loss_weight} needs the per-slot labels of ShapesWorld scenes, "
                         f"but --data {args.data!r} has no shapesworld source (or shards written with "
                         "train/pretokenize.py --slot-labels)")
    for name in ("lora_rank", "lora_alpha", "num_samples", "max_length", "questions_per_image"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)!r} must be >= 1")


def check_intervals(args: TrainingArguments) -> None:
    """Step counts the Trainer divides by are rejected here, before any model is built."""
    for name in ("logging_steps", "save_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)!r} must be > 0 (steps, or a fraction "
                             "of the run below 1)")
    if args.max_steps == 0 or args.max_steps < -1:
        raise ValueError(f"--max-steps={args.max_steps!r} must be >= 1 (or -1: train --num-train-epochs)")


def parse_weights(text: str | None, what: str) -> dict[str, float] | None:
    """'a:0.5,b:0.5' → {"a": 0.5, "b": 0.5}."""
    if not text:
        return None
    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition(":")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"{what} {text!r}: expected comma-separated name:value pairs, got {part!r}")
    return weights


def parse_counts(text: str | None, what: str) -> dict[str, int]:
    """'relation:2,count:1' → {"relation": 2, "count": 1} (None or '' → {}): `parse_weights` with whole counts."""
    counts = {}
    for name, value in (parse_weights(text, what) or {}).items():
        if not (math.isfinite(value) and value >= 0 and value == int(value)):
            raise ValueError(f"{what} {name}:{value:g}: the count must be a whole number >= 0, e.g. 'relation:2'")
        counts[name] = int(value)
    return counts


def resolved_options(stage_args: StageArguments, training_args: TrainingArguments) -> dict:
    """Every option of the run, as saved beside the checkpoint (`run_config.yaml`)."""
    options = dataclasses.asdict(stage_args)
    options.update({k: v for k, v in training_args.to_dict().items() if not k.startswith("_")})
    return {k: v for k, v in options.items() if not k.endswith("_token")}
