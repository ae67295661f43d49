"""diamond_atari.py follows DIAMOND's reference code (eloialonso/diamond, main branch) where it matters for the scores:
the autoregressive denoiser loss, the reward/end model's attention, the Atari 100k env-step schedule, replay padding,
recency weights and segment lengths, the sampler's start and 8-bit quantisation, the warmup, fp32 by default and an
fp32 noise embedding. Every check is against hand-computed values; the whole file runs in a few seconds."""
import math

import numpy as np
import pytest
import torch
from conftest import load_module


@pytest.fixture(scope="module")
def dia():
    return load_module("diamond_atari.py")


def make_buffer(dia, lengths, weights=(0.1, 0.1, 0.1, 0.7)):
    """Episodes of the given lengths; frame t of episode k is filled with 10 k + t + 1, action t is t % 3 + 1."""
    buffer = dia.ReplayBuffer(None, weights, num_conditioning_steps=4)
    for k, T in enumerate(lengths):
        obs = np.stack([np.full((8, 8, 3), 10 * k + t + 1, np.uint8) for t in range(T + 1)])
        buffer.add({"obs": obs, "actions": np.arange(T) % 3 + 1, "rewards": np.arange(T, dtype=np.float32) % 3 - 1,
                    "terminated": np.arange(T) == T - 1, "truncated": np.zeros(T, bool)}, write=False)
    return buffer


# ----------------------------------------------------------------------------------------------------------------------
# 1. The autoregressive training step


def test_denoiser_loss_is_the_mean_of_two_predictions_the_second_on_the_first_quantised(dia):
    torch.manual_seed(0)
    args = dia.Args(num_autoregressive_steps=1)  # DIAMOND's default: 4 + 1 + 1 = 6 frames, two predictions
    net = dia.DenoiserNet(4, (8, 8), 1, 16, 4)
    for p in net.parameters():  # zero-initialised layers would make F constant: give every weight a value
        torch.nn.init.normal_(p, std=0.2)
    denoiser = dia.Denoiser(net, 0.5, 0.3)
    b = 3
    obs = torch.rand(b, 6, 3, 8, 8) * 2 - 1
    actions = torch.randint(0, 4, (b, 5))
    obs_mask = torch.ones(b, 6, dtype=torch.bool)
    obs_mask[0, :5] = False  # segment 0 starts 5 frames before its episode: its first target is padding
    obs[0, :5] = 0.0
    actions[0, :5] = 0
    loss = dia.denoiser_loss(denoiser, obs, actions, obs_mask, args, torch.Generator().manual_seed(7))

    # By hand, drawing the same noise in the same order: sigma (B,), offset noise (B, 3, 1, 1), noise (B, 3, 8, 8).
    g = torch.Generator().manual_seed(7)
    frames = obs.clone()
    losses = []
    for k in range(2):
        sigma = (-0.4 + 1.2 * torch.randn(b, generator=g)).exp().clip(2e-3, 20.0)
        offset = 0.3 * torch.randn((b, 3, 1, 1), generator=g)
        noise = torch.randn((b, 3, 8, 8), generator=g)
        x0 = frames[:, 4 + k]
        noisy = x0 + offset + sigma[:, None, None, None] * noise
        s_eff = (sigma ** 2 + 0.09).sqrt()  # sigma_eff = sqrt(sigma^2 + 0.3^2)
        c_in = 1 / (s_eff ** 2 + 0.25).sqrt()
        c_skip = 0.25 / (s_eff ** 2 + 0.25)
        c_out = s_eff * c_skip.sqrt()
        c_noise = s_eff.log() / 4
        r = lambda c: c[:, None, None, None]  # noqa: E731
        out = net(r(c_in) * noisy, c_noise, frames[:, k: k + 4].reshape(b, 12, 8, 8) / 0.5, actions[:, k: k + 4])
        target = (x0 - r(c_skip) * noisy) / r(c_out)
        valid = obs_mask[:, 4 + k]
        losses.append(((out - target) ** 2)[valid].mean())  # F.mse_loss over the real targets, as DIAMOND
        denoised = (r(c_skip) * noisy + r(c_out) * out).detach()
        frames[:, 4 + k] = ((denoised.clamp(-1, 1) + 1) / 2 * 255).floor() / 255 * 2 - 1  # uint8 cast: a floor
    assert loss.item() == pytest.approx(((losses[0] + losses[1]) / 2).item(), rel=1e-5)

    # a 5-frame segment is the first prediction alone
    first_only = dia.denoiser_loss(denoiser, obs[:, :5], actions[:, :4], obs_mask[:, :5], args,
                                   torch.Generator().manual_seed(7))
    assert first_only.item() == pytest.approx(losses[0].item(), rel=1e-5)


