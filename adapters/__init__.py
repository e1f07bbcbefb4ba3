"""Adapters: websocket protocols, audio conversion and the browser demo."""
