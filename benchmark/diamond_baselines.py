# cleanworlds benchmark: the baselines DIAMOND's CPU-scale agent is compared with. Results: benchmark/RESULTS.md
"""
Two baselines under exactly the protocol of diamond_atari.py's test episodes, and the table that puts the agent's
pooled test returns beside them (benchmark/diamond_learns.sh runs both).

    python benchmark/diamond_baselines.py --games Breakout-v5 Boxing-v5 --episodes 100 --max-episode-steps 500 \
        --out benchmark/out/diamond_learns/baselines.json
    python benchmark/diamond_baselines.py --summarize benchmark/out/diamond_learns \
        --baselines benchmark/out/diamond_learns/baselines.json --logs benchmark/logs

The environment is diamond_atari.py's own AtariEnv (imported from the script file), made as its test episodes make it:
full games (life loss does not end them), no sticky actions, up to 30 no-ops at the start, frame skip 4 with max-pool,
the same --max-episode-steps cap. Baselines:
- random: each action uniformly at random at every step;
- best single action: every action of the minimal set repeated for a whole game, --screen-episodes games each; the
  action with the best mean is then played for --episodes fresh games (other seeds), which is the figure reported
  (choosing it on separate games keeps the selection from inflating its score).

The agent's figure: each run's final test ("N test episodes after E epochs ...: mean return M (std S)" in its log,
S the population standard deviation), pooled over the seeds of a game: mean of all episodes, sample std from the
per-run means and stds, 95% CI = mean +- 1.96 std / sqrt(n). Baselines use the same CI over their episodes.
"""
import argparse
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "diamond_atari.py"
# the final test of a run that finished, or --eval-only on a run's checkpoint (a run stopped before its last epoch)
TEST_LINE = re.compile(r"^(\d+) test episodes (?:after (\d+) epochs, (\d+) env steps|with the agent of epoch (\d+)())"
                       r".*?: mean return (-?[\d.]+) \(std ([\d.]+)\)", re.M)
