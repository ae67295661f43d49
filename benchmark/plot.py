# cleanworlds benchmark: learning curves and final-value tables from TensorBoard runs. Results: benchmark/RESULTS.md
"""
Turns many runs into the plots and tables papers show.

Reads the TensorBoard event files of every run folder under the given paths (tensorboard's EventAccumulator, which
also honours the purge_step a resumed run writes), groups the runs by (script, dataset or env, exp_name): the script
from the run's config.json (its fields tell the four scripts apart), else its checkpoint, else an exp_name that is a
script's default; the rest from the run folder name `{dataset_or_env}__{exp_name}__{seed}__{timestamp}`. Two
scripts' runs that share an exp_name stay apart. For every tag it writes

- `{out}/{tag}.png`: one panel per (script, dataset/env), one line per exp_name: the mean across seeds and a band
  (default: a 95% Student-t confidence interval of that mean; `--band std` or `--band minmax` instead); the x axis
  is the script's global step, named (DIAMOND: the gradient updates of its three models);
- `{out}/final_values.md`: a markdown table of final values, mean +- sample standard deviation across seeds
  (ddof=1), with the seed count; `{out}/final_values.json` holds the same numbers at full precision.

{out} is --out-dir, by default plots/ inside the first runs folder given (beside the runs; for a single run folder,
beside it). Needs matplotlib (pip install matplotlib, or the `plot` extra: pip install -e '.[plot]').

    python benchmark/plot.py runs --tag losses/mse
    python benchmark/plot.py runs_a runs_b --tag charts/episodic_return --tag eval/episodic_return --smooth 0.9
    python benchmark/plot.py runs --tag "losses/*" --final-window 5 --out-dir plots

The final value of a run is its last logged point (`--final-window K`: the mean of its last K points).
Curves of seeds logged at different steps are linearly interpolated onto a common grid over the steps all seeds
reached. `--smooth a` applies TensorBoard's debiased exponential moving average (weight a) to each seed first.
"""
import argparse
import fnmatch
import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_TAGS = ["losses/*", "eval/*", "charts/episodic_return"]
RUN_NAME = re.compile(r"^(?P<env>.+?)__(?P<exp>.+)__(?P<seed>-?\d+)__(?P<time>\d+)_*$")
# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (no scipy needed); above 30 the normal 1.96.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


# Which script wrote a run: Args fields only that script has (its config.json holds every field).
SCRIPT_FIELDS = {"diamond_atari.py": {"denoiser_steps_per_epoch", "imagination_horizon"},
                 "video_diffusion.py": {"context_frames", "long_video_frames"},
                 "dit_cifar10.py": {"patch", "depth"}, "ddpm_cifar10.py": {"channels", "channels_last"}}
UNKNOWN_SCRIPT = "-"
# What each script's TensorBoard step counts (the x axis of its curves).
STEP_NAMES = {"diamond_atari.py": "global step (gradient updates of the three models)",
              "ddpm_cifar10.py": "global step (optimizer steps)", "dit_cifar10.py": "global step (optimizer steps)",
              "video_diffusion.py": "global step (optimizer steps)"}


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""


@dataclass
class Run:
    path: Path
    env: str
    exp_name: str
    seed: int
    timestamp: int
    script: str = UNKNOWN_SCRIPT
    scalars: dict = field(default_factory=dict)  # tag -> (steps int64 array, values float64 array)


def run_script_name(run_dir: Path, exp_name: str) -> str:
    """The script that wrote a run: from its config.json's fields, else its checkpoint's "script" entry, else an
    exp_name that is a script's default (its file name without .py); "-" when none tells."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        for script, names in SCRIPT_FIELDS.items():
            if isinstance(config, dict) and names <= set(config):
                return script
    except (OSError, ValueError):
        pass
    checkpoint = run_dir / "checkpoints" / "latest.pt"
    if checkpoint.is_file():
        try:
            import torch

            script = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("script")
            if script in SCRIPT_FIELDS:
                return script
        except Exception:  # noqa: BLE001 - an unreadable checkpoint only means the script is unknown
            pass
    return f"{exp_name}.py" if f"{exp_name}.py" in SCRIPT_FIELDS else UNKNOWN_SCRIPT


def parse_run_name(name: str):
    """'{env}__{exp_name}__{seed}__{timestamp}' (a trailing '_' marks a folder renamed to avoid a clash) ->
    (env, exp_name, seed, timestamp), or None when the name does not follow the layout."""
    match = RUN_NAME.match(name)
    if match is None:
        return None
    return match["env"], match["exp"], int(match["seed"]), int(match["time"])


def find_run_dirs(paths) -> list[Path]:
    """Every folder holding an events.out.tfevents.* file, under (or equal to) the given paths."""
    found = set()
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise UserError(f"{given} does not exist (give one or more runs/ folders or run folders)")
        candidates = [root] if root.is_file() else [root, *root.rglob("*")]
        for p in candidates:
            if p.is_file() and p.name.startswith("events.out.tfevents."):
                found.add(p.parent.resolve())
    return sorted(found)


def read_scalars(run_dir: Path) -> dict:
    """tag -> (steps, values) of a run folder's event files, in step order (the last value wins on a repeated step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 1,
                                                                "histograms": 1, "audio": 1})
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        by_step = {}
        for event in accumulator.Scalars(tag):
            by_step[int(event.step)] = float(event.value)
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def load_runs(paths, tag_patterns) -> list[Run]:
    """The runs under paths, one per (script, env, exp_name, seed): when a seed appears twice, the newest folder is
    kept."""
    runs = {}
    for run_dir in find_run_dirs(paths):
        parsed = parse_run_name(run_dir.name)
        if parsed is None:
            print(f"note: skipping {run_dir} (its name is not env__exp_name__seed__timestamp)", file=sys.stderr)
            continue
        run = Run(run_dir, *parsed, script=run_script_name(run_dir, parsed[1]))
        key = (run.script, run.env, run.exp_name, run.seed)
        if key in runs:
            older, newer = sorted([runs[key], run], key=lambda r: (r.timestamp, r.path.name))
            print(f"note: {older.path} and {newer.path} have the same script, env, exp_name and seed; using the newer",
                  file=sys.stderr)
            run = newer
        runs[key] = run
    for run in runs.values():
        run.scalars = {tag: series for tag, series in read_scalars(run.path).items()
                       if any(fnmatch.fnmatchcase(tag, pattern) for pattern in tag_patterns)}
    return sorted(runs.values(), key=lambda r: (r.script, r.env, r.exp_name, r.seed))


