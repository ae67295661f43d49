# cleanworlds benchmark: why a diamond_atari.py run on Catch did or did not learn. Results: RESULTS.md section 3e
"""
Two measurements on a finished (or stopped) `diamond_atari.py --env-id Catch` run, from its checkpoint and episodes:

1. The reward/end model's reward sign on counterfactual actions. At the last decision of each of the run's episodes
   (the ball one row above the paddle's), every action is stepped in Catch itself from the state read off the frame,
   and the model predicts the sign from the real frames (its LSTM burnt in on the c - 1 transitions before, as
   imagination does). Accuracy per (action the collector took or not) x (catch or miss). The run's logged recall is
   on transitions the policy took; the actor-critic needs the others to tell a better action from its own.
2. The actor-critic from scratch, --updates updates at --lr, in the run's world model and in Catch itself (a perfect
   world model: the same starts from the replay buffer, the same imagination code, rules read off each frame); its
   catch rate over --test-games real games every --every updates. If Catch-as-model learns and the world model does
   not, the world model is what limits the run.

    python benchmark/diamond_catch_diagnosis.py runs/Catch__diamond_atari__1__1796640817
    python benchmark/diamond_catch_diagnosis.py runs/Catch__diamond_atari__1__1796640817 --agents   # the agents' curve
"""
import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def load_script():
    spec = importlib.util.spec_from_file_location("diamond_atari_diagnosis", ROOT / "diamond_atari.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read_state(env, frame: np.ndarray):
    """(ball row, ball column, paddle column) of a Catch frame uint8 (H, W, 3), each cell's mean colour matched to
    the nearest of the palette (a generated frame's colours are not exact); None if it shows no single ball."""
    names = list(env.colours)
    palette = np.array([env.colours[name] for name in names], dtype=float)
    cell = lambda r, c: names[int(((palette - frame[env.cell_pixels(r, c)].reshape(-1, 3).mean(0)) ** 2)  # noqa: E731
                                  .sum(1).argmin())]
    balls = [(r, c) for r in range(env.rows) for c in range(env.columns) if cell(r, c) == "ball"]
    paddle = [c for c in range(env.columns) if cell(env.rows - 1, c) == "paddle"]
    if len(balls) != 1 or len(paddle) > 1:
        return None
    return (*balls[0], paddle[0] if paddle else balls[0][1])  # no paddle colour: the ball is over it


def load_run(dia, run_dir: Path):
    checkpoint = dia.load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    args = dia.Args(**checkpoint["args"])
    env = dia.make_env(args, args.seed)
    denoiser, reward_end, _ = dia.build_models(args, env.num_actions)
    denoiser.load_state_dict(checkpoint["models"]["denoiser"])
    reward_end.load_state_dict(checkpoint["models"]["reward_end"])
    buffer = dia.ReplayBuffer(run_dir / "episodes", args.recency_weights, args.num_conditioning_steps)
    for i in range(checkpoint["num_buffer_files"]):
        buffer.add(dia.load_episode(buffer.folder / f"episode_{i:06d}.npz", args.obs_size, env.num_actions),
                   write=False)
    return args, env, denoiser.eval(), reward_end.eval(), buffer


@torch.no_grad()
def counterfactual_rewards(dia, args, env, reward_end, buffer) -> dict:
    """Accuracy of the predicted reward sign at each episode's last decision, for every action (see 1. above)."""
    c, cpu, hits = args.num_conditioning_steps, torch.device("cpu"), {}
    for index in range(len(buffer.episodes)):
        T = len(buffer.episode(index)["actions"])
        batch = buffer.segments([(index, T - c)], c + 1)
        obs, actions = dia.segment_obs(batch, cpu), batch["actions"]
        state = read_state(env, dia.to_uint8(obs[0, c - 1]).permute(1, 2, 0).numpy())
        if state is None or state[0] != env.rows - 2:
            continue
        _, _, hidden = reward_end(obs[:, :c - 1], actions[:, :c - 1], obs[:, 1:c])
        for action in range(env.num_actions):
            env.ball_row, env.ball_col, env.paddle_col = state
            env.game_over = False
            frame, reward, _, _ = env.step(action)
            next_obs = dia.to_float(torch.from_numpy(frame).permute(2, 0, 1))[None, None]
            logits, _, _ = reward_end(obs[:, c - 1:c], torch.tensor([[action]]), next_obs, hidden)
            key = ("taken" if action == int(actions[0, c - 1]) else "not taken", "catch" if reward > 0 else "miss")
            hits.setdefault(key, []).append(int(logits[0, 0].argmax()) - 1 == np.sign(reward))
    return {key: (float(np.mean(value)), len(value)) for key, value in sorted(hits.items())}


def catch_as_model(dia, base):
    """A WorldModelEnv whose networks are Catch itself, inside the script's own imagination step: the denoiser's
    D(x) is the next frame by bsuite's rules from the state read off each env's last frame and its action, the
    reward/end model's logits are that step's reward sign and end, certain. A game that is over (or unreadable) ends
    there."""

    def catch_step(obs, act):  # last frames (n, 3, H, W) in [-1, 1], actions (n,) -> next frames, rewards, ends
        env, frames, rewards, ends = dia.CatchEnv(obs.shape[-1]), [], [], []
        for frame, a in zip(dia.to_uint8(obs).permute(0, 2, 3, 1).numpy(), act.tolist()):
            state = read_state(env, frame)
            reward, terminated = 0.0, True
            if state is not None and state[0] < env.rows - 1:
                env.ball_row, env.ball_col, env.paddle_col = state
                env.game_over = False
                frame, reward, terminated, _ = env.step(a)
            frames.append(frame)
            rewards.append(reward)
            ends.append(terminated)
        next_obs = dia.to_float(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2))
        return next_obs, torch.tensor(rewards).long(), torch.tensor(ends).long()

    def certain(k, classes):  # logits whose softmax is one-hot at k
        return torch.nn.functional.one_hot(k, classes).float() * 1e4

    class CatchDenoiser:
        def __call__(self, x, sigma, past, act, net=None):  # (F output, D(x)) as the script's Denoiser
            return None, catch_step(past[:, -3:], act[:, -1])[0]

    class CatchRewardEnd(torch.nn.Module):
        def forward(self, obs, act, next_obs, hidden=None):  # the burn-in on a start's real transitions: no state
            return None, None, (torch.zeros(1, len(act), 1), torch.zeros(1, len(act), 1))

        def step(self, obs, act, next_obs, hidden):
            _, reward, end = catch_step(obs, act)
            return certain(reward.sign() + 1, 3), certain(end, 2), hidden

    class CatchModel(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.denoiser, self.reward_end_model = CatchDenoiser(), CatchRewardEnd()

    return CatchModel


def train_actor_critic(dia, args, env, denoiser, reward_end, buffer, world, opts) -> list[tuple[int, float]]:
    """A fresh actor-critic trained in `world` (the run's model or Catch); its catch rate every opts.every updates."""
    cpu = torch.device("cpu")
    torch.manual_seed(opts.seed)
    actor_critic = dia.build_models(args, env.num_actions)[2]
    generator, cpu_generator = torch.Generator().manual_seed(opts.seed), torch.Generator().manual_seed(opts.seed + 1)
    cls = dia.WorldModelEnv if world == "world model" else catch_as_model(dia, dia.WorldModelEnv)
    wm_env = cls(denoiser, reward_end, buffer, args, cpu, generator, cpu_generator)
    optimizer = torch.optim.AdamW(actor_critic.parameters(), lr=opts.lr, eps=args.adam_eps, weight_decay=0.0)
    curve = []
    for update in range(1, opts.updates + 1):
        loss, _ = dia.actor_critic_loss(actor_critic, wm_env, args, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(actor_critic.parameters(), args.max_grad_norm)
        optimizer.step()
        if update % opts.every == 0 or update == opts.updates:
            returns = dia.run_test_episodes(actor_critic, args, opts.test_games, opts.seed + 7, cpu)
            curve.append((update, (float(np.mean(returns)) + 1) / 2))  # catch rate = (mean return + 1) / 2
    return curve


def main(argv=None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a diamond_atari.py run folder on Catch")
    parser.add_argument("--updates", type=int, default=300, help="actor-critic updates in each world")
    parser.add_argument("--lr", type=float, default=1e-3, help="the actor-critic's learning rate")
    parser.add_argument("--every", type=int, default=100, help="test the catch rate every this many updates")
    parser.add_argument("--test-games", type=int, default=200, help="real games per test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--agents", action="store_true",
                        help="only test the run's agent copies (checkpoints/agent_epoch_*.pt) and its last agent")
    opts = parser.parse_args(argv)
    run_dir = Path(opts.run)
    bad = [f"--{name.replace('_', '-')} must be >= 1, not {getattr(opts, name)}" for name in
           ("updates", "every", "test_games") if getattr(opts, name) < 1]
    bad += [f"--lr must be a positive number, not {opts.lr}"] if not 0 < opts.lr < float("inf") else []
    bad += [f"--seed must be in [0, 2**62), not {opts.seed}"] if not 0 <= opts.seed < 2 ** 62 else []
    if not (run_dir / "checkpoints" / "latest.pt").is_file():
        bad.append(f"no checkpoint at {run_dir / 'checkpoints' / 'latest.pt'}: give a diamond_atari.py run folder")
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    dia = load_script()
    try:  # a damaged checkpoint, episode or agent file: the script's own one-line reason
        args, env, denoiser, reward_end, buffer = load_run(dia, run_dir)
        if args.env_id != "Catch":
            raise dia.UserError(f"{run_dir} is a run on {args.env_id}, not Catch")
        return diagnose(dia, run_dir, args, env, denoiser, reward_end, buffer, opts)
    except dia.UserError as e:
        print(f"error: {str(e).replace('; resume from another checkpoint', '')}", file=sys.stderr)
        return 2


def diagnose(dia, run_dir: Path, args, env, denoiser, reward_end, buffer, opts) -> int:
    print(f"run: {run_dir} ({len(buffer.episodes)} episodes)")
    if opts.agents:  # the curve of agents the run kept: each on the same --test-games real games
        for path in sorted((run_dir / "checkpoints").glob("agent_epoch_*.pt")) + [run_dir / "checkpoints" /
                                                                                   "latest.pt"]:
            actor_critic = dia.build_models(args, env.num_actions)[2]
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                actor_critic.load_state_dict(state["models"]["actor_critic"] if "models" in state else state)
            except Exception as e:  # noqa: BLE001 - any damage to the file: one line naming it
                raise dia.UserError(f"cannot read the agent in {path} ({type(e).__name__}); remove the file") from None
            returns = dia.run_test_episodes(actor_critic, args, opts.test_games, opts.seed + 7, torch.device("cpu"))
            print(f"{path.name}: catch rate {(float(np.mean(returns)) + 1) / 2:.3f} over {opts.test_games} games")
        return 0
    for (taken, outcome), (accuracy, count) in counterfactual_rewards(dia, args, env, reward_end, buffer).items():
        print(f"reward sign at the last decision, action {taken}, {outcome}: accuracy {accuracy:.3f} ({count} cases)")
    for world in ("world model", "Catch"):
        start = time.perf_counter()
        curve = train_actor_critic(dia, args, env, denoiser, reward_end, buffer, world, opts)
        where = "the run's world model" if world == "world model" else "Catch itself"
        print(f"actor-critic from scratch in {where}: catch rate " + ", ".join(
            f"{rate:.3f} after {update}" for update, rate in curve) + f" ({time.perf_counter() - start:.0f} s)",
            flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
