"""The session actor: single writer of one session's state (see actor.py and
docs/session-semantics.md, "Where each rule lives", for which module owns which rule)."""

from duplexd.actors.session.actor import SessionActor
from duplexd.actors.session.conversation import Conversation, item_text
from duplexd.actors.session.core import Dest, HostSettings, IdFactory, Out, random_id
from duplexd.actors.session.response import Response

__all__ = [
    "Conversation",
    "Dest",
    "HostSettings",
    "IdFactory",
    "Out",
    "Response",
    "SessionActor",
    "item_text",
    "random_id",
]
