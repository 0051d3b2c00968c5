"""A plugin's option schema, checked at load (every worker, and `neurohttpd
check`) before its setup() runs.

A plugin may declare `OPTIONS`, a dict of option name -> type (int, float,
str, bool, list, dict, or a tuple of those): an option not in it, or of
another type, is an error naming the plugin and the key. It may also define
`validate(options)`, called after the types are checked, which raises
OptionError(key, message) (or ValueError) for a value it refuses. A plugin
that declares neither gets its options unchecked.
"""

from __future__ import annotations

from typing import Any


class OptionError(ValueError):
    """A bad value for option `key` of a plugin (raised by its validate())."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "an array", dict: "a table"}.get(t, getattr(t, "__name__", str(t)))


def _fits(value: Any, t: Any) -> bool:
    if isinstance(t, tuple):
        return any(_fits(value, x) for x in t)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


def check_options(module: Any, options: dict[str, Any]) -> list[str]:
    """The problems of `options` for `module` as "key: message" strings ([]: fine)."""
    problems = []
    schema = getattr(module, "OPTIONS", None)
    if schema is not None:
        if not isinstance(schema, dict):
            return [f"OPTIONS must be a dict of option name -> type, not {type(schema).__name__}"]
        for k, v in options.items():
            if k not in schema:
                problems.append(f"{k}: unknown option (known: {', '.join(sorted(schema)) or 'none'})")
            elif not _fits(v, schema[k]):
                problems.append(f"{k}: must be {_type_name(schema[k])}, not {v!r}")
    validate = getattr(module, "validate", None)
    if not problems and callable(validate):
        try:
            validate(dict(options))
        except OptionError as e:
            problems.append(f"{e.key}: {e.message}")
        except (ValueError, TypeError) as e:
            problems.append(str(e))
    return problems
