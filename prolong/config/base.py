"""What every recipe section is made of: frozen configs that forbid unknown fields, and token counts.

Token counts accept integers or binary-suffixed strings: ``64K`` = 65,536, ``4M`` = 4,194,304.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

_SUFFIX = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_tokens(value: Any) -> int:
    """``65536``, ``"64K"`` and ``"0.5M"`` → token counts (binary suffixes, as ML papers use them)."""
    if isinstance(value, bool):
        raise ValueError("expected a token count, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KkMmGg]?)\s*", str(value))
    if not m:
        raise ValueError(f"expected a token count like 65536 or 64K, got {value!r}")
    n = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not n.is_integer():
        raise ValueError(f"{value!r} is not a whole number of tokens")
    return int(n)


def format_tokens(n: int) -> str:
    """Inverse of :func:`parse_tokens` for display and stream names: 65536 → ``64K``."""
    for suffix in ("G", "M", "K"):
        if n >= _SUFFIX[suffix] and n % _SUFFIX[suffix] == 0:
            return f"{n // _SUFFIX[suffix]}{suffix}"
    return str(n)


Tokens = Annotated[int, BeforeValidator(parse_tokens), Field(gt=0)]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # fields added after runs were recorded with this config: left out of the digest while at their
    # default, so a new release's new option does not make finished stages look changed
    ADDED_LATER: ClassVar[frozenset[str]] = frozenset()

    def digest_dump(self, exclude: set[str] = frozenset()) -> dict:
        """The config as a stage's digest covers it (``exclude``: fields covered otherwise)."""
        return self._without_later_defaults(self.model_dump(mode="json", exclude={"kind", *exclude}))

    def _without_later_defaults(self, out: dict) -> dict:
        """``out`` (this config's dump) without ADDED_LATER fields at their defaults, at every level:
        in nested sections and in mappings of them (``data.domains``) too."""
        for name in list(out):
            value = getattr(self, name, None)
            if name in self.ADDED_LATER and value == type(self).model_fields[name].default:
                del out[name]
            elif isinstance(value, _Config) and isinstance(out[name], dict):
                out[name] = value._without_later_defaults(out[name])
            elif isinstance(value, dict) and isinstance(out[name], dict):
                for key, item in value.items():
                    if isinstance(item, _Config) and isinstance(out[name].get(key), dict):
                        out[name][key] = item._without_later_defaults(out[name][key])
        return out


class StageConfig(_Config):
    """The config of one stage of a recipe's graph (``stages.NAME``); each stage kind
    (prolong.stages) has its own subclass with ``kind`` a Literal of its name."""

    kind: str