def ema_smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: a debiased exponential moving average, s_i = a s_{i-1} + (1 - a) v_i, / (1 - a^i)."""
    if weight <= 0:
        return values
    out, last = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        last = weight * last + (1 - weight) * v
        out[i] = last / (1 - weight ** (i + 1))
    return out


def align(series: list[tuple[np.ndarray, np.ndarray]], max_points: int = 1000):
    """Puts the seeds of one group on one step grid: (steps, values (num_seeds, num_steps)). Identical step lists are
    used as they are; otherwise each seed is linearly interpolated onto the union of steps inside the range every
    seed covers (thinned to max_points)."""
    first_steps = series[0][0]
    if all(len(s) == len(first_steps) and np.array_equal(s, first_steps) for s, _ in series):
        return first_steps, np.stack([v for _, v in series])
    low, high = max(s[0] for s, _ in series), min(s[-1] for s, _ in series)
    if low > high:  # the seeds share no step range: keep the first seed's grid and no band
        return first_steps, series[0][1][None]
    grid = np.unique(np.concatenate([s[(s >= low) & (s <= high)] for s, _ in series]))
    if len(grid) > max_points:
        grid = np.unique(np.linspace(low, high, max_points).round().astype(np.int64))
    return grid, np.stack([np.interp(grid, s, v) for s, v in series])


def band(values: np.ndarray, kind: str):
    """Lower and upper edge of the band around the mean across seeds (axis 0)."""
    mean, n = values.mean(axis=0), values.shape[0]
    if n < 2:
        return mean, mean
    if kind == "minmax":
        return values.min(axis=0), values.max(axis=0)
    std = values.std(axis=0, ddof=1)
    if kind == "std":
        return mean - std, mean + std
    t = T_975[n - 2] if n - 1 <= len(T_975) else 1.96  # 95% CI of the mean: mean +- t_{0.975, n-1} std / sqrt(n)
    half = t * std / math.sqrt(n)
    return mean - half, mean + half


def final_value(values: np.ndarray, window: int) -> float:
    return float(np.mean(values[-window:]))


def summarise(runs: list[Run], tags: list[str], window: int) -> list[dict]:
    """One row per (script, env, exp_name, tag): the final value of every seed, their mean and sample std (ddof=1)."""
    groups = defaultdict(list)
    for run in runs:
        groups[(run.script, run.env, run.exp_name)].append(run)
    rows = []
    for (script, env, exp_name), group in sorted(groups.items()):
        for tag in tags:
            per_seed = {run.seed: final_value(run.scalars[tag][1], window) for run in group if tag in run.scalars}
            if not per_seed:
                continue
            values = np.array(list(per_seed.values()))
            rows.append(dict(script=script, env=env, exp_name=exp_name, tag=tag, seeds=sorted(per_seed),
                             per_seed={str(k): v for k, v in sorted(per_seed.items())}, mean=float(values.mean()),
                             std=float(values.std(ddof=1)) if len(values) > 1 else float("nan"), n=len(values)))
    return rows


def format_number(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.6g}"


def markdown_table(rows: list[dict], tags: list[str], window: int) -> str:
    """Rows (script, env, exp_name), one column per tag: 'mean +- std (n)'."""
    what = "last logged value" if window == 1 else f"mean of the last {window} logged values"
    lines = [f"Final values ({what} per run; mean +- sample std across seeds, seed count in brackets)", "",
             "| script | env | exp_name | " + " | ".join(tags) + " |", "|---|---|---|" + "---|" * len(tags)]
    cells = defaultdict(dict)
    for row in rows:
        std = "" if row["n"] < 2 else f" +- {format_number(row['std'])}"
        cells[(row["script"], row["env"], row["exp_name"])][row["tag"]] = (f"{format_number(row['mean'])}{std} "
                                                                         f"({row['n']})")
    for (script, env, exp_name), by_tag in sorted(cells.items()):
        lines.append(f"| {script} | {env} | {exp_name} | " + " | ".join(by_tag.get(tag, "") for tag in tags) + " |")
    return "\n".join(lines) + "\n"


def plot_tag(runs: list[Run], tag: str, path: Path, smooth: float, band_kind: str) -> list[tuple[str, str]]:
    """Writes the tag's figure; returns each panel's (title, x axis label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(run.script, run.env) for run in runs if tag in run.scalars})  # one per (script, env)
    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(6.0, 4.5 * columns), 0.6 + 3.4 * rows), squeeze=False)
    for ax, (script, env) in zip(axes.flat, panels):
        mine = [run for run in runs if run.script == script and run.env == env and tag in run.scalars]
        exp_names = sorted({run.exp_name for run in mine})
        for colour, exp_name in enumerate(exp_names):
            group = [run for run in mine if run.exp_name == exp_name]
            steps, values = align([(run.scalars[tag][0], ema_smooth(run.scalars[tag][1], smooth)) for run in group])
            low, high = band(values, band_kind)
            ax.plot(steps, values.mean(axis=0), color=f"C{colour}", label=f"{exp_name} ({len(group)} seeds)")
            if len(group) > 1:
                ax.fill_between(steps, low, high, color=f"C{colour}", alpha=0.2, linewidth=0)
        ax.set_title(env if script == UNKNOWN_SCRIPT else f"{env} ({script})", fontsize="medium")
        ax.set_xlabel(STEP_NAMES.get(script, "global step"))
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    band_name = {"ci95": "95% CI of the mean", "std": "+- 1 std", "minmax": "min to max"}[band_kind]
    fig.suptitle(f"{tag}\nmean across seeds, band: {band_name}" + (f", smoothing {smooth}" if smooth > 0 else ""),
                 fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [(ax.get_title(), ax.get_xlabel()) for ax in list(axes.flat)[:len(panels)]]


def tag_file_name(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tag)


def default_out_dir(first: Path) -> Path:
    """plots/ beside the runs: inside a runs folder, or next to a run folder given alone (never the current folder)."""
    folder = first if first.is_dir() else first.parent
    is_run = any(p.name.startswith("events.out.tfevents.") for p in folder.iterdir())
    return (folder.parent if is_run else folder) / "plots"


def main(argv=None) -> list[dict]:
    parser = OneLineArgumentParser(prog="benchmark/plot.py", description=__doc__.strip(),
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("paths", nargs="+", help="runs/ folders (searched recursively) or run folders")
    parser.add_argument("--tag", action="append", default=None,
                        help=f"scalar tag or glob pattern, repeatable (default: {' '.join(DEFAULT_TAGS)})")
    parser.add_argument("--out-dir", default=None, help="where the PNGs and the table go (default: plots/ in the "
                                                         "first runs folder given; beside a single run folder)")
    parser.add_argument("--final-window", type=int, default=1, help="final value = mean of the last K points")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA smoothing weight in [0, 1) for the curves")
    parser.add_argument("--band", choices=["ci95", "std", "minmax"], default="ci95", help="band around the mean")
    args = parser.parse_args(argv)
    if args.final_window < 1:
        raise UserError(f"--final-window must be at least 1, not {args.final_window}")
    if not 0 <= args.smooth < 1:
        raise UserError(f"--smooth must be in [0, 1), not {args.smooth}")

    try:
        import matplotlib  # noqa: F401 - checked first: a missing plotting library is one line, before any reading
    except ImportError:
        raise UserError("plot.py draws with matplotlib, which is not installed: pip install matplotlib (or the `plot` "
                        "extra: pip install -e '.[plot]')") from None
    patterns = args.tag or DEFAULT_TAGS
    runs = load_runs(args.paths, patterns)
    if not runs:
        raise UserError(f"no run folders with TensorBoard event files under {' '.join(args.paths)}")
    tags = sorted({tag for run in runs for tag in run.scalars})
    if not tags:
        known = sorted({tag for run in runs for tag in read_scalars(run.path)})
        raise UserError(f"no scalar tag matches {' '.join(patterns)} in {len(runs)} runs; tags there: "
                        f"{' '.join(known[:30])}")
    out_dir = Path(args.out_dir) if args.out_dir is not None else default_out_dir(Path(args.paths[0]))
    for tag in tags:
        path = out_dir / f"{tag_file_name(tag)}.png"
        plot_tag(runs, tag, path, args.smooth, args.band)
        print(f"wrote {path}")
    rows = summarise(runs, tags, args.final_window)
    table = markdown_table(rows, tags, args.final_window)
    (out_dir / "final_values.md").write_text(table)
    (out_dir / "final_values.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out_dir / 'final_values.md'} and final_values.json ({len(runs)} runs)\n")
    print(table)
    return rows


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
