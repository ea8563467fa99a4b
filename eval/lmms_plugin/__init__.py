"""lmms-eval plugin: run lmms-eval's tasks on a TokenFlowMLLM checkpoint without forking lmms-eval.

    LMMS_EVAL_PLUGINS=eval.lmms_plugin python -m lmms_eval --model tokenflow_mllm \\
        --model_args pretrained=/path/to/checkpoint,dtype=bfloat16 --tasks mme,pope --batch_size 8

lmms-eval imports `eval.lmms_plugin.models` and reads its `AVAILABLE_MODELS` (model name → class name in the module
of that name), and adds `eval.lmms_plugin.tasks` to its task search path (no tasks ship here). lmms-eval is not a
dependency of this project; install it next to it (`pip install lmms-eval`) to use the plugin.
"""
