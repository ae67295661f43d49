# cleanworlds benchmark: diamond_atari.py's update and imagination-step times beside the paper's. Results: RESULTS.md
"""
Times, in one process, the four figures DIAMOND's paper gives for one RTX 4090 (Alonso et al. 2024, appendix):
the denoiser update (88 ms), the reward/end model update (115 ms), the actor-critic update (340 ms: 15 imagined
steps of 32 envs and the backward) and one imagination step (20.4 ms: 3 denoiser calls, the reward/end model, the
policy), with the script's own functions (phase_loss, Learner.update, ImaginationGraphs) and its defaults: the paper's
networks and batch sizes, fp32. Three rows, in this order, each hard-limited (--part-limit) and each figure printed as
soon as it is measured, so that a timeout loses only the rest of its row:
  1. the fast path with the reference's settings (TF32, cudnn autotuning, no determinism): the imagination step as
     compiled graphs (CUDA graphs on CUDA, the script's default there) and the denoiser's update compiled as --compile
     does;
  2. eager, the same settings;
  3. eager with what --torch-deterministic sets (cudnn deterministic, no autotuning): its cost decides the flag's
     default on CUDA.
Each figure is the median of --repeats timed calls after --warmup untimed ones (the first of which compiles: its time
is reported apart). From them: the epoch time they imply (400 + 400 + 400 updates; the 100 env steps of collection
and the evaluations are left out) and the days for Atari 100k (epoch 1: 10000 + 10000 + 5000 updates, then 999
epochs), each beside the paper's; the peak GPU memory of each row.

After the fast row, its compile counters (graphs compiled, graph breaks, cudagraph skips and recordings: one compile
per function and no re-recording is the goal; gpu_diamond.sh turns cudagraph skips into errors), then a check, with
TF32 off, that the fast path computes what the eager path computes: from identical inputs (the imagined envs' state,
the noise and uniforms, the restart pool), the compiled world-model step's first denoiser output D(x; sigma) before
8-bit quantisation, its reward/end logits and the compiled policy's logits against the same functions run eagerly
(the largest difference must be within --tolerance). Exit status 1 if not.

The replay buffer holds random frames (the timings do not depend on the pixels), so it runs offline, without the ALE.

    bash benchmark/gpu_diamond.sh                         # one GPU, the paper's sizes, at most 5 minutes
    python benchmark/diamond_speed.py --device cpu --preset tiny --repeats 2 --warmup 1 --backend eager   # a smoke run
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import json
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PAPER_MS = {"denoiser update": 88.0, "reward/end update": 115.0, "actor-critic update": 340.0,
            "imagination step": 20.4}  # one RTX 4090
PAPER_DAYS = 2.9


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def load_script():
    spec = importlib.util.spec_from_file_location("diamond_atari_speed", ROOT / "diamond_atari.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile looks the script's globals up by module name
    spec.loader.exec_module(module)
    return module


def parse(argv=None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--preset", default=None, help="a preset of diamond_atari.py (tiny: a smoke run on a CPU)")
    parser.add_argument("--repeats", type=int, default=8, help="timed calls per figure (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (the first compiles)")
    parser.add_argument("--part-limit", type=float, nargs=3, default=(150, 50, 50), metavar=("FAST", "EAGER", "DET"),
                        help="seconds each row may take (the fast row includes the check); default 150 50 50")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the fast path (eager: tests)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest fast-vs-eager difference allowed (TF32 off during the check)")
    parser.add_argument("--num-sampling-steps", type=int, default=None,
                        help="denoising steps per frame (default: the script's, 3; the suite's CPU smoke run passes 1)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args(argv)


def random_buffer(dia, args, num_actions: int, episodes: int = 8, length: int = 200):
    rng = np.random.default_rng(0)
    buffer = dia.ReplayBuffer(None, args.recency_weights, args.num_conditioning_steps)
    for _ in range(episodes):
        buffer.add({"obs": rng.integers(0, 256, (length + 1, args.obs_size, args.obs_size, 3), dtype=np.uint8),
                    "actions": rng.integers(0, num_actions, length),
                    "rewards": rng.integers(-1, 2, length).astype(np.float32),
                    "terminated": np.arange(length) == length - 1, "truncated": np.zeros(length, bool)}, write=False)
    return buffer


def timed(fn, device: torch.device, repeats: int, warmup: int) -> dict:
    """Median, min and max ms of repeats calls after warmup calls; the first warm-up call's time apart."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    first = None
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        elapsed = (time.perf_counter() - start) * 1000
        if i == 0:
            first = elapsed
        if i >= warmup:
            times.append(elapsed)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "first_ms": first}


