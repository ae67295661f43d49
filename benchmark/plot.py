# cleanworlds benchmark: learning curves and final-value tables from TensorBoard runs. Results: benchmark/RESULTS.md
"""
Turns many runs into the plots and tables papers show.

Reads the TensorBoard event files of every run folder under the given paths (tensorboard's EventAccumulator, which
also honours the purge_step a resumed run writes), groups the runs by (script, dataset or env, exp_name,
configuration): the script from the run's config.json (its fields tell the four scripts apart), else its checkpoint,
else an exp_name that is a script's default; the configuration from its config.json: every flag but the seed and the
flags a resume may change (run length, cadence, logging, sampling, device: NOT_CONFIGURATION), so that runs of two
presets, or of two learning rates, are never averaged as seeds; the rest from the run folder name
`{dataset_or_env}__{exp_name}__{seed}__{timestamp}`. Two scripts' runs that share an exp_name stay apart. What it
merges (seeds of one group), keeps apart (configurations of one exp_name) or drops (the older of two runs of one group
and seed, folders that are not runs, runs without the tags) it says on stderr, one line each. For every tag it writes

- `{out}/{tag}.png`: one panel per (script, dataset/env), one line per (exp_name, configuration): the mean across
  seeds and a band (default: a 95% Student-t confidence interval of that mean; `--band std` or `--band minmax`
  instead); the x axis is the script's global step, named (DIAMOND: the gradient updates of its three models);
- `{out}/final_values.md`: a markdown table of final values, mean +- sample standard deviation across seeds
  (ddof=1), with the seed count; `{out}/final_values.json` holds the same numbers at full precision. Its config
  column: the preset ("no preset"; "-" without a config.json), and the flags in which the configurations of one
  (script, env, exp_name) differ.

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
from typing import Optional

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
# config.json fields that do not make runs incomparable: the seed, the run's names, and every flag a script marks
# RESUME_MUTABLE, the flags a resume may change (tests/test_benchmark.py checks this holds all of them).
NOT_CONFIGURATION = {
    "seed", "exp_name", "resume", "config", "output_dir", "data_dir", "download", "cuda", "compile", "track",
    "wandb_project_name", "wandb_entity",
    "total_steps", "epochs", "num_epochs", "save_every", "eval_every", "log_every", "first_sample_at",  # cadence
    "sample_only", "eval_only", "num_samples", "sampler", "num_sampling_steps", "ddim_eta", "cfg_scale", "class_label",
    "samples_per_class", "eval_fid", "fid_num_samples", "sample_batch_size", "num_eval_samples", "long_video_frames",
    "context_noise_sampling_step", "eval_episodes", "test_episodes", "episode_to_mp4", "imagination_graphs",
    "play", "play_keys", "play_caption", "play_world", "play_size", "play_fps",
}
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
    configuration: Optional[dict] = None  # config.json's fields, less NOT_CONFIGURATION and Nones (None: no file)
    config: str = "-"  # the configuration in words (label_configurations)
    scalars: dict = field(default_factory=dict)  # tag -> (steps int64 array, values float64 array)


def read_run_config(run_dir: Path) -> Optional[dict]:
    """The run's config.json (every flag's value at its start), or None when it has none that reads as an object."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def run_script_name(run_dir: Path, exp_name: str, config: Optional[dict]) -> str:
    """The script that wrote a run: from its config.json's fields, else its checkpoint's "script" entry, else an
    exp_name that is a script's default (its file name without .py); "-" when none tells."""
    for script, names in SCRIPT_FIELDS.items():
        if config is not None and names <= set(config):
            return script
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


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def label_configurations(runs: list[Run]):
    """Sets each run's config: its preset, then the flags (with this run's values) in which the configurations of its
    (script, env, exp_name) differ, so that two configurations never share a label; "-" without a config.json."""
    families = defaultdict(list)
    for run in runs:
        families[(run.script, run.env, run.exp_name)].append(run)
    for family in families.values():
        known = [run.configuration for run in family if run.configuration is not None]
        names = sorted({name for configuration in known for name in configuration} - {"preset"})
        differing = [name for name in names if len({json.dumps(c.get(name)) for c in known}) > 1]
        for run in family:
            if run.configuration is not None:  # a field set to None, or one an older script did not have: "(not set)"
                values = [run.configuration.get(name, "(not set)") for name in differing]
                run.config = " ".join([run.configuration.get("preset") or "no preset"] + [
                    f"--{name.replace('_', '-')} {value if isinstance(value, str) else json.dumps(value)}"
                    for name, value in zip(differing, values)])
        configs = sorted({run.config for run in family})
        if len(configs) > 1:
            print(f"note: {family[0].script} {family[0].env} {family[0].exp_name}: runs of {len(configs)} "
                  f"configurations ({'; '.join(configs)}), kept apart", file=sys.stderr)


