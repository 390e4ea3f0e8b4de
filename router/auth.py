"""Who is calling: API keys for both front doors, and the owner a request belongs to.

With keys configured, a call must carry `Authorization: Bearer KEY` (an HTTP header, or gRPC
metadata `authorization`), checked in constant time, and its requests belong to that key. Without
keys, a gRPC request belongs to the client connection (peer) that made it, so only that connection
can cancel it; HTTP requests have ids nobody else sees."""
from __future__ import annotations

import hashlib
import hmac

NO_KEY = "missing API key: send 'Authorization: Bearer KEY'"
WRONG_KEY = "wrong API key"


class Unauthenticated(Exception):
    """The call's key is missing or wrong; str() says which."""


class Keys:
    def __init__(self, keys: tuple[str, ...]) -> None:
        # digests, so every comparison is of equal length and no key is kept in the clear
        self._digests = [(hashlib.sha256(k.encode()).digest(), f"key{i}") for i, k in enumerate(keys)]

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def owner(self, authorization: str | None, anonymous: str) -> str:
        """The owner of a call carrying this Authorization value: its key's name when keys are
        required (else Unauthenticated), `anonymous` when they are not."""
        if not self.required:
            return anonymous
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(NO_KEY)
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for known, name in self._digests:  # no early exit: the time does not say which key nearly matched
            if hmac.compare_digest(digest, known):
                found = name
        if found is None:
            raise Unauthenticated(WRONG_KEY)
        return found
