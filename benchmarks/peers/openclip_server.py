"""A peer: the FastAPI + open_clip server a user would write in an afternoon (one request at a time).

    .venv/bin/python benchmarks/peers/openclip_server.py --model ViT-B-16 --port 8101

``POST /embeddings`` takes ``{"input": ["data:image/jpeg;base64,...", ...]}`` (the shape infinity and the gateway
take) and answers ``{"data": [{"embedding": [...]}, ...]}``. The endpoint decodes, preprocesses with open_clip's
own transform and runs ``encode_image`` in torch on the event loop, so requests run one after another; there is
no micro-batching across requests. Random weights of the named architecture (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import base64
import io

import open_clip
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel


class EmbeddingRequest(BaseModel):
    input: list[str]


def create_app(model_name: str) -> FastAPI:
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    app = FastAPI()

    @app.post("/embeddings")
    async def embeddings(request: EmbeddingRequest) -> dict:
        images = [Image.open(io.BytesIO(base64.b64decode(item.split(",", 1)[-1]))).convert("RGB")
                  for item in request.input]
        with torch.no_grad():
            features = model.encode_image(torch.stack([preprocess(image) for image in images]))
            features = torch.nn.functional.normalize(features, dim=-1)
        return {"data": [{"index": i, "embedding": row.tolist()} for i, row in enumerate(features)]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")
