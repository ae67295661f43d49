"""video_diffusion.py: every block's shapes, zero output at init, guidance at s = 1 and s = 0, the samplers against
ddpm_cifar10.py's, the metrics on ground truth, autoregressive generation, a tiny model that must learn action and text
control, the script on every dataset kind, exact resume, torchrun, and bad inputs."""
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import (PYTHON, ROOT, assert_checkpoints_bitwise_equal, assert_one_line_error, checkpoint_tensors, file_hash,
                      load_module, measured, only_run_dir, SEED_SHIFT,
                      read_image_tags, read_scalars, run_script, run_until_line_then_kill, script_env)

vd = load_module("video_diffusion.py")
SCRIPT = "video_diffusion.py"
TINY = ["--preset", "tiny"]
# The smallest end-to-end run: a few steps, a small evaluation (it runs at the last step).
QUICK = [*TINY, "--num-eval-samples", "2", "--sample-batch-size", "2", "--num-sampling-steps", "2",
         "--long-video-frames", "10"]


def small_model(**overrides) -> "vd.VideoDiffusionModel":
    config = dict(in_channels=3, model_channels=16, num_res_blocks=1, channel_mult=(1, 2), attn_resolutions=(8,),
                  img_size=16, num_heads=2, norm_groups=4, num_actions=5, vocab_size=12, text_dim=32, text_layers=1,
                  max_text_len=6)
    config.update(overrides)
    return vd.VideoDiffusionModel(**config)