def build_run(dia, args, device, num_actions: int, fast: bool, backend: str):
    """A dia.Run holding what the training phases read (no environment, writer or run folder)."""
    setup = dia.Setup(device)
    torch.manual_seed(args.seed)
    models = dict(zip(("denoiser", "reward_end", "actor_critic"),
                      (m.to(device) for m in dia.build_models(args, num_actions))))
    learners = dia.build_learners(args, models, setup.use_cuda)
    buffer = random_buffer(dia, args, num_actions)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    cpu_generator = torch.Generator().manual_seed(args.seed)
    denoiser = models["denoiser"]
    mode = "reduce-overhead" if device.type == "cuda" else None
    denoiser_net = torch.compile(denoiser.net, backend=backend, dynamic=False) if fast else denoiser.net  # --compile
    wm_env = dia.WorldModelEnv(denoiser, models["reward_end"], buffer, args, device, generator, cpu_generator)
    graphs = dia.ImaginationGraphs(wm_env, models["actor_critic"], args, device, backend=backend, mode=mode) \
        if fast else None
    run = dia.Run(args, device, contextlib.nullcontext(), generator, cpu_generator, buffer, None, learners,
                  denoiser_net, wm_env, graphs, None, None, None, None, None, None)
    return run


class PartTimeout(BaseException):
    """A row ran past its --part-limit (a BaseException, as KeyboardInterrupt: torch.compile does not wrap it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises PartTimeout inside the block after `seconds` (SIGALRM: a compilation is cut too)."""
    def expire(signum, frame):
        raise PartTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def measure(dia, run, repeats: int, warmup: int, figures: dict, row: str):
    """Fills figures[label] for each of the four figures in turn, printing each as soon as it is measured."""
    def done(label: str, figure: dict):
        figures[label] = figure
        print(f"{row}: {label} {figure['median_ms']:.1f} ms [{figure['min_ms']:.1f}, {figure['max_ms']:.1f}] (first "
              f"call {figure['first_ms'] / 1000:.1f} s)", flush=True)

    for name, label in (("denoiser", "denoiser update"), ("reward_end", "reward/end update"),
                        ("actor_critic", "actor-critic update")):
        learner = run.learners[name]
        learner.model.train()
        done(label, timed(lambda: learner.update(dia.phase_loss(run, name)[0]), run.device, repeats, warmup))
    args, actor_critic = run.args, run.learners["actor_critic"].model
    if run.graphs is not None:
        rollout = lambda: run.graphs.rollout(run.generator)  # noqa: E731
    else:
        eager = dia.ImaginationGraphs(run.wm_env, actor_critic, args, run.device, eager=True)
        rollout = lambda: eager.rollout(run.generator)  # noqa: E731
    per_rollout = timed(rollout, run.device, repeats, warmup)  # with gradients, as in training
    done("imagination step", {key: value / args.backup_every for key, value in per_rollout.items()})


def compile_counters(recordings: list) -> dict:
    """What the fast path compiled: dynamo's graphs and graph breaks, inductor's cudagraph skips, CUDA graph
    recordings (counted by a wrapper around cudagraph trees' record_function)."""
    import torch._dynamo.utils

    counters = torch._dynamo.utils.counters
    return {"graphs compiled": counters["stats"]["unique_graphs"], "graph breaks": sum(counters["graph_break"].values()),
            "cudagraph skips": counters["inductor"]["cudagraph_skips"], "cudagraph recordings": len(recordings)}


def count_recordings() -> list:
    """A list that grows by one at each CUDA graph recording (torch._inductor.cudagraph_trees)."""
    recordings = []
    try:
        from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
    except ImportError:
        return recordings
    record = CUDAGraphTreeManager.record_function

    def counted(self, *args, **kwargs):
        recordings.append(1)
        return record(self, *args, **kwargs)

    CUDAGraphTreeManager.record_function = counted
    return recordings


