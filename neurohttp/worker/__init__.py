"""Worker processes: the event loop, HTTP connections and the worker lifecycle."""
