"""Stage 1, alignment: connect images to a frozen backbone (both ways: captioning and drawing).

    deepspeed train/pretrain.py                        # ShapesWorld, tiny tokenizer, small random backbone
    deepspeed train/pretrain.py --backbone /models/Qwen2.5-0.5B --tokenizer /models/tokenflow-clipb \\
        --data captions:/data/cc3m.jsonl --deepspeed zero2 --bf16 true
    python train/pretrain.py --help

See train/stage.py for what trains and what the output folder holds; `train/sft.py --init-from <output>` continues.
"""

from train.stage import run_stage
from unimodal.cli import run_main


def main(argv: list[str] | None = None) -> str:
    return run_stage("pretrain", argv)


if __name__ == "__main__":
    run_main(main)
