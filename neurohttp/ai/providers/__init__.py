"""Model backends. A provider has `async def stream(messages, params)` yielding
text tokens; it may also offer `complete_now(messages, params)` returning the
whole answer text when it can answer without waiting (the echo model with no
pacing), which lets the server answer without a task."""
