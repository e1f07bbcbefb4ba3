"""The vLLM thinker backend of the qwen-omni engine (``thinker_backend = "vllm"``).

Stage0's Qwen2.5-Omni thinker on vLLM's engine, in-process and stepped by stage0's loop;
stage1 keeps the transformers talker and token2wav of :mod:`..qwen_omni`. Only
:mod:`.options` is importable without vllm; the registry imports the rest when stage0
builds the engine. See docs/qwen-omni-vllm.md.
"""
