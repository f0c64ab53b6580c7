"""Ablation of the HQ-CLIP objective on the demo data: plain CLIP vs +HNI vs +STC vs both.

    python benchmarks/ablation.py [--seeds 3] [--jobs 2] [--json benchmarks/ablation-results.json] \
        [section.field=value ...]

Same data (the demo's Tux Paint + emoji training split), same model (frozen EfficientNet-Lite0 and MiniLM
towers, trained projections; training/demo/cached.py), same steps and settings (training/demo/build.py's
DEMO_OVERRIDES and the distillation defaults, plus any overrides given here, e.g. distill.weight=0 without it)
and the same seeds for every variant; only lambda_hni and lambda_stc change. Metrics on the held-out split and the
held-out photos (training/demo/build.py: train_demo_heads), mean +- sample std over seeds, printed as a markdown
table. Builds the data and tower features first if they are missing (the slow part, shared with
`hqclip demo build`). Results and discussion: docs/ablation.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> (HNI on, STC on); "on" = the weight of the demo config (training/config.py defaults)
    "CLIP (contrastive only)": (False, False),
    "+ HNI": (True, False),
    "+ STC": (False, True),
    "+ HNI + STC (HQ-CLIP)": (True, True),
}
COLUMNS = {"zeroshot_top1": "zero-shot top-1", "alt_i2t_R@1": "I→T R@1", "alt_i2t_R@5": "I→T R@5",
           "alt_t2i_R@1": "T→I R@1", "alt_t2i_R@5": "T→I R@5", "hardneg_acc_desc": "hard-neg acc (desc)",
           "hardneg_acc_tags": "hard-neg acc (tags)", "photo_top1_10way": "photos top-1 (10-way)"}


def _one(task: tuple) -> dict:
    """Train and evaluate one (variant, seed) in this process (a worker of --jobs)."""
    from training.demo.build import demo_config, train_demo_heads

    paths, templates, overrides, hni, stc, seed = task
    overrides = [*overrides, f"loss.lambda_hni={hni}", f"loss.lambda_stc={stc}", f"run.seed={seed}"]
    started = time.perf_counter()
    metrics = train_demo_heads(paths, templates, overrides, progress=False)[3]
    return metrics | {"train_s": time.perf_counter() - started, "steps": demo_config(overrides).optim.steps}


def run(seeds: int, work: Path, overrides: list[str], jobs: int = 1) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    from training.demo.build import build_data, build_features, demo_config
    from training.demo.cached import Features

    data = build_data(work)
    paths = build_features(work, data)
    templates = json.loads((data / "classes.json").read_text())["templates"]
    defaults = demo_config(overrides).loss
    tasks = {}
    for name, (use_hni, use_stc) in VARIANTS.items():
        hni, stc = defaults.lambda_hni * use_hni, defaults.lambda_stc * use_stc
        for seed in range(seeds):
            tasks[(name, seed)] = (paths, templates, overrides, hni, stc, seed)
    if jobs == 1:  # in this process
        outcomes = {key: _one(task) for key, task in tasks.items()}
    else:
        with ProcessPoolExecutor(jobs) as pool:
            outcomes = dict(zip(tasks, pool.map(_one, tasks.values())))
    results: dict = {"variants": {}, "seeds": list(range(seeds)), "overrides": overrides,
                     "train_images": len(Features.load(paths["train"]).keys),
                     "heldout_images": len(Features.load(paths["heldout"]).keys)}
    for (name, seed), metrics in outcomes.items():
        hni, stc = tasks[(name, seed)][3:5]
        variant = results["variants"].setdefault(name, {"lambda_hni": hni, "lambda_stc": stc, "runs": []})
        variant["runs"].append(metrics)
        print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                  if isinstance(v, float)), file=sys.stderr)
    return results


def to_markdown(results: dict) -> str:
    lines = ["| objective | " + " | ".join(COLUMNS.values()) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, variant in results["variants"].items():
        cells = []
        for key in COLUMNS:
            values = [100 * r[key] for r in variant["runs"]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per variant (0..N-1).")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "demo", help="Demo data and features.")
    parser.add_argument("--json", type=Path, default=None, help="Also write every run's metrics here.")
    parser.add_argument("--jobs", type=int, default=1, help="Runs in parallel processes (one thread each).")
    parser.add_argument("overrides", nargs="*", help="Training overrides for every run, e.g. optim.steps=500")
    args = parser.parse_args(argv)
    results = run(args.seeds, args.work, args.overrides, args.jobs)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(to_markdown(results))


if __name__ == "__main__":
    main()
