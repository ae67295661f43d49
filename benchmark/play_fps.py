# cleanworlds benchmark: the frame rate of playing a DIAMOND world model (--play), headless and windowed. RESULTS.md
"""
How many frames per second `diamond_atari.py --play` makes on this machine: the paper's networks (denoiser 4.4M,
reward/end model 5.9M parameters, 64x64 frames, a 4-action game), with freshly initialised weights (the frame rate
does not depend on what the weights learned), at each number of sampling steps. A frame is one imagined step: the
denoiser's network calls (Euler: one per sampling step) plus the reward/end model's step, then the frame enlarged
and captioned for the screen or the MP4.

- headless: the session `--play-keys` runs (ImaginedGame stepped by play_keys), no window, no pygame;
- window: play_window with pygame, on SDL's dummy video driver when there is no display (SDL_VIDEODRIVER=dummy):
  what a window costs beyond generation (blitting the 512x538 frame); skipped when pygame is not installed.
The window is uncapped here (--play-fps caps it at 15 in use, the game's own rate).

    python benchmark/play_fps.py                       # 1 and 3 sampling steps, the threads torch picks
    python benchmark/play_fps.py --threads 2 --steps 1 3 --frames 30
    python benchmark/play_fps.py --size 32 --frames 3  # a quick check of the script itself (the tests run this)
"""
import argparse
import importlib.util
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def load_script(file_name: str):
    spec = importlib.util.spec_from_file_location(file_name[:-3], ROOT / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stand_alone_game(dia, args, num_sampling_steps: int, seed: int = 0):
    """An ImaginedGame on the paper's networks (random weights) that starts from random frames."""
    num_actions = 4
    torch.manual_seed(seed)
    denoiser, reward_end_model, _ = dia.build_models(args, num_actions)
    denoiser.eval(), reward_end_model.eval()
    args = replace(args, num_sampling_steps=num_sampling_steps)
    generator = torch.Generator().manual_seed(seed)
    c, size = args.num_conditioning_steps, args.obs_size
    start = torch.rand((1, c, 3, size, size), generator=generator) * 2 - 1

    def next_frame(obs, act):
        return dia.generate_next_obs(denoiser, obs, act, args, generator)

    def starts():
        return start.clone(), torch.zeros((1, c - 1), dtype=torch.long)

    return dia.ImaginedGame(next_frame, starts, reward_end_model, torch.Generator().manual_seed(seed))


def main(argv=None) -> list[dict]:
    parser = OneLineArgumentParser(prog="benchmark/play_fps.py", description=__doc__.strip(),
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 3], help="sampling steps per frame to measure")
    parser.add_argument("--frames", type=int, default=30, help="frames per measurement (after 2 warm-up frames)")
    parser.add_argument("--size", type=int, default=64, help="frame side (the paper: 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-window", action="store_true", help="headless only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dia = load_script("diamond_atari.py")
    config = dia.Args(obs_size=args.size)
    meanings = ["NOOP", "FIRE", "RIGHT", "LEFT"]
    keys = dia.parse_play_keys(("FRRLLN" * args.frames)[: args.frames], meanings)
    try:
        import pygame  # noqa: F401
        window = not args.no_window
    except ImportError:
        window = False
        print("pygame is not installed: the window is not measured (pip install pygame-ce)")
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy" if not os.environ.get("DISPLAY") else "")
    rows = []
    print(f"DIAMOND play, {args.size}x{args.size} frames, {torch.get_num_threads()} torch threads, "
          f"{args.frames} frames each")
    for steps in args.steps:
        game = stand_alone_game(dia, config, steps)
        dia.play_keys(game, keys[:2], meanings, 512)  # warm-up
        headless = dia.play_keys(game, keys, meanings, 512)["fps"]
        row = {"sampling_steps": steps, "headless_fps": headless}
        if window:
            game = stand_alone_game(dia, config, steps)
            row["window_fps"] = dia.play_window({"imagined": lambda: game}, meanings, Path("play_fps_unused"), 512,
                                                max_fps=1e6, max_steps=args.frames)
        rows.append(row)
        print(f"  {steps} sampling step{'s' if steps > 1 else ''}: headless {headless:.1f} frames/s" +
              (f", window ({os.environ.get('SDL_VIDEODRIVER') or 'display'}) {row['window_fps']:.1f} frames/s"
               if window else ""), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
