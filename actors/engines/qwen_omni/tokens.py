"""Token ids of the Qwen chat format, and the reply text as per-token pieces.

:class:`ChatTokens` wraps a transformers tokenizer (loaded from the model directory, or
the word tokenizer :func:`word_tokenizer` builds for random-weight runs) with the ids of
the chat template: ``<|im_start|>role\\n ... <|im_end|>\\n`` turns, user audio as
``<|audio_bos|><|AUDIO|>*n<|audio_eos|>``. :class:`Pieces` turns generated ids into text
incrementally, one piece per token, such that the pieces always join to the decoded text:
the talker aligns pieces to audio, and a cut history text maps back to a token count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from duplexd.actors.engines.qwen_omni.configs import FULL_IDS, TINY_IDS, TINY_VOCAB

SPECIAL_NAMES = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "audio": "<|AUDIO|>",
    "audio_start": "<|audio_bos|>",
    "audio_end": "<|audio_eos|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|IMAGE|>",
    "video": "<|VIDEO|>",
    "tts_pad": "<tts_pad>",
    "tts_start": "<tts_text_bos>",
    "tts_end": "<tts_text_eod>",
}
# The release's ids of the template words, used by the synthetic full-size vocabulary.
_FULL_WORDS = {"system": 8948, "user": 872, "assistant": 77091}


def word_tokenizer(size: str) -> Any:
    """A whitespace word tokenizer (``w17`` = id 17) with the special tokens at the ids the
    ``size`` config uses. Random-weight runs and tests use it: there are no tokenizer files
    to load, and it round-trips exactly (decode then encode gives the same ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = FULL_IDS if size == "full" else TINY_IDS
    n_words = min(ids.values())
    words = {"system": 1, "user": 2, "assistant": 3} if size != "full" else dict(_FULL_WORDS)
    vocab: dict[str, int] = {"<unk>": 0}
    taken = set(words.values()) | {0}
    vocab.update(words)
    for i in range(n_words):
        if i not in taken:
            vocab[f"w{i}"] = i
    for name, tid in ids.items():
        vocab[SPECIAL_NAMES[name]] = tid
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        eos_token=SPECIAL_NAMES["im_end"],
        pad_token=SPECIAL_NAMES["endoftext"],
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": [SPECIAL_NAMES[n] for n in ids]})
    assert size == "full" or len(vocab) <= TINY_VOCAB
    return fast


class ChatTokens:
    """Template ids and text coding for one model (see module docstring)."""

    def __init__(self, tokenizer: Any, thinker_config: Any) -> None:
        self.tok = tokenizer
        vocab = int(thinker_config.text_config.vocab_size)

        def tid(name: str) -> int:
            t = tokenizer.convert_tokens_to_ids(SPECIAL_NAMES[name])
            if t is None or t == tokenizer.unk_token_id or not 0 <= t < vocab:
                raise ValueError(f"tokenizer has no {SPECIAL_NAMES[name]} token inside the model vocabulary")
            return int(t)

        self.im_start = tid("im_start")
        self.im_end = tid("im_end")
        self.endoftext = tid("endoftext")
        self.audio = int(thinker_config.audio_token_index)
        self.audio_start = int(thinker_config.audio_start_token_id)
        self.audio_end = int(thinker_config.audio_end_token_id)
        self.eos = (self.im_end, self.endoftext)
        self.newline = self.encode("\n")
        self._headers: dict[str, list[int]] = {}
        # Never generated: every special token but the two that end a reply, and the
        # embedding rows past the tokenizer (padding of the vocabulary).
        special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
        special.update(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))
        named = {self.audio, self.audio_start, self.audio_end, self.im_start, self.im_end, self.endoftext}
        special |= named
        first = min(named)  # the release (and the word tokenizer) keep every special id above this
        self.suppress = sorted((special | set(range(first, vocab))) - set(self.eos))

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tok.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def header(self, role: str) -> list[int]:
        """``<|im_start|>{role}\\n``."""
        h = self._headers.get(role)
        if h is None:
            h = self._headers[role] = [self.im_start, *self.encode(f"{role}\n")]
        return h

    def footer(self) -> list[int]:
        """``<|im_end|>\\n``: closes every turn."""
        return [self.im_end, *self.newline]


class Pieces:
    """Incremental detokenization: one text piece per token; ``"".join(pieces)`` equals
    the decoded ids (a token that ends inside a character gets an empty piece; the one
    completing it gets the character)."""

    def __init__(self, tokens: ChatTokens) -> None:
        self._t = tokens
        self.ids: list[int] = []
        self.pieces: list[str] = []
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of the text already emitted
        self._read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        head = self._t.decode(self.ids[self._prefix : self._read])
        text = self._t.decode(self.ids[self._prefix :])
        piece = ""
        if len(text) > len(head) and not text.endswith("\ufffd"):
            piece = text[len(head) :]
            self._prefix, self._read = self._read, len(self.ids)
        self.pieces.append(piece)
        return piece

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end): added to the last piece."""
        if self._read == len(self.ids) or not self.pieces:
            return ""
        head = self._t.decode(self.ids[self._prefix : self._read])
        rest = self._t.decode(self.ids[self._prefix :])[len(head) :]
        self.pieces[-1] += rest
        self._prefix = self._read = len(self.ids)
        return rest

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def tokens_within(self, text: str) -> int | None:
        """How many leading tokens the cut transcript ``text`` covers (it is a prefix of
        :attr:`text`, spaces at the ends stripped); None if it is not such a prefix."""
        full = self.text
        lead = len(full) - len(full.lstrip())
        text = text.strip()
        if full[lead : lead + len(text)] != text:
            return None
        limit = lead + len(text)
        k, total = 0, 0
        for i, p in enumerate(self.pieces):
            total += len(p)
            if total > limit:
                break
            if p:  # a boundary inside a character is no place to cut
                k = i + 1
        # Trailing tokens with empty pieces belong to a character not yet complete: drop them.
        return k