def randomise_(model: torch.nn.Module, seed: int = 0):
    """Gives every parameter (the zero-initialised ones too) random values, so that every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def conditions(batch: int, num_frames: int, num_actions: int = 5, action_dim: int = 0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    text = torch.zeros(batch, 6, dtype=torch.long)
    text[:, :3] = torch.randint(3, 12, (batch, 3), generator=generator)
    if action_dim:
        actions = torch.randn(batch, num_frames, action_dim, generator=generator)
    else:
        actions = torch.randint(0, num_actions, (batch, num_frames), generator=generator)
    return text, actions


# ---------------------------------------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("num_frames,height,width", [(1, 8, 8), (3, 16, 8), (6, 8, 24)])
def test_every_block_keeps_its_shape_for_several_clip_sizes(num_frames, height, width):
    b, c, emb = 2, 16, 64
    x = torch.randn(b, c, num_frames, height, width)
    per_frame_emb = torch.randn(b, num_frames, emb)
    text = torch.randn(b, 5, 32)
    text_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    assert vd.SinusoidalPosEmb(c)(torch.tensor([0, 999])).shape == (2, c)
    assert vd.ResBlock3D(c, 2 * c, emb, norm_groups=4)(x, per_frame_emb).shape == (b, 2 * c, num_frames, height, width)
    attention = randomise_(vd.SpatioTemporalAttention(c, num_heads=2, norm_groups=4, context_dim=32))
    out = attention(x, text, text_mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    model = randomise_(small_model())
    clip = torch.randn(b, 3, num_frames, height, width)
    text_tokens, actions = conditions(b, num_frames)
    eps = model(clip, torch.tensor([5, 900]), text_tokens, actions)
    assert eps.shape == clip.shape and torch.isfinite(eps).all()


def test_model_predicts_zero_at_initialisation_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    for action_dim in (0, 2):
        model = small_model(action_dim=action_dim, num_actions=0 if action_dim else 5)
        x = torch.randn(3, 3, 4, 16, 16)
        text, actions = conditions(3, 4, action_dim=action_dim)
        context_mask = torch.tensor([[1.0, 1, 0, 0]] * 3)
        eps = model(x, torch.tensor([1, 500, 999]), text, actions, torch.tensor([False, True, False]),
                    torch.randn_like(x), context_mask, torch.tensor([0, 5, 50]))
        assert torch.equal(eps, torch.zeros_like(eps))
    # after one step on random targets every parameter has moved away from its init (nothing is disconnected)
    model = randomise_(small_model(), seed=1)
    x = torch.randn(2, 3, 4, 16, 16)
    text, actions = conditions(2, 4)
    model(x, torch.tensor([3, 700]), text, actions, torch.tensor([False, True]), torch.randn_like(x),
          torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]), torch.tensor([3, 0])).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad


@pytest.mark.parametrize("action_dim", [0, 2])
def test_guidance_scale_one_is_conditional_and_zero_is_unconditional(action_dim):
    # float64: batched and separate forwards then agree far below 1e-6, so the test sees only the guidance formula
    model = randomise_(small_model(action_dim=action_dim, num_actions=0 if action_dim else 5)).double().eval()
    b, num_frames = 3, 4
    x = torch.randn(b, 3, num_frames, 8, 8, dtype=torch.float64)
    t = torch.tensor([10, 400, 990])
    text, actions = conditions(b, num_frames, action_dim=action_dim)
    actions = actions.double() if action_dim else actions
    context = torch.randn_like(x)
    context_mask = torch.tensor([[1.0, 1, 0, 0]] * b, dtype=torch.float64)
    level = torch.tensor([2, 2, 2])
    with torch.no_grad():
        conditional = model(x, t, text, actions, None, context, context_mask, level)
        unconditional = model(x, t, None, None, None, context, context_mask, level)
        null_by_flags = model(x, t, model.null_text(b, x.device), actions, torch.ones(b, dtype=torch.bool), context,
                              context_mask, level)
        assert (conditional - unconditional).abs().max() > 1e-2  # the conditions matter in this model
        torch.testing.assert_close(null_by_flags, unconditional, atol=1e-6, rtol=0)
        guided = {s: vd.guided_model_fn(model, s, text, actions, None, context, context_mask, level)(x, t)
                  for s in (0.0, 1.0, 3.0)}
    torch.testing.assert_close(guided[1.0], conditional, atol=1e-6, rtol=0)
    torch.testing.assert_close(guided[0.0], unconditional, atol=1e-6, rtol=0)
    torch.testing.assert_close(guided[3.0], unconditional + 3.0 * (conditional - unconditional), atol=1e-5, rtol=0)


def test_guidance_runs_one_batched_forward_per_step():
    model = randomise_(small_model()).eval()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    x = torch.randn(2, 3, 4, 16, 16)
    text, actions = conditions(2, 4)
    with torch.no_grad():
        vd.guided_model_fn(model, 2.0, text, actions)(x, torch.tensor([5, 5]))
    assert calls == [4]


def test_tokenizer_vocabulary_null_and_unknown_words():
    vocabulary = vd.build_vocabulary(["a red square moves right", "A blue square moves UP!", ""])
    assert vocabulary[:3] == vd.SPECIAL_TOKENS and "right" in vocabulary and "up" in vocabulary
    tokens = vd.tokenize(["a red square", "", "a purple square"], vocabulary, 5)
    assert tokens.shape == (3, 5)
    assert tokens[0, :3].tolist() == [vocabulary.index(w) for w in ("a", "red", "square")] and tokens[0, 3] == vd.PAD_ID
    assert tokens[1].tolist() == [vd.NULL_ID] + [vd.PAD_ID] * 4  # the empty caption is the null condition
    assert tokens[2, 1] == vd.UNK_ID
    model = small_model(vocab_size=len(vocabulary), max_text_len=5)
    assert torch.equal(model.null_text(1, torch.device("cpu"))[0], tokens[1])


def test_data_captions_cut_to_max_text_len_or_with_unknown_words_are_said_in_one_notice():
    sixteen = " ".join(f"w{i}" for i in range(16))
    captions = ["a red square", f"{sixteen} then left", f"{sixteen} then right", f"{sixteen} then right!", ""]
    vocabulary = vd.build_vocabulary(captions)
    assert vd.data_caption_notices(captions, vocabulary, 16) == [
        "notice: 2 of 4 captions are cut to their first --max-text-len 16 words"]
    assert vd.data_caption_notices(captions, vocabulary, 18) == []  # nothing cut, every word known: silent
    assert vd.caption_as_read(captions[1], vocabulary, 16) == sixteen
    # a resumed model reads its own vocabulary: the data's new words are <unk> (the cut words do not count)
    old_vocabulary = vd.build_vocabulary(["a red square", sixteen])
    assert vd.data_caption_notices(["a purple square", "a red square", "A Purple cube", f"{sixteen} zebra"],
                                   old_vocabulary, 16) == [
        "notice: 1 of 4 captions are cut to their first --max-text-len 16 words; words the model never learned, "
        "read as <unk>: purple, cube"]
    assert vd.caption_as_read("A purple square!", old_vocabulary, 16) == "a <unk> square"


# ---------------------------------------------------------------------------------------------------------------------
# Samplers: the same code as ddpm_cifar10.py's, on video-shaped tensors


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_equal_ddpm_cifar10s_on_video_tensors(sampler):
    ddpm = load_module("ddpm_cifar10.py")
    alphas_cumprod = vd.make_alphas_cumprod(vd.make_beta_schedule("linear", 1000))
    torch.testing.assert_close(alphas_cumprod, ddpm.make_alphas_cumprod(ddpm.make_beta_schedule("linear", 1000)),
                               atol=0, rtol=0)
    weight = torch.linspace(-0.5, 0.5, 3 * 4)

    def model_fn(x, t):  # a smooth stand-in network: depends on x and t
        return torch.tanh(x * weight.reshape(1, 3, 4, 1, 1) + t.float()[:, None, None, None, None] / 1000)

    x_T = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    ours, theirs = [], []
    for module, out in ((vd, ours), (ddpm, theirs)):
        generator = torch.Generator().manual_seed(1)
        if sampler == "ddpm":
            out.append(module.ddpm_sample(model_fn, x_T, alphas_cumprod, 20, generator=generator))
        else:
            out.append(module.ddim_sample(model_fn, x_T, alphas_cumprod, 20, eta=0.5, generator=generator))
    assert ours[0].shape == x_T.shape
    assert torch.equal(ours[0], theirs[0])


# ---------------------------------------------------------------------------------------------------------------------
# Metrics on ground truth


@pytest.fixture(scope="module")
def sprites():
    return vd.make_sprites_dataset(400, 8, 16, num_distractors=2, seed=3)


def clips_of(data) -> np.ndarray:
    t = data.frames.shape[0] // len(data.clip_starts)
    return data.frames.reshape(len(data.clip_starts), t, *data.frames.shape[1:]).transpose(0, 2, 1, 3, 4)


def test_sprites_world_follows_its_actions_and_captions(sprites):
    assert sprites.frames.dtype == np.uint8 and sprites.frames.shape == (400 * 8, 3, 16, 16)
    assert sprites.actions.shape == (400 * 8,) and sprites.num_actions == 5
    for i in range(5):
        d = sprites.directions[i]
        assert sprites.captions[i].endswith(f"square moves {vd.DIRECTIONS[d]}")
        clip_actions = sprites.actions[i * 8:(i + 1) * 8]
        assert (clip_actions == d + 1).mean() >= 0.25 and not (clip_actions == vd.SPRITE_ACTIONS.index(
            {"up": "down", "down": "up", "left": "right", "right": "left"}[vd.DIRECTIONS[d]])).any()
        # re-rendering from the initial state with the same actions gives the same frames
        rendered = vd.render_sprite_clip(sprites.sprite_states[i], clip_actions, 16)
        assert np.array_equal(rendered, sprites.frames[i * 8:(i + 1) * 8])


def test_the_first_frame_does_not_tell_the_direction(sprites):
    # Control must come from the caption or the actions: the start position is drawn whatever the direction, so the
    # best guess of the direction from where the sprite starts (the nearest per-direction mean start) is near chance.
    starts = np.array([state["sprite"] for state in sprites.sprite_states])  # (N, 2) top-left corners
    means = np.stack([starts[sprites.directions == d].mean(0) for d in range(4)])
    guess = np.argmin(((starts[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (guess == sprites.directions).mean() < 0.4  # chance 0.25; starts with room to move their way gave 0.56
    span = 16 - vd.sprite_geometry(16)[0]
    assert abs(means[3, 0] - means[2, 0]) < 0.2 * span and abs(means[1, 1] - means[0, 1]) < 0.2 * span


def direction_accuracy(clips, directions) -> float:
    """evaluate()'s eval/*_direction_accuracy: the share of clips whose sprite moves the given way."""
    return float(np.mean(vd.movement_directions(clips) == directions))