def check_fast_path(dia, run, tolerance: float) -> dict:
    """The compiled steps against the same functions run eagerly, from identical inputs."""
    graphs, env, args, n = run.graphs, run.wm_env, run.args, run.args.num_imagined_envs
    eager = dia.ImaginationGraphs(env, graphs.actor_critic, args, run.device, backend=None)
    with torch.no_grad():
        start_obs, start_act, start_hidden = env.start(n)
        start = (start_obs, start_act, start_hidden)
        start_actor = dia.actor_burn_in(graphs.actor_critic, start_obs[:, :-1])
        noise = torch.randn((n, 3, args.obs_size, args.obs_size), generator=run.generator, device=run.device)
        uniforms = torch.rand((3, n), generator=run.generator, device=run.device)
        stopped = torch.rand(n, generator=run.generator, device=run.device) < 0.5
    final_value = torch.zeros(n, device=run.device)
    # an LSTM state that requires grad, as the rollout's compiled calls get it (steps 1 on): no recompile here
    actor_hidden = tuple(h.detach().float().requires_grad_() for h in env.actor_hidden)
    inputs = (env.obs[:, -1], actor_hidden, stopped, start_actor, final_value, uniforms[0])
    # called in grad mode, as the rollout calls them: the graphs compiled there are the ones checked
    if run.device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
    ref_policy, fast_policy = eager.policy_step(*inputs), graphs.policy(*inputs)
    diffs = {"policy logits": (fast_policy[0] - ref_policy[0]).abs().max().item()}
    action = ref_policy[2]
    step_inputs = (env.obs, env.act, env.hidden, env.age, action,
                   tuple(h.detach() for h in ref_policy[5]), noise, uniforms[1:], start)
    ref, fast = eager.world_model_step(*step_inputs), graphs.world_model(*step_inputs)
    diffs["D(x; sigma_max) before quantisation"] = (fast["denoised"][0] - ref["denoised"][0]).abs().max().item()
    for key in ("reward_logits", "end_logits"):
        diffs[key.replace("_", " ")] = (fast[key] - ref[key]).abs().max().item()
    return {"max_abs_diff": diffs, "tolerance": tolerance, "ok": all(d <= tolerance for d in diffs.values())}


def report(figures: dict, args) -> list[str]:
    """The table: each figure beside the paper's, the epoch time and the days they imply."""
    lines = ["| | paper (RTX 4090) | " + " | ".join(figures) + " |", "|---|---|" + "---|" * len(figures)]
    for label, paper in PAPER_MS.items():
        cells = [f"{f[label]['median_ms']:.1f} ms [{f[label]['min_ms']:.1f}, {f[label]['max_ms']:.1f}]"
                 if label in f else "(stopped: --part-limit)" for f in figures.values()]
        lines.append(f"| {label} (median [min, max]) | {paper:.1f} ms | " + " | ".join(cells) + " |")
    lines.append("| first call (the fast path compiles there): denoiser update, actor-critic update | | " + " | ".join(
        ", ".join(f"{f[key]['first_ms'] / 1000:.1f} s" if key in f else "-" for key in ("denoiser update",
                                                                                      "actor-critic update"))
        for f in figures.values()) + " |")

    def epoch_s(ms: dict, steps=(400, 400, 400)) -> float:
        return sum(k * ms[label] for k, label in zip(steps, ("denoiser update", "reward/end update",
                                                           "actor-critic update"))) / 1000

    paper_epoch = epoch_s(PAPER_MS)
    epochs = 1000  # Atari 100k with a first collection of 5000 env steps: 950 collecting epochs and 50 more
    cells, days_cells = [], []
    for f in figures.values():
        if any(label not in f for label in PAPER_MS):
            cells.append("-")
            days_cells.append("-")
            continue
        ms = {label: f[label]["median_ms"] for label in PAPER_MS}
        epoch = epoch_s(ms)
        first = epoch_s(ms, (10_000, 10_000, 5000))
        cells.append(f"{epoch:.0f} s")
        days_cells.append(f"{(first + (epochs - 1) * epoch) / 86400:.2f}")
    lines.append(f"| epoch (400 + 400 + 400 updates) | {paper_epoch:.0f} s | " + " | ".join(cells) + " |")
    lines.append(f"| Atari 100k (1000 epochs), days | {PAPER_DAYS} (paper, all included) | " + " | ".join(days_cells)
                 + " |")
    return lines


