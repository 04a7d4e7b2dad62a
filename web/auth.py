"""Who may do what on the web stack: roles, passwords, API tokens, and slowing password guessers.

Roles are ordered, each allowing what the ones below it do: a *viewer* reads,
an *operator* also adds notes to a device or a run, *quality* also sets a
disposition, an *admin* also manages webhooks and users. A person logs in
with a password (hashed with argon2id, never stored or logged); a script
sends ``Authorization: Bearer <token>``, a token made by ``sequencer portal
add-token`` and stored only as its SHA-256.

The users, tokens and failed-login counts live in MongoDB beside the
records, so every portal process behind a load balancer sees the same ones.
Everything here is blocking pymongo: the web apps call it through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import secrets
from typing import Any

import attrs
import pymongo
import pymongo.errors
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["AuthStore", "LoginRefused", "Principal", "Role", "valid_user_name"]

#: Collections of the web stack's users (the ``portal_`` prefix keeps them apart from the records).
USERS, TOKENS, FAILURES, META = "portal_users", "portal_api_tokens", "portal_login_failures", "portal_meta"
#: Failed logins for one name (or from one address) before the next attempt must wait.
FREE_FAILURES = 5
#: The wait after FREE_FAILURES doubles with each further failure, up to this.
MAX_LOCKOUT = dt.timedelta(minutes=15)
#: A token is this prefix and 32 random bytes, so a leaked one is recognisable in a log or a repository.
TOKEN_PREFIX = "sqp_"
MAX_NAME = 64


class Role(enum.IntEnum):
    """A user's role; a higher one may do everything a lower one may."""

    VIEWER = 1
    OPERATOR = 2
    QUALITY = 3
    ADMIN = 4

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            choices = ", ".join(r.name.lower() for r in cls)
            raise ValueError(f"{text!r} is not a role (one of {choices})") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@attrs.frozen
class Principal:
    """Who a request comes from: a user's name and role, and how they proved it."""

    name: str
    role: Role
    via: str  # "session", "token", or "bench" (a read-only portal on a station's own store)

    def may(self, role: Role) -> bool:
        return self.role >= role