def test_real_clips_score_text_direction_accuracy_one_and_shuffled_captions_near_chance(sprites):
    clips = clips_of(sprites)
    assert direction_accuracy(clips, sprites.directions) == 1.0
    shuffled = np.random.default_rng(0).permutation(sprites.directions)
    accuracy = direction_accuracy(clips, shuffled)
    assert 0.15 < accuracy < 0.35  # chance is 1/4
    # with continuous actions too
    continuous = vd.make_sprites_dataset(40, 8, 16, num_distractors=1, action_dim=2, seed=4)
    assert continuous.actions.shape == (40 * 8, 2) and continuous.actions.dtype == np.float32
    assert direction_accuracy(clips_of(continuous), continuous.directions) == 1.0


def test_true_actions_beat_shuffled_actions_in_rollout_psnr(sprites):
    real = clips_of(sprites)[:64]
    actions = sprites.actions.reshape(400, 8)[:64]
    states = sprites.sprite_states[:64]

    def rollouts(action_rows):  # a perfect world model: the simulator, from each clip's initial state
        return np.stack([vd.render_sprite_clip(s, a, 16).transpose(1, 0, 2, 3) for s, a in zip(states, action_rows)])

    k = 2
    true = vd.rollout_psnr(rollouts(actions), real, k)
    shuffled = vd.rollout_psnr(rollouts(np.roll(actions, 1, axis=0)), real, k)
    copy_last = vd.rollout_psnr(np.repeat(real[:, :, k - 1:k], 8, axis=2), real, k)
    assert true == 100.0  # identical frames: capped at 100 dB
    assert shuffled < 40.0 and copy_last < 40.0
    assert vd.rollout_psnr(np.zeros_like(real), np.full_like(real, 255)) == 0.0  # all-wrong [0, 1] images: 0 dB


def test_movement_direction_from_centroids_by_hand():
    clips = np.full((4, 3, 3, 16, 16), 20, dtype=np.uint8)
    for i, (dx, dy) in enumerate([(0, -2), (0, 3), (-2, 0), (4, 1)]):
        for f in range(3):
            x, y = 6 + dx * f // 2, 6 + dy * f // 2
            clips[i, :, f, y:y + 4, x:x + 4] = np.array([230, 40, 40])[:, None, None]
            clips[i, :, f, 0:2, 12 - f * 3:14 - f * 3] = 150  # a grey distractor moving left: ignored
    assert vd.movement_directions(clips).tolist() == [0, 1, 2, 3]
    clips[0, :, -1] = 20  # the sprite vanished: no direction
    assert vd.movement_directions(clips)[0] == -1


# ---------------------------------------------------------------------------------------------------------------------
# Autoregressive generation


def test_autoregressive_generation_is_longer_than_training_clips_and_keeps_its_context():
    model = randomise_(small_model(), seed=2).eval()
    for p in model.parameters():
        p.data.mul_(0.3)
    alphas_cumprod = vd.make_alphas_cumprod(vd.make_beta_schedule("linear", 1000))
    text, actions = conditions(2, 19)
    generator = torch.Generator().manual_seed(0)
    args = vd.replace(vd.Args(), context_frames=2, cfg_scale=1.5, num_sampling_steps=3, context_noise_sampling_step=0)
    video = vd.generate_video(model, alphas_cumprod, args, 19, (2, 3, 6, 16, 16), generator, text, actions)
    assert video.shape == (2, 3, 19, 16, 16)
    assert torch.isfinite(video).all() and video.abs().max() <= 1.0
    # a continuation block starts from the given frames: generate_video() keeps them in the result
    context = torch.rand(2, 3, 6, 16, 16) * 2 - 1
    args = vd.replace(args, cfg_scale=1.0, context_noise_sampling_step=10)
    block = vd.generate_video(model, alphas_cumprod, args, 6, (2, 3, 6, 16, 16), torch.Generator().manual_seed(0),
                              text, actions[:, :6], None, context[:, :, :2])
    assert block.shape == (2, 3, 6, 16, 16) and torch.equal(block[:, :, :2], context[:, :, :2])


def test_context_noise_is_q_sample_at_the_given_level():
    alphas_cumprod = vd.make_alphas_cumprod(vd.make_beta_schedule("linear", 1000))
    context, noise = torch.randn(2, 3, 4, 5, 5), torch.randn(2, 3, 4, 5, 5)
    out = vd.noise_context(context, torch.tensor([0, 99]), alphas_cumprod, noise)
    for i, level in enumerate((0, 99)):
        abar = float(alphas_cumprod[level])
        torch.testing.assert_close(out[i], abar ** 0.5 * context[i] + (1 - abar) ** 0.5 * noise[i])



@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_is_l_simple_on_the_frames_to_generate(prediction):
    # the output conv starts at zero: the network predicts 0, so the loss is the mean square of the target over the
    # frames that are not context, divided by the full clip size
    model = small_model()
    alphas_cumprod = vd.make_alphas_cumprod(vd.make_beta_schedule("linear", 1000))
    x0, noise = torch.rand(2, 3, 6, 16, 16) * 2 - 1, torch.randn(2, 3, 6, 16, 16)
    t = torch.tensor([10, 900])
    mask = torch.zeros(2, 6)
    mask[0, :2] = 1  # the first clip has 2 context frames
    loss = vd.video_diffusion_loss(model, x0, t, noise, alphas_cumprod, context=x0, context_mask=mask,
                                   context_noise=torch.zeros(2, dtype=torch.long), prediction=prediction)
    abar = alphas_cumprod[t].float()[:, None, None, None, None]
    target = abar.sqrt() * noise - (1 - abar).sqrt() * x0 if prediction == "v" else noise
    torch.testing.assert_close(loss, (target ** 2 * (1 - mask)[:, None, :, None, None]).mean())
    loss.backward()  # the zero output conv gets a gradient: the loss trains the network

# ---------------------------------------------------------------------------------------------------------------------
# A tiny model learns action control and text control (one run, measured separately by the script's own metrics)

