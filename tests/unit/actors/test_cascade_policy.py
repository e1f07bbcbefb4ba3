"""Reply policies: echo, and openai-chat against a real local chat-completions server."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import msgspec
import pytest

from duplexd.actors.engines.cascade.options import CascadeOptions
from duplexd.actors.engines.cascade.policy import (
    ChatMessage,
    EchoPolicy,
    OpenAIChatPolicy,
    Polled,
    ReplyStream,
)
from tests.chat_completions_server import ChatScript, chat_server

pytestmark = pytest.mark.timeout(30)


def drain(stream: ReplyStream, within_s: float = 5.0) -> tuple[list[str], Polled]:
    """Poll until done; returns all sentences and the last poll."""
    got: list[str] = []
    deadline = time.monotonic() + within_s
    while True:
        p = stream.poll()
        got += p.sentences
        if p.done or time.monotonic() > deadline:
            return got, p
        time.sleep(0.01)


def test_echo_repeats_the_newest_user_turn_sentence_by_sentence() -> None:
    pol = EchoPolicy("You said: {transcript}", "Sorry?")
    msgs = [ChatMessage("system", "be nice"), ChatMessage("user", "Old turn."), ChatMessage("assistant", "Ok.")]
    p = pol.start([*msgs, ChatMessage("user", "Hi there. How are you?")], 0.8).poll()
    assert p == Polled(["You said: Hi there.", "How are you?"], True)
    assert pol.start(msgs[:1], 0.8).poll().sentences == ["Sorry?"]


@pytest.fixture()
def stub() -> Iterator[tuple[ChatScript, str]]:
    script = ChatScript()
    srv = chat_server(script)
    yield script, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_streams_sentences_as_they_complete_and_sends_a_proper_request(stub: tuple[ChatScript, str]) -> None:
    script, url = stub
    script.say((0.0, "Paris is sunny. "), (0.8, "It is warm."))
    pol = OpenAIChatPolicy(url, model="m1", api_key="k", max_tokens=50)
    msgs = [ChatMessage("system", "sys"), ChatMessage("user", "Weather?")]
    t0 = time.monotonic()
    stream = pol.start(msgs, 0.3)
    first: list[str] = []
    while not first and time.monotonic() - t0 < 5:
        first = stream.poll().sentences
        time.sleep(0.01)
    assert first == ["Paris is sunny."]
    assert time.monotonic() - t0 < 0.6  # before the second piece was even written
    rest, last = drain(stream)
    assert rest == ["It is warm."] and last.done and last.error is None
    body, hdr = script.requests[0], script.headers[0]
    assert body == {
        "model": "m1",
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Weather?"}],
        "stream": True,
        "temperature": 0.3,
        "max_tokens": 50,
    }
    assert hdr["Authorization"] == "Bearer k"
    assert pol.endpoint == f"{url}/chat/completions"


def test_markdown_is_stripped_and_an_unterminated_tail_is_flushed(stub: tuple[ChatScript, str]) -> None:
    script, url = stub
    script.say((0.0, "**Sure**, here it is\n- first point\n- last point"))
    got, last = drain(OpenAIChatPolicy(url).start([ChatMessage("user", "x")], 0.5))
    assert got == ["Sure, here it is", "first point", "last point"] and last.error is None


def test_a_server_that_ignores_stream_still_works(stub: tuple[ChatScript, str]) -> None:
    script, url = stub
    script.say((0.0, "One. Two."), stream=False)
    got, last = drain(OpenAIChatPolicy(url).start([ChatMessage("user", "x")], 0.5))
    assert got == ["One.", "Two."] and last.error is None


@pytest.mark.parametrize(
    ("setup", "expect"),
    [
        ({"status": 503}, "HTTP 503"),
        ({"done_marker": False}, "without [DONE]"),
    ],
)
def test_endpoint_failures_are_reported_as_errors(stub: tuple[ChatScript, str], setup: dict, expect: str) -> None:
    script, url = stub
    script.say((0.0, "Partial answer"), **setup)
    _, last = drain(OpenAIChatPolicy(url).start([ChatMessage("user", "x")], 0.5))
    assert last.done and last.error is not None and expect in last.error
    assert url in last.error


def test_unreachable_endpoint_is_an_error_not_a_hang() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    _, last = drain(OpenAIChatPolicy(f"http://127.0.0.1:{port}/v1", timeout_s=2).start([], 0.5))
    assert last.done and "ConnectionRefusedError" in (last.error or "")


def test_cancel_stops_the_stream_at_once_and_drops_what_follows(stub: tuple[ChatScript, str]) -> None:
    script, url = stub
    script.say((0.0, "First. "), (0.5, "Second. "), (0.5, "Third."))
    pol = OpenAIChatPolicy(url)
    stream = pol.start([ChatMessage("user", "x")], 0.5)
    deadline = time.monotonic() + 5
    got: list[str] = []
    while not got and time.monotonic() < deadline:
        got = stream.poll().sentences
        time.sleep(0.01)
    assert got == ["First."]
    t0 = time.monotonic()
    stream.cancel()
    stream.join(2.0)  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 0.5
    p = stream.poll()
    assert p == Polled([], True, None)  # a cancel is not an error and yields nothing more
    assert script.disconnected.wait(3.0)  # the server saw the client hang up


def test_bad_url_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="not an http"):
        OpenAIChatPolicy("ftp://example/v1")


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        (b'policy = "gpt"', "policy 'gpt'"),
        (b'policy = "openai-chat"\nopenai_url = "localhost:8080"', "not an http"),
        (b'echo_template = "{text}"', "echo_template"),
        (b"input_rate = 24000", "input_rate"),
        (b"bogus = 1", "bogus"),
    ],
)
def test_bad_engine_options_are_config_errors(toml: bytes, needle: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=needle):
        msgspec.toml.decode(toml, type=CascadeOptions)


# ---------------------------------------------------------------------- start-up probe (issue 11, item 9)
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_probe_reports_an_endpoint_that_is_not_there() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    status = OpenAIChatPolicy(url).probe()
    assert not status.ok and status.name == "chat endpoint" and status.url == url
    assert "unreachable" in status.detail and "refused" in status.detail.lower()


def test_probe_finds_the_endpoint_its_key_and_its_model(stub: tuple[ChatScript, str]) -> None:
    script, url = stub
    ok = OpenAIChatPolicy(url, model="stand-in", api_key="sk-probe").probe()
    assert ok.ok and "serves stand-in" in ok.detail
    assert script.model_queries[-1]["Authorization"] == "Bearer sk-probe"
    assert script.requests == []  # a probe never asks for a completion
    other = OpenAIChatPolicy(url, model="llama-3").probe()
    assert other.ok and "'llama-3' is not among those it serves (stand-in)" in other.detail


def test_probe_hides_credentials_in_the_url(stub: tuple[ChatScript, str]) -> None:
    _, url = stub
    status = OpenAIChatPolicy(url.replace("http://", "http://user:pw@")).probe()
    assert "pw" not in status.url and status.url == url


def test_echo_policy_has_nothing_to_probe() -> None:
    assert EchoPolicy().probe() is None
