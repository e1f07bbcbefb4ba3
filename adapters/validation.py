"""Client input validation shared by every protocol adapter (Realtime, native, demo bridge).

One dialect for the whole server: the same bad field gets the same error code on every
endpoint. A :class:`ClientError` becomes an error event and the connection stays open.

Codes (Realtime's vocabulary):

* ``missing_required_parameter``: a required field is absent or ``null``;
* ``invalid_type``: a field has the wrong JSON type;
* ``invalid_value``: the type is right but the value is out of range or not one of the
  allowed values;
* ``unknown_parameter`` / ``unsupported_parameter``: a field we do not know / know but do
  not serve.

``null`` handling: for an **optional** field ``null`` means "not set" (the default, or for
an update "leave it as it is"), as OpenAI's server treats it. The ``opt_*`` readers
return ``None`` for an absent or ``null`` field; a field where ``null`` means something
(``turn_detection: null`` is manual turns) is read by its translator with ``key in obj``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

JSONObject = dict[str, Any]


class ClientError(Exception):
    """A client event we reject; becomes an error event, the connection stays."""

    def __init__(self, code: str, message: str, param: str = "", type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.code = code
        self.param = param
        self.type = type_


# ---------------------------------------------------------------------- errors
def missing(param: str) -> ClientError:
    return ClientError("missing_required_parameter", f"Missing required parameter: '{param}'.", param=param)


def invalid_type(param: str, what: str) -> ClientError:
    """``what``: the expected type, e.g. "a string", "an object"."""
    return ClientError("invalid_type", f"'{param}' must be {what}", param=param)


def bad(param: str, message: str, code: str = "invalid_value") -> ClientError:
    return ClientError(code, message, param=param)


def unknown(param: str) -> ClientError:
    return ClientError("unknown_parameter", f"Unknown parameter: '{param}'.", param=param)


def unsupported(param: str, why: str) -> ClientError:
    return ClientError("unsupported_parameter", f"'{param}' is not supported by duplexd: {why}", param=param)


# ---------------------------------------------------------------------- value checks
def want_obj(value: Any, param: str) -> JSONObject:
    if not isinstance(value, dict):
        raise invalid_type(param, "an object")
    return value


def want_str(value: Any, param: str, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise invalid_type(param, "a string")
    if nonempty and not value:
        raise bad(param, f"'{param}' must not be empty")
    return value


def want_bool(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise invalid_type(param, "true or false")
    return value


def want_num(value: Any, param: str, lo: float = float("-inf"), hi: float = float("inf")) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_type(param, "a number")
    if not lo <= value <= hi:
        raise bad(param, f"'{param}' must be between {lo:g} and {hi:g}; got {value}")
    return float(value)


def want_int(value: Any, param: str, lo: int = -(2**31), hi: int = 2**31 - 1) -> int:
    # 3.0 from a JavaScript client is an integer; 3.5 is not.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(param, "an integer")
    if not lo <= value <= hi:
        raise bad(param, f"'{param}' must be between {lo} and {hi}; got {value}")
    return value


def want_choice(value: Any, param: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise invalid_type(param, "a string")
    if value not in choices:
        raise bad(param, f"'{param}' must be one of {', '.join(choices)}; got {value!r}")
    return value


# ---------------------------------------------------------------------- field readers
def path(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def required(obj: Mapping[str, Any], key: str, parent: str = "") -> Any:
    """The value of a required field; absent or ``null`` is ``missing_required_parameter``."""
    value = obj.get(key)
    if value is None:
        raise missing(path(parent, key))
    return value


def optional(obj: Mapping[str, Any], key: str) -> Any:
    """The value of an optional field, ``None`` when absent or ``null`` ("not set")."""
    return obj.get(key)


def req_str(obj: Mapping[str, Any], key: str, parent: str = "", nonempty: bool = False) -> str:
    return want_str(required(obj, key, parent), path(parent, key), nonempty)


def opt_str(obj: Mapping[str, Any], key: str, parent: str = "") -> str | None:
    value = optional(obj, key)
    return None if value is None else want_str(value, path(parent, key))


def req_int(obj: Mapping[str, Any], key: str, parent: str = "", lo: int = -(2**31), hi: int = 2**31 - 1) -> int:
    return want_int(required(obj, key, parent), path(parent, key), lo, hi)


def opt_int(
    obj: Mapping[str, Any], key: str, parent: str = "", lo: int = -(2**31), hi: int = 2**31 - 1
) -> int | None:
    value = optional(obj, key)
    return None if value is None else want_int(value, path(parent, key), lo, hi)


def opt_bool(obj: Mapping[str, Any], key: str, parent: str = "") -> bool | None:
    value = optional(obj, key)
    return None if value is None else want_bool(value, path(parent, key))


def req_obj(obj: Mapping[str, Any], key: str, parent: str = "") -> JSONObject:
    return want_obj(required(obj, key, parent), path(parent, key))


def opt_obj(obj: Mapping[str, Any], key: str, parent: str = "") -> JSONObject | None:
    value = optional(obj, key)
    return None if value is None else want_obj(value, path(parent, key))


def only(obj: Mapping[str, Any], allowed: frozenset[str] | set[str], parent: str = "") -> None:
    """Refuse any key of ``obj`` outside ``allowed`` (``unknown_parameter``)."""
    for key in obj:
        if key not in allowed:
            raise unknown(path(parent, key))


def set_fields(obj: Mapping[str, Any]) -> JSONObject:
    """``obj`` without its ``null`` fields: what an update actually sets."""
    return {k: v for k, v in obj.items() if v is not None}


# ---------------------------------------------------------------------- typed conversion
_AT = re.compile(r" - at `\$((?:\.[A-Za-z0-9_]+|\[\d+\])*)`$")


def convert(value: Any, kind: type[Any], param: str) -> Any:
    """``msgspec.convert`` with its errors in the client dialect: a wrong type is
    ``invalid_type``, anything else ``invalid_value``, ``param`` extended by msgspec's path."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _AT.search(text)
        where = param + (m.group(1).replace("$", "") if m else "")
        reason = text[: m.start()] if m else text
        if reason.startswith("Object contains unknown field"):
            field = reason.split("`")[1] if "`" in reason else ""
            raise unknown(path(where, field) if field else where) from exc
        code = "invalid_type" if reason.startswith("Expected `") else "invalid_value"
        raise ClientError(code, f"invalid '{where}': {reason}", param=where) from exc