# 8x8 sprites (a 2x2 square moving 1 px per step), 6 frames, no distractor, v-prediction (the tiny preset's). Each
# clip is generated from a real first frame under one condition alone. The "swapped" metrics command each first frame
# with ANOTHER clip's caption or actions: whatever the model may read from the first frame, it agrees with that
# command only by chance (1/4; 128 clips: one sigma is 0.038), so following it is control.
# The caption and the actions are each dropped with probability 0.5 (both with 0.1), so each often steers alone.
# Measured at 1000 steps (seeds 1 and 2): caption 0.95 / 0.89 own, 0.82 / 0.83 swapped; actions 0.89 / 0.84 own,
# 0.79 / 0.76 swapped; rollout delta-PSNR 5.2 / 5.0 dB. At 500 steps neither is learned yet (0.27 to 0.41 swapped).
# With the old drop rule (caption-only in 15% of samples) and starts that hinted the direction, the caption scored
# chance (0.27) swapped at 1000 steps.
# The run: the cpu preset (video_control.sh's recipe) shortened to its first evaluation, 1000 of its 2000 steps; at step
# 600 the caption is not followed yet (0.35 swapped, RESULTS 2d), so it cannot be shorter.
# Over seeds (RESULTS.md section 7), control at step 1000 is bimodal: seeds 1 and 2 follow both commands (caption
# 0.82 / 0.83 swapped, actions 0.79 / 0.76), seed 3 only starts to (caption 0.375, actions 0.51; at step 800 0.24 and
# 0.32). The thresholds sit below seed 3 and above chance (0.25; one sigma 0.038 on 128 clips): a model that ignores
# a command scores chance on it, and fails.
LEARN_STEPS = 1000
LEARN = ["--preset", "cpu", "--total-steps", str(LEARN_STEPS), "--save-every", str(LEARN_STEPS)]


@pytest.fixture(scope="module")
def learned_run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("video_learn")
    run_script(SCRIPT, *LEARN, "--seed", 1 + SEED_SHIFT, "--output-dir", out, timeout=1800)  # a hang guard: about 10 min on a shared core
    return only_run_dir(out)


@pytest.fixture(scope="module")
def learned_run(learned_run_dir):
    return {k: v[-1][1] for k, v in read_scalars(learned_run_dir).items() if k.startswith("eval/")}


def judge_step0(args, n: int) -> dict:
    """The judge's scores of the untrained model (step 0: the zero-initialised output conv predicts v = 0) on the
    evaluation's first n clips (their noise, captions and actions) and sampler, scored as the run's evaluation scores
    its samples."""
    args = vd.replace(args, data_dir=str(ROOT / "data"))
    data = vd.load_dataset(args)
    vocabulary = vd.build_vocabulary(data.captions)
    untrained = vd.build_model(args, len(vocabulary), data.num_actions).eval().requires_grad_(False)
    alphas_cumprod = vd.make_alphas_cumprod(vd.make_beta_schedule(args.beta_schedule, args.timesteps,
                                                                  args.beta_start, args.beta_end))
    sampler = vd.DeviceClips(vd.eval_subset(data, args), vocabulary, args, torch.device("cpu"), alphas_cumprod,
                             untrained, torch.autocast("cpu", enabled=False))
    scores = vd.judge_clips(sampler, sampler.clips(n))  # each frame of the (N, 3, T, H, W) uint8 clips
    return {k[len("eval/judge_"):]: v for k, v in scores.items()}


@pytest.mark.slow
@pytest.mark.learning
def test_tiny_model_moves_the_sprite_where_the_actions_say(learned_run):
    measured(**{k: v for k, v in learned_run.items() if "action" in k})
    # another clip's actions (null caption) from this clip's first frame: chance 0.25, 0.4 is 4 sigma above it
    # (3 seeds and AVX2 kernels: swapped 0.51 to 0.79, own 0.61 to 0.89, delta-PSNR 2.6 to 5.2 dB)
    assert learned_run["eval/action_direction_accuracy_swapped"] >= 0.4, learned_run
    assert learned_run["eval/action_direction_accuracy"] >= 0.45, learned_run
    # rollouts from real context frames are closer to the real clip with the true actions than with shuffled ones
    assert learned_run["eval/action_control_dpsnr"] > 1.5, learned_run


@pytest.mark.slow
@pytest.mark.learning
def test_tiny_model_moves_the_sprite_where_the_caption_says(learned_run):
    measured(**{k: v for k, v in learned_run.items() if "text" in k})
    # another clip's caption (null actions) from this clip's first frame: chance 0.25; over 3 seeds and AVX2
    # kernels swapped 0.375 to 0.83, own 0.445 to 0.945 (seed 3 is late, above): 0.32 and 0.37 are 1.8 and
    # 3.2 sigma above chance
    assert learned_run["eval/text_direction_accuracy_swapped"] >= 0.32, learned_run
    assert learned_run["eval/text_direction_accuracy"] >= 0.37, learned_run


@pytest.mark.slow
@pytest.mark.learning
def test_cpu_preset_shortened_draws_sprites_of_the_captions_colour(learned_run, learned_run_dir, torch_threads):
    """The judge on every generated frame (caption and actions given, from noise): a sprite at all, of the colour the
    caption names (chance 0.25), against the preset's untrained model (step 0) on the same clips and noise. Measured
    at step 1000 of the preset (RESULTS 2d, seeds 1 and 2): recognised 0.922 and 0.973, colour 0.987 and 0.956,
    Frechet 46.6 and 36.2 (real-vs-real 2.57). Step 0 on the first 32 of those clips (4 s, not 15 s for all 128: the
    suite's budget): recognised 0, colour 0.38, Frechet 11,845 (on all 128: 0, 0.27 and 11,621)."""
    args = vd.parse_args(["--config", str(learned_run_dir / "config.json")])[0]
    step0 = judge_step0(args, 32)
    final = {k[len("eval/judge_"):]: v for k, v in learned_run.items() if k.startswith("eval/judge_")}
    measured(**{f"step0_{k}": v for k, v in step0.items()}, **final)
    assert final["recognised_real"] >= 0.9 and final["class_accuracy_real"] >= 0.9, final  # the judge works
    assert step0["recognised"] <= 0.1 and step0["class_accuracy"] <= 0.5, step0  # no sprite, colours by chance
    assert final["recognised"] >= step0["recognised"] + 0.5, final  # better than step 0 by stated margins ...
    assert final["class_accuracy"] >= step0["class_accuracy"] + 0.3, final  # (in the caption's colour)
    assert final["frechet"] <= step0["frechet"] / 50, (final, step0)
    assert final["frechet_real"] <= final["frechet"] <= 200, final  # ... and inside [floor, ceiling]


