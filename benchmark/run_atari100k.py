# cleanworlds benchmark: run diamond_atari.py on many games x seeds in parallel. Results: benchmark/RESULTS.md
"""
Runs the Atari 100k benchmark: one diamond_atari.py process per (game, seed), `--workers` at a time, each with its
own log file; then aggregate with benchmark/atari_scores.py.

    python benchmark/run_atari100k.py --workers 4                          # 26 games x 5 seeds, 4 at a time
    python benchmark/run_atari100k.py --games Breakout,Pong --seeds 1-3 --workers 2 -- --preset small
    python benchmark/run_atari100k.py --print-commands > jobs.txt          # one line per run, for a SLURM array
    python benchmark/atari_scores.py runs/atari100k --bootstrap 2000       # mean HNS and IQM, as the paper

Everything after `--` goes to every diamond_atari.py call. Each run writes into `--output-dir` (default
runs/atari100k) and logs to `{output_dir}/logs/{game}__{seed}.log`. A run that exits 0 leaves a marker
`logs/{game}__{seed}.done`; calling the runner again skips those and continues the others: a run folder of that game
and seed with a checkpoint is resumed (`--resume`), exactly where it stopped. With CUDA_VISIBLE_DEVICES listing
several GPUs, the workers are spread over them (worker i gets GPU i mod n).
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The 26 games of Atari 100k (the order of DIAMOND's Table 1).
ATARI_100K_GAMES = ["Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
                    "ChopperCommand", "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero",
                    "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert",
                    "RoadRunner", "Seaquest", "UpNDown"]
RUN_NAME = re.compile(r"^(?P<env>.+?)__(?P<exp>.+)__(?P<seed>-?\d+)__(?P<time>\d+)_*$")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""


def parse_seeds(text: str) -> list[int]:
    """'1-5' -> [1, 2, 3, 4, 5]; '1,3,7' -> [1, 3, 7]."""
    seeds = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise UserError(f"--seeds {text!r}: use a range like 1-5 or a list like 1,3,7")
        seeds += list(range(int(low), int(high) + 1)) if dash else [int(low)]
    return seeds


def parse_games(text: str) -> list[str]:
    if text == "all":
        return list(ATARI_100K_GAMES)
    lower = {g.lower(): g for g in ATARI_100K_GAMES}
    games = []
    for name in text.split(","):
        key = re.sub(r"(NoFrameskip)?-v\d+$", "", name.strip().split("/")[-1]).lower()
        if key not in lower:
            raise UserError(f"--games: {name!r} is not an Atari 100k game ({', '.join(ATARI_100K_GAMES)})")
        games.append(lower[key])
    return games


def existing_run(output_dir: Path, game: str, seed: int):
    """The newest run folder of this game and seed that has a checkpoint, or None."""
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            match = RUN_NAME.match(p.name)
            if match and match["env"] == f"{game}-v5" and int(match["seed"]) == seed and \
                    (p / "checkpoints" / "latest.pt").is_file():
                found.append((int(match["time"]), p.name, p))
    return max(found)[2] if found else None


def command_for(script: str, game: str, seed: int, output_dir: Path, extra: list[str]) -> list[str]:
    resume = existing_run(output_dir, game, seed)
    if resume is not None:  # the run's arguments come from its checkpoint; only the extra (mutable) flags are passed
        return [sys.executable, str(ROOT / script), "--resume", str(resume), *extra]
    return [sys.executable, str(ROOT / script), "--env-id", f"{game}-v5", "--seed", str(seed),
            "--output-dir", str(output_dir), *extra]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--games", default="all", help="comma-separated games, or all (the 26 of Atari 100k)")
    parser.add_argument("--seeds", default="1-5", help="a range (1-5) or a list (1,3,7)")
    parser.add_argument("--workers", type=int, default=1, help="runs at the same time")
    parser.add_argument("--output-dir", default="runs/atari100k", help="where the run folders and logs go")
    parser.add_argument("--script", default="diamond_atari.py", help="the script to run (relative to the repository)")
    parser.add_argument("--print-commands", action="store_true", help="print one shell command per run and exit")
    ns = parser.parse_args(argv)
    if ns.workers < 1:
        raise UserError(f"--workers must be at least 1, not {ns.workers}")
    games, seeds = parse_games(ns.games), parse_seeds(ns.seeds)
    output_dir = Path(ns.output_dir)
    logs = output_dir / "logs"
    jobs = [(game, seed) for seed in seeds for game in games]  # seed-major: every game gets seed 1 first
    if ns.print_commands:
        for game, seed in jobs:
            print(shlex.join(command_for(ns.script, game, seed, output_dir, extra)))
        return 0
    logs.mkdir(parents=True, exist_ok=True)
    pending = [job for job in jobs if not (logs / f"{job[0]}__{job[1]}.done").exists()]
    print(f"{len(jobs)} runs, {len(jobs) - len(pending)} already done, {len(pending)} to go, {ns.workers} at a time",
          flush=True)
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    running, failed, finished, slot_free = {}, [], 0, list(range(ns.workers))
    while pending or running:
        while pending and slot_free:
            game, seed = pending.pop(0)
            slot = slot_free.pop(0)
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            cmd = command_for(ns.script, game, seed, output_dir, extra)
            log = open(logs / f"{game}__{seed}.log", "a")
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[process] = (game, seed, slot, log, time.time())
            print(f"started {game} seed {seed} (pid {process.pid})", flush=True)
        time.sleep(0.2)
        for process in [p for p in running if p.poll() is not None]:
            game, seed, slot, log, started = running.pop(process)
            log.close()
            slot_free.append(slot)
            if process.returncode == 0:
                (logs / f"{game}__{seed}.done").write_text(f"{time.time() - started:.0f} s\n")
                finished += 1
            else:
                failed.append((game, seed, process.returncode))
            print(f"{'finished' if process.returncode == 0 else 'FAILED'} {game} seed {seed} "
                  f"(exit {process.returncode}, {time.time() - started:.0f} s)", flush=True)
    print(f"{finished} finished, {len(failed)} failed"
          + ("".join(f"\n  {g} seed {s}: exit {rc}, see {logs / f'{g}__{s}.log'}" for g, s, rc in failed)))
    if not failed:
        print(f"aggregate: python benchmark/atari_scores.py {output_dir} --bootstrap 2000")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
