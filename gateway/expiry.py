"""OpenAI's expiration policies as requests give them: a file upload's ``expires_after`` (multipart form fields) and a
batch's ``output_expires_after`` (JSON), checked into a number of seconds or refused with a 400 naming the field."""

from __future__ import annotations

import json

from pydantic import ValidationError

from conveyor.batch_lines import MAX_EXPIRY_SECONDS, ExpiresAfter
from conveyor.errors import InvalidRequest


def from_form(anchor: str | None, seconds: str | None, whole: str | None) -> ExpiresAfter | None:
    """The upload's policy: the two fields the official SDK sends (``expires_after[anchor]``,
    ``expires_after[seconds]``), or one ``expires_after`` field holding the policy as a JSON object; None when
    neither is given."""
    data: object
    if whole is not None:
        if anchor is not None or seconds is not None:
            raise InvalidRequest(
                "Give expires_after either as expires_after[anchor] and expires_after[seconds] or as one JSON "
                "field, not both.",
                param="expires_after",
            )
        try:
            data = json.loads(whole)
        except ValueError:
            raise InvalidRequest(
                'expires_after is not valid JSON: send {"anchor": "created_at", "seconds": N}.',
                param="expires_after",
                code="invalid_json",
            ) from None
    elif anchor is None and seconds is None:
        return None
    else:
        data = {name: value for name, value in (("anchor", anchor), ("seconds", seconds)) if value is not None}
    return parsed(data, "expires_after")


def parsed(data: object, param: str) -> ExpiresAfter:
    """``data`` as a policy, or a 400 naming the first wrong field (``<param>.seconds``, ``<param>.anchor``)."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"{param} must be an object with 'anchor' and 'seconds'.", param=param)
    try:
        return ExpiresAfter.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in (param, *first.get("loc", ())))
        raise InvalidRequest(f"Invalid value for '{where}': {first.get('msg')}", param=where) from None


def checked_seconds(policy: ExpiresAfter, param: str, minimum: int) -> int:
    """The policy's seconds, when between ``minimum`` (OpenAI's 3600 unless a test lowered it) and 30 days."""
    if not minimum <= policy.seconds <= MAX_EXPIRY_SECONDS:
        raise InvalidRequest(
            f"'{param}.seconds' must be between {minimum} and {MAX_EXPIRY_SECONDS} seconds; got {policy.seconds}.",
            param=f"{param}.seconds",
        )
    return policy.seconds
