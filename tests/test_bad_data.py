"""Bad data files (docs/PROMISES.md sections 3 and 7): each is refused with one line that names the file (and the
field) and the fix. In process through the scripts' own data functions, then one subprocess per script for the whole
path: exit status 2 and exactly one line on stderr."""
import inspect
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, load_module, run_script

ddpm = load_module("ddpm_cifar10.py")
dit = load_module("dit_cifar10.py")
vd = load_module("video_diffusion.py")
dia = load_module("diamond_atari.py")
IMAGE_SCRIPTS = pytest.mark.parametrize("script", [ddpm, dit], ids=["ddpm", "dit"])


def refused(script, call, *words) -> str:
    """The script's UserError from call(), one line, naming every word."""
    with pytest.raises(script.UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and ";" in message, message  # "<file>: <what is wrong>; <how to fix>"
    for word in words:
        assert str(word) in message, message
    return message


# ----------------------------------------------------------------------------------------------------------------------
# CIFAR-10 folders: a batch missing, empty or cut, or not CIFAR-10


def cut(path, size):
    path.write_bytes(path.read_bytes()[:size])


@IMAGE_SCRIPTS
@pytest.mark.parametrize("case,file,damage,words", [
    ("missing", "data_batch_3.bin", lambda p: p.unlink(), ["missing"]),
    ("missing_last", "data_batch_5.bin", lambda p: p.unlink(), ["missing"]),
    ("empty", "data_batch_2.bin", lambda p: cut(p, 0), ["0 bytes"]),
    ("wrong_size", "data_batch_4.bin", lambda p: cut(p, 3073 * 5 + 100), ["15465 bytes"]),
    ("not_cifar", "data_batch_1.bin", lambda p: p.write_bytes(bytes([200]) * 3073 * 2), ["labels"]),
])
def test_cifar_binary_folder(script, case, file, damage, words, cifar10_binary_dir, tmp_path):
    shutil.copytree(cifar10_binary_dir / "cifar-10-batches-bin", tmp_path / "cifar-10-batches-bin")
    damage(tmp_path / "cifar-10-batches-bin" / file)
    refused(script, lambda: script.load_cifar10(str(tmp_path), download=False), file, *words, "delete the folder")


# ----------------------------------------------------------------------------------------------------------------------
# Image folders: truncated or undecodable files; images outside a class subfolder


def encoded(suffix: str) -> bytes:
    import cv2

    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3)).astype(np.uint8)
    return cv2.imencode(suffix, image)[1].tobytes()


