# cleanworlds benchmark: does a trained sprites model move the sprite the way the play keys say? Results: RESULTS.md
"""
Learned steering, measured through `video_diffusion.py --play` itself: a model trained on the sprites world (the
README's CPU recipe: 8x8 frames with a 2x2 square, 6 frames, 3 context frames, 1000 steps, about 3 minutes on a quiet
core) is played from held-out starts with fixed key sequences, and every step's sprite move in the generated frames
(the centroid of the saturated pixels, frame to frame) is compared with the key. The real sprites world is played
from the same starts with the same keys: a step counts only where the real sprite moved (a key into a wall moves
nothing), and there the real world follows the key by construction. Chance is 1/4 (four directions; a sprite that
does not move scores 0).

Writes {out}/steering.json (per-key and overall follow rates) and {out}/steering.png: real and generated rows of a few
sessions, each frame headed by the key that led into it.

    python benchmark/play_steering.py                                  # trains (about 3 min), then plays
    python benchmark/play_steering.py --run runs/play_steering/sprites__...  # plays an existing sprites run
    python benchmark/play_steering.py --total-steps 20 --starts 2      # a quick check of the script (the tests)
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
KEYS = ["RRRDDD", "LLLUUU", "DDDRRR", "UUULLL"]  # each start plays one of these (start i: KEYS[i % 4])
TRAIN = ["--preset", "tiny", "--img-size", "8", "--num-frames", "6", "--num-distractors", "0", "--num-sprite-clips",
         "2048", "--batch-size", "32", "--learning-rate", "1e-3", "--context-frames", "3", "--cfg-scale", "3",
         "--cond-drop-prob", "0.5", "--null-cond-prob", "0.1", "--log-every", "100", "--num-eval-samples", "16",
         "--sample-batch-size", "16", "--long-video-frames", "6", "--exp-name", "play_steering"]


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def load_script(file_name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(file_name[:-3], ROOT / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def steps_moved(vd, frames: np.ndarray) -> np.ndarray:
    """uint8 (T + 1, H, W, 3) frames -> the sprite's move at each of the T steps (index into DIRECTIONS, -1: none)."""
    clips = frames.transpose(3, 0, 1, 2)[None]  # (1, 3, T + 1, H, W)
    return np.array([vd.movement_directions(clips[:, :, t: t + 2])[0] for t in range(frames.shape[0] - 1)])


def main(argv=None) -> dict:
    parser = OneLineArgumentParser(prog="benchmark/play_steering.py", description=__doc__.strip(),
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--run", default=None, help="a trained sprites run of video_diffusion.py (default: train one)")
    parser.add_argument("--total-steps", type=int, default=1000, help="training steps when training")
    parser.add_argument("--seed", type=int, default=1, help="the training run's seed")
    parser.add_argument("--starts", type=int, default=32, help="held-out starts played (at most 64)")
    parser.add_argument("--out-dir", default="runs/play_steering", help="where the run, JSON and figure go")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    vd = load_script("video_diffusion.py")
    if args.run is None:
        steps = str(args.total_steps)
        cmd = [sys.executable, str(ROOT / "video_diffusion.py"), *TRAIN, "--total-steps", steps, "--eval-every", steps,
               "--save-every", steps, "--seed", str(args.seed), "--output-dir", str(out)]
        print("training:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        runs = sorted((p for p in out.iterdir() if p.name.startswith("sprites__play_steering__")),
                      key=lambda p: p.stat().st_mtime)
        run_dir = runs[-1]
    else:
        run_dir = Path(args.run)
    play_args, checkpoint, _ = vd.resume_run(vd.Args(resume=str(run_dir)), set(), trains=False)
    followed = {key: [0, 0] for key in "UDLR"}  # key -> [steps the generated sprite followed, steps that count]
    rows, labels, names = [], [], []
    for start in range(min(args.starts, 64)):
        built = vd.play_games(play_args, checkpoint, torch.device("cpu"), clip=start)
        keys = KEYS[start % len(KEYS)]
        actions = vd.parse_play_keys(keys, built["meanings"])
        sessions = {mode: vd.play_keys(built["games"][mode], actions, built["meanings"], 64)["frames"]
                    for mode in ("real", "imagined")}
        real_moves, generated_moves = steps_moved(vd, sessions["real"]), steps_moved(vd, sessions["imagined"])
        for key, real, generated in zip(keys, real_moves, generated_moves):
            if real >= 0:  # the real sprite moved: the key could be followed
                followed[key][1] += 1
                followed[key][0] += int(generated == real)
        if start < 4:
            rows += [sessions["real"], sessions["imagined"]]
            names += [f"real {start}", f"generated {start}"]
            labels += [["start", *[vd.DIRECTIONS["UDLR".index(k)] for k in keys]]] * 2
    total = [sum(v[0] for v in followed.values()), sum(v[1] for v in followed.values())]
    result = {"run": str(run_dir), "starts": min(args.starts, 64), "keys": KEYS,
              "follow_rate": total[0] / max(total[1], 1), "counted_steps": total[1],
              "per_key": {vd.DIRECTIONS["UDLR".index(k)]: v[0] / max(v[1], 1) for k, v in followed.items()},
              "chance": 0.25}
    out.mkdir(parents=True, exist_ok=True)
    (out / "steering.json").write_text(json.dumps(result, indent=1))
    clips = np.stack(rows).transpose(0, 4, 1, 2, 3)  # (N, 3, T + 1, H, W)
    vd.write_png(out / "steering.png", vd.frame_strips(clips, [f"{n}: {' '.join(l)}" for n, l in zip(names, labels)]))
    print(f"the generated sprite follows the key in {result['follow_rate']:.1%} of {total[1]} steps where the real "
          f"sprite moved (chance 25%); per key: " + ", ".join(f"{k} {v:.0%}" for k, v in result["per_key"].items()))
    print(f"wrote {out / 'steering.json'} and {out / 'steering.png'}")
    return result


if __name__ == "__main__":
    main()
