"""`hqclip loop`: the paper's loop as one resumable command.

    raw shards -> refine (the LVLM) -> train (from the served model's checkpoint) -> gate (held-out evaluation,
    new vs served) -> export (the next Triton version) -> reload (the gateway swaps it in) -> reindex (collections)

Each step runs the `hqclip` command that does it alone (refine, train, eval, export) as a subprocess, so this module
never imports training (tests/test_layers.py) and each step shows its own progress; reload is one HTTP call and
reindex calls ``hqclip.jobs.reindex.reindex`` per collection.

Resume: ``<work>/loop-state.json`` records each finished step with the digest of its inputs (its part of the config
and the outputs of the step before it; for refine also the raw shards' names, sizes and times) and its outputs.
A rerun skips a step whose record has the same digest. A step whose inputs changed runs again from scratch (its
folder under ``<work>`` is deleted) and so does every step after it, since their inputs are its outputs. A step
killed part-way has no record: it runs again and resumes by itself (refine and train keep their own progress).
A gate that refuses the new model records nothing: the rerun evaluates again and refuses again, until the config
(more data, other training settings: both change the train step's digest) or the tolerance changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from hqclip.jobs.refine import FAILURE_LOG
from hqclip.repo.manifest import load_manifest, sha256_file
from hqclip.shards import count_samples

STATE_FILE = "loop-state.json"
STEPS = ("refine", "train", "gate", "export", "reload", "reindex")
RELOAD_TIMEOUT_S = 600  # the gateway loads and warms the new towers before it answers


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(_Section):
    raw: list[Path] = Field(description="New raw shards (img2dataset .tar files or folders of them).")
    lvlm: list[str] = Field(description="LVLM servers (vLLM's OpenAI API, http://HOST:8000/v1).")
    concurrency: int = Field(16, ge=1, description="Requests in flight over all LVLM servers.")
    ray: bool | None = Field(None, description="Refine on Ray (true), in one process (false), or when installed.")
    ray_address: str | None = Field(None, description="A Ray cluster to refine on (auto, ray://HOST:10001).")


class TrainSection(_Section):
    base_checkpoint: Path = Field(description="The served model's `hqclip train` checkpoint: training starts from "
                                  "its weights, and the gate measures the served model with it.")
    config: Path | None = Field(None, description="`hqclip train` YAML (steps, batch size, lr...).")
    overrides: list[str] = Field(default_factory=list, description="section.field=value for `hqclip train`.")
    launcher: list[str] = Field(default_factory=list, description="A command before `hqclip train`, e.g. "
                                "[torchrun, --nproc_per_node, '8'] or [srun, ...] ($VARIABLES expand from the "
                                "environment, e.g. $SLURM_NNODES); empty: one process.")


class GateSection(_Section):
    shards: list[str] = Field(description="Held-out shards (with desc/tags; brace patterns expand).")
    metric: str = Field("desc_t2i_R@5", description="A key of `hqclip eval`'s results (e.g. desc_i2t_R@1, "
                        "hardneg_acc_desc, tag_mAP, zeroshot_top1).")
    tolerance: float = Field(0.0, description="The new model passes when new >= served - tolerance; negative: it "
                             "must be better by at least that much.")
    batch_size: int = Field(64, ge=1)


class ServeSection(_Section):
    model_repo: Path = Field(description="The model repository the gateway serves (HQCLIP_MODEL_REPO).")
    model: str = Field(description="The model's name in it (HQCLIP_MODEL).")
    keep_versions: int = Field(2, ge=1, description="Versions kept in the repository (`hqclip export --version`).")
    gateway: str = Field(description="The gateway's URL, for POST /v1/admin/reload and the reindex.")
    admin_key_env: str = Field("HQCLIP_ADMIN_KEY", description="The environment variable holding an admin key "
                               "(one of the gateway's HQCLIP_ADMIN_KEYS); unset: no key sent.")
    collections: list[str] = Field(default_factory=list, description="Collections to re-embed with the new model.")
    keep_old_collections: bool = Field(False, description="Keep each collection's old physical copy after the flip.")


class LoopConfig(_Section):
    work: Path = Field(description="The loop's folder: state, refined shards, training run, evaluations.")
    data: DataSection
    train: TrainSection
    gate: GateSection
    serve: ServeSection


def load_loop_config(path: Path) -> LoopConfig:
    """``loop.yaml``, validated; relative paths are taken from the folder the command runs in."""
    loaded = yaml.safe_load(Path(path).read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping with work, data, train, gate, serve (docs/loop.md)")
    return LoopConfig.model_validate(loaded)


class LoopError(RuntimeError):
    """A step failed; the message says what happened and what to do next."""


class GateRefused(LoopError):
    """The new model is worse than the served one on the held-out set; nothing was exported."""


@dataclass
class StepRun:
    name: str
    status: str  # "ran", "skipped" (done before), "stopped" (not reached: --stop-after)
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)


@dataclass
class LoopSummary:
    steps: list[StepRun]

    def __str__(self) -> str:
        lines = [f"{run.name:8} {run.status:8} {run.seconds:7.1f} s  {json.dumps(run.outputs, sort_keys=True)}"
                 for run in self.steps]
        train = next((run for run in self.steps if run.name == "train" and run.outputs), None)
        if train and all(run.status != "stopped" for run in self.steps):
            lines.append(f"next round: set train.base_checkpoint to {train.outputs['checkpoint']}")
        return "\n".join(lines)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _files(paths: list[Path]) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of the .tar files in ``paths`` (files or folders)."""
    found = [q for p in paths for q in (sorted(Path(p).rglob("*.tar")) if Path(p).is_dir() else [Path(p)])]
    missing = [str(p) for p in found if not p.is_file()]
    if missing or not found:
        raise LoopError(f"data.raw: no shards at {', '.join(missing or map(str, paths))}: check the paths in loop.yaml")
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in found]


