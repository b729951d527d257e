"""Download links to stored outputs, for the self-hosted server (docs/ARCHITECTURE.md §4): a
link names one file directly in `output_images/` and carries its expiry and an HMAC-SHA256
signature of both under a server secret, so whoever holds a response can fetch its files and
nobody can forge a link to anything else. A link lives as long as the file is kept
(OUTPUT_RETENTION_DAYS from when it was made).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

from da3_serverless.api.errors import ServiceError
from da3_serverless.config import Settings

# What OutputStore.save names a file: a uuid4 hex and a short suffix (`.png`, `.tar.gz`).
FILE_NAME = re.compile(r"[0-9a-f]{32}\.[A-Za-z0-9]{1,16}(\.[A-Za-z0-9]{1,16})?")
ROUTE = "files"
_CONTEXT = b"da3-serverless download links v1"


class LinkSigner:
    """Signs and checks download links; `lifetime_s` is how long a new link stays valid."""

    def __init__(self, secret: bytes, lifetime_s: float):
        self._key = hmac.new(secret, _CONTEXT, hashlib.sha256).digest()
        self.lifetime_s = lifetime_s

    @classmethod
    def from_settings(cls, settings: Settings) -> LinkSigner:
        """DA3_DOWNLOAD_SECRET, else one derived from DA3_API_KEY (links survive a restart),
        else a random secret for this process; links live OUTPUT_RETENTION_DAYS."""
        secret = settings.download_secret or settings.api_key
        key = secret.encode() if secret else secrets.token_bytes(32)
        return cls(key, settings.output_retention_days * 86400.0)

    def _signature(self, name: str, expires: int) -> str:
        return hmac.new(self._key, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def link(self, base_url: str, name: str, now: float | None = None) -> str:
        """The absolute link to stored file `name` under `base_url` (ending in `/`)."""
        expires = int((time.time() if now is None else now) + self.lifetime_s)
        query = urlencode({"expires": expires, "signature": self._signature(name, expires)})
        return f"{base_url}{ROUTE}/{name}?{query}"

    def check(
        self, name: str, expires: str | None, signature: str | None, now: float | None = None
    ) -> None:
        """Refuse a download unless `name` is an output's file name and the link is signed by
        this server and not expired: `unauthorized` (no or a wrong signature), `not_found`
        (not an output's name, or expired: the file is gone or about to be)."""
        if not FILE_NAME.fullmatch(name):
            raise ServiceError("not_found", "no such output: links name one stored output file")
        if not expires or not signature or not expires.isdigit() or len(expires) > 12:
            raise ServiceError(
                "unauthorized",
                "a download needs the link's expires and signature: use the url the response gave",
            )
        if not hmac.compare_digest(self._signature(name, int(expires)), signature):
            raise ServiceError(
                "unauthorized", "the link's signature does not match: use the url as given"
            )
        if int(expires) < (time.time() if now is None else now):
            raise ServiceError(
                "not_found",
                "the link expired with its file (OUTPUT_RETENTION_DAYS): run the request again",
            )


def add_links(response: dict, signer: LinkSigner, base_url: str, root: Path) -> dict:
    """Give every output of `response` (a v1 response dict, changed in place and returned) that
    is stored in `root` but has no URL a signed link: `url` next to each output's `path`, and
    `file_url` next to a view's `file_path`."""
    for target in [response, *(response.get("views") or [])]:
        _link(target, "file_path", "file_url", signer, base_url, root)
        for entry in target.values():
            if isinstance(entry, dict) and "media_type" in entry:
                _link(entry, "path", "url", signer, base_url, root)
    return response


def _link(
    fields: dict, path_key: str, url_key: str, signer: LinkSigner, base_url: str, root: Path
) -> None:
    path = fields.get(path_key)
    if not isinstance(path, str) or fields.get(url_key):
        return
    stored = Path(path)
    if stored.parent == root and FILE_NAME.fullmatch(stored.name):
        fields[url_key] = signer.link(base_url, stored.name)
