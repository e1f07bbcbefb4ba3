"""The stage0 → stage1 handoff of the qwen-omni engine: token rows and hidden rows.

A speak decision carries two arrays (the bus ships them as raw frames, without a copy):

* ``tokens`` int32 ``[n, 4]``, one row per hidden row: ``(token id, position, role,
  piece length)``. Roles: ``CONTEXT`` (a position of the thinker's prompt), ``REPLY``
  (a reply token the thinker has fed back; its piece is that many characters of the
  unit's text), ``SPEAKER_BOS`` (position = speaker index, sorted by name),
  ``TEXT_EOS`` and ``TEXT_PAD`` (embeddings the talker appends after the reply).
* ``hidden`` ``[n, hidden]``: the talker's per-token input, the thinker's last hidden
  state plus the token's embedding (the embedding of audio positions is zero, as in
  ``generate()``; the special rows are embeddings only). bfloat16 travels as its bits
  in int16, float16 and float32 as themselves.

The first unit of a reply carries the whole prompt (``CONTEXT`` rows from position 0)
and the special rows; later units carry the new ``REPLY`` rows.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

CONTEXT = 0
REPLY = 1
SPEAKER_BOS = 2
TEXT_EOS = 3
TEXT_PAD = 4


def to_wire(t: torch.Tensor) -> np.ndarray:
    """A device tensor as a numpy array for the bus (one device-to-host copy)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).cpu().numpy()
    return t.cpu().numpy()


def from_wire(arr: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A received array (a read-only view of the bus frame) as a new tensor on ``device``."""
    with warnings.catch_warnings():
        # Read-only is fine: the tensor is only read, by the copy below.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(arr)
    if arr.dtype == np.int16:
        t = t.view(torch.bfloat16)
    return t.to(device=device, dtype=dtype, copy=True)