def load_runs(paths, tag_patterns) -> list[Run]:
    """The runs under paths with a scalar tag matching tag_patterns, one per (script, env, exp_name, configuration,
    seed): when a seed appears twice, the newest folder is kept. What is merged or dropped, and why, goes to stderr."""
    runs = {}
    for run_dir in find_run_dirs(paths):
        parsed = parse_run_name(run_dir.name)
        if parsed is None:
            print(f"note: skipping {run_dir} (its name is not env__exp_name__seed__timestamp)", file=sys.stderr)
            continue
        config = read_run_config(run_dir)
        configuration = None if config is None else {  # a field set to None counts as one a run does not have
            k: v for k, v in config.items() if k not in NOT_CONFIGURATION and v is not None}
        run = Run(run_dir, *parsed, script=run_script_name(run_dir, parsed[1], config), configuration=configuration)
        key = (run.script, run.env, run.exp_name, json.dumps(configuration, sort_keys=True), run.seed)
        if key in runs:
            older, newer = sorted([runs[key], run], key=lambda r: (r.timestamp, r.path.name))
            print(f"note: dropping {older.path}: {newer.path} is a newer run of the same script, env, exp_name, "
                  f"configuration and seed", file=sys.stderr)
            run = newer
        runs[key] = run
    if not runs:
        raise UserError(f"no run folders with TensorBoard event files under {' '.join(map(str, paths))}")
    all_tags = {}
    for run in runs.values():
        all_tags[run.path] = read_scalars(run.path)
        run.scalars = {tag: series for tag, series in all_tags[run.path].items()
                       if any(fnmatch.fnmatchcase(tag, pattern) for pattern in tag_patterns)}
    kept = [run for run in runs.values() if run.scalars]
    if not kept:
        known = sorted({tag for tags in all_tags.values() for tag in tags})
        raise UserError(f"no scalar tag matches {' '.join(tag_patterns)} in {plural(len(runs), 'run')}; tags there: "
                        f"{' '.join(known[:30])}")
    for run in runs.values():
        if not run.scalars:
            print(f"note: leaving out {run.path}: it logged no tag matching {' '.join(tag_patterns)}", file=sys.stderr)
    label_configurations(kept)
    groups = defaultdict(list)
    for run in kept:
        groups[(run.script, run.env, run.exp_name, run.config)].append(run)
    for (script, env, exp_name, config), group in sorted(groups.items()):
        if len(group) > 1:
            seeds = ", ".join(str(run.seed) for run in sorted(group, key=lambda r: r.seed))
            print(f"note: averaging {plural(len(group), 'seed')} ({seeds}) of {script} {env} {exp_name} (config "
                  f"{config}): same configuration", file=sys.stderr)
    return sorted(kept, key=lambda r: (r.script, r.env, r.exp_name, r.config, r.seed))


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
    """One row per (script, env, exp_name, config, tag): the final value of every seed, their mean and sample std
    (ddof=1)."""
    groups = defaultdict(list)
    for run in runs:
        groups[(run.script, run.env, run.exp_name, run.config)].append(run)
    rows = []
    for (script, env, exp_name, config), group in sorted(groups.items()):
        for tag in tags:
            per_seed = {run.seed: final_value(run.scalars[tag][1], window) for run in group if tag in run.scalars}
            if not per_seed:
                continue
            values = np.array(list(per_seed.values()))
            rows.append(dict(script=script, env=env, exp_name=exp_name, config=config, tag=tag, seeds=sorted(per_seed),
                             per_seed={str(k): v for k, v in sorted(per_seed.items())}, mean=float(values.mean()),
                             std=float(values.std(ddof=1)) if len(values) > 1 else float("nan"), n=len(values)))
    return rows


def format_number(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.6g}"


def markdown_table(rows: list[dict], tags: list[str], window: int) -> str:
    """Rows (script, env, exp_name, config), one column per tag: 'mean +- std (n)'."""
    what = "last logged value" if window == 1 else f"mean of the last {window} logged values"
    lines = [f"Final values ({what} per run; mean +- sample std across seeds, seed count in brackets)", "",
             "| script | env | exp_name | config | " + " | ".join(tags) + " |",
             "|---|---|---|---|" + "---|" * len(tags)]
    cells = defaultdict(dict)
    for row in rows:
        std = "" if row["n"] < 2 else f" +- {format_number(row['std'])}"
        cells[(row["script"], row["env"], row["exp_name"], row["config"])][row["tag"]] = (
            f"{format_number(row['mean'])}{std} ({row['n']})")
    for (script, env, exp_name, config), by_tag in sorted(cells.items()):
        lines.append(f"| {script} | {env} | {exp_name} | {config} | " + " | ".join(by_tag.get(tag, "") for tag in tags)
                     + " |")
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
        lines = sorted({(run.exp_name, run.config) for run in mine})  # one per (exp_name, configuration)
        for colour, (exp_name, config) in enumerate(lines):
            group = [run for run in mine if (run.exp_name, run.config) == (exp_name, config)]
            steps, values = align([(run.scalars[tag][0], ema_smooth(run.scalars[tag][1], smooth)) for run in group])
            low, high = band(values, band_kind)
            name = exp_name if config == "-" else f"{exp_name}, {config}"
            ax.plot(steps, values.mean(axis=0), color=f"C{colour}", label=f"{name} ({plural(len(group), 'seed')})")
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
    runs = load_runs(args.paths, patterns)  # each with at least one of the tags
    tags = sorted({tag for run in runs for tag in run.scalars})
    out_dir = Path(args.out_dir) if args.out_dir is not None else default_out_dir(Path(args.paths[0]))
    for tag in tags:
        path = out_dir / f"{tag_file_name(tag)}.png"
        plot_tag(runs, tag, path, args.smooth, args.band)
        print(f"wrote {path}")
    rows = summarise(runs, tags, args.final_window)
    table = markdown_table(rows, tags, args.final_window)
    (out_dir / "final_values.md").write_text(table)
    (out_dir / "final_values.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out_dir / 'final_values.md'} and final_values.json ({plural(len(runs), 'run')} in "
          f"{plural(len({(r['script'], r['env'], r['exp_name'], r['config']) for r in rows}), 'row')})\n")
    print(table)
    return rows


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
