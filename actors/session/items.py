"""Client edits of the conversation: ``conversation.item.create / delete / retrieve``."""

from __future__ import annotations

from duplexd.actors.session.core import SessionCore
from duplexd.actors.session.lifecycle import ResponseLifecycle
from duplexd.bus.messages import (
    Item,
    ItemAdded,
    ItemCreate,
    ItemDelete,
    ItemDeleted,
    ItemDone,
    ItemRetrieve,
    ItemRetrieved,
)


class ItemCommands:
    """Applies the client's conversation edits; stage0's context follows each one."""

    def __init__(self, core: SessionCore, responses: ResponseLifecycle) -> None:
        self._core = core
        self._responses = responses

    def create(self, msg: ItemCreate) -> None:
        core, conv = self._core, self._core.conversation
        item = msg.item
        if item.role not in ("user", "assistant", "system"):
            core.error(
                "invalid_value",
                f"item role {item.role!r} is not user, assistant or system",
                msg.event_id,
                param="item.role",
            )
            return
        r = self._responses.response
        if conv.find(item.id) is not None or (r is not None and r.item_id == item.id):
            core.error("item_already_exists", f"item {item.id!r} already exists", msg.event_id, param="item.id")
            return
        if item.status == "in_progress":
            item = Item(id=item.id, role=item.role, type=item.type, content=item.content, audio_ms=item.audio_ms)
        try:
            prev = conv.insert(item, msg.previous_item_id)
        except KeyError:
            core.error(
                "item_not_found",
                f"previous_item_id {msg.previous_item_id!r} not found",
                msg.event_id,
                param="previous_item_id",
            )
            return
        core.event(ItemAdded(core.session_id, core.epoch, item, prev))
        core.event(ItemDone(core.session_id, core.epoch, item, prev))
        core.send_context()

    def delete(self, msg: ItemDelete) -> None:
        core = self._core
        if not core.conversation.delete(msg.item_id):
            core.error("item_not_found", f"no item {msg.item_id!r} in the conversation", msg.event_id, param="item_id")
            return
        r = self._responses.response
        if r is not None and r.item_id == msg.item_id:
            r.in_history = False  # the response plays on, out of the conversation
        core.event(ItemDeleted(core.session_id, core.epoch, msg.item_id, msg.event_id))
        core.send_context()

    def retrieve(self, msg: ItemRetrieve) -> None:
        core = self._core
        item = core.conversation.find(msg.item_id)
        if item is None:
            core.error("item_not_found", f"no item {msg.item_id!r} in the conversation", msg.event_id, param="item_id")
        else:
            core.event(ItemRetrieved(core.session_id, core.epoch, item, msg.event_id))
