"""The machinery behind the plugin API (neurohttp/plugins.py is the public
face): shared state (state.py), timers (timers.py), option schemas
(options.py) and the loader (loader.py)."""
