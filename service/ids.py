"""Image ids: the hex sha256 of an image's bytes, checked exactly wherever a caller names one.

Exactly: Python's ``re.match`` with ``^...$`` also accepts the id followed by a newline (``$``
matches before a final newline), and such an id breaks the response headers it is echoed in.
"""

from __future__ import annotations

import hashlib
import re

_HEX64 = "[0-9a-f]{64}"
_IMAGE_ID = re.compile(_HEX64)
# for request schemas: pydantic's default (Rust) regex engine reads ``$`` as the end of the text
IMAGE_ID_PATTERN = f"^{_HEX64}$"


def is_image_id(text: str) -> bool:
    return _IMAGE_ID.fullmatch(text) is not None


def image_id_of(data: bytes) -> str:
    """The id of the image whose file is ``data``."""
    return hashlib.sha256(data).hexdigest()
