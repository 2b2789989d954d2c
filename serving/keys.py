"""API keys: who may call the HTTP API, as which tenant, for which adapters, stores and actions.

A token is `tfk_<key id>_<secret>` with 256 random bits of secret. Only a salted SHA-256 of the
secret is stored (HOME/keys.json, mode 0600): the token is shown once, at creation. A fast
hash is enough for random 256-bit secrets (nothing to guess from a dictionary) and keeps the
per-request check at microseconds; the comparison is constant-time. The key id in the token
finds the record without scanning, and names the key in logs and provenance instead of the
token.

Once any key has been created, every request needs one: revoking the last key does not open
the server again. The file is replaced whole under a lock and re-read when its mtime moves,
so `keys create` / `keys revoke` apply to a running server on its next request. An unreadable
file fails closed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ValidationError

from cluster.errors import NotFound, UserError
from cluster.files import locked, replace_text

TOKEN_PREFIX = "tfk_"
_TOKEN = re.compile(r"^tfk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Unauthenticated(UserError):
    """No token, or one that is malformed, unknown or revoked (HTTP 401)."""


class Forbidden(UserError):
    """A valid key asked for something outside its scope (HTTP 403)."""


class KeysUnavailable(UserError):
    """The keys file exists but cannot be read: nobody is let in (HTTP 503)."""


class ApiKey(BaseModel):
    key_id: str
    tenant: str
    adapters: list[str] | None = None  # adapter names this key may use; None: all
    kbs: list[str] | None = None  # knowledge stores it may retrieve from; None: all
    admin: bool = False  # canary actions, the system card, metrics, every tenant's provenance
    policy: str | None = None  # a guard policy (governance.guards.policies) its requests also run under
    created_at: float
    created_by: str
    revoked_at: float | None = None
    salt: str
    secret_sha256: str

    def check_adapter(self, name: str) -> None:
        if self.adapters is not None and name not in self.adapters:
            raise Forbidden(f"key {self.key_id} may not use adapter {name!r}")

    def check_kb(self, kb: str) -> None:
        if self.kbs is not None and kb not in self.kbs:
            raise Forbidden(f"key {self.key_id} may not read knowledge store {kb!r}")

    def check_admin(self, action: str) -> None:
        if not self.admin:
            raise Forbidden(f"key {self.key_id} has no admin scope ({action})")

    def scopes(self) -> str:
        """One line for people: what the key may do."""
        adapters = ",".join(self.adapters) if self.adapters is not None else "*"
        kbs = ",".join(self.kbs) if self.kbs is not None else "*"
        return (f"adapters={adapters} kbs={kbs}" + (f" policy={self.policy}" if self.policy else "")
                + (" admin" if self.admin else ""))


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def _names(kind: str, values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    for value in values:
        if not _NAME.match(value):
            raise UserError(f"{kind}: {value[:80]!r} is not a valid name (letters, digits, '.', '_', '-'; at most 64)")
    return sorted(set(values))


class KeyRing:
    """The keys of one home (HOME/keys.json)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._cache: tuple[int, dict[str, ApiKey]] | None = None
        self._guard = threading.Lock()

    # -- reading -------------------------------------------------------------------------------
    def keys(self) -> dict[str, ApiKey]:
        """Every key by id, revoked ones included ({} when none was ever created)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        # The inode too: a mounted Kubernetes Secret changes by swapping the file behind a symlink.
        mtime = (st.st_mtime_ns, st.st_ino, st.st_size)
        with self._guard:
            if self._cache and self._cache[0] == mtime:
                return self._cache[1]
            try:
                data = json.loads(self.path.read_text())
                keys = {k["key_id"]: ApiKey.model_validate(k) for k in data["keys"]}
            except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
                raise KeysUnavailable(f"the API keys file {self.path} is unreadable ({exc.__class__.__name__}): "
                                      "fix or restore it") from None
            self._cache = (mtime, keys)
            return keys

    def required(self) -> bool:
        """True once any key has been created (even if all are revoked since)."""
        return bool(self.keys())

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The key of an `Authorization: Bearer TOKEN` header; None while no keys exist."""
        keys = self.keys()
        if not keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("an API key is required: send 'Authorization: Bearer TOKEN'")
        match = _TOKEN.match(token.strip())
        key = keys.get(match.group(1)) if match else None
        # Compare even when the id is unknown, so timing does not tell ids apart.
        expected = key.secret_sha256 if key else "0" * 64
        given = _digest(key.salt if key else "00", match.group(2) if match else token)
        if not hmac.compare_digest(expected, given) or key is None:
            raise Unauthenticated("the API key is not valid")
        if key.revoked_at is not None:
            raise Unauthenticated(f"the API key {key.key_id} was revoked")
        return key

    # -- writing -------------------------------------------------------------------------------
    def create(self, tenant: str, adapters: list[str] | None = None, kbs: list[str] | None = None,
               admin: bool = False, by: str = "", policy: str | None = None) -> tuple[ApiKey, str]:
        """A new key and its token (the only time the token exists outside the caller)."""
        if not _NAME.match(tenant or ""):
            raise UserError(f"--tenant: {tenant[:80]!r} is not a valid name (letters, digits, '.', '_', '-'; at most 64)")
        key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
        key = ApiKey(key_id=key_id, tenant=tenant, adapters=_names("--adapters", adapters), kbs=_names("--kbs", kbs),
                     admin=admin, policy=policy, created_at=time.time(), created_by=by, salt=salt,
                     secret_sha256=_digest(salt, secret))
        with self._editing() as keys:
            keys[key_id] = key
        return key, f"{TOKEN_PREFIX}{key_id}_{secret}"

    def revoke(self, key_id: str) -> ApiKey:
        with self._editing() as keys:
            key = keys.get(key_id)
            if key is None:
                raise NotFound(f"no API key {key_id!r} (see `tunefetch keys list`)")
            if key.revoked_at is None:
                keys[key_id] = key = key.model_copy(update={"revoked_at": time.time()})
        return key

    @contextmanager
    def _editing(self):
        """Every key, locked against other writers; written back whole (mode 0600) on success."""
        with locked(self.path.with_name(self.path.name + ".lock")):
            self._cache = None
            keys = dict(self.keys())
            yield keys
            data = {"keys": [k.model_dump(mode="json") for k in keys.values()]}
            replace_text(self.path, json.dumps(data, indent=1), mode=0o600)
            self._cache = None
