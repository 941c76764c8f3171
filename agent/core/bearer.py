"""The gateway's bearer keys during a rotation: which keys the proxy accepts, and how the
config names them. Pure: the renderer applies the rule, a pass feeds it the key on disk.

LiteLLM holds one master key. The role's auth module (``roles/motoko/templates/
fleet_auth.py``) accepts instead every key whose SHA-256 the config lists under
``general_settings.llm_agent_accepted_key_sha256``. A rotation is then two reloads: the first
config holds the new master key and accepts both keys, so no worker, old or new, refuses a
client still on the old token; the next pass, with the new key on disk, renders the new key
alone, and that reload retires the old one.
"""

from __future__ import annotations

import hashlib

#: The ``general_settings`` key the auth module reads (its ``SETTING``; LiteLLM 1.108.7
#: keeps unknown ``general_settings`` keys as they are).
ACCEPTED_KEYS_SETTING = "llm_agent_accepted_key_sha256"

#: What ``agent plan`` says of the two reloads of a rotation.
ROTATION_STARTED = "bearer token rotation: the old key is accepted until the next reload"
ROTATION_FINISHED = "bearer token rotation: the old key is refused after this reload"
#: Why a pass that began a rotation is followed at once by another.
ROTATION_FOLLOW_UP = "bearer token rotation: another pass retires the old key"


def accepted_keys(key: str, previous: str | None) -> list[str]:
    """The new key, and the previous one (the master key of the config on disk) while it
    differs. In that order: same inputs, same config bytes."""
    return [key] if previous is None or previous == key else [key, previous]


def key_digest(key: str) -> str:
    """SHA-256 hex digest of a key, as the auth module compares them (``fleet_auth.digest``)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generation(digests: list[str]) -> str:
    """A short hash of a config's accepted digests, in order: what a proxy worker on that
    config answers the agent's probe (``fleet_auth.generation``). A reload that changes the
    list can tell its new worker from the old ones by it, with no key."""
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()[:16]