@IMAGE_SCRIPTS
@pytest.mark.parametrize("case,name,content,words", [
    ("truncated_jpeg", "bad.jpg", lambda: encoded(".jpg")[: len(encoded(".jpg")) // 2], ["truncated JPEG"]),
    ("truncated_png", "bad.png", lambda: encoded(".png")[: len(encoded(".png")) // 2], ["truncated PNG"]),
    ("empty", "bad.png", lambda: b"", ["empty"]),
    ("garbage_png", "bad.png", lambda: b"\x89PNG\r\n\x1a\n\0\0\0\0IHDR\0\0\0\0\0\0\0\0IEND\xaeB`\x82", ["decode"]),
    ("text", "bad.jpeg", lambda: b"not an image at all", ["decode"]),
])
def test_unreadable_image(script, case, name, content, words, tmp_path, capfd):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "good.png").write_bytes(encoded(".png"))
    (tmp_path / "b" / name).write_bytes(content())
    capfd.readouterr()
    refused(script, lambda: script.load_image_folder(str(tmp_path), 16), tmp_path / "b" / name, *words,
            "replace it with a valid PNG/JPG")
    assert capfd.readouterr().err == ""  # no OpenCV or libjpeg warning beside the one line


@IMAGE_SCRIPTS
def test_complete_images_are_read_whatever_follows_or_precedes_them(script, tmp_path):
    """Real files that are complete are read: a JPEG with an EXIF thumbnail (its own end marker comes first), bytes
    after the end marker (a motion photo), a progressive JPEG."""
    import cv2

    image = np.random.default_rng(1).integers(0, 256, (30, 20, 3)).astype(np.uint8)
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    app1 = b"Exif\0\0" + cv2.imencode(".jpg", image[:8, :8])[1].tobytes()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "thumb.jpg").write_bytes(jpeg[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 +
                                               jpeg[2:])
    (tmp_path / "a" / "motion.jpg").write_bytes(jpeg + b"\0\0\0\x18ftypmp42" + bytes(range(256)) * 8)
    (tmp_path / "a" / "progressive.jpg").write_bytes(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1])
    images, labels, _ = script.load_image_folder(str(tmp_path), 8)
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [0, 0, 0]
    thumb = (tmp_path / "a" / "thumb.jpg").read_bytes()
    (tmp_path / "a" / "thumb.jpg").write_bytes(thumb[: len(thumb) - 200])  # the thumbnail's end marker does not count
    refused(script, lambda: script.load_image_folder(str(tmp_path), 8), "thumb.jpg", "truncated JPEG")


@IMAGE_SCRIPTS
def test_an_image_outside_the_class_subfolders_has_no_class(script, tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "c.png").write_bytes(encoded(".png"))
    (tmp_path / "stray.png").write_bytes(encoded(".png"))
    _, labels, classes = script.load_image_folder(str(tmp_path), 8)
    assert classes == ["cats"] and labels.tolist() == [0, -1]  # sorted paths: cats/c.png, stray.png


def deny_reads(monkeypatch, bad: Path):
    """Reading bad fails as it does for a user without permission (the tests run as root, whom chmod 000 does not stop):
    os.scandir is what os.walk lists a folder with, Path.open what read_bytes and read_video open a file with."""
    scandir, path_open = os.scandir, Path.open

    def check(path):
        if isinstance(path, (str, os.PathLike)) and Path(path) == bad:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", lambda path=".": check(path) or scandir(path))
    monkeypatch.setattr(Path, "open", lambda self, *args, **kwargs: check(self) or path_open(self, *args, **kwargs))


@IMAGE_SCRIPTS
@pytest.mark.parametrize("what", ["class_folder", "image"])
def test_unreadable_class_folder_or_image(script, what, image_folder, monkeypatch):
    """A class folder that cannot be listed was skipped without a word (DiT then said "has 2 classes; use
    --num-classes 2"): now, like an image that cannot be opened, it is one line naming it."""
    bad = image_folder / "green" if what == "class_folder" else image_folder / "green" / "3.png"
    deny_reads(monkeypatch, bad)
    message = refused(script, lambda: script.load_image_folder(str(image_folder), 16), bad, "Permission denied",
                      "make it readable")
    assert ("move it out of --data-dir" in message) == (what == "class_folder")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads whatever the mode says")
@IMAGE_SCRIPTS
@pytest.mark.parametrize("what", ["class_folder", "image"])
def test_chmod_000_class_folder_or_image(script, what, image_folder, tmp_path):
    shutil.copytree(image_folder, tmp_path / "images")
    bad = tmp_path / "images" / "green" if what == "class_folder" else tmp_path / "images" / "green" / "3.png"
    bad.chmod(0)
    try:
        refused(script, lambda: script.load_image_folder(str(tmp_path / "images"), 16), bad, "Permission denied")
    finally:
        bad.chmod(0o755 if what == "class_folder" else 0o644)


def test_image_and_episode_readers_are_the_same_code_in_every_script():
    for name in ("load_cifar10", "load_image_folder"):
        assert inspect.getsource(getattr(ddpm, name)) == inspect.getsource(getattr(dit, name)), name
    assert inspect.getsource(vd.read_episode) == inspect.getsource(dia.read_episode)
    assert vd.EPISODE_KEYS == dia.EPISODE_KEYS


# ----------------------------------------------------------------------------------------------------------------------
# Episode files (DIAMOND's --dataset-dir and replay buffer, the video script's Atari clips)


def good_episode(T: int = 6) -> dict:
    return {"obs": np.full((T + 1, 16, 16, 3), 7, np.uint8), "actions": np.arange(T, dtype=np.int64) % 4,
            "rewards": np.zeros(T, np.float32), "terminated": np.zeros(T, bool),
            "truncated": np.arange(T) == T - 1}


def with_changes(**changes):
    episode = {**good_episode(), **changes}
    return {key: value for key, value in episode.items() if value is not None}


NAN_REWARD = np.zeros(6, np.float32)
NAN_REWARD[2] = np.nan
EPISODE_CASES = {  # name: (the file's fields, or bytes; words the message names)
    "obs_one_channel": (with_changes(obs=np.zeros((7, 16, 16, 1), np.uint8)), ["obs", "(7, 16, 16, 1)"]),
    "obs_float": (with_changes(obs=np.zeros((7, 16, 16, 3), np.float32)), ["obs", "float32"]),
    "single_frame": (with_changes(obs=np.zeros((1, 16, 16, 3), np.uint8), **{k: np.zeros(0, d) for k, d in (
        ("actions", np.int64), ("rewards", np.float32), ("terminated", bool), ("truncated", bool))}), ["obs"]),
    "actions_2d": (with_changes(actions=np.zeros((6, 2), np.int64)), ["actions", "(6, 2)"]),
    "actions_float": (with_changes(actions=np.full(6, 1.5)), ["actions", "float64", "int64"]),
    "rewards_0d": (with_changes(rewards=np.float32(1.0)), ["rewards", "()"]),
    "lengths_disagree": (with_changes(terminated=np.zeros(5, bool)), ["terminated", "(5,)", "(6,)"]),
    "truncated_int": (with_changes(truncated=np.zeros(6, np.uint8)), ["truncated", "uint8", "bool"]),
    "missing_rewards": (with_changes(rewards=None), ["rewards"]),
    "nan_reward": (with_changes(rewards=NAN_REWARD), ["rewards", "nan", "step 2"]),
    "inf_reward": (with_changes(rewards=np.array([0, 0, 0, 0, 0, np.inf], np.float32)), ["rewards", "inf", "step 5"]),
    "action_outside_set": (with_changes(actions=np.array([0, 1, 4, 0, 0, 0])), ["actions", "4", "0..3"]),
    "negative_action": (with_changes(actions=np.array([0, -1, 0, 0, 0, 0])), ["actions", "-1"]),
    "pickled": (with_changes(obs=np.array([{"x": 1}], dtype=object)), ["cannot read"]),
    "not_an_npz": (b"PK\x03\x04 but not a zip", ["cannot read"]),
}


def write_episode(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)


@pytest.mark.parametrize("case", EPISODE_CASES)
def test_bad_episode_diamond(case, tmp_path):
    content, words = EPISODE_CASES[case]
    path = tmp_path / "episodes" / "episode_000003.npz"
    write_episode(path, content)
    refused(dia, lambda: dia.load_episode(path, 8, 4, "fix it"), path, *words, "; fix it")


@pytest.mark.parametrize("case", EPISODE_CASES)
def test_bad_episode_video(case, tmp_path):
    content, words = EPISODE_CASES[case]
    path = tmp_path / "atari" / "Breakout-v5" / "episode_00000.npz"
    write_episode(path, content)
    refused(vd, lambda: vd.read_episode(path, 4, "delete it"), path, *words, "; delete it")


def test_video_atari_clips_read_episodes_through_the_checks(tmp_path):
    """load_atari_dataset reads the recorded-episodes folder with read_episode: a good file gives clips, a bad one
    (recording skips a file that exists) is refused with the fix."""
    args = vd.parse_args(["--preset", "tiny", "--dataset", "atari", "--env-id", "Breakout-v5", "--data-dir",
                          str(tmp_path), "--num-atari-episodes", "1"])[0]
    path = vd.atari_folder(tmp_path, "Breakout-v5") / "episode_00000.npz"
    write_episode(path, good_episode(12))
    assert vd.load_atari_dataset(args).frames.shape == (13, 3, 16, 16)
    write_episode(path, with_changes(actions=np.full(6, 9)))
    refused(vd, lambda: vd.load_atari_dataset(args), path, "actions", "9", "0..3", "delete it")


def test_good_episode_passes_the_checks(tmp_path):
    path = tmp_path / "episode_000000.npz"
    write_episode(path, {**good_episode(12), "actions": np.arange(12, dtype=np.int32) % 4,
                         "rewards": np.arange(12, dtype=np.float64)})  # other integer and float widths are fine
    episode = dia.load_episode(path, 8, 4)
    assert episode["obs"].shape == (13, 8, 8, 3) and episode["actions"].dtype == np.int64
    assert episode["rewards"].dtype == np.float32 and episode["rewards"][11] == 11
    assert vd.read_episode(path, 4, "")["actions"].tolist() == [0, 1, 2, 3] * 3


# ----------------------------------------------------------------------------------------------------------------------
# The sprites world: a one-frame clip cannot show a move, whatever the image size


def test_one_frame_sprites_clip_blames_num_frames():
    message = refused(vd, lambda: vd.make_sprites_dataset(4, 1, 16), "--num-frames 1", "at least 2")
    assert "--img-size" not in message


# ----------------------------------------------------------------------------------------------------------------------
# Video folders (the video script's --dataset folder): an empty, cut, corrupt or unreadable video, an unreadable folder


def write_clip(path, num_frames: int = 12):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8, (40, 30))
    for f in range(num_frames):
        writer.write(np.full((30, 40, 3), 20 * f, np.uint8))
    writer.release()


VIDEO_DAMAGE = {  # name: (damage the video at path, return the path the line names; words the line names)
    "empty": (lambda path, mp: cut(path, 0) or path, ["empty file", "replace it"]),
    "cut": (lambda path, mp: cut(path, path.stat().st_size // 2) or path, ["decodes no frame", "replace it"]),
    "no_moov": (lambda path, mp: cut(path, 100) or path, ["decodes no frame", "replace it"]),
    "text": (lambda path, mp: (path.write_bytes(b"not a video at all\n" * 50), path)[1], ["decodes no frame"]),
    "unreadable": (lambda path, mp: deny_reads(mp, path) or path, ["Permission denied", "make it readable"]),
    "unreadable_folder": (lambda path, mp: deny_reads(mp, path.parent) or path.parent,
                          ["cannot read this folder", "Permission denied", "move it out of --data-dir"]),
}


@pytest.mark.parametrize("case", VIDEO_DAMAGE)
def test_unreadable_video(case, tmp_path, monkeypatch, capfd):
    """Beside good clips, a video OpenCV cannot read was skipped with only FFmpeg's "moov atom not found" (no file
    name) on stderr; like an image, it is now refused with one line naming it, and nothing else on stderr."""
    (tmp_path / "more").mkdir()
    write_clip(tmp_path / "good.mp4")
    write_clip(tmp_path / "more" / "bad.mp4")
    args = vd.parse_args(["--preset", "tiny", "--dataset", "folder", "--data-dir", str(tmp_path)])[0]
    assert len(vd.load_video_folder(args).clip_starts) > 0  # both clips are good before the damage
    damage, words = VIDEO_DAMAGE[case]
    bad = damage(tmp_path / "more" / "bad.mp4", monkeypatch)
    capfd.readouterr()
    refused(vd, lambda: vd.load_video_folder(args), bad, *words)
    assert capfd.readouterr().err == ""  # no FFmpeg or OpenCV line beside ours


# ----------------------------------------------------------------------------------------------------------------------
# The whole path, one subprocess per script (run side by side: most of their time is starting torch): exit status 2,
# exactly one line on stderr, no run folder


@pytest.fixture(scope="module")
def whole_path(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("whole_path")
    (root / "cut" / "a").mkdir(parents=True)  # ddpm: a truncated PNG
    (root / "cut" / "a" / "cut.png").write_bytes(encoded(".png")[:200])
    for folder in ("a", "b"):  # dit: a truncated JPEG
        (root / "images" / folder).mkdir(parents=True)
        (root / "images" / folder / "good.png").write_bytes(encoded(".png"))
    (root / "images" / "b" / "cut.jpg").write_bytes(encoded(".jpg")[:300])
    write_episode(root / "episodes" / "a.npz", good_episode())  # diamond: actions of shape (T, 2) in --dataset-dir
    write_episode(root / "episodes" / "b.npz", with_changes(actions=np.zeros((6, 2), np.int64)))
    write_episode(vd.atari_folder(root / "data", "Breakout-v5") / "episode_00000.npz",  # video: a NaN reward
                  with_changes(rewards=NAN_REWARD))
    # (--no-torch-deterministic: on the CPU that call costs seconds before the data is read)
    runs = {
        "ddpm": ("ddpm_cifar10.py", "--preset", "tiny", "--no-torch-deterministic", "--dataset", "folder",
                 "--data-dir", root / "cut"),
        "dit": ("dit_cifar10.py", "--preset", "tiny", "--no-torch-deterministic", "--dataset", "folder", "--data-dir",
                root / "images", "--num-classes", "2"),
        "diamond": ("diamond_atari.py", "--env-id", "Breakout-v5", "--preset", "tiny", "--world-model-only",
                    "--no-torch-deterministic", "--dataset-dir", root / "episodes"),
        "video": ("video_diffusion.py", "--preset", "tiny", "--dataset", "atari", "--env-id", "Breakout-v5",
                  "--data-dir", root / "data", "--num-atari-episodes", "1"),
    }
    for name in runs:
        (root / name).mkdir()

    def run(name):
        return run_script(*runs[name], cwd=root / name, check=False)

    with ThreadPoolExecutor(len(runs)) as pool:
        results = dict(zip(runs, pool.map(run, runs)))
    return {"root": root, **results}


def test_whole_path_ddpm_truncated_png(whole_path):
    assert_one_line_error(whole_path["ddpm"], str(whole_path["root"] / "cut" / "a" / "cut.png"), "truncated PNG")
    assert not (whole_path["root"] / "ddpm" / "runs").exists()


def test_whole_path_dit_truncated_jpeg(whole_path):
    assert_one_line_error(whole_path["dit"], str(whole_path["root"] / "images" / "b" / "cut.jpg"), "truncated JPEG")
    assert not (whole_path["root"] / "dit" / "runs").exists()


def test_whole_path_diamond_bad_episode_in_dataset_dir(whole_path):
    assert_one_line_error(whole_path["diamond"], str(whole_path["root"] / "episodes" / "b.npz"), "actions", "(6, 2)",
                          "--dataset-dir")
    assert not (whole_path["root"] / "diamond" / "runs").exists()


def test_whole_path_video_bad_atari_episode(whole_path):
    assert_one_line_error(whole_path["video"], "episode_00000.npz", "rewards", "nan", "delete it")
    assert not (whole_path["root"] / "video" / "runs").exists()