# ---------------------------------------------------------------------------------------------------------------------
# The script as a user runs it


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("video_tiny")
    result = run_script(SCRIPT, *TINY, "--seed", 1 + SEED_SHIFT, "--output-dir", out)
    return only_run_dir(out), result


@pytest.mark.learning
def test_tiny_run_logs_the_judge(tiny_run):
    """eval/judge_* on the generated frames (colour vs the caption's) beside real sprites' values: the real frames
    are recognised and their colour told (the judge works); 40 steps draw no sprite yet (measured: recognised 0.02,
    Frechet 3,700 vs 137 real-vs-real, DDIM-4)."""
    run_dir, result = tiny_run
    final = {k[len("eval/judge_"):]: v[-1][1] for k, v in read_scalars(run_dir).items() if k.startswith("eval/judge_")}
    assert set(final) == {"recognised", "recognised_real", "frechet", "frechet_real", "class_accuracy",
                          "class_accuracy_real"}
    measured(**final)
    assert final["recognised_real"] >= 0.9 and final["class_accuracy_real"] >= 0.9
    assert final["recognised"] <= 0.1 and final["frechet"] > 10 * final["frechet_real"]
    assert "judge_recognised" in result.stdout


def read_mp4(path) -> list:
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def test_tiny_preset_writes_events_config_mp4s_metrics_and_a_safe_checkpoint(tiny_run):
    run_dir, result = tiny_run
    assert run_dir.name.startswith(f"sprites__video_diffusion__{1 + SEED_SHIFT}__")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "tiny" and config["num_frames"] == 8
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert checkpoint["script"] == SCRIPT and checkpoint["step"] == 40 and checkpoint["num_actions"] == 5
    assert "right" in checkpoint["vocabulary"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    assert "saved checkpoint at step 40" in result.stdout
    scalars = read_scalars(run_dir)
    for tag in ("losses/mse", "charts/learning_rate", "charts/grad_norm", "charts/SPS",
                "eval/psnr_true_actions", "eval/psnr_shuffled_actions", "eval/psnr_copy_last",
                "eval/action_control_dpsnr", "eval/text_direction_accuracy", "eval/action_direction_accuracy",
                "eval/text_direction_accuracy_swapped", "eval/action_direction_accuracy_swapped"):
        assert tag in scalars, tag
    assert all(np.isfinite(v) for _, v in scalars["losses/mse"])
    assert scalars["charts/num_parameters"] == [(0, sum(v.numel() for v in checkpoint["model"].values()))]
    assert "perf/mfu" not in scalars  # MFU on CUDA only
    psnr = {k: scalars[f"eval/{k}"][-1][1] for k in ("psnr_true_actions", "psnr_shuffled_actions")}
    assert scalars["eval/action_control_dpsnr"][-1][1] == pytest.approx(psnr["psnr_true_actions"] -
                                                                        psnr["psnr_shuffled_actions"], abs=1e-4)
    assert {"samples/clips", "samples/rollouts_true_actions", "samples/long_video"} <= set(read_image_tags(run_dir))
    clips = np.load(run_dir / "samples" / "step00000040.npz")["arr_0"]
    assert clips.dtype == np.uint8 and clips.shape == (8, 8, 16, 16, 3)  # (N, T, H, W, 3)
    assert len(read_mp4(run_dir / "samples" / "step00000040.mp4")) == 8
    long_videos = np.load(run_dir / "samples" / "long_step00000040.npz")["arr_0"]
    assert long_videos.shape[1] == 12 and len(read_mp4(run_dir / "samples" / "long_step00000040.mp4")) == 12


def test_sample_only_writes_clips_and_a_long_video(tiny_run, tmp_path):
    run_dir = tmp_path / tiny_run[0].name
    shutil.copytree(tiny_run[0], run_dir)
    result = run_script(SCRIPT, "--resume", run_dir, "--sample-only", "--num-samples", "3", "--cfg-scale", "3",
                        "--long-video-frames", "20", "--num-sampling-steps", "2")
    assert "wrote 3 clips" in result.stdout
    npz = [p for p in (run_dir / "samples").glob("sample_only_*.npz")]
    assert len(npz) == 1 and np.load(npz[0])["arr_0"].shape == (3, 8, 16, 16, 3)
    long_npz = list((run_dir / "samples").glob("long_sample_only_*.npz"))
    assert len(long_npz) == 1 and np.load(long_npz[0])["arr_0"].shape == (3, 20, 16, 16, 3)


def test_atari_clips_are_recorded_as_episode_files_and_train(tmp_path):
    out, data_dir = tmp_path / "runs", tmp_path / "data"
    run_script(SCRIPT, *QUICK, "--dataset", "atari", "--env-id", "ALE/Breakout-v5", "--data-dir", data_dir,
               "--num-atari-episodes", "2", "--atari-episode-steps", "12", "--total-steps", "2", "--output-dir", out)
    files = sorted(vd.atari_folder(data_dir, "Breakout-v5").glob("episode_*.npz"))
    assert len(files) == 2
    with np.load(files[0], allow_pickle=False) as f:
        assert f["obs"].dtype == np.uint8 and f["obs"].shape[1:] == (16, 16, 3)
        n = len(f["actions"])
        assert f["actions"].dtype == np.int64 and f["obs"].shape[0] == n + 1
        assert f["rewards"].dtype == np.float32 and f["terminated"].dtype == bool and f["truncated"].dtype == bool
        assert f["caption"].tolist() == ["Breakout"]
    run_dir = only_run_dir(out)
    assert run_dir.name.startswith("Breakout-v5__video_diffusion__")
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert checkpoint["num_actions"] == 4 and "paddle" in checkpoint["vocabulary"]
    assert "eval/psnr_true_actions" in read_scalars(run_dir)
    # an Atari model plays headless with the game's own actions (F fires); only the sprites world has a real twin
    result = run_script(SCRIPT, "--resume", run_dir, "--play-keys", "FR", "--num-sampling-steps", "1")
    assert "keys: N noop, F fire, R right, L left" in result.stdout
    assert [len(read_mp4(p)) for p in (run_dir / "play").glob("play_imagined_*.mp4")] == [3]
    result = run_script(SCRIPT, "--resume", run_dir, "--play-keys", "R", "--play-world", "real", check=False)
    assert result.returncode == 2 and result.stderr.strip().endswith("for real here; give --play-world imagined")


def test_atari_captions_name_the_action_held_most():
    assert vd.describe_atari_action("RIGHTFIRE") == "moves right and fires"
    assert vd.describe_atari_action("NOOP") == "stays still"
    assert vd.atari_ids("Breakout") == ("ALE/Breakout-v5", "Breakout-v5", "Breakout")


def test_atari_recorder_keeps_the_max_of_the_last_two_frames_of_each_frame_skip(tmp_path):
    """DIAMOND's AtariEnv step (frameskip 1, each action 4 frames, the max of the last two), rebuilt here on its own
    emulator from the recorded actions, gives the recorded frames; the last frame alone (ALE's frameskip 4) differs in
    many of them (SpaceInvaders' bullets and laser flicker)."""
    import cv2
    import gymnasium as gym

    seed, steps, size = 3, 100, 64
    gym_id, canonical, game = vd.atari_ids("SpaceInvaders")
    vd.record_atari_episodes(gym_id, tmp_path, 1, steps, size, seed, game)
    with np.load(tmp_path / "episode_00000.npz", allow_pickle=False) as f:
        obs, actions = f["obs"], f["actions"]
    assert len(actions) == steps and len(set(actions.tolist())) > 2

    def resized(rgb):  # as resize_frame: the centre square, then cv2.resize with INTER_AREA
        h, w = rgb.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return cv2.resize(rgb[top: top + side, left: left + side], (size, size), interpolation=cv2.INTER_AREA)

    env = gym.make("ALE/SpaceInvaders-v5", frameskip=1, repeat_action_probability=0.0)
    frame, _ = env.reset(seed=seed * 1_000_003)  # the recorder's seed for episode 0
    expected, last_only = [resized(frame)], [resized(frame)]
    for action in actions:
        frames = []
        for _ in range(4):
            frame, _, terminated, truncated, _ = env.step(int(action))
            frames.append(frame)
            if terminated or truncated:
                break
        expected.append(resized(np.maximum(frames[-2], frames[-1]) if len(frames) > 1 else frames[-1]))
        last_only.append(resized(frames[-1]))
    env.close()
    assert obs.shape == (steps + 1, size, size, 3)
    assert np.array_equal(obs, np.stack(expected))
    differs = np.mean([not np.array_equal(a, b) for a, b in zip(expected, last_only)])
    assert differs > 0.2, differs


def write_video(path, frames, fps=10):
    import cv2

    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for frame in frames:
        writer.write(frame)
    writer.release()


def test_runs_on_a_folder_of_videos_with_captions(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, colour in enumerate([(40, 40, 220), (40, 200, 40)]):
        frames = []
        for f in range(12):
            frame = np.full((30, 40, 3), 20, np.uint8)
            frame[10:18, 2 + 2 * f: 10 + 2 * f] = colour
            frames.append(frame)
        write_video(videos / f"clip{i}.mp4", frames)
    (videos / "captions.json").write_text(json.dumps({"clip0.mp4": "a red block slides right"}))
    out = tmp_path / "runs"
    result = run_script(SCRIPT, *QUICK, "--dataset", "folder", "--data-dir", videos, "--total-steps", "2",
                        "--output-dir", out, "--batch-size", "16", "--max-text-len", "4")
    num_clips = int(re.search(r"data: ([\d,]+) clips", result.stdout).group(1).replace(",", ""))
    assert num_clips < 16 and f"notice: {num_clips} clips, fewer than --batch-size 16" in result.stdout  # said, trains
    cut = "notice: 1 of 2 captions are cut to their first --max-text-len 4 words"
    assert cut in result.stdout.splitlines()
    run_dir = only_run_dir(out)
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert "slides" in checkpoint["vocabulary"] and checkpoint["num_actions"] == 0
    data = vd.load_video_folder(vd.parse_args(["--dataset", "folder", "--data-dir", str(videos), *TINY])[0])
    assert data.frames.shape[1:] == (3, 16, 16) and len(data.clip_starts) == 4  # 2 videos x windows 0, 4
    assert data.captions.count("a red block slides right") == 2 and data.captions.count("") == 2
    # sampling from the model after its captions changed: the word it never learned is said (it reads <unk>)
    (videos / "captions.json").write_text(json.dumps({"clip0.mp4": "a purple block slides right"}))
    result = run_script(SCRIPT, "--resume", run_dir, "--sample-only", "--num-samples", "1", "--num-sampling-steps",
                        "1", "--long-video-frames", "8")
    assert f"{cut}; words the model never learned, read as <unk>: purple" in result.stdout.splitlines()



# ---------------------------------------------------------------------------------------------------------------------
# Exact resume, signals, torchrun


RESUME_ARGS = [*QUICK, "--total-steps", "8", "--save-every", "4", "--eval-every", "1000", "--log-every", "2"]


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run_script(SCRIPT, *RESUME_ARGS, "--output-dir", reference)
    run_until_line_then_kill(SCRIPT, *RESUME_ARGS, "--output-dir", interrupted,
                             line_startswith="saved checkpoint at step 4")
    run_dir = only_run_dir(interrupted)
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"] == 4
    run_script(SCRIPT, "--resume", run_dir)
    assert_checkpoints_bitwise_equal(only_run_dir(reference) / "checkpoints" / "latest.pt",
                                     run_dir / "checkpoints" / "latest.pt")
    a = checkpoint_tensors(only_run_dir(reference) / "checkpoints" / "latest.pt")
    b = checkpoint_tensors(run_dir / "checkpoints" / "latest.pt")
    assert torch.equal(a["/train_generator"], b["/train_generator"]) and torch.equal(a["/rng/torch"], b["/rng/torch"])
    steps = [s for s, _ in read_scalars(run_dir)["losses/mse"]]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # no point logged twice after the resume


def test_sigterm_saves_and_exits_zero(tmp_path):
    out = run_until_line_then_kill(SCRIPT, *QUICK, "--total-steps", "100000", "--output-dir", tmp_path,
                                   "--save-every", "2", line_startswith="saved checkpoint at step 2",
                                   sig=__import__("signal").SIGTERM)
    assert "stopped by signal" in out or "saved checkpoint" in out
    step = torch.load(only_run_dir(tmp_path) / "checkpoints" / "latest.pt", weights_only=True)["step"]
    assert 2 <= step < 100000


def test_torchrun_two_processes_match_one_process(tmp_path):
    common = [*QUICK, "--total-steps", "2", "--batch-size", "4", "--save-every", "2", "--eval-every", "1000",
              "--num-sprite-clips", "16"]
    run_script(SCRIPT, *common, "--output-dir", tmp_path / "one")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / SCRIPT), *common,
           "--output-dir", str(tmp_path / "two")]
    result = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    one = checkpoint_tensors(only_run_dir(tmp_path / "one") / "checkpoints" / "latest.pt")
    two = checkpoint_tensors(only_run_dir(tmp_path / "two") / "checkpoints" / "latest.pt")
    model_keys = [k for k in one if k.startswith("/model/")]
    assert model_keys
    args = vd.parse_args(common)[0]
    initial = vd.build_model(args, len(torch.load(only_run_dir(tmp_path / "one") / "checkpoints" / "latest.pt",
                                                  weights_only=True)["vocabulary"]), 5)
    assert any(not torch.equal(one[f"/model/{k}"], v) for k, v in initial.state_dict().items())  # it trained
    for key in model_keys + [k for k in one if k.startswith("/ema/")]:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing lost


