"""The judge (the optional judge block of ddpm_cifar10.py, dit_cifar10.py and video_diffusion.py, one text in
each): its Frechet distance against hand-computed values and an independent implementation, its cache (round trip, a
damaged file is retrained), its scores on real images and on noise, and classifier-free guidance raising class
accuracy with a stand-in model whose conditional and unconditional outputs are known exactly."""
import math

import numpy as np
import pytest
import torch

from conftest import SEED_SHIFT, load_module, measured

ddpm = load_module("ddpm_cifar10.py")
dit = load_module("dit_cifar10.py")


# ---------------------------------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_distance_of_gaussians_by_hand():
    a = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])  # mean (1, 1), covariance 4/3 I (ddof 1)
    b = 2 * a + 1  # mean (3, 3), covariance 16/3 I
    # diagonal covariances: d^2 = |mu_a - mu_b|^2 + sum_i (s_a,i - s_b,i)^2 = 8 + 2 * (2/sqrt(3) - 4/sqrt(3))^2
    assert ddpm.frechet_distance(a, b) == pytest.approx(8 + 2 * (2 / math.sqrt(3) - 4 / math.sqrt(3)) ** 2)
    assert ddpm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # 1-D: d^2 = (mu1 - mu2)^2 + (s1 - s2)^2
    x, y = torch.tensor([[-1.0], [1.0]]), torch.tensor([[2.0], [8.0]])  # (0, sqrt 2) and (5, sqrt 18)
    assert ddpm.frechet_distance(x, y) == pytest.approx(25 + (math.sqrt(2) - math.sqrt(18)) ** 2)


