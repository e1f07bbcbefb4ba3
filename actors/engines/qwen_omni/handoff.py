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
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from duplexd.actors.engines.base import EngineError

if TYPE_CHECKING:
    from duplexd.actors.engines.qwen_omni.thinker_session import ThinkerSession

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


def pending_unit(
    s: ThinkerSession,
    rows: torch.Tensor,
    base: int,
    context_id: Callable[[int], int],
    special_rows: np.ndarray,
    special_tokens: np.ndarray,
) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """Text, tokens and rows of what ``s`` has not handed off yet: the prompt's rows (positions
    before ``base``, where the reply's body starts) on a reply's first unit, then a row per fed
    reply token. ``rows`` is the session's row store [positions, hidden]; ``context_id`` gives
    the prompt's token id at a position."""
    r = s.reply
    assert r is not None and r.pieces is not None
    positions: list[int] = []
    tokens: list[list[int]] = []
    if not s.sent_context:
        positions = list(range(base))
        tokens = [[context_id(p), p, CONTEXT, 0] for p in positions]
    pieces = [r.pieces.pieces[i] for i in s.unsent]
    for i, piece in zip(s.unsent, pieces, strict=True):
        positions.append(base + i)
        tokens.append([r.body[i], base + i, REPLY, len(piece)])
    text = "".join(pieces) + s.extra_text
    s.extra_text = ""
    s.unsent.clear()
    if not positions:
        return text, None, None
    if positions[-1] >= rows.shape[0]:
        raise EngineError(f"row store holds {rows.shape[0]} positions, the handoff needs {positions[-1] + 1}",
                          s.sid, "engine_error")
    out = to_wire(rows[torch.tensor(positions, device=rows.device)])
    tok = np.array(tokens, dtype=np.int32)
    if not s.sent_context:
        s.sent_context = True
        out = np.concatenate([out, special_rows])
        tok = np.concatenate([tok, special_tokens])
    return text, tok, out
