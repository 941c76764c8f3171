"""Canonical, order-insensitive hashes of what a service should be.

- ``spec_hash``: the service spec plus the image *id* (a new image behind the same tag is a
  change);
- ``files_hash``: the contents and modes of the stack files the service mounts (compose never
  notices those);
- ``config_hash``: both together: "the full rendered spec", stored as compose's config-hash.

Lists whose order carries no meaning (ports, mounts, networks, ...) are sorted first, so an
innocent reordering in a template is not a change. Values are hashed, never stored: the
environment holds secrets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from agent.core.stack import ServiceSpec, StackFile

UNORDERED = frozenset({"ports", "mounts", "networks", "depends_on", "extra_hosts"})


def canonical_json(value: Any) -> str:
    """Compact, key-sorted JSON: the form hashed, and the form of the JSON labels."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def service_fields(spec: ServiceSpec, image_id: str | None) -> dict[str, Any]:
    data = spec.model_dump(mode="json")
    for key in UNORDERED:
        data[key] = sorted(data[key], key=canonical_json)
    data["image_id"] = image_id
    return data


def field_hashes(spec: ServiceSpec, image_id: str | None) -> dict[str, str]:
    return {k: _digest(canonical_json(v))[:12] for k, v in sorted(service_fields(spec, image_id).items())}


def spec_hash(spec: ServiceSpec, image_id: str | None) -> str:
    return _digest(canonical_json(service_fields(spec, image_id)))


def file_hashes(files: Iterable[StackFile]) -> dict[str, str]:
    return {f.path: _digest(canonical_json([f.mode, f.content]))[:16] for f in sorted(files, key=lambda f: f.path)}


def files_hash(files: Iterable[StackFile]) -> str:
    return _digest(canonical_json(file_hashes(files)))


def config_hash(spec_h: str, files_h: str) -> str:
    return _digest(spec_h + files_h)