def test_denoiser_batch_has_six_frame_segments(dia):
    buffer = make_buffer(dia, [2, 7, 30])
    args = dia.Args(batch_size=64)
    batch = dia.sample_batch(buffer, args, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert batch["obs"].shape == (64, 6, 3, 8, 8) and batch["actions"].shape == (64, 5)
    assert batch["obs_mask"].shape == (64, 6) and batch["obs"].dtype == torch.float32
    args0 = dia.Args(batch_size=4, num_autoregressive_steps=0)
    assert dia.sample_batch(buffer, args0, torch.Generator(), torch.device("cpu"))["obs"].shape[1] == 5


# ----------------------------------------------------------------------------------------------------------------------
# 2. Parameter counts at 64 px and 4 actions


def test_parameter_counts(dia):
    denoiser, reward_end, actor_critic = dia.build_models(dia.Args(), num_actions=4)
    counts = [sum(p.numel() for p in m.parameters()) for m in (denoiser, reward_end, actor_critic)]
    assert counts == [4_405_955, 5_900_864, 3_229_637]  # reward/end: attention only in the 2 blocks after the encoder


# ----------------------------------------------------------------------------------------------------------------------
# 3. The Atari 100k schedule, the warmup


@pytest.mark.parametrize("first", [5000, 10_000])
def test_schedule_spends_exactly_the_env_step_budget(dia, first):
    steps = dia.collection_schedule(first, env_step_budget=100_000, steps_per_epoch=100, final_epochs=50)
    collecting = (100_000 - first) // 100  # epoch 1 included
    assert len(steps) == collecting + 50  # 1000 epochs for N = 5000, 950 for N = 10000
    assert sum(steps) == 100_000
    assert steps[0] == first + 100 and steps[1:collecting] == [100] * (collecting - 1)
    assert steps[collecting:] == [0] * 50
    # a remainder goes into the last collecting epoch; a first collection that fills the budget leaves epoch 1 alone
    assert dia.collection_schedule(250, 1000, 100, 2) == [350, 100, 100, 100, 100, 100, 100, 50, 0, 0]
    assert dia.collection_schedule(1000, 1000, 100, 1) == [1000, 0]


def test_warmup_starts_at_zero(dia):
    assert [dia.lr_warmup_factor(s, 100) for s in (0, 1, 50, 99, 100, 5000)] == [0.0, 0.01, 0.5, 0.99, 1.0, 1.0]


# ----------------------------------------------------------------------------------------------------------------------
# 4. Replay sampling: padding, recency weights, segment lengths


def test_padding_is_grey_action_0_and_masked(dia):
    buffer = make_buffer(dia, [5, 5])
    batch = buffer.segments([(0, -2), (1, 3)], 6)
    obs = dia.segment_obs(batch, torch.device("cpu"))
    # frames -2, -1 before episode 0 and frames 6, 7 after episode 1's final frame 5: 0.0 in [-1, 1] (mid-grey)
    assert torch.equal(obs[0, :2], torch.zeros(2, 3, 8, 8)) and torch.equal(obs[1, 3:], torch.zeros(3, 3, 8, 8))
    assert torch.equal(obs[0, 2:], dia.to_float(buffer.episodes[0]["obs"][:4]))
    assert torch.equal(obs[1, :3], dia.to_float(buffer.episodes[1]["obs"][3:6]))
    assert batch["obs_mask"].tolist() == [[False, False, True, True, True, True], [True, True, True, False, False,
                                                                                   False]]
    assert batch["actions"].tolist() == [[0, 0, 1, 2, 3], [1, 2, 0, 0, 0]]
    assert batch["mask"].tolist() == [[False, False, True, True, True], [True, True, False, False, False]]
    assert batch["ends"].tolist() == [[False] * 5, [False, True, False, False, False]]

    # masked out of the reward/end loss: what padding holds does not change it
    model = dia.RewardEndModel(4, 8, 8, 8, 16)
    rb = {"obs": obs, **{key: batch[key] for key in ("actions", "rewards", "ends", "mask")}}
    changed = dict(rb, rewards=torch.where(rb["mask"], rb["rewards"], 1.0), ends=rb["ends"] | ~rb["mask"])
    assert dia.reward_end_loss(model, rb).item() == dia.reward_end_loss(model, changed).item()
    # masked out of the denoiser loss: a batch whose only target is padding has loss 0
    denoiser = dia.Denoiser(dia.DenoiserNet(4, (8, 8), 1, 16, 4))
    torch.nn.init.normal_(denoiser.net.conv_out.weight)
    obs_mask = torch.zeros(1, 5, dtype=torch.bool)
    loss = dia.denoiser_loss(denoiser, obs[:1, 1:], batch["actions"][:1], obs_mask, dia.Args(), torch.Generator())
    assert loss.item() == 0.0


def test_segment_starts_as_the_reference_samples_them(dia):
    buffer = make_buffer(dia, [10])
    g = torch.Generator().manual_seed(0)
    # denoiser (6 frames): stop = min(T, t + 1 + U{0..5}) with t ~ U{0..9}; start = stop - 6: in [-5, 4]
    starts = np.array([s for _, s in buffer.sample_segments(20_000, 6, g)])
    assert starts.min() == -5 and starts.max() == 4
    # P(start = 4) = P(stop = 10) = P(t + 1 + u >= 10) = sum_t P(u >= 9 - t) = (1 + 2 + 3 + 4 + 5 + 6) / 60 = 0.35
    assert abs(np.mean(starts == 4) - 0.35) < 0.015
    # reward/end (19 frames, 18 transitions): start = t - U{0..18}: in [-18, 9], past the end too
    starts = np.array([s for _, s in buffer.sample_segments(20_000, 19, g, beyond_end=True)])
    assert starts.min() == -18 and starts.max() == 9
    args = dia.Args(batch_size=8)
    batch = dia.sample_batch(buffer, args, g, torch.device("cpu"), reward_end=True)
    assert batch["obs"].shape[1] == 19 and batch["mask"].shape == (8, 18)


@pytest.mark.parametrize("lengths, expected", [
    ([2, 3, 5], [0.2, 0.3, 0.5]),  # fewer episodes than quarters: in proportion to their length
    ([4] * 5, [0.1, 0.1, 0.1, 0.35, 0.35]),  # quarters of 1, 1, 1, 2: the leftover episode joins the newest quarter
    ([4] * 6, [0.1, 0.1, 0.1, 0.7 / 3, 0.7 / 3, 0.7 / 3]),  # 1, 1, 1, 3
    ([4] * 8, [0.05] * 6 + [0.35, 0.35]),  # 2, 2, 2, 2
])
def test_recency_sampling_probabilities(dia, lengths, expected):
    buffer = make_buffer(dia, lengths)
    probs = buffer.episode_weights(buffer.sampleable())
    assert probs.tolist() == pytest.approx(expected, abs=1e-12)
    chosen = np.array([e for e, _ in buffer.sample_segments(40_000, 6, torch.Generator().manual_seed(0))])
    assert np.bincount(chosen, minlength=len(lengths)) / 40_000 == pytest.approx(expected, abs=0.01)


def test_episode_being_collected_is_the_newest(dia):
    buffer = make_buffer(dia, [4] * 4)
    buffer.partial = buffer.episodes.pop()  # the 4th episode, still being collected
    assert buffer.sampleable() == [0, 1, 2, -1]
    assert buffer.episode_weights(buffer.sampleable()).tolist() == pytest.approx([0.1, 0.1, 0.1, 0.7])
    no_weights = dia.ReplayBuffer(None, None, 4)  # a static dataset (--dataset-dir): by length
    no_weights.episodes = make_buffer(dia, [1, 3]).episodes
    assert no_weights.episode_weights([0, 1]).tolist() == pytest.approx([0.25, 0.75])


# ----------------------------------------------------------------------------------------------------------------------
# 5. Sampling and numerics


def test_euler_starts_from_unit_noise_by_default(dia):
    class Recorder:
        def __init__(self):
            self.inputs = []

        def __call__(self, x, sigma, past, act, net=None):  # (F output, D(x)) as Denoiser.forward
            self.inputs.append((x.clone(), sigma.clone()))
            return None, torch.zeros_like(x)

    obs, act = torch.zeros(2, 4, 3, 8, 8), torch.zeros(2, 4, dtype=torch.long)
    unit = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    for edm, scale in ((False, 1.0), (True, 5.0)):
        recorder = Recorder()
        args = dia.Args(edm_initial_noise=edm)
        dia.generate_next_obs(recorder, obs, act, args, torch.Generator().manual_seed(3))
        x, sigma = recorder.inputs[0]
        assert torch.equal(x, scale * unit) and float(sigma[0]) == 5.0 and len(recorder.inputs) == 3
    assert dia.Args().edm_initial_noise is False


def test_quantisation_floors_and_to_uint8_round_trips(dia):
    k = torch.arange(256)
    frames = dia.to_float(k.to(torch.uint8))
    assert torch.equal(dia.to_uint8(frames), k.to(torch.uint8))  # stored and shown frames: exact
    # D's output just below the next 8-bit level floors to this level (rounding would go up)
    below_next = frames[:-1] + 0.9 / 127.5
    assert torch.equal(dia.quantize_8bit(below_next), frames[:-1])
    assert dia.quantize_8bit(torch.tensor([-2.0, 2.0])).tolist() == [-1.0, 1.0]  # clamped first


def test_noise_embedding_is_fp32_under_bf16_autocast(dia):
    emb = dia.FourierFeatures(256)
    c_noise = torch.linspace(-1.6, 0.8, 7)  # ln(sigma_eff) / 4 over DIAMOND's range
    exact = emb(c_noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = emb(c_noise)
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.bfloat16  # autocast is on
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, exact)


def test_defaults_are_fp32_and_the_references_segment_lengths(dia):
    args = dia.Args()
    assert args.dtype == "float32"
    assert (args.num_autoregressive_steps, args.reward_segment_length) == (1, 19)
    assert (args.env_step_budget, args.final_epochs_without_collection, args.collection_steps_per_epoch) == (
        100_000, 50, 100)
    assert math.isclose(sum(args.recency_weights), 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Imagination: persistent imagined episodes, truncation apart from termination


def test_lambda_returns_bootstrap_truncated_steps_and_stop_terminated_ones(dia):
    # gamma 0.5, lambda 0.5, rewards 1, 2, -3, 0.5 (signs 1, 1, -1, 1), V' = 1, 2, 4, 8 (the value after each step)
    # row 0, truncated at t = 1: L3 = 1 + .5 (.5 * 8 + .5 * 8) = 5; L2 = -1 + .5 (.5 * 4 + .5 * 5) = 1.25;
    #   L1 = 1 + .5 * 2 = 2 (bootstraps from V'_1 alone); L0 = 1 + .5 (.5 * 1 + .5 * 2) = 1.75
    # row 1, terminated at t = 1: L1 = 1; L0 = 1 + .5 (.5 * 1 + .5 * 1) = 1.5
    rewards = torch.tensor([[1.0, 2.0, -3.0, 0.5]] * 2)
    ends = torch.tensor([[0.0, 0, 0, 0], [0, 1, 0, 0]])
    truncs = torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 0]])
    bootstrap = torch.tensor([[1.0, 2.0, 4.0, 8.0]] * 2)
    returns = dia.lambda_returns(rewards, ends, truncs, bootstrap, gamma=0.5, lam=0.5)
    assert returns.tolist() == [[1.75, 2.0, 1.25, 5.0], [1.5, 1.0, 1.25, 5.0]]


