"""The shared-memory backend of the Store interface: two tables in the block.

- `named`: keys the config knows (API key names, plugin counter names), sized
  from the config with room for reloads that add some;
- `open`: open-ended keys (client IPs, header values), `[state] max_keys`.

A flood of new client addresses can fill `open` but never takes the room of an
API key's quota in `named`.
"""

from __future__ import annotations

from .mutex import buffer_address
from .table import KeyTable, table_words


class SharedState:
    """The tables of one block; `buf` is the block's state area (bytes)."""

    def __init__(self, buf: memoryview, named_keys: int, open_keys: int) -> None:
        addr = buffer_address(buf)
        words = buf.cast("q")
        split = table_words(named_keys)
        self.named = KeyTable(words[:split], addr, "named")
        self.open = KeyTable(words[split:], addr + split * 8, "open")

    @staticmethod
    def init(buf: memoryview, named_keys: int, open_keys: int) -> None:
        """Master, once, on the zeroed area, before forking."""
        addr = buffer_address(buf)
        words = buf.cast("q")
        split = table_words(named_keys)
        KeyTable.init(words[:split], addr, named_keys)
        KeyTable.init(words[split:], addr + split * 8, open_keys)

    def release(self) -> None:
        """Let go of the views of the block (before it is closed)."""
        for t in (self.named, self.open):
            t.w.release()

    def figures(self) -> dict[str, dict[str, int]]:
        return {"named": self.named.figures(), "open": self.open.figures()}