class LoginRefused(Exception):
    """Too many failed logins: the message says how long to wait (``retry_after`` seconds)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed logins; try again in {retry_after} s")
        self.retry_after = retry_after


def valid_user_name(name: str) -> str:
    """``name`` if it can be a user's name (printable, no spaces at the ends, at most 64 characters)."""
    if not name or name != name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise ValueError(f"{name[:80]!r} is not a user name (1 to {MAX_NAME} printable characters, no spaces at "
                         "either end)")
    return name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _token_id(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


_USERS_VALIDATOR = {"$jsonSchema": {
    "bsonType": "object",
    "required": ["_id", "password_hash", "role", "created_at"],
    "properties": {
        "_id": {"bsonType": "string", "minLength": 1, "maxLength": MAX_NAME},
        "password_hash": {"bsonType": "string", "pattern": "^\\$argon2"},
        "role": {"enum": [r.label for r in Role]},
        "created_at": {"bsonType": "date"},
    },
}}
_TOKENS_VALIDATOR = {"$jsonSchema": {
    "bsonType": "object",
    "required": ["_id", "name", "role", "created_at"],
    "properties": {
        "_id": {"bsonType": "string", "pattern": "^[0-9a-f]{64}$"},
        "name": {"bsonType": "string", "minLength": 1, "maxLength": MAX_NAME},
        "role": {"enum": [r.label for r in Role]},
        "created_at": {"bsonType": "date"},
    },
}}


class AuthStore:
    """Users, API tokens and failed logins in one MongoDB database. Blocking; thread-safe."""

    def __init__(self, db: Any, *, hasher: PasswordHasher | None = None) -> None:
        self.db = db
        self.hasher = hasher or PasswordHasher()
        # Verified against when the name is unknown, so an unknown name costs as long as a wrong password.
        self._dummy_hash = self.hasher.hash(secrets.token_hex(16))

    def ensure(self) -> None:
        """Create the collections with their validators and indexes (idempotent, safe to race)."""
        existing = set(self.db.list_collection_names())
        for name, validator in ((USERS, _USERS_VALIDATOR), (TOKENS, _TOKENS_VALIDATOR)):
            options = {"validator": validator, "validationLevel": "strict", "validationAction": "error"}
            if name in existing:
                self.db.command("collMod", name, **options)
            else:
                try:
                    self.db.create_collection(name, **options)
                except pymongo.errors.CollectionInvalid:
                    self.db.command("collMod", name, **options)
        # Old failure counts go by themselves: a day after the last attempt.
        self.db[FAILURES].create_index("last", expireAfterSeconds=86400, name="expire")

    # -- users and tokens ---------------------------------------------------

    def add_user(self, name: str, role: Role, password: str) -> bool:
        """Create or update ``name`` with ``role`` and ``password``; True if the user is new."""
        valid_user_name(name)
        if not password:
            raise ValueError("the password is empty")
        result = self.db[USERS].update_one(
            {"_id": name},
            {"$set": {"password_hash": self.hasher.hash(password), "role": role.label},
             "$setOnInsert": {"created_at": _now()}},
            upsert=True,
        )
        self.db[FAILURES].delete_one({"_id": f"user:{name}"})
        return result.upserted_id is not None

    def add_token(self, name: str, role: Role) -> str:
        """A new API token for ``name`` with ``role``; only its hash is kept, so this is the one chance to see it."""
        valid_user_name(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.db[TOKENS].insert_one({"_id": _token_id(token), "name": name, "role": role.label, "created_at": _now()})
        return token

    def user(self, name: str) -> Principal | None:
        """The user ``name`` as they are now (a session re-checks each request: a removed user is logged out)."""
        doc = self.db[USERS].find_one({"_id": name}, {"role": 1})
        return Principal(name, Role.parse(doc["role"]), "session") if doc else None

    def principal_for_token(self, token: str) -> Principal | None:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
            return None
        doc = self.db[TOKENS].find_one({"_id": _token_id(token)})
        return Principal(doc["name"], Role.parse(doc["role"]), "token") if doc else None

    # -- logging in -----------------------------------------------------------

    def login(self, name: str, password: str, client: str) -> Principal | None:
        """The user if ``password`` is theirs, else None; :class:`LoginRefused` while guessing is being slowed.

        Failures are counted per name and per client address; after
        :data:`FREE_FAILURES` of either, each further attempt must wait
        (30 s, doubling, at most :data:`MAX_LOCKOUT`), right password or
        not, so a guesser gets a handful of tries an hour.
        """
        keys = [f"user:{name[:MAX_NAME * 4]}", f"client:{client}"]
        now = _now()
        for doc in self.db[FAILURES].find({"_id": {"$in": keys}}):
            until = doc.get("until")
            if until is not None and until > now:
                raise LoginRefused(max(1, int((until - now).total_seconds() + 0.999)))
        doc = self.db[USERS].find_one({"_id": name}) if len(name) <= MAX_NAME else None
        try:
            self.hasher.verify(doc["password_hash"] if doc else self._dummy_hash, password)
            ok = doc is not None
        except (VerificationError, InvalidHashError):
            ok = False
        if ok:
            assert doc is not None
            self.db[FAILURES].delete_many({"_id": {"$in": keys}})
            if self.hasher.check_needs_rehash(doc["password_hash"]):
                self.db[USERS].update_one({"_id": name}, {"$set": {"password_hash": self.hasher.hash(password)}})
            return Principal(name, Role.parse(doc["role"]), "session")
        for key in keys:
            counted = self.db[FAILURES].find_one_and_update(
                {"_id": key}, {"$inc": {"count": 1}, "$set": {"last": now}},
                upsert=True, return_document=pymongo.ReturnDocument.AFTER,
            )
            over = counted["count"] - FREE_FAILURES
            if over >= 0:
                wait = min(dt.timedelta(seconds=30 * 2 ** min(over, 10)), MAX_LOCKOUT)
                self.db[FAILURES].update_one({"_id": key}, {"$set": {"until": now + wait}})
        return None

    def cookie_secret(self) -> bytes:
        """The key session cookies are signed with: made once, shared by every portal process on this database."""
        self.db[META].update_one({"_id": "cookie_secret"},
                                 {"$setOnInsert": {"secret": secrets.token_hex(32)}}, upsert=True)
        return bytes.fromhex(self.db[META].find_one({"_id": "cookie_secret"})["secret"])
