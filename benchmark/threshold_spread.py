# cleanworlds benchmark: the spread of the suite's learning and quality measurements. RESULTS.md section T
"""
A learning or quality threshold measured on one run of one machine is not a property of the code: another CPU kind,
another thread count or another seed gives another training trajectory. Every test marked `learning` records what it
measured (tests/conftest.py, measured()); this runs those tests once per configuration (training-seed shift x torch
threads x ATen CPU capability) and prints, for each measured value, its minimum and maximum over the configurations
beside each configuration's value, so that each threshold is set below (or above) the spread by a stated margin.

- seed shift s: every training seed of those tests is moved by s (CLEANWORLDS_SEED_SHIFT; the scripts' --seed 1 + s);
- threads: OMP_NUM_THREADS for the scripts and torch.set_num_threads in the test process;
- ATen CPU capability: ATEN_CPU_CAPABILITY=avx2 runs the AVX2 kernels on an AVX-512 machine, another CPU's kernels.
The judges the scripts cache under data/judge are deleted before each configuration, so each is trained under it.

    python benchmark/threshold_spread.py --seed-shifts 0,1,2 --threads 1,2 --log benchmark/logs/threshold_spread.jsonl
    python benchmark/threshold_spread.py --seed-shifts 0 --threads 1 --pytest-args "-k judge"   # one quick config
    python benchmark/threshold_spread.py --report benchmark/logs/threshold_spread.jsonl          # the table again
"""
import argparse
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give non-negative integers")
    return values


def config_name(line: dict) -> str:
    capability = "" if line["cpu_capability"] == "default" else f" {line['cpu_capability']}"
    return f"s+{line['seed_shift']} t{line['threads']}{capability}"


def run_config(seed_shift: int, threads: int, capability: str, log: Path, pytest_args: list[str]) -> dict:
    """Runs the learning tests under one configuration; their measurements are appended to `log` by the tests."""
    shutil.rmtree(ROOT / "data" / "judge", ignore_errors=True)
    env = dict(os.environ, CLEANWORLDS_SEED_SHIFT=str(seed_shift), OMP_NUM_THREADS=str(threads),
               CLEANWORLDS_SPREAD_LOG=str(log.resolve()), PYTHONWARNINGS="ignore")
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != "default":
        env["ATEN_CPU_CAPABILITY"] = capability
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "learning", "-q", "-p", "no:cacheprovider",
                             *pytest_args], cwd=ROOT, env=env, capture_output=True, text=True)
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    failed = [line.split(" ")[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")]
    line = {"config": True, "seed_shift": seed_shift, "threads": threads, "cpu_capability": capability,
            "exit": result.returncode, "summary": summary, "failed": failed, "seconds": round(time.time() - start)}
    with open(log, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"{config_name(line)}: exit {result.returncode}, {summary} ({line['seconds']} s)", flush=True)
    return line


def report(log: Path) -> str:
    """The markdown table of a log: a row per (test, value), its minimum and maximum over the configurations, then
    each configuration's value; then each configuration's pytest summary and failed tests."""
    lines = [json.loads(text) for text in log.read_text().splitlines() if text.strip()]
    configs = list(dict.fromkeys(config_name(line) for line in lines))
    values: dict[tuple[str, str], dict[str, float]] = {}
    for line in lines:
        for name, value in line.get("values", {}).items():
            test = line["test"].removeprefix("tests/test_").replace(".py::", "::")
            values.setdefault((test, name), {})[config_name(line)] = value
    out = ["| test | value | min | max | " + " | ".join(configs) + " |", "|---" * (4 + len(configs)) + "|"]
    for (test, name), per_config in values.items():
        row = [f"{per_config[c]:.4g}" if c in per_config else "" for c in configs]
        out.append(f"| {test} | {name} | {min(per_config.values()):.4g} | {max(per_config.values()):.4g} | "
                   + " | ".join(row) + " |")
    out.append("")
    for line in lines:
        if line.get("config"):
            failed = ", ".join(line["failed"]) or "none failed"
            out.append(f"- {config_name(line)}: exit {line['exit']}, {line['summary']}, {line['seconds']} s; {failed}")
    return "\n".join(out)


def main(argv=None):
    parser = OneLineArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seed-shifts", type=int_list, default=[0, 1, 2], help="training-seed shifts (default 0,1,2)")
    parser.add_argument("--threads", type=int_list, default=[1, 2], help="torch thread counts (default 1,2)")
    parser.add_argument("--cpu-capabilities", default="default",
                        help="ATEN_CPU_CAPABILITY values, comma-separated: default, avx2, avx512 (default: default)")
    parser.add_argument("--pytest-args", default="", help="more pytest arguments, e.g. \"-k ddpm -n 0\"")
    parser.add_argument("--log", type=Path, default=ROOT / "benchmark" / "out" / "threshold_spread.jsonl",
                        help="the JSON-lines file the measurements are appended to")
    parser.add_argument("--report", type=Path, help="only print the table of an existing log")
    args = parser.parse_args(argv)
    if args.report is not None:
        if not args.report.is_file():
            parser.exit(2, f"error: --report {args.report} is not a file; give a log this tool wrote\n")
        print(report(args.report))
        return
    if 0 in args.threads:
        parser.exit(2, "error: --threads 0: give thread counts of at least 1\n")
    capabilities = args.cpu_capabilities.split(",")
    if not set(capabilities) <= {"default", "avx2", "avx512", "default"}:
        parser.exit(2, f"error: --cpu-capabilities {args.cpu_capabilities}: give default, avx2 or avx512\n")
    args.log.parent.mkdir(parents=True, exist_ok=True)
    for shift, threads, capability in itertools.product(args.seed_shifts, args.threads, capabilities):
        run_config(shift, threads, capability, args.log, shlex.split(args.pytest_args))
    print(report(args.log))


if __name__ == "__main__":
    main()
