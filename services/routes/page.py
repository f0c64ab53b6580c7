"""The web page at ``/``: static HTML, CSS and JavaScript (services/static, no build step) that call the JSON API
from the browser. The page itself needs no API key (it asks for one and keeps it in the browser's localStorage);
every API call it makes does."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"
PUBLIC_PATHS = frozenset({"/"})
PUBLIC_PREFIX = "/static/"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


def mount(app: FastAPI) -> None:
    """The page's route and its static files."""
    app.include_router(router)
    app.mount(PUBLIC_PREFIX.rstrip("/"), StaticFiles(directory=STATIC), name="static")


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX)
