"""API keys as the gateway checks them (serving/keys.py): tokens, scopes, revocation, failure
closed. The HTTP behaviour is in tests/reliability/test_access.py."""

from __future__ import annotations

import json
import os
import stat

import pytest

from cluster.errors import NotFound, UserError
from serving.keys import Forbidden, KeyRing, KeysUnavailable, Unauthenticated


@pytest.fixture
def ring(tmp_path) -> KeyRing:
    return KeyRing(tmp_path / "keys.json")


def test_no_keys_means_open_and_the_first_key_closes_the_door_for_good(ring):
    assert not ring.required() and ring.authenticate(None) is None
    key, token = ring.create("acme")
    assert ring.required() and ring.authenticate(f"Bearer {token}").key_id == key.key_id
    ring.revoke(key.key_id)
    with pytest.raises(Unauthenticated, match="revoked"):
        ring.authenticate(f"Bearer {token}")
    with pytest.raises(Unauthenticated, match="required"):
        ring.authenticate(None)  # revoking the last key does not reopen the server


def test_only_a_salted_hash_is_stored_and_the_file_is_private(ring):
    _, token = ring.create("acme")
    text = ring.path.read_text()
    assert token not in text and token.split("_")[-1] not in text
    assert stat.S_IMODE(os.stat(ring.path).st_mode) == 0o600
    _, again = ring.create("acme")
    salts = [k["salt"] for k in json.loads(ring.path.read_text())["keys"]]
    assert len(set(salts)) == 2 and token != again


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic dXNlcjpwYXNz", "Bearer tfk_nope",
                                    "Bearer tfk_000000000000_" + "A" * 43])
def test_missing_malformed_and_unknown_tokens_are_refused(ring, header):
    ring.create("acme")
    with pytest.raises(Unauthenticated):
        ring.authenticate(header)


def test_a_token_with_one_character_changed_is_refused(ring):
    _, token = ring.create("acme")
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(Unauthenticated, match="not valid"):
        ring.authenticate(f"Bearer {flipped}")


def test_scopes(ring):
    key, _ = ring.create("acme", adapters=["support"], kbs=["kestrel"])
    key.check_adapter("support")
    key.check_kb("kestrel")
    for check, name in ((key.check_adapter, "echo"), (key.check_kb, "globex"), (key.check_admin, "canary start")):
        with pytest.raises(Forbidden, match=key.key_id):
            check(name)
    admin, _ = ring.create("ops", admin=True)
    admin.check_admin("canary start")
    admin.check_adapter("anything") and admin.check_kb("anything")
    assert key.scopes() == "adapters=support kbs=kestrel" and admin.scopes() == "adapters=* kbs=* admin"


def test_a_change_by_another_process_is_seen_on_the_next_check(ring, tmp_path):
    other = KeyRing(tmp_path / "keys.json")  # e.g. the CLI, while the gateway holds `ring`
    assert ring.authenticate(None) is None
    _, token = other.create("acme")
    assert ring.authenticate(f"Bearer {token}").tenant == "acme"


def test_a_mounted_secret_updated_by_the_kubelet_is_seen_on_the_next_check(tmp_path):
    """A Secret volume holds keys.json -> ..data/keys.json, ..data -> a timestamped directory that
    the kubelet replaces whole; the gateway reads through the link (serving.keys_file)."""
    admin = KeyRing(tmp_path / "admin" / "keys.json")  # where the operator runs `keys create`
    _, acme = admin.create("acme")
    mount = tmp_path / "mount"
    mount.mkdir()

    def publish(version: str) -> None:  # what the kubelet does when the Secret changes
        (mount / version).mkdir()
        (mount / version / "keys.json").write_bytes(admin.path.read_bytes())
        (mount / "..data_tmp").symlink_to(version)
        os.replace(mount / "..data_tmp", mount / "..data")

    publish("..2026_12_03_01")
    (mount / "keys.json").symlink_to("..data/keys.json")
    gateway = KeyRing(mount / "keys.json")
    key = gateway.authenticate(f"Bearer {acme}")
    assert key.tenant == "acme"
    admin.revoke(key.key_id)
    publish("..2026_12_03_02")
    with pytest.raises(Unauthenticated):
        gateway.authenticate(f"Bearer {acme}")


def test_an_unreadable_keys_file_fails_closed(ring):
    _, token = ring.create("acme")
    good = ring.path.read_text()
    ring.path.write_text(good[: len(good) // 2])  # half-written by hand
    with pytest.raises(KeysUnavailable, match="unreadable"):
        ring.authenticate(f"Bearer {token}")
    with pytest.raises(KeysUnavailable):
        ring.create("globex")  # nothing is written over it either
    assert ring.path.read_text() == good[: len(good) // 2]
    ring.path.write_text(good)
    assert ring.authenticate(f"Bearer {token}").tenant == "acme"


@pytest.mark.parametrize("tenant", ["", "a b", "../x", "x\x00y", "t" * 65, "é"])
def test_bad_names_are_refused(ring, tenant):
    with pytest.raises(UserError):
        ring.create(tenant)
    with pytest.raises(UserError):
        ring.create("acme", adapters=[tenant or "../"])
    assert not ring.required()


def test_revoking_an_unknown_key(ring):
    with pytest.raises(NotFound):
        ring.revoke("000000000000")
