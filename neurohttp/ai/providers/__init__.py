"""Model backends. A provider has `async def stream(messages, params)` yielding
text tokens; it may also offer `complete_now(messages, params)` returning the
whole answer text, or (text, finish_reason), when it can answer without
waiting (the echo model with no pacing), which lets the server answer
without a task; and `tokens_now(messages, params)` returning the tokens as a
plain iterator in that case, so ready tokens can be framed together.
`stream` may yield a `Finish` last to say why it stopped
("stop": the answer is complete, "length": max_tokens cut it); without one
the server infers it."""

from __future__ import annotations


class Finish:
    """The last item a provider may yield: why the answer ended."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Finish({self.reason!r})"


STOP = Finish("stop")
LENGTH = Finish("length")