@pytest.fixture()
def saved_run(tiny_run, tmp_path):
    run_dir = tmp_path / tiny_run[0].name
    shutil.copytree(tiny_run[0], run_dir)
    return run_dir, file_hash(run_dir / "checkpoints" / "latest.pt")


def test_error_corrupt_checkpoint(saved_run):
    run_dir, _ = saved_run
    (run_dir / "checkpoints" / "latest.pt").write_bytes(b"\x00garbage")
    assert_one_line_error(run_script(SCRIPT, "--resume", run_dir, check=False), "cannot load checkpoint")


def test_error_checkpoint_of_another_script_or_another_model_shape(saved_run, tmp_path):
    run_dir, _ = saved_run
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    other = tmp_path / "other.pt"
    torch.save(dict(checkpoint, script="ddpm_cifar10.py"), other)
    assert_one_line_error(run_script(SCRIPT, "--resume", other, check=False), "ddpm_cifar10.py")
    checkpoint["args"]["model_channels"] = 32
    torch.save(checkpoint, other)
    assert_one_line_error(run_script(SCRIPT, "--resume", other, "--sample-only", check=False), "do not fit")


def test_error_changed_flag_on_resume_leaves_checkpoint_untouched(saved_run):
    run_dir, digest = saved_run
    result = run_script(SCRIPT, "--resume", run_dir, "--learning-rate", "0.1", check=False)
    assert_one_line_error(result, "--learning-rate")
    assert file_hash(run_dir / "checkpoints" / "latest.pt") == digest



