# cleanworlds benchmark: Atari 100k human-normalised scores, mean/median HNS and IQM. Results: benchmark/RESULTS.md
"""
Aggregates Atari 100k runs (diamond_atari.py, or any CSV of scores) the way the DIAMOND paper reports them.

    python benchmark/atari_scores.py runs/                                   # final eval/test_episodic_return per run
    python benchmark/atari_scores.py runs/ --tag eval/final_return --out scores.md
    python benchmark/atari_scores.py --csv scores.csv                       # columns: game,seed,score

Each run folder `{env_id}__{exp_name}__{seed}__{timestamp}` gives one score: the last logged value of `--tag` (the
mean return of the evaluation episodes logged at the end of training). When a game and seed appear twice, the newest
run folder is used. Definitions (as in the DIAMOND paper and rliable, Agarwal et al. 2021):
- HNS = (score - random) / (human - random), with the random and human scores below.
- Mean HNS and median HNS: of the per-game means over seeds (rliable's aggregate_mean / aggregate_median).
- IQM: over all runs (games x seeds) pooled, exactly rliable's aggregate_iqm = scipy.stats.trim_mean(x, 0.25,
  axis=None): sort the N values, drop int(0.25 N) from each end (no fractional weighting of boundary items), and
  average the rest. For DIAMOND's 26 games x 5 seeds: N = 130, 32 dropped at each end, the mean of the middle 66.
- 95% confidence intervals (with --bootstrap R): percentile stratified bootstrap as rliable does it (resample the
  seeds of each game with replacement, keep the games), R repetitions, a fixed seed.
- Superhuman games: per-game mean HNS >= 1.
"""
import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np

# (random, human) scores of the 26 Atari 100k games: the Random and Human columns of DIAMOND's Table 1 (arXiv
# 2405.12399), the same scores IRIS, SPR and DER normalise with.
RANDOM_HUMAN = {
    "Alien": (227.8, 7127.7), "Amidar": (5.8, 1719.5), "Assault": (222.4, 742.0), "Asterix": (210.0, 8503.3),
    "BankHeist": (14.2, 753.1), "BattleZone": (2360.0, 37187.5), "Boxing": (0.1, 12.1), "Breakout": (1.7, 30.5),
    "ChopperCommand": (811.0, 7387.8), "CrazyClimber": (10780.5, 35829.4), "DemonAttack": (152.1, 1971.0),
    "Freeway": (0.0, 29.6), "Frostbite": (65.2, 4334.7), "Gopher": (257.6, 2412.5), "Hero": (1027.0, 30826.4),
    "Jamesbond": (29.0, 302.8), "Kangaroo": (52.0, 3035.0), "Krull": (1598.0, 2665.5),
    "KungFuMaster": (258.5, 22736.3), "MsPacman": (307.3, 6951.6), "Pong": (-20.7, 14.6),
    "PrivateEye": (24.9, 69571.3), "Qbert": (163.9, 13455.0), "RoadRunner": (11.5, 7845.0),
    "Seaquest": (68.4, 42054.7), "UpNDown": (533.4, 11693.2),
}
# DIAMOND (Alonso et al. 2024, arXiv 2405.12399) Table 1: mean return over 5 seeds (100 test episodes each).
DIAMOND_PAPER_SCORES = {
    "Alien": 744.1, "Amidar": 225.8, "Assault": 1526.4, "Asterix": 3698.5, "BankHeist": 19.7, "BattleZone": 4702.0,
    "Boxing": 86.9, "Breakout": 132.5, "ChopperCommand": 1369.8, "CrazyClimber": 99167.8, "DemonAttack": 288.1,
    "Freeway": 33.3, "Frostbite": 274.1, "Gopher": 5897.9, "Hero": 5621.8, "Jamesbond": 427.4, "Kangaroo": 5382.2,
    "Krull": 8610.1, "KungFuMaster": 18713.6, "MsPacman": 1958.2, "Pong": 20.4, "PrivateEye": 114.3,
    "Qbert": 4499.3, "RoadRunner": 20673.2, "Seaquest": 551.2, "UpNDown": 3856.3,
}
DIAMOND_PAPER_AGGREGATES = {"mean_hns": 1.46, "iqm": 0.64, "superhuman": 11}  # IQM over the 130 runs
RUN_NAME = re.compile(r"^(?P<env>.+?)__(?P<exp>.+)__(?P<seed>-?\d+)__(?P<time>\d+)_*$")
_GAMES_LOWER = {name.lower(): name for name in RANDOM_HUMAN}


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""


