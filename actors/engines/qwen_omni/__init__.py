"""Qwen2.5-Omni as a two-stage engine: the thinker in stage0, talker + token2wav in stage1.

Only :mod:`.options` is torch-free; the registry imports the engine modules lazily.
See docs/qwen-omni.md.
"""