class Loop:
    """One round of the loop over ``config``; ``run`` does the steps not done before."""

    def __init__(self, config: LoopConfig, progress: bool = True, console: Console | None = None) -> None:
        self.config, self.progress = config, progress
        self.console = console or Console(stderr=True)
        self.work = Path(config.work).resolve()
        self.state_path = self.work / STATE_FILE
        self.base_sha256 = ""  # the base checkpoint's, from preflight
        self.steps: dict[str, Callable[[dict], dict]] = {
            "refine": self.refine, "train": self.train, "gate": self.gate, "export": self.export,
            "reload": self.reload}

    # --- state ---------------------------------------------------------------------------------------------------

    def _state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def _record(self, state: dict) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        temporary.replace(self.state_path)

    def _inputs(self, name: str, previous: dict) -> str:
        cfg = self.config
        own = {"refine": (cfg.data.model_dump(mode="json", exclude={"ray", "ray_address"}), _files(cfg.data.raw)),
               "train": (cfg.train.model_dump(mode="json"), self.base_sha256),
               "gate": cfg.gate.model_dump(mode="json"),
               "export": cfg.serve.model_dump(mode="json", include={"model_repo", "model", "keep_versions"}),
               "reload": cfg.serve.model_dump(mode="json", include={"gateway"}),
               }.get(name, cfg.serve.model_dump(mode="json", include={"gateway", "keep_old_collections"}))
        return _digest(name, own, previous)

    # --- running -------------------------------------------------------------------------------------------------

    def run(self, stop_after: str | None = None) -> LoopSummary:
        """The steps in order, each skipped when done before with the same inputs; stop after ``stop_after``."""
        self.preflight()
        state, previous, runs = self._state(), {}, []
        names = [*self.steps, *(f"reindex/{c}" for c in self.config.serve.collections)]
        stopped = False
        for number, name in enumerate(names, 1):
            if stopped:
                runs.append(StepRun(name, "stopped"))
                continue
            key = self._inputs(name.split("/")[0], previous if not name.startswith("reindex/") else
                               state.get("reload", {}).get("outputs", {}))
            done = state.get(name)
            header = f"[bold]loop {number}/{len(names)}[/bold] {name}"
            if done and done["inputs"] == key:
                self.console.print(f"{header}: done before, skipped ({json.dumps(done['outputs'])})")
                runs.append(StepRun(name, "skipped", 0.0, done["outputs"]))
            else:
                if done:  # its inputs changed: it and every later step start over
                    self.console.print(f"{header}: its inputs changed since it ran: running it again")
                    for later in names[number - 1:]:
                        state.pop(later, None)
                    self._record(state)
                    self._clear(name)
                self.console.print(f"{header} ...")
                started = time.monotonic()
                outputs = (self.steps[name](previous) if name in self.steps
                           else self.reindex(name.removeprefix("reindex/")))
                seconds = time.monotonic() - started
                state[name] = {"inputs": key, "outputs": outputs, "seconds": round(seconds, 1)}
                self._record(state)
                self.console.print(f"{header}: done in {seconds:.0f} s ({json.dumps(outputs)})")
                runs.append(StepRun(name, "ran", seconds, outputs))
            previous = state[name]["outputs"]
            stopped = name.split("/")[0] == stop_after
        return LoopSummary(runs)

    def _clear(self, name: str) -> None:
        import shutil

        folder = {"refine": "refined", "train": "train", "gate": "eval"}.get(name)
        if folder and (self.work / folder).exists():
            shutil.rmtree(self.work / folder)

    def preflight(self) -> None:
        """What can be checked before hours of refinement: the base checkpoint is the served model's (or, once this
        round has exported, the served model is this round's)."""
        cfg = self.config
        base = Path(cfg.train.base_checkpoint)
        if not base.is_file():
            raise LoopError(f"train.base_checkpoint {base} does not exist: give the `hqclip train` checkpoint the "
                            f"served model was exported from")
        try:
            manifest = load_manifest(cfg.serve.model_repo, cfg.serve.model)
        except (FileNotFoundError, ValueError) as exc:
            raise LoopError(f"serve: {exc}") from None
        self.base_sha256 = sha256_file(base)[:16]  # an input of the train step: another file at the same path
        expected = f"sha256:{self.base_sha256}"
        state = self._state()
        ours = f"sha256:{state['train']['outputs']['sha256']}" if "export" in state else expected  # this round's
        if not manifest.weights.endswith((expected, ours)):
            raise LoopError(f"the served model '{manifest.name}' was exported from {manifest.weights!r}, not from "
                            f"train.base_checkpoint {base} ({expected}): the gate would compare against another "
                            f"model; set train.base_checkpoint to the checkpoint it came from")

    def _hqclip(self, *args: str, what: str, launcher: list[str] = ()) -> None:
        """Run an `hqclip` command, its progress on this terminal; a failure says which command and how to go on."""
        command = ([*map(os.path.expandvars, launcher), str(Path(sys.executable).with_name("hqclip"))] if launcher
                   else [sys.executable, "-m", "hqclip.cli"]) + list(args)
        result = subprocess.run(command)
        if result.returncode != 0:
            raise LoopError(f"{what} failed (exit status {result.returncode}) running: {' '.join(command)}; see its "
                            f"output above, fix the cause, then rerun `hqclip loop` (it resumes at this step)")

    def refine(self, _previous: dict) -> dict:
        data, out = self.config.data, self.work / "refined"
        ray = ["--no-ray"] if data.ray is False else ["--ray"] if data.ray else []
        self._hqclip("refine", *map(str, data.raw), "--out", str(out), *(a for u in data.lvlm for a in ("--url", u)),
                     "--concurrency", str(data.concurrency), *ray,
                     *(["--ray-address", data.ray_address] if data.ray_address else []),
                     *([] if self.progress else ["--no-progress"]), what="refine")
        shards = sorted(str(p) for p in out.glob("*.tar"))
        samples = sum(count_samples(Path(shard)) for shard in shards)
        failures = out / FAILURE_LOG
        left_out = failures.read_text().splitlines() if failures.is_file() else []
        if not samples:
            first = json.loads(left_out[0])["error"] if left_out else "no input samples"
            raise LoopError(f"refine refined no sample ({len(left_out)} left out, the first: {first}; all in "
                            f"{failures}). Fix the cause (is data.lvlm a running LVLM server?), delete {out} (left-out "
                            f"samples are not retried) and rerun `hqclip loop`")
        if len(left_out) > samples:
            self.console.print(f"[yellow]warning[/]: refine left out {len(left_out)} samples and refined {samples} "
                               f"(see {failures})")
        return {"shards": shards, "samples": samples, "left_out": len(left_out)}

    def train(self, previous: dict) -> dict:
        train, out = self.config.train, self.work / "train"
        self._hqclip("train", *(["--config", str(train.config)] if train.config else []), *train.overrides,
                     f"data.train_shards={json.dumps(previous['shards'])}", f"run.output_dir={out}",
                     f"model.init_from={Path(train.base_checkpoint).resolve()}",
                     *([] if self.progress else ["run.progress=false"]), what="train", launcher=train.launcher)
        checkpoints = sorted(out.glob("checkpoint-*.pt"))
        if not checkpoints:
            raise LoopError(f"`hqclip train` left no checkpoint in {out}")
        return {"checkpoint": str(checkpoints[-1]), "sha256": sha256_file(checkpoints[-1])[:16]}

    def _evaluate(self, checkpoint: str, label: str) -> dict:
        gate, out = self.config.gate, self.work / "eval" / label
        out.parent.mkdir(parents=True, exist_ok=True)
        self._hqclip("eval", "--checkpoint", checkpoint, *(a for s in gate.shards for a in ("--shards", s)),
                     "--out", str(out), "--batch-size", str(gate.batch_size), what=f"evaluating the {label} model")
        return json.loads(out.with_suffix(".json").read_text())

    def gate(self, previous: dict) -> dict:
        gate = self.config.gate
        served = self._evaluate(str(Path(self.config.train.base_checkpoint).resolve()), "served")
        new = self._evaluate(previous["checkpoint"], "new")
        if gate.metric not in served or gate.metric not in new:
            known = ", ".join(sorted(k for k, v in new.items() if isinstance(v, float)))
            raise LoopError(f"gate.metric {gate.metric!r} is not among the evaluation's results ({known}): "
                            f"set gate.metric in loop.yaml to one of them")
        numbers = (f"{gate.metric}: new {new[gate.metric]:.4f}, served {served[gate.metric]:.4f} "
                   f"(tolerance {gate.tolerance:g}, on {new.get('samples', '?')} held-out samples)")
        self.console.print(numbers)
        if new[gate.metric] < served[gate.metric] - gate.tolerance:
            raise GateRefused(f"the new model is refused: {numbers}; nothing was exported. Train longer or on more "
                              f"data (train.overrides, data.raw), or change gate.tolerance, then rerun `hqclip loop`")
        return {"checkpoint": previous["checkpoint"], "metric": gate.metric, "new": new[gate.metric],
                "served": served[gate.metric]}

    def export(self, previous: dict) -> dict:
        serve = self.config.serve
        self._hqclip("export", previous["checkpoint"], "--out", str(serve.model_repo), "--name", serve.model,
                     "--version", "next", "--keep-versions", str(serve.keep_versions), what="export")
        manifest = load_manifest(serve.model_repo, serve.model)
        return {"fingerprint": manifest.fingerprint, "version": manifest.version(manifest.image.model)}

    def _admin_key(self) -> str | None:
        return os.environ.get(self.config.serve.admin_key_env) or None

    def reload(self, previous: dict) -> dict:
        serve, key = self.config.serve, self._admin_key()
        url = f"{serve.gateway.rstrip('/')}/v1/admin/reload"
        try:
            answer = httpx.post(url, headers={"Authorization": f"Bearer {key}"} if key else {},
                                timeout=RELOAD_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise LoopError(f"POST {url}: {exc}: start the gateway (or fix serve.gateway), then rerun `hqclip loop` "
                            f"(it resumes at reload)") from None
        if answer.status_code in (401, 403):
            raise LoopError(f"POST {url} answered {answer.status_code}: set {serve.admin_key_env} to one of the "
                            f"gateway's HQCLIP_ADMIN_KEYS, then rerun `hqclip loop`")
        if answer.status_code != 200:
            raise LoopError(f"POST {url} answered {answer.status_code}: {answer.text[:500]}; the gateway serves its "
                            f"old model on. Fix the cause, then rerun `hqclip loop`")
        body = answer.json()
        if body["fingerprint"] != previous["fingerprint"]:
            raise LoopError(f"the gateway at {serve.gateway} now serves {body['fingerprint']}, not the export "
                            f"{previous['fingerprint']}: does it serve {serve.model_repo} (HQCLIP_MODEL_REPO)?")
        return {"fingerprint": body["fingerprint"], "previous": body["previous"], "reloaded": body["reloaded"]}

    def reindex(self, collection: str) -> dict:
        from hqclip.jobs.reindex import ReindexError, reindex  # the job of `hqclip reindex COLLECTION`

        try:
            summary = reindex(self.config.serve.gateway, collection, api_key=self._admin_key(),
                              keep_old=self.config.serve.keep_old_collections, progress=self.progress)
        except ReindexError as exc:
            raise LoopError(f"reindex of {collection}: {exc}; then rerun `hqclip loop` (it resumes there)") from None
        if not summary.complete:
            raise LoopError(f"the reindex of {collection} did not finish: {summary}; rerun `hqclip loop` to go on")
        return {"collection": collection, "summary": str(summary)}