def test_error_guidance_from_a_checkpoint_without_a_trained_null_condition(saved_run, tmp_path):
    run_dir, _ = saved_run
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    checkpoint["args"]["null_cond_prob"] = 0.0
    torch.save(checkpoint, tmp_path / "no_null.pt")
    result = run_script(SCRIPT, "--resume", tmp_path / "no_null.pt", "--sample-only", "--cfg-scale", "3", check=False)
    assert_one_line_error(result, "--cfg-scale 3", "--null-cond-prob 0")

@pytest.mark.parametrize("flags,words", [
    (["--num-sampling-steps", "0"], ["--num-sampling-steps"]),
    (["--num-heads", "3"], ["--num-heads", "divide"]),
    (["--null-cond-prob", "1.5"], ["--null-cond-prob", "[0, 1]"]),
])
def test_error_impossible_settings(flags, words, tmp_path):
    result = run_script(SCRIPT, *TINY, "--output-dir", tmp_path, *flags, check=False)
    assert_one_line_error(result, *words)
    assert not any(tmp_path.iterdir())  # nothing written for a run that never started


@pytest.mark.parametrize("flags,words", [
    (["--img-size", "15"], ["--img-size"]),
    (["--context-frames", "8"], ["--context-frames"]),
    (["--dataset", "atari", "--action-dim", "3"], ["--action-dim", "sprites"]),
    (["--action-dim", "3"], ["--action-dim 2"]),
    (["--sample-only"], ["--resume"]),
    (["--long-video-frames", "4"], ["--long-video-frames"]),
    (["--null-cond-prob", "0", "--cfg-scale", "3"], ["--cfg-scale 3", "--null-cond-prob 0"]),
    (["--seed", "-1"], ["--seed"]),
    (["--dropout", "2"], ["--dropout"]),
    (["--channel-mult", "1", "0"], ["--channel-mult"]),
])
def test_check_args_refuses_impossible_settings(flags, words):
    args = vd.parse_args([*TINY, *flags])[0]
    with pytest.raises(vd.UserError) as error:
        vd.check_args(args, 1)
    for word in words:
        assert word in str(error.value)