def test_frechet_distance_equals_the_symmetric_square_root_form():
    """Full covariances: Tr((S_a S_b)^(1/2)) computed another way, as the trace of the square root of the symmetric
    S_a^(1/2) S_b S_a^(1/2) (two eigh calls in numpy)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    y = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 1
    sa, sb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(w.clip(0))) @ v.T
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(root_a @ sb @ root_a).clip(0)).sum()
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * trace_sqrt
    assert ddpm.frechet_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# The judge network, its cache and its scores (8x8 shapes: trains in about a second)


def shapes_8px(num: int, seed: int):
    return ddpm.make_shapes_dataset(num, 8, seed=seed)


@pytest.fixture(scope="module")
def judge_8px(tmp_path_factory):
    cache = tmp_path_factory.mktemp("judge_cache")
    rng_before = torch.get_rng_state()
    judge = ddpm.load_or_train_judge(cache, "shapes_8px", lambda: shapes_8px(2048, 11), 10, 11 + SEED_SHIFT)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the run's RNG is untouched: exact resume stays exact
    return judge, cache


def test_the_cache_round_trips_and_a_damaged_cache_is_retrained(judge_8px, capsys):
    judge, cache = judge_8px
    (path,) = cache.glob("shapes_8px_v*.pt")

    def must_not_train():
        raise AssertionError("the cached judge should have been loaded")

    loaded = ddpm.load_or_train_judge(cache, "shapes_8px", must_not_train, 10, 11 + SEED_SHIFT)
    assert all(torch.equal(p, q) for p, q in zip(judge.state_dict().values(), loaded.state_dict().values()))
    path.write_bytes(b"not a torch file")
    retrained = ddpm.load_or_train_judge(cache, "shapes_8px", lambda: shapes_8px(2048, 11), 10, 11 + SEED_SHIFT)
    assert "training the judge again" in capsys.readouterr().out
    # retrained to the same weights: the judge is a pure function of its seed
    assert all(torch.equal(p, q) for p, q in zip(judge.state_dict().values(), retrained.state_dict().values()))
    assert torch.load(path, weights_only=True).keys() == judge.state_dict().keys()  # the cache was rewritten
    assert not list(cache.glob(".*tmp*"))  # no temporary file left behind


@pytest.mark.learning
def test_judge_scores_real_images_as_real_and_noise_as_none(judge_8px):
    judge, _ = judge_8px
    heldout, heldout_labels = shapes_8px(400, 12)
    real, real_labels = shapes_8px(200, 13)
    scores = ddpm.judge_scores(judge, real, real_labels, heldout, heldout_labels)
    assert set(scores) == {"recognised", "recognised_real", "frechet", "frechet_real", "class_accuracy",
                           "class_accuracy_real"}
    assert scores["recognised"] >= 0.9 and scores["recognised_real"] >= 0.9
    # chance 0.1; at 8 px discs and squares of one colour are the same pixels (classes 0 and 8, 1 and 9): at most 0.9
    assert scores["class_accuracy"] >= 0.5 and scores["class_accuracy_real"] >= 0.5
    noise = np.random.default_rng(0).integers(0, 256, (200, 3, 8, 8)).astype(np.uint8)
    noise_scores = ddpm.judge_scores(judge, noise, real_labels, heldout)
    measured(**scores, **{f"noise_{k}": v for k, v in noise_scores.items()},
             frechet_over_real=scores["frechet"] / scores["frechet_real"],
             noise_frechet_over_real=noise_scores["frechet"] / scores["frechet_real"])
    assert noise_scores["recognised"] <= 0.05 and noise_scores["class_accuracy"] <= 0.3
    # real images are as far from the held-out set as another real set is; noise is far beyond it
    assert scores["frechet"] < 3 * scores["frechet_real"] + 1.0
    assert noise_scores["frechet"] > 20 * scores["frechet_real"]
    with pytest.raises(ValueError):
        ddpm.judge_scores(judge, real, None, heldout[:300])  # fewer than 2N held-out images


# ---------------------------------------------------------------------------------------------------------------------
# Guidance raises class accuracy: a stand-in DiT whose outputs are the exact noise predictions of a Gaussian mixture

NUM_CLASSES, DIM, SPREAD = 4, 8, 0.7
MEANS = 0.6 * torch.eye(NUM_CLASSES, DIM, dtype=torch.float64)  # class k: N(m_k, SPREAD^2 I), the m_k 0.85 apart


class ExactMixtureDenoiser(torch.nn.Module):
    """model(x_t, t, y) as DiT's forward: the exact E[eps | x_t, y] of class y's Gaussian, and for the null label
    (y = num_classes) the exact E[eps | x_t] of the equal-weight mixture: sum_k p(k | x_t) E[eps | x_t, k].
    For N(m, s^2 I): x_t ~ N(sqrt(a) m, (a s^2 + 1 - a) I) and
    E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) m) / (a s^2 + 1 - a)."""

    num_classes = NUM_CLASSES

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod

    def forward(self, x, t, y):
        a = self.alphas_cumprod[t].to(x.dtype)[:, None, None]  # (B, 1, 1)
        var = a * SPREAD ** 2 + 1 - a
        eps_k = (1 - a).sqrt() * (x[:, None] - a.sqrt() * MEANS[None]) / var  # (B, K, D): each class's prediction
        log_p = -((x[:, None] - a.sqrt() * MEANS[None]) ** 2).sum(-1) / (2 * var[:, :, 0])  # (B, K)
        posterior = log_p.softmax(1)
        unconditional = (posterior[:, :, None] * eps_k).sum(1)
        conditional = eps_k[torch.arange(len(x)), y.clamp(max=NUM_CLASSES - 1)]
        return torch.where((y == NUM_CLASSES)[:, None], unconditional, conditional)


def test_guidance_raises_class_accuracy_with_a_known_denoiser():
    """Class accuracy (the nearest class mean to the sample, the judge here) of samples asked for class y: guidance
    0 samples the mixture (chance, 1/4), 1 the class's own Gaussian (which overlaps its neighbours), 3 and 6
    sharpen it towards the class (eps_u + s (eps_c - eps_u) follows p(x) p(y | x)^s)."""
    alphas_cumprod = ddpm.make_alphas_cumprod(ddpm.make_beta_schedule("linear", 1000))
    model = ExactMixtureDenoiser(alphas_cumprod)
    labels = torch.arange(NUM_CLASSES).repeat(250)  # 1000 samples
    x_T = torch.randn(len(labels), DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    accuracy = {}
    for scale in (0.0, 1.0, 3.0, 6.0):
        x0 = dit.ddim_sample(dit.guided_model_fn(model, labels, scale), x_T, alphas_cumprod, 50)
        nearest = torch.cdist(x0, MEANS).argmin(1)
        accuracy[scale] = (nearest == labels).double().mean().item()
    assert abs(accuracy[0.0] - 0.25) < 0.06, accuracy  # the unconditional model draws the classes at chance
    assert accuracy[1.0] > accuracy[0.0] + 0.2, accuracy
    assert accuracy[3.0] > accuracy[1.0] + 0.1, accuracy
    assert accuracy[6.0] >= accuracy[3.0] and accuracy[6.0] > 0.9, accuracy
