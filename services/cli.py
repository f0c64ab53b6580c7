"""The `hqclip` command. Each subcommand imports its module lazily, so `hqclip serve` needs no torch."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="HQ-CLIP: train, export, refine and serve.")


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default HQCLIP_HOST or 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default HQCLIP_PORT or 8000)."),
) -> None:
    """Start the HTTP gateway on the model repository (HQCLIP_MODEL_REPO)."""
    import uvicorn

    from services.app import create_app
    from services.settings import Settings

    settings = Settings()
    if host:
        settings.host = host
    if port:
        settings.port = port
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


if __name__ == "__main__":
    app()
