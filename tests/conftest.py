"""Shared test helpers and tiny offline datasets.

Datasets made here (nothing is downloaded):
- cifar10_binary_dir: a folder holding cifar-10-batches-bin/data_batch_{1..5}.bin in the real binary layout.
- image_folder: PNG and JPG images in class subfolders.
Helpers: run_script (the real script in a subprocess, as a user runs it), run_until_line_then_kill, read_scalars,
read_images, load_module (import a script by path), checkpoint_tensors (flatten a checkpoint for bitwise compares).
"""
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CIFAR_IMAGES_PER_BATCH = 20  # 5 batches x 20 = 100 tiny "CIFAR-10" images
# A learning or quality threshold must hold on any CPU, not only on the one it was measured on: other kernels, other
# thread counts and other rounding give other training trajectories. benchmark/threshold_spread.py reruns the tests
# marked `learning` with every training seed shifted by CLEANWORLDS_SEED_SHIFT and at OMP_NUM_THREADS threads, and
# collects what each of them measured (measured() below); each threshold sits below that spread by a stated margin.
SEED_SHIFT = int(os.environ.get("CLEANWORLDS_SEED_SHIFT", "0"))
# One thread unless OMP_NUM_THREADS says otherwise: two test workers share 2 cores (pyproject's -n 2), and tiny
# networks gain nothing from a second thread that spins while waiting for the other worker's.
THREADS = int(os.environ.get("OMP_NUM_THREADS", "1"))
torch.set_num_threads(THREADS)


def measured(**values: float):
    """Records what a learning test measured, before it asserts, in the file CLEANWORLDS_SPREAD_LOG names (a JSON
    line per call: the test, the seed shift, the threads, the values); does nothing when it names none."""
    path = os.environ.get("CLEANWORLDS_SPREAD_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        line = {"test": test, "seed_shift": SEED_SHIFT, "threads": THREADS,
                "cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY", "default"),
                "values": {k: float(v) for k, v in values.items() if v is not None}}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


@pytest.fixture
def torch_threads():
    """In-process work on THREADS threads (one by default: tiny models beside the other test worker), whatever the
    test before it set; the pytest process's setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)

# The order in which the 2 workers take the test files (pyproject: --dist loadfile --no-loadscope-reorder): the longest
# first, so that it does not start last and set the wall time alone (the video file's learned run is about 10 minutes
# of its ~15). Each worker is handed two files to start with and runs them in turn: the third here is a short one, so
# that nothing long waits behind the video file. Files not named follow in collection order.
FILE_ORDER = ["test_video_diffusion.py", "test_ddpm_cifar10.py", "test_shared_blocks.py", "test_dit_cifar10.py",
              "test_bad_inputs.py", "test_benchmark.py", "test_diamond_atari.py", "test_diamond_catch.py",
              "test_diamond_faithful.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FILE_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FILE_ORDER)))  # stable: each file keeps its own order


def script_env() -> dict:
    env = dict(os.environ)
    # One thread per script: tiny runs gain little from a second one, and on a busy machine OpenMP threads that spin
    # while waiting for each other make a run many times slower.
    env["OMP_NUM_THREADS"] = str(THREADS)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def run_script(script: str, *args, cwd=None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `python <script> <args>` as a user would; with check=True a non-zero exit fails the test with its output."""
    cmd = [PYTHON, str(ROOT / script), *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd or ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                    f"stderr:\n{result.stderr[-5000:]}")
    return result


def run_until_line_then_kill(script: str, *args, line_startswith: str, cwd=None, timeout: float = 300,
                             sig: int = signal.SIGKILL) -> str:
    """Starts the script, reads its stdout, and sends `sig` as soon as a line starts with `line_startswith`.
    Returns the stdout read so far. Fails the test if the process ends without printing the line."""
    cmd = [PYTHON, str(ROOT / script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(line_startswith):
                proc.send_signal(sig)
                break
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not any(line.startswith(line_startswith) for line in seen):
        pytest.fail(f"{' '.join(cmd)} never printed {line_startswith!r}\nstdout:\n{''.join(seen)[-3000:]}\n"
                    f"stderr:\n{proc.stderr.read()[-5000:]}")
    return "".join(seen)


def only_run_dir(output_dir: Path) -> Path:
    """The single run folder written under output_dir."""
    runs = [p for p in Path(output_dir).iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder in {output_dir}, found {runs}"
    return runs[0]


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """All scalars of a run's TensorBoard event files: tag -> [(step, value), ...] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_image_tags(run_dir) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]


def load_module(script: str):
    """Imports a top-level script by path (scripts are single files, not packages)."""
    name = Path(script).stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint (loaded with weights_only=True), keyed by its path in the nested dict."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    walk("", torch.load(path, map_location="cpu", weights_only=True))
    return flat


def assert_checkpoints_bitwise_equal(path_a, path_b, prefixes=("/model", "/ema", "/optimizer")):
    a, b = checkpoint_tensors(path_a), checkpoint_tensors(path_b)
    keys = [k for k in a if k.startswith(prefixes)]
    assert keys, f"no tensors under {prefixes} in {path_a}"
    assert set(keys) == {k for k in b if k.startswith(prefixes)}
    different = [k for k in keys if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def file_hash(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_one_line_error(result, *words):
    """Bad input (docs/PROMISES.md section 7): exit 2, one line on stderr starting with "error: ", naming each word."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def tiny_cifar_arrays(seed: int = 0):
    """5 batches of CIFAR-format uint8 images (N, 3072 channel-major) and labels; images carry a class-dependent
    colour so that content is not pure noise."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(5):
        labels = rng.integers(0, 10, CIFAR_IMAGES_PER_BATCH)
        images = rng.integers(0, 256, (CIFAR_IMAGES_PER_BATCH, 3, 32, 32)).astype(np.uint8)
        images[:, 0] = (labels * 25)[:, None, None]
        batches.append((images, labels))
    return batches


@pytest.fixture(scope="session")
def cifar10_binary_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar_bin")
    folder = root / "cifar-10-batches-bin"
    folder.mkdir()
    for i, (images, labels) in enumerate(tiny_cifar_arrays(), start=1):
        records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
        records.tofile(folder / f"data_batch_{i}.bin")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """3 classes x 6 images, PNG and JPG, of various sizes (not square), in class subfolders."""
    import cv2

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    colours = {"red": (40, 40, 220), "green": (40, 200, 40), "blue": (220, 60, 40)}  # BGR
    for name, bgr in colours.items():
        (root / name).mkdir()
        for j in range(6):
            h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
            img = np.full((h, w, 3), 30, np.uint8)
            img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = bgr
            cv2.imwrite(str(root / name / f"{j}.{'png' if j % 2 else 'jpg'}"), img)
    return root
