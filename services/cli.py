"""The `hqclip` command. Each subcommand imports its module lazily, so `hqclip serve` needs no torch."""

from __future__ import annotations

from pathlib import Path

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


@app.command()
def export(
    model: str = typer.Argument(..., help="open_clip model name (ViT-B-16), a checkpoint folder "
                                "(open_clip_config.json + open_clip_model.safetensors) or hf-hub:org/repo."),
    pretrained: str = typer.Option(None, "--pretrained", help="Weights for a model name: a checkpoint file "
                                   "or an open_clip tag. Without any, the weights are random."),
    name: str = typer.Option(None, help="Model name in the repository (default: derived from MODEL)."),
    out: Path = typer.Option(Path("model_repo"), help="The Triton model repository to write into."),
    max_batch_size: int = typer.Option(32, min=1, help="Largest batch the towers take (Triton max_batch_size)."),
    opset: int = typer.Option(17, min=14, help="ONNX opset."),
) -> None:
    """Export an open_clip model to the model repository: ONNX towers, config.pbtxt, tokenizer, manifest."""
    from training.export import export_checkpoint

    export_checkpoint(model, pretrained, out=out, name=name, max_batch_size=max_batch_size, opset=opset)


if __name__ == "__main__":
    app()