def test_error_batch_not_divisible_by_world_size(tmp_path):
    env = dict(script_env(), WORLD_SIZE="3", RANK="0", LOCAL_RANK="0")
    result = subprocess.run([PYTHON, str(ROOT / SCRIPT), *TINY, "--output-dir", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "--batch-size 8", "3")


def test_error_folder_without_videos_and_unknown_game(tmp_path):
    (tmp_path / "notes.txt").write_text("no videos here")
    result = run_script(SCRIPT, *TINY, "--dataset", "folder", "--data-dir", tmp_path, "--output-dir", tmp_path / "o",
                        check=False)
    assert_one_line_error(result, "no videos", str(tmp_path))
    with pytest.raises(vd.UserError, match="did you mean Breakout"):
        vd.atari_ids("Breakot-v5")


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run_script(SCRIPT, *QUICK, "--output-dir", tmp_path, "--learning-rate", "1e30", "--warmup-steps", "1",
                        "--save-every", "1", "--log-every", "1", "--total-steps", "30", check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "non-finite" in result.stderr.strip().splitlines()[-1]
    checkpoint = torch.load(only_run_dir(tmp_path) / "checkpoints" / "latest.pt", weights_only=True)
    assert 1 <= checkpoint["step"] < 30
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


# ---------------------------------------------------------------------------------------------------------------------
# --play: an action-conditioned model as a game; headless with --play-keys


def test_play_wiring_keys_reach_the_model_and_the_real_sprites_follow_them(tmp_path, monkeypatch):
    meanings = [name.upper() for name in vd.SPRITE_ACTIONS]  # NOOP UP DOWN LEFT RIGHT
    assert vd.parse_play_keys("RR D/N", meanings) == [4, 4, 2, None, 0]
    with pytest.raises(vd.UserError, match="'F' is no action of this model; its letters: N noop, U up"):
        vd.parse_play_keys("F", meanings)
    assert vd.action_from_keys(True, False, False, True, False, meanings) == 4  # no diagonals: up-right is RIGHT
    data = vd.make_sprites_dataset(1, 6, 16, num_distractors=1, seed=3)
    k = 2
    start = torch.from_numpy(data.frames[:k]).permute(1, 0, 2, 3)[None] / 127.5 - 1.0
    seen = []

    def next_frame(frames, actions):  # a stand-in model: the last frame shifted right by (action + 1) pixels
        seen.append(actions.clone())
        return torch.roll(frames[:, :, -1], shifts=int(actions[0, -1]) + 1, dims=-1)

    def game():
        return vd.imagined_video(next_frame, start, torch.from_numpy(data.actions[:k])[None], torch.arange(5))

    runs = [vd.play_keys(game, vd.parse_play_keys(keys, meanings), meanings, 64) for keys in ("RRU", "LLU", "RRU")]
    first = data.frames[k - 1].transpose(1, 2, 0)
    assert np.array_equal(runs[0]["frames"][0], first)
    assert np.array_equal(runs[0]["frames"][1], np.roll(first, 5, axis=1))  # RIGHT is action 4
    assert not np.array_equal(runs[0]["frames"], runs[1]["frames"]) and np.array_equal(runs[0]["frames"],
                                                                                      runs[2]["frames"])
    assert seen[1].tolist() == [[data.actions[k - 1], 4, 4]]  # the last k actions and the new one reach the model
    vd.write_mp4(tmp_path / "play.mp4", runs[0]["shown"])
    assert len(read_mp4(tmp_path / "play.mp4")) == 4
    # the real sprites world from the same start follows the keys: right, right, then down
    real = vd.play_keys(lambda: vd.real_sprites(data.sprite_states[0], data.actions[:k], 16, torch.arange(5)),
                        vd.parse_play_keys("RRDD", meanings), meanings, 64)
    assert np.array_equal(real["frames"][0], first)
    moves = vd.movement_directions(real["frames"].transpose(3, 0, 1, 2)[None, :, [0, 2]])
    down = vd.movement_directions(real["frames"].transpose(3, 0, 1, 2)[None, :, [2, 4]])
    assert [vd.DIRECTIONS[moves[0]], vd.DIRECTIONS[down[0]]] == ["right", "down"]
    monkeypatch.setitem(__import__("sys").modules, "pygame", None)
    with pytest.raises(vd.UserError, match="pip install pygame-ce"):
        vd.import_pygame()


def test_play_caption_with_unknown_words_is_refused_and_a_cut_one_is_said(capsys, monkeypatch):
    """--play-caption: a word the model never trained on (it would be the untrained <unk>) is refused in one line that
    names it and the model's words, before any data is made; words beyond --max-text-len are dropped with a notice,
    and the caption printed is the one the model reads."""
    vocabulary = vd.build_vocabulary([f"a {c} square moves {d}" for c in vd.SPRITE_COLOURS for d in vd.DIRECTIONS])
    args = vd.parse_args([*TINY, "--play-caption", "A purple squre moves up"])[0]
    checkpoint = {"num_actions": 5, "vocabulary": vocabulary,
                  "ema": vd.build_model(args, len(vocabulary), 5).state_dict()}
    with monkeypatch.context() as patched:
        patched.setattr(vd, "make_sprites_dataset", None)  # refused before the start clips are made
        with pytest.raises(vd.UserError) as error:
            vd.play_games(args, checkpoint, torch.device("cpu"))
    assert str(error.value) == (
        "--play-caption 'A purple squre moves up': the model does not know purple, squre (did you mean square?): it "
        "learned the words of its training captions only (an unknown word would be the untrained <unk>); its 11 "
        "words: a, blue, down, green, left, moves, red, right, square, up, yellow")
    args = vd.replace(args, play_caption="a red square moves up " * 4)  # 20 words, --max-text-len 16
    built = vd.play_games(args, checkpoint, torch.device("cpu"))
    assert capsys.readouterr().out.splitlines() == [
        "notice: --play-caption has 20 words, more than the model's --max-text-len 16: it reads 'a red square moves up "
        "a red square moves up a red square moves up a' and drops 'red square moves up'"]
    assert built["caption"] == " ".join(("a red square moves up " * 4).split()[:16])


def test_headless_play_of_a_tiny_run(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    result = run_script(SCRIPT, "--resume", run_dir, "--play-keys", "RD", "--play-world", "both",
                        "--num-sampling-steps", "2", "--play-caption", "a red square moves up", cwd=tmp_path)
    assert "keys: N noop, U up, D down, L left, R right" in result.stdout
    assert "caption: 'a red square moves up'; sampler: ddim, 2 steps" in result.stdout
    mp4s = sorted((run_dir / "play").glob("*.mp4"))
    assert [p.name.split("_")[1] for p in mp4s] == ["imagined", "real"]
    assert [len(read_mp4(p)) for p in mp4s] == [3, 3]
