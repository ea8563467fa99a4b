"""Models this plugin adds to lmms-eval: name → class name inside `eval.lmms_plugin.models.<name>`."""

AVAILABLE_MODELS = {"tokenflow_mllm": "TokenFlowMLLMForLMMSEval"}
