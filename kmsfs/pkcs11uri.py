"""RFC 7512 PKCS#11 URIs: the parts kmsfs needs to find a token and log in."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote


class UriError(ValueError):
    """A PKCS#11 URI that is malformed or lacks what kmsfs needs."""


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str
    module_path: str
    pin_source: str | None = None  # "file:/path" (RFC 7512 pin-source)
    pin_value: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Pkcs11Uri":
        if not text.startswith("pkcs11:"):
            raise UriError("a PKCS#11 URI starts with 'pkcs11:'")
        rest = text[len("pkcs11:"):]
        path_part, _, query_part = rest.partition("?")
        path_attrs = _split(path_part, ";")
        query_attrs = _split(query_part, "&")
        token = path_attrs.get("token")
        if not token:
            raise UriError("the PKCS#11 URI must name the token (pkcs11:token=LABEL?...)")
        module = query_attrs.get("module-path")
        if not module:
            raise UriError("the PKCS#11 URI must give the module (?module-path=/path/to/module.so)")
        pin_source = query_attrs.get("pin-source")
        pin_value = query_attrs.get("pin-value")
        if not pin_source and pin_value is None:
            raise UriError("the PKCS#11 URI must give a PIN (&pin-source=file:/path or &pin-value=...)")
        return cls(token=token, module_path=module, pin_source=pin_source, pin_value=pin_value)

    def __str__(self) -> str:
        text = f"pkcs11:token={quote(self.token, safe='')}?module-path={quote(self.module_path, safe='/')}"
        if self.pin_source:
            text += f"&pin-source={quote(self.pin_source, safe='/:')}"
        if self.pin_value is not None:
            text += f"&pin-value={quote(self.pin_value, safe='')}"
        return text

    def redacted(self) -> str:
        """The URI as it may be shown or logged: a literal PIN is never printed."""
        if self.pin_value is None:
            return str(self)
        return str(Pkcs11Uri(self.token, self.module_path, self.pin_source, None)) + "&pin-value=***"

    def read_pin(self) -> str:
        """The user PIN, from pin-value or the pin-source file.

        Raises UriError with a clear message when the source can't be read.
        """
        if self.pin_value is not None:
            return self.pin_value
        assert self.pin_source is not None
        source = self.pin_source
        if source.startswith("file:"):
            source = source[len("file:"):]
            if source.startswith("//"):
                source = source[2:]
        path = Path(source)
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise UriError(f"cannot read the PIN file {path}: {os.strerror(exc.errno or 0)}") from exc


def _split(part: str, sep: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    if not part:
        return attrs
    for item in part.split(sep):
        if not item:
            continue
        name, eq, value = item.partition("=")
        if not eq:
            raise UriError(f"malformed PKCS#11 URI attribute {item!r}")
        attrs[unquote(name)] = unquote(value)
    return attrs
