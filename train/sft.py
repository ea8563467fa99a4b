"""Stage 2, instruction tuning: VQA conversations, drawing requests and text chat, full fine-tuning or LoRA.

    deepspeed train/sft.py --init-from outputs/pretrain          # ShapesWorld mixture on the stage-1 model
    deepspeed train/sft.py --init-from outputs/pretrain --lora true --lora-rank 16
    deepspeed train/sft.py --config run.yaml --data llava:/data/llava.json,text:/data/chat.jsonl \\
        --mixture llava:0.9,text:0.1 --image-folder /data/images --deepspeed zero3
    python train/sft.py --help

See train/stage.py for what trains and what the output folder holds.
"""

from train.stage import run_stage
from unimodal.cli import run_main


def main(argv: list[str] | None = None) -> str:
    return run_stage("sft", argv)


if __name__ == "__main__":
    run_main(main)
