"""Operator actions, allowed only to admin keys (``HQCLIP_ADMIN_KEYS``): swapping in a new export."""

from __future__ import annotations

import hmac
from dataclasses import asdict

from fastapi import APIRouter, Request

from services.errors import ApiError

router = APIRouter(tags=["admin"])


def _check_admin(request: Request) -> None:
    keys = request.app.state.settings.admin_keys
    if not keys:
        raise ApiError(403, "no admin keys are configured: set HQCLIP_ADMIN_KEYS to allow /v1/admin/*",
                       param="authorization", type="permission_error")
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
    if not any([hmac.compare_digest(given, key.encode()) for key in keys]):  # noqa: C419 (no short cut: constant time)
        raise ApiError(403, "this endpoint needs an admin key (HQCLIP_ADMIN_KEYS): send 'Authorization: Bearer <key>'",
                       param="authorization", type="permission_error")


@router.post("/v1/admin/reload")
async def reload(request: Request) -> dict:
    """Serve what the model repository's manifest names now: the new towers are loaded beside the old ones, warmed,
    then swapped in at once. 422 naming the problem (the old model serving on) when they cannot be loaded."""
    _check_admin(request)
    return asdict(await request.app.state.serving.reload())