RUN_NAME = re.compile(r"^(?P<env>.+?)__(?P<exp>.+)__(?P<seed>-?\d+)__(?P<time>\d+)$")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def load_script():
    spec = importlib.util.spec_from_file_location("diamond_atari", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def play(da, game: str, policy, num_episodes: int, seed: int, max_episode_steps: int, num_actions: int) -> list:
    """num_episodes full games with policy(rng) -> action; each game's env seeded as run_test_episodes seeds them."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    returns = []
    for i in range(num_episodes):
        env = da.AtariEnv(game, obs_size=32, frame_skip=4, noop_max=30, sticky_actions=False,
                          max_episode_steps=max_episode_steps, end_on_life_loss=False, generator=generator,
                          seed=seed * 1000 + i)
        env.reset()
        while True:
            _, _, terminated, truncated = env.step(policy(rng))
            if terminated or truncated:
                break
        returns.append(env.game_return)
        env.env.close()
    return returns


def ci(values) -> dict:
    x = np.asarray(values, dtype=np.float64)
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return {"mean": float(x.mean()), "std": std, "n": len(x), "ci95": 1.96 * std / math.sqrt(len(x))}


def baselines(args):
    da = load_script()
    out = Path(args.out)
    settings = {"episodes": args.episodes, "screen_episodes": args.screen_episodes,
                "max_episode_steps": args.max_episode_steps, "seed": args.seed}
    results = json.loads(out.read_text()) if out.exists() else {}
    for env_id in args.games:
        game, canonical = da.canonical_env_id(env_id)
        if results.get(canonical, {}).get("settings") == settings:
            print(f"{canonical}: baselines already in {out}", flush=True)
            continue
        num_actions = da.AtariEnv(game).num_actions
        random_returns = play(da, game, lambda rng: int(rng.integers(num_actions)), args.episodes, args.seed,
                              args.max_episode_steps, num_actions)
        screen = {}
        for a in range(num_actions):
            screen[a] = float(np.mean(play(da, game, lambda rng, a=a: a, args.screen_episodes, args.seed + 1 + a,
                                           args.max_episode_steps, num_actions)))
        best = max(screen, key=screen.get)
        best_returns = play(da, game, lambda rng: best, args.episodes, args.seed + 1000, args.max_episode_steps,
                            num_actions)
        meanings = da.AtariEnv(game).env.get_action_meanings()
        results[canonical] = {"settings": settings, "random": ci(random_returns) | {"returns": random_returns},
                              "best_action": ci(best_returns) | {"returns": best_returns, "action": best,
                                                                  "meaning": meanings[best]},
                              "screen": {meanings[a]: v for a, v in screen.items()}}
        r, b = results[canonical]["random"], results[canonical]["best_action"]
        print(f"{canonical}: random {r['mean']:.2f} +- {r['ci95']:.2f} (n={r['n']}); best single action "
              f"{meanings[best]} {b['mean']:.2f} +- {b['ci95']:.2f} (n={b['n']}); screen ({args.screen_episodes} "
              f"games each): " + ", ".join(f"{m} {v:.2f}" for m, v in results[canonical]["screen"].items()),
              flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))


def agent_runs(out_dir: Path, logs: Path) -> dict:
    """{env: [(seed, n, mean, std, epochs, env_steps)]} from the last test line of each run's log (diamond_learns_<env>
    _<seed>.log, with the --eval-only output appended when the run was stopped early; env_steps -1 when unknown)."""
    runs = {}
    for log in sorted(logs.glob("diamond_learns_*_*.log")):
        m = re.fullmatch(r"diamond_learns_(.+)_(\d+)\.log", log.name)
        if not m:
            continue
        found = TEST_LINE.findall(log.read_text(errors="replace").replace("\r", "\n"))
        if found:
            n, epochs, env_steps, epochs_eval_only, _, mean, std = found[-1]
            runs.setdefault(m.group(1), []).append((int(m.group(2)), int(n), float(mean), float(std),
                                                   int(epochs or epochs_eval_only), int(env_steps or -1)))
    return runs


def pooled(rows) -> dict:
    """Pooled mean, sample std and 95% CI of all episodes from per-run (n, mean, population std)."""
    n = sum(r[1] for r in rows)
    mean = sum(r[1] * r[2] for r in rows) / n
    sum_sq = sum(r[1] * (r[3] ** 2 + r[2] ** 2) for r in rows)
    var = max(sum_sq / n - mean ** 2, 0.0) * n / max(n - 1, 1)
    std = math.sqrt(var)
    return {"mean": mean, "std": std, "n": n, "ci95": 1.96 * std / math.sqrt(n)}


def summarize(args):
    base = json.loads(Path(args.baselines).read_text())
    runs = agent_runs(Path(args.summarize), Path(args.logs))
    print("| game | DIAMOND --preset cpu (per seed) | DIAMOND pooled | random policy | best single action | "
          "agent - best baseline |")
    print("|---|---|---|---|---|---|")
    for env, rows in sorted(runs.items()):
        if env not in base:
            continue
        a, r, b = pooled(rows), base[env]["random"], base[env]["best_action"]
        best = max((r, "random"), (b, "action"), key=lambda x: x[0]["mean"])[0]
        diff = a["mean"] - best["mean"]
        diff_ci = 1.96 * math.sqrt(a["std"] ** 2 / a["n"] + best["std"] ** 2 / best["n"])
        seeds = ", ".join(f"seed {s}: {m:.2f} (n={n}, {e} epochs" + (f", {st} env steps)" if st >= 0 else ")")
                          for s, n, m, _, e, st in rows)
        print(f"| {env} | {seeds} | **{a['mean']:.2f} +- {a['ci95']:.2f}** (n={a['n']}) | {r['mean']:.2f} +- "
              f"{r['ci95']:.2f} (n={r['n']}) | {b['meaning']}: {b['mean']:.2f} +- {b['ci95']:.2f} (n={b['n']}) | "
              f"{diff:+.2f} +- {diff_ci:.2f} |")
    print("\n(+- = 95% CI of the mean, 1.96 std / sqrt(n); last column: agent minus the better baseline, with the CI "
          "of that difference)")


def main():
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--games", nargs="+", default=["Breakout-v5", "Boxing-v5"])
    parser.add_argument("--episodes", type=int, default=100, help="games of the random policy and of the best action")
    parser.add_argument("--screen-episodes", type=int, default=3, help="games per action to choose the best one")
    parser.add_argument("--max-episode-steps", type=int, default=500, help="the cap of the agent's runs")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--out", default="benchmark/out/diamond_learns/baselines.json")
    parser.add_argument("--summarize", default=None, help="a diamond_learns output folder: print the table")
    parser.add_argument("--baselines", default=None, help="baselines.json for --summarize")
    parser.add_argument("--logs", default="benchmark/logs", help="where the runs' logs are (diamond_learns_*.log)")
    args = parser.parse_args()
    if args.summarize:
        summarize(args)
    else:
        baselines(args)


if __name__ == "__main__":
    sys.exit(main())