class StubDenoiser:
    def __call__(self, x, sigma, past, act, net=None):  # (F output, D(x)) as Denoiser.forward
        return None, past[:, -3:].clamp(-1, 1)  # repeats the last frame


class StubRewardEnd(torch.nn.Module):
    """Reward sign 0 or +1 at random, never an end; an LSTM-shaped state that counts the transitions seen."""

    def forward(self, obs, act, next_obs, hidden=None):
        b, t = act.shape
        count = (hidden[0] if hidden is not None else torch.zeros(1, b, 2)) + t
        return (torch.tensor([-30.0, 0.0, 0.0]).expand(b, t, 3), torch.tensor([30.0, -30.0]).expand(b, t, 2),
                (count, count.clone()))

    def step(self, obs, act, next_obs, hidden):  # one transition, as RewardEndModel.step
        reward_logits, end_logits, hidden = self(obs[:, None], act[:, None], next_obs[:, None], hidden)
        return reward_logits[:, 0], end_logits[:, 0], hidden


def test_imagined_episodes_persist_across_updates_and_resume(dia, monkeypatch):
    torch.manual_seed(0)
    buffer = make_buffer(dia, [6, 9, 12])
    buffer.episodes = [dict(ep, obs=ep["obs"][:, :, :, :].repeat(1, 1, 2, 2)) for ep in buffer.episodes]  # 16 px
    args = dia.Args(num_imagined_envs=3, imagination_horizon=5, backup_every=3)
    actor = dia.ActorCritic(4, 16, (4, 4, 4, 4), 8)
    seen = []
    monkeypatch.setattr(dia, "lambda_returns", lambda r, e, tr, v, g, lam: seen.append((e, tr, v)) or
                        torch.zeros_like(r))

    def make_env(seed):
        return dia.WorldModelEnv(StubDenoiser(), StubRewardEnd(), buffer, args, torch.device("cpu"),
                                 torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1))

    env, g = make_env(0), torch.Generator().manual_seed(5)
    dia.actor_critic_loss(actor, env, args, g)
    assert env.age.tolist() == [3, 3, 3]  # 3 steps into their episodes
    state = env.state_dict()
    rng = (env.generator.get_state(), env.cpu_generator.get_state(), g.get_state())
    loss, _ = dia.actor_critic_loss(actor, env, args, g)
    # the same episodes went on: steps 4 and 5 of their life, truncated at 5 (horizon), restarted, then 1 step
    assert env.age.tolist() == [1, 1, 1]
    ends, truncs, bootstrap = seen[-1]
    assert truncs.tolist() == [[0.0, 1.0, 0.0]] * 3 and ends.tolist() == [[0.0] * 3] * 3
    assert env.hidden[0][0, :, 0].tolist() == [3 + 1, 3 + 1, 3 + 1]  # reward/end burn-in (3) + 1 imagined step

    # a fresh env given the saved state and generators continues exactly (an exact resume)
    resumed = make_env(0)
    resumed.load_state_dict(state)
    resumed.generator.set_state(rng[0])
    resumed.cpu_generator.set_state(rng[1])
    g.set_state(rng[2])
    loss_resumed, _ = dia.actor_critic_loss(actor, resumed, args, g)
    assert torch.equal(seen[-1][2], bootstrap) and torch.equal(resumed.obs, env.obs)
    assert loss_resumed.item() == loss.item()
