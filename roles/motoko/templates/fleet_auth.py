"""The gateway's bearer-token check, loaded by LiteLLM as its custom auth function.

Written by llm-agent next to the proxy config (``config/fleet_auth.py``, mode 0644; it holds
no secret) and named by the config: ``general_settings.custom_auth:
fleet_auth.user_api_key_auth`` (LiteLLM 1.108.7 imports it from the config's directory).

Why: LiteLLM accepts one master key. During a bearer-token rotation the agent wants two for
a while, the new one and the old one, so that no request fails while the proxy's workers are
replaced one by one. The config lists the keys accepted, as SHA-256 hex digests (never the
keys): ``general_settings.llm_agent_accepted_key_sha256``. A request whose bearer key's
digest is in that list is the proxy admin (as the master key is); anything else is refused
the way LiteLLM refuses a key that is not its master key without a database (400 "No
connected db."), so clients see what they saw before. Routes LiteLLM treats as public
(``/``, ``/routes``...; ``/health/liveliness`` and ``/health/readiness`` never reach any
auth) stay public. ``general_settings.master_key`` stays set (the new key): LiteLLM needs it
for its own internals.

A request carrying the header ``X-LLM-Agent-Auth-Probe`` is refused (401) with the worker's
*generation* in the message, a hash of the digests it accepts: the agent asks it during a
reload to tell a new worker (the new list) from an old one without any key.

The decision (``verdict``) is plain Python, importable without LiteLLM; only
``user_api_key_auth`` touches LiteLLM's types. Keep this file free of template syntax: the
role renders it as a template with no variables, byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

#: The ``general_settings`` key listing the accepted keys' SHA-256 hex digests.
SETTING = "llm_agent_accepted_key_sha256"

#: The header of the agent's probe, and how the answer names the worker's generation.
PROBE_HEADER = "x-llm-agent-auth-probe"
GENERATION = "llm-agent accepted keys generation "

ADMIN, PUBLIC, NO_KEY, MALFORMED, REFUSED = "admin", "public", "no-key", "malformed", "refused"

_HEX = re.compile(r"[0-9a-f]{64}")


def digest(key: str) -> str:
    """The SHA-256 hex digest of a bearer key, as the config lists it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def accepted(key: str, digests: Iterable[object]) -> bool:
    """Whether ``key``'s digest is one of ``digests``. Each comparison is constant-time
    (``hmac.compare_digest``), and every listed digest is compared: how long it takes says
    nothing about which entry, or how much of one, matched. Entries that are not 64 lowercase
    hex digits never match."""
    mine = digest(key).encode("ascii")
    found = False
    for entry in digests:
        if isinstance(entry, str) and _HEX.fullmatch(entry):
            found |= hmac.compare_digest(mine, entry.encode("ascii"))
    return found


def listed(digests: object) -> list[str]:
    """The well-formed digests of a config's list, in its order."""
    entries = digests if isinstance(digests, list | tuple) else []
    return [d for d in entries if isinstance(d, str) and _HEX.fullmatch(d)]


def generation(digests: object) -> str:
    """A short hash of the accepted digests: what a worker on a given config answers a probe."""
    return hashlib.sha256("\n".join(listed(digests)).encode("ascii")).hexdigest()[:16]


def verdict(route: str, api_key: str | None, digests: object, public_routes: Collection[str]) -> str:
    """What the proxy does with a request: ``admin`` (an accepted key), ``public`` (a route
    LiteLLM serves without a key), or a refusal (``no-key``, ``malformed``, ``refused``)."""
    if route in public_routes:
        return PUBLIC
    if api_key is None:
        return NO_KEY
    if api_key == "":
        return MALFORMED
    return ADMIN if accepted(api_key, listed(digests)) else REFUSED


async def user_api_key_auth(request: Any, api_key: str | None) -> Any:
    """LiteLLM's custom auth hook: a ``UserAPIKeyAuth``, or the exception LiteLLM itself
    raises for the same request (it turns it into the client's error answer)."""
    from litellm.constants import LITELLM_PROXY_MASTER_KEY_ALIAS
    from litellm.proxy._types import (
        LiteLLMRoutes,
        LitellmUserRoles,
        ProxyErrorTypes,
        ProxyException,
        UserAPIKeyAuth,
    )
    from litellm.proxy.auth.auth_utils import get_request_route
    from litellm.proxy.proxy_server import general_settings, litellm_proxy_admin_name

    # LiteLLM's settings store: a mapping (the config's values), not a dict.
    digests = general_settings.get(SETTING) if isinstance(general_settings, Mapping) else None
    if request.headers.get(PROBE_HEADER) is not None:
        raise ProxyException(
            message=GENERATION + generation(digests), type=ProxyErrorTypes.auth_error, code=401, param=None
        )
    what = verdict(get_request_route(request), api_key, digests, LiteLLMRoutes.public_routes.value)
    if what == ADMIN:
        # As for LiteLLM's master key: an alias stands for the key in spend logs and metrics.
        return UserAPIKeyAuth(
            api_key=LITELLM_PROXY_MASTER_KEY_ALIAS,
            user_role=LitellmUserRoles.PROXY_ADMIN,
            user_id=litellm_proxy_admin_name,
        )
    if what == PUBLIC:
        return UserAPIKeyAuth(user_role=LitellmUserRoles.INTERNAL_USER_VIEW_ONLY)
    if what == NO_KEY:
        raise Exception("No api key passed in.")
    if what == MALFORMED:
        raise Exception("Malformed API Key passed in. Ensure Key has `Bearer ` prefix.")
    raise ProxyException(message="No connected db.", type=ProxyErrorTypes.no_db_connection, code=400, param=None)
