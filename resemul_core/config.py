"""Plain-dict round trips for the configuration dataclasses stored in checkpoints.

Public: :class:`DictConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any, TypeVar

__all__ = ["DictConfig"]

_Config = TypeVar("_Config", bound="DictConfig")


class DictConfig:
    """Mixin for a dataclass: :meth:`to_dict` and a strict :meth:`from_dict`.

    Checkpoints store configs as plain dicts so that they load with ``weights_only=True``.
    """

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_Config], data: Mapping[str, Any]) -> _Config:
        """Rebuild from :meth:`to_dict`'s output; unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
        return cls(**data)
