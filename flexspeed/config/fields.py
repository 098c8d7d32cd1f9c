"""Value types and the base class shared by every config section.

JSON configs are hand-written, so the number types here refuse booleans and strings
(``"stage": "2"`` and ``"train_batch_size": true`` are errors, not silent coercions) but accept
integral floats (``"reduce_bucket_size": 5e8`` is how DeepSpeed users write bucket sizes).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr
from pydantic_core import PydanticCustomError

__all__ = [
    "Section",
    "Int",
    "Float",
    "Bool",
    "Str",
    "Auto",
    "NonNegInt",
    "PosInt",
    "NonNegFloat",
    "PosFloat",
    "Dtype",
]


def _refuse_bool_and_str(kind: str) -> Any:
    def check(value: Any) -> Any:
        if isinstance(value, (bool, str, bytes)):
            raise PydanticCustomError("flex_type", "expected {kind}", {"kind": kind})
        return value

    return check


Int = Annotated[int, BeforeValidator(_refuse_bool_and_str("an integer"))]
"""An integer; integral floats (``5e8``) are accepted, booleans and strings are not."""
Float = Annotated[float, BeforeValidator(_refuse_bool_and_str("a number"))]
"""A finite number; booleans and strings are refused."""
Bool = StrictBool
"""``true`` or ``false``; ``0``/``1``/``"true"`` are refused."""
Str = StrictStr
"""A string."""
Auto = Literal["auto"]
"""The literal ``"auto"``: filled in by :func:`flexspeed.config.resolve_config`."""

NonNegInt = Annotated[Int, Field(ge=0)]
PosInt = Annotated[Int, Field(ge=1)]
NonNegFloat = Annotated[Float, Field(ge=0)]
PosFloat = Annotated[Float, Field(gt=0)]
Dtype = Literal["fp32", "fp16", "bf16"]


class Section(BaseModel):
    """Base of every config section: unknown keys, NaN and infinity are errors.

    Class attributes (not config keys):
        json_aliases: alternative JSON spellings -> field name (``"bfloat16" -> "bf16"``).
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )

    json_aliases: ClassVar[dict[str, str]] = {}

    # ---- read-only dict view: DeepSpeed's engine.config is the config dict, and HF's Trainer reads
    # engine.config.get("zero_optimization", {}).get("stage"); values are the validated ones
    def _field_name(self, key: str) -> str | None:
        name = self.json_aliases.get(key, key)
        return name if name in type(self).model_fields else None

    def get(self, key: str, default: Any = None) -> Any:
        """The value of config key ``key`` (JSON spelling or alias), ``default`` when unknown or unset (null)."""
        name = self._field_name(key)
        value = getattr(self, name) if name is not None else None
        return default if value is None else value

    def __getitem__(self, key: str) -> Any:
        name = self._field_name(key)
        if name is None:
            raise KeyError(key)
        return getattr(self, name)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def keys(self) -> list[str]:
        """The config keys that have a value (sections included)."""
        return [n for n in type(self).model_fields if getattr(self, n) is not None]
