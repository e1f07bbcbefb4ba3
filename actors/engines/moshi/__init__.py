"""Moshi full duplex on transformers: batched session slots, static KV, CUDA graphs.

Split: stage0 runs the whole model (Mimi encode, temporal LM, depth decoder, Mimi
decode) in one batched step; stage1 plays out the decoded audio. Why: Mimi's decoder is
streaming and must see every frame of a session's output, but the session actor hands
stage1 only the frames of speak decisions (see talker.py); and stage0 needs the decoded
audio anyway to tell a speaking frame from a silent one. One process also owns the GPU,
its weights and its graphs.

Importing this package does not import torch: the registry and config loading use
``MoshiOptions``; the model code loads when the engine does.
"""

from duplexd.actors.engines.moshi.options import MoshiOptions

__all__ = ["MoshiOptions"]
