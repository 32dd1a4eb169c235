"""Benchmarks. `python -m embxlib.bench` prints a table of timings."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

# --- analysis ---------------------------------------------------------------------------------------------

_VARIANTS = ["baseline", "x01", "x02", "x03"]


def _synthetic_run(rng: np.random.Generator, n_points: int, every: int = 25):
    """Steps, times (ms) and losses of one made-up run: a decaying loss with noise, a run-specific speed."""
    steps = np.arange(n_points) * every
    ms = np.cumsum(np.r_[0.0, rng.normal(240.0 + rng.normal(0, 5), 2.0, n_points - 1) * every])
    loss = 2.9 + 8.0 * np.exp(-steps / (n_points * every / 8)) + rng.normal(0, 0.002, n_points)
    return steps, ms, loss


def _val_lines(steps, ms, loss) -> list[str]:
    total = steps[-1]
    return [f"step:{s}/{total} val_loss:{v:.6f} train_time:{t:.0f}ms step_avg:{t / max(s, 1):.2f}ms"
            for s, t, v in zip(steps, ms, loss)]


def _write_synthetic(root: Path, n_runs: int, n_points: int, seed: int = 0) -> list[Path]:
    """A third of the runs each as embxlib run folders, upstream logs and sections of one results markdown."""
    rng = np.random.default_rng(seed)
    n_md = n_log = n_runs // 3
    n_folder = n_runs - n_md - n_log
    markdown = ["# Results", ""]
    for i in range(n_runs):
        variant = _VARIANTS[i % len(_VARIANTS)]
        steps, ms, loss = _synthetic_run(rng, n_points)
        if i < n_folder:
            folder = root / "runs" / f"{variant}-s{i}"
            folder.mkdir(parents=True)
            (folder / "config.json").write_text(json.dumps({"name": variant, "seed": i}))
            (folder / "log.txt").write_text("\n".join(_val_lines(steps, ms, loss)) + "\n")
            (folder / "metrics.jsonl").write_text("".join(
                json.dumps({"step": int(s), "val_loss": float(v), "train_time_ms": float(t),
                            "lambdas": {"x": [1.0] * 4, "x00": [0.5] * 4}, "norms": [1.0] * 4}) + "\n"
                for s, t, v in zip(steps, ms, loss)))
        elif i < n_folder + n_log:
            log = root / "logs" / variant / f"{i:03d}.txt"
            log.parent.mkdir(parents=True, exist_ok=True)
            lines = ["[training script source omitted: 500 lines]", "=" * 100]
            for line, s, t in zip(_val_lines(steps, ms, loss), steps, ms):
                if s:  # the training-step line that upstream prints before each validation
                    lines.append(f"step:{s}/{steps[-1]} train_time:{t:.0f}ms step_avg:{t / s:.2f}ms")
                lines.append(line)
            log.write_text("\n".join(lines) + "\n")
        else:
            markdown += [f"## {variant}-{i}", "", *_val_lines(steps, ms, loss), ""]
    (root / "results.md").write_text("\n".join(markdown) + "\n")
    return [root / "runs", root / "logs" / "*" / "*.txt", root / "results.md"]


def bench_analysis(n_runs: int = 100, n_points: int = 6000, tmpdir=None) -> dict:
    """Seconds to load, average (on a common time grid) and plot n_runs synthetic runs of n_points validations."""
    from embxlib.plots import plot_val_loss, save
    from embxlib.runs import load_runs
    from embxlib.stats import average_runs

    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        inputs = _write_synthetic(Path(tmp), n_runs, n_points)
        t0 = time.perf_counter()
        df = load_runs(inputs)
        t1 = time.perf_counter()
        avg = average_runs(df, x="train_time_s", band="ci95")
        t2 = time.perf_counter()
        save(plot_val_loss(df, x="train_time_s", average=True, band="ci95"), Path(tmp) / "val_loss-time.png")
        t3 = time.perf_counter()
    assert df["run"].nunique() == n_runs and len(df) == n_runs * n_points, "synthetic runs did not all load"
    return {"runs": n_runs, "points": len(df), "curves": avg["variant"].nunique(),
            "load_s": t1 - t0, "average_s": t2 - t1, "plot_s": t3 - t2, "total_s": t3 - t0}


if __name__ == "__main__":
    from tabulate import tabulate

    result = bench_analysis()
    print(tabulate([[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in result.items()],
                   headers=["analysis", "value"], tablefmt="github"))