def main(argv=None) -> int:
    opts = parse(argv)
    dia = load_script()
    bad = [f"--preset must be one of {', '.join(dia.PRESETS)}, not {opts.preset}"] if opts.preset and \
        opts.preset not in dia.PRESETS else []
    bad += [f"--part-limit must be positive seconds, not {' '.join(f'{x:g}' for x in opts.part_limit)}"] if not all(
        0 < x < float("inf") for x in opts.part_limit) else []
    bad += [f"--repeats must be >= 1 and --warmup >= 0, not {opts.repeats} and {opts.warmup}"] if opts.repeats < 1 or \
        opts.warmup < 0 else []
    bad += [f"--json: no folder {Path(opts.json).parent}"] if opts.json and not Path(opts.json).parent.is_dir() else []
    args = dia.Args(cuda=opts.device == "cuda", torch_deterministic=False)  # the reference's settings first
    if not bad:
        args = dataclasses.replace(args, **({"preset": opts.preset, **dia.PRESETS[opts.preset]} if opts.preset else {}),
                                   **({} if opts.num_sampling_steps is None else
                                      {"num_sampling_steps": opts.num_sampling_steps}))
        try:
            dia.check_arg_domains(args)  # --num-sampling-steps in the script's own domain
        except dia.UserError as e:
            bad.append(str(e))
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    device = dia.setup_device(args).device  # TF32 on, cudnn autotuning, as the script sets them
    if opts.device == "cuda" and device.type != "cuda":
        print("error: no CUDA device (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    num_actions = 4  # Breakout's minimal action set
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch "
          f"{torch.__version__}; {args.num_imagined_envs} imagined envs, batch {args.batch_size}, {args.obs_size}x"
          f"{args.obs_size}, {args.num_sampling_steps} denoising steps; median of {opts.repeats} after {opts.warmup} "
          f"warm-up calls; rows limited to {', '.join(f'{x:g}' for x in opts.part_limit)} s", flush=True)
    recordings = count_recordings()
    fast_label = f"fast path ({'CUDA graphs' if device.type == 'cuda' else opts.backend})"
    rows = ((fast_label, True, False), ("eager", False, False), ("eager, --torch-deterministic", False, True))
    figures, check, counters = {}, None, None
    for (label, fast, deterministic), limit in zip(rows, opts.part_limit):
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, not deterministic
        figures[label] = {}
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with time_limit(limit):
                run = build_run(dia, args, device, num_actions, fast, opts.backend)
                measure(dia, run, opts.repeats, opts.warmup, figures[label], label)
                if fast:
                    counters = compile_counters(recordings)
                    print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in counters.items()) + " (one graph each for "
                          f"the denoiser's update, the policy step and the world-model step: 3)", flush=True)
                    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
                    try:
                        check = check_fast_path(dia, run, opts.tolerance)
                    finally:
                        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
                    print(f"fast path vs eager from identical inputs, TF32 off: largest differences "
                          f"{ {k: f'{v:.2e}' for k, v in check['max_abs_diff'].items()} } (tolerance "
                          f"{opts.tolerance:g}): {'match' if check['ok'] else 'MISMATCH'}; {run.graphs.calls} compiled "
                          f"calls", flush=True)
        except PartTimeout:
            print(f"{label}: stopped at its limit of {limit:g} s", flush=True)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "n/a (CPU)"
        print(f"{label}: {time.perf_counter() - start:.0f} s, peak GPU memory {peak}", flush=True)
        run = None
    print("\n".join(report(figures, args)))
    print("fast path: the imagination step as diamond_atari.py's ImaginationGraphs (its default on CUDA) and the "
          "denoiser update compiled as --compile does (off by default); eager: neither. The epoch leaves out the 100 "
          "env steps of collection and the evaluations, which the paper's days include.")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"figures": figures, "check": check, "counters": counters,
                                               "paper_ms": PAPER_MS}, indent=1))
    return 0 if check is not None and check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
