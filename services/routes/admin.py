"""Operator actions, allowed only to admin keys (``HQCLIP_ADMIN_KEYS``): swapping in a new export."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request

from services.access import check_admin

router = APIRouter(tags=["admin"])


@router.post("/v1/admin/reload")
async def reload(request: Request) -> dict:
    """Serve what the model repository's manifest names now: the new towers are loaded beside the old ones, warmed,
    then swapped in at once. 422 naming the problem (the old model serving on) when they cannot be loaded."""
    check_admin(request, "/v1/admin/*")
    return asdict(await request.app.state.serving.reload())
