"""The base of the OpenAI request bodies: strict types, and every string valid UTF-8."""

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _utf8(cls, value: Any) -> Any:
        """JSON's "\\ud800" escape decodes to a lone surrogate, which no UTF-8 encoder takes: a 400 naming the
        field here, not a 500 wherever the text is encoded later."""
        _check_utf8(value)
        return value


def _check_utf8(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"is not valid UTF-8: lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start}"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_utf8(key)
            _check_utf8(item)
    elif isinstance(value, list):
        for item in value:
            _check_utf8(item)