def game_name(env_id: str) -> str:
    """'Breakout-v5', 'ALE/Breakout-v5', 'BreakoutNoFrameskip-v4', 'breakout' -> 'Breakout'."""
    name = env_id.split("/")[-1]
    name = re.sub(r"(NoFrameskip|Deterministic)?-v\d+$", "", name)
    if name.lower() not in _GAMES_LOWER:
        raise UserError(f"{env_id!r} is not one of the 26 Atari 100k games ({', '.join(RANDOM_HUMAN)})")
    return _GAMES_LOWER[name.lower()]


def human_normalized_score(game: str, score):
    """HNS = (score - random) / (human - random)."""
    random_score, human_score = RANDOM_HUMAN[game_name(game)]
    return (np.asarray(score, dtype=np.float64) - random_score) / (human_score - random_score)


def iqm(values) -> float:
    """Interquartile mean as rliable's aggregate_iqm, i.e. scipy.stats.trim_mean(values, 0.25, axis=None): drop
    int(0.25 N) of the sorted values at each end and average the rest (boundary items are not weighted
    fractionally)."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size == 0:
        return float("nan")
    cut = int(0.25 * x.size)
    return float(x[cut: x.size - cut].mean())


def aggregate_hns(hns_by_game: dict) -> dict:
    """Mean/median of per-game means, IQM over all runs, superhuman games. hns_by_game: game -> HNS per seed."""
    per_game_means = np.array([np.mean(v) for v in hns_by_game.values()])
    all_runs = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in hns_by_game.values()])
    return {"mean_hns": float(per_game_means.mean()), "median_hns": float(np.median(per_game_means)),
            "iqm": iqm(all_runs), "superhuman": int((per_game_means >= 1.0).sum()),
            "num_games": len(per_game_means), "num_runs": int(all_runs.size)}


def stratified_bootstrap(hns_by_game: dict, repetitions: int = 2000, seed: int = 0) -> dict:
    """95% percentile intervals of mean HNS, median HNS and IQM, resampling the seeds within each game."""
    rng = np.random.default_rng(seed)
    games = [np.asarray(v, dtype=np.float64).ravel() for v in hns_by_game.values()]
    samples = {"mean_hns": [], "median_hns": [], "iqm": []}
    for _ in range(repetitions):
        resampled = {i: g[rng.integers(0, g.size, g.size)] for i, g in enumerate(games)}
        result = aggregate_hns(resampled)
        for key in samples:
            samples[key].append(result[key])
    return {key: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for key, v in samples.items()}


def read_event_scores(paths, tag: str) -> dict:
    """(game, seed) -> last logged value of tag, from the run folders under paths (the newest folder wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise UserError(f"{given} does not exist (give runs/ folders or run folders)")
        for event_file in sorted([root] if root.is_file() else root.rglob("events.out.tfevents.*")):
            run_dir = event_file.parent
            match = RUN_NAME.match(run_dir.name)
            if match is None:
                continue
            try:
                game = game_name(match["env"])
            except UserError:
                print(f"note: skipping {run_dir} ({match['env']} is not an Atari 100k game)", file=sys.stderr)
                continue
            key, stamp = (game, int(match["seed"])), (int(match["time"]), run_dir.name)
            if key in found and found[key][0] >= stamp:
                continue
            found[key] = (stamp, run_dir)
    scores = {}
    for key, (_, run_dir) in sorted(found.items()):
        accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag not in accumulator.Tags()["scalars"]:
            print(f"note: {run_dir} has no {tag} yet; left out", file=sys.stderr)
            continue
        events = accumulator.Scalars(tag)
        scores[key] = float(max(events, key=lambda e: (e.step, e.wall_time)).value)
    return scores


def read_csv_scores(path: str) -> dict:
    """(game, seed) -> score from a CSV with a header game,seed,score (extra columns are ignored)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not rows or not {"game", "seed", "score"} <= set(rows[0]):
        raise UserError(f"{path} needs a header with the columns game,seed,score")
    scores = {}
    for i, row in enumerate(rows, start=2):
        try:
            key, score = (game_name(row["game"].strip()), int(row["seed"])), float(row["score"])
        except (ValueError, TypeError):
            raise UserError(f"{path} line {i}: seed must be an integer and score a number") from None
        if key in scores:
            raise UserError(f"{path} line {i}: {key[0]} seed {key[1]} appears twice")
        scores[key] = score
    return scores


def report(scores: dict, bootstrap: int = 0) -> tuple[str, dict]:
    """A markdown report: per-game scores and HNS beside the DIAMOND paper, then the aggregates."""
    by_game = {}
    for (game, seed), score in sorted(scores.items()):
        by_game.setdefault(game, {})[seed] = score
    hns_by_game = {game: human_normalized_score(game, list(s.values())) for game, s in by_game.items()}
    result = aggregate_hns(hns_by_game)
    lines = ["| game | seeds | score (mean +- std) | HNS | DIAMOND paper score | paper HNS |",
             "|---|---|---|---|---|---|"]
    for game, seeds in by_game.items():
        values = np.array(list(seeds.values()))
        std = f" +- {values.std(ddof=1):.1f}" if len(values) > 1 else ""
        paper = DIAMOND_PAPER_SCORES[game]
        lines.append(f"| {game} | {len(values)} | {values.mean():.1f}{std} | {hns_by_game[game].mean():.3f} | "
                     f"{paper} | {float(human_normalized_score(game, paper)):.3f} |")
    missing = [g for g in RANDOM_HUMAN if g not in by_game]
    paper = DIAMOND_PAPER_AGGREGATES
    lines += ["", f"{result['num_runs']} runs on {result['num_games']} games"
              + (f" (missing: {', '.join(missing)})" if missing else ""), "",
              "| metric | this benchmark | DIAMOND paper (26 games x 5 seeds) |", "|---|---|---|"]
    intervals = stratified_bootstrap(hns_by_game, bootstrap) if bootstrap else {}

    def cell(key):
        low_high = f" [{intervals[key][0]:.3f}, {intervals[key][1]:.3f}]" if key in intervals else ""
        return f"{result[key]:.3f}{low_high}"

    lines += [f"| mean HNS (of per-game means) | {cell('mean_hns')} | {paper['mean_hns']} |",
              f"| median HNS (of per-game means) | {cell('median_hns')} | |",
              f"| IQM HNS (all runs, 25% trimmed) | {cell('iqm')} | {paper['iqm']} |",
              f"| superhuman games (mean HNS >= 1) | {result['superhuman']} | {paper['superhuman']} |"]
    if intervals:
        lines.append(f"\n[95% stratified bootstrap intervals, {bootstrap} repetitions]")
    return "\n".join(lines) + "\n", result


def main(argv=None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("paths", nargs="*", help="runs/ folders (searched recursively) or run folders")
    parser.add_argument("--csv", action="append", default=[], help="CSV file(s) with columns game,seed,score")
    parser.add_argument("--tag", default="eval/test_episodic_return",
                        help="the scalar holding a run's final score (the test episodes at the end of training)")
    parser.add_argument("--bootstrap", type=int, default=0, help="stratified bootstrap repetitions for 95%% CIs")
    parser.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    if not args.paths and not args.csv:
        raise UserError("give run folders or --csv scores.csv (columns game,seed,score)")
    scores = read_event_scores(args.paths, args.tag) if args.paths else {}
    for path in args.csv:
        scores.update(read_csv_scores(path))
    if not scores:
        raise UserError(f"no Atari runs with {args.tag} under {' '.join(args.paths)}")
    text, result = report(scores, args.bootstrap)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
