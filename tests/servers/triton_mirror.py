"""A Triton repository of Python-backend models mirroring a model repository's versions (stdlib only: it runs in
the test process and in the Triton venv alike).

For every model folder of the repository, ``<triton>/<model>/config.pbtxt`` is the export's own config with the
Python backend instead of ONNX Runtime's, and each version folder ``<model>/<version>/`` gets a copy of its
``model.onnx`` and tests/servers/triton_onnx_model.py as ``model.py``. Mirroring again adds the versions that
appeared since (a new export); folders already mirrored are left alone, as Triton may be serving them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODEL_PY = Path(__file__).with_name("triton_onnx_model.py")
MANIFEST_SUFFIX = ".manifest.json"


def mirror(repo: Path, triton: Path) -> list[str]:
    """Mirror ``repo``'s models (the names its manifests give) into ``triton``; the model versions added."""
    added = []
    for manifest_file in sorted(Path(repo).glob(f"*{MANIFEST_SUFFIX}")):
        files = json.loads(manifest_file.read_text())["files"]
        for rel in sorted(files):
            model, version, name = [*rel.split("/"), "", "", ""][:3]
            if name != "model.onnx" or not version.isdigit():
                continue
            target = Path(triton) / model
            target.mkdir(parents=True, exist_ok=True)
            config = (Path(repo) / model / "config.pbtxt").read_text()
            config = config.replace('platform: "onnxruntime_onnx"\n', "").replace('"onnxruntime"', '"python"')
            (target / "config.pbtxt").write_text(config)
            if (target / version).exists():
                continue
            staged = target / f".{version}.partial"
            staged.mkdir()
            shutil.copyfile(Path(repo) / rel, staged / "model.onnx")
            shutil.copyfile(MODEL_PY, staged / "model.py")
            staged.rename(target / version)
            added.append(f"{model}/{version}")
    return added
