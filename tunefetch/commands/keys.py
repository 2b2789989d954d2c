"""Access: `keys create|list|revoke`, the API keys a server checks (it re-reads them on change)."""

from __future__ import annotations

import getpass
import time
from argparse import Namespace

from cluster.config import TunefetchConfig
from cluster.errors import UserError
from tunefetch.console import Console


def add_parsers(sub, command) -> None:
    p = command(sub, "keys", "API keys: once any exists, the server answers only requests that carry one")
    kv = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = command(kv, "create", "a new key; its token is printed once and stored only as a salted hash",
                handler=keys_create, json="print the key record and token as JSON")
    p.add_argument("--tenant", required=True, help="whose key: answers and provenance records are the tenant's")
    p.add_argument("--adapters", default=None, help="adapter names it may use, e.g. support,legal (default: all)")
    p.add_argument("--kbs", default=None, help="knowledge stores it may retrieve from (default: all)")
    p.add_argument("--admin", action="store_true",
                   help="canary actions, the system card, /metrics and every tenant's provenance")
    p.add_argument("--policy", default=None, help="a guard policy of governance.guards.policies its requests also "
                                                  "run under (length limits, topics, PII, source allow-list)")
    p.add_argument("--by", default=None, help="who creates it (default: this user)")
    command(kv, "list", "every key with its scope (never a token)", handler=keys_list, json="print JSON")
    p = command(kv, "revoke", "the key stops working on the server's next request", handler=keys_revoke)
    p.add_argument("key_id", help="the key's id (keys list)")


def _ring(config: TunefetchConfig):
    from serving.keys import KeyRing

    return KeyRing(config.paths.keys)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def keys_create(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    policies = config.governance.guards.policies
    if args.policy is not None and args.policy not in policies:
        raise UserError(f"--policy: no guard policy {args.policy!r} in governance.guards.policies "
                        f"({', '.join(sorted(policies)) or 'none configured'})")
    key, token = _ring(config).create(args.tenant, _names(args.adapters), _names(args.kbs), args.admin,
                                      args.by or getpass.getuser(), args.policy)
    if args.json:
        console.json({**_public(key), "token": token})
        return 0
    console.info(f"key {key.key_id} for tenant {key.tenant}: {key.scopes()}. The token below is shown only now.")
    console.result(token)
    return 0


def keys_list(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    keys = sorted(_ring(config).keys().values(), key=lambda k: k.created_at)
    if args.json:
        console.json([_public(k) for k in keys])
        return 0
    if not keys:
        console.info("no API keys: the server answers every request that reaches it")
    for k in keys:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created_at))
        state = "revoked " + time.strftime("%Y-%m-%d %H:%M", time.localtime(k.revoked_at)) if k.revoked_at else "active"
        console.result(f"{k.key_id}\t{k.tenant}\t{k.scopes()}\t{when} by {k.created_by}\t{state}")
    return 0


def keys_revoke(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    key = _ring(config).revoke(args.key_id)
    console.result(f"revoked {key.key_id} (tenant {key.tenant})")
    return 0


def _public(key) -> dict:
    return key.model_dump(mode="json", exclude={"salt", "secret_sha256"})
