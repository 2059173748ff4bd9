"""GRPO numerics against independent NumPy / PyTorch references of TRL's definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_scaled, logprobs_entropy_from_logits, np_grpo_loss

from reflax import grpo

# ----------------------------------------------------------------------------- references


def np_advantages(rewards, valid, *, eps=1e-4, std="unbiased", scale=True):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for u in range(rewards.shape[0]):
        if not valid[u]:
            continue
        r = rewards[u]
        centred = r - r.mean()
        s = r.std(ddof=1 if std == "unbiased" else 0)
        out[u] = centred / (s + eps) if scale else centred
    return out


def np_log_softmax_entropy(logits, targets, temperature=1.0):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    ent = -(np.exp(logp) * logp).sum(-1)
    return lp, ent


def make_batch(seed, b=6, t=9, empty_row=True):
    rng = np.random.default_rng(seed)
    lp = -rng.uniform(0.05, 3.0, (b, t)).astype(np.float32)
    old = (lp + 0.4 * rng.standard_normal((b, t))).astype(np.float32)
    ref = (lp + 0.3 * rng.standard_normal((b, t))).astype(np.float32)
    adv = rng.standard_normal(b).astype(np.float32)
    mask = rng.uniform(size=(b, t)) < 0.6
    mask[:, 0] = True
    if empty_row:
        mask[2] = False
    return lp, old, ref, adv, mask


# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("std", ["unbiased", "biased"])
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_reference(std, scale):
    rng = np.random.default_rng(0)
    u, g = 7, 5
    rewards = rng.standard_normal((u, g)).astype(np.float32)
    rewards[1] = (rng.uniform(size=g) < 0.5).astype(np.float32)  # binary group
    rewards[1, :2] = [0.0, 1.0]
    rewards[3] = 1.0  # zero-variance group
    valid = np.array([True, True, True, True, False, True, False])
    rewards[4] = np.nan  # padding may hold garbage
    adv, stats = grpo.group_advantages(
        jnp.asarray(rewards), jnp.asarray(valid), std=std, scale=scale
    )
    want = np_advantages(np.nan_to_num(rewards), valid, std=std, scale=scale)
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[~valid] == 0.0)
    assert np.all(np.asarray(adv)[3] == 0.0)

    r_valid = rewards[valid]
    np.testing.assert_allclose(stats["reward_mean"], r_valid.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        stats["reward_std"],
        r_valid.std(axis=1, ddof=1 if std == "unbiased" else 0).mean(),
        rtol=1e-5,
    )
    np.testing.assert_allclose(stats["frac_zero_std"], 1 / valid.sum())
    assert float(stats["num_groups"]) == valid.sum()
    np.testing.assert_allclose(stats["adv_abs_mean"], np.abs(want[valid]).mean(), rtol=1e-5)


def test_group_advantages_equal_rewards_are_exactly_zero():
    # 0.1 is not representable: the float32 mean of equal values can miss by an ulp.
    values = np.array([0.1, 0.7, 1 / 3, 0.3, 1e-3, 2.9, -0.1], np.float32)
    rewards = jnp.asarray(np.repeat(values[:, None], 5, axis=1))
    adv, stats = grpo.group_advantages(rewards, jnp.ones(7, bool))
    assert np.all(np.asarray(adv) == 0.0)
    assert float(stats["frac_zero_std"]) == 1.0


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        grpo.group_advantages(jnp.ones((3, 1)), jnp.ones(3, bool))
    with pytest.raises(ValueError, match="std"):
        grpo.group_advantages(jnp.ones((7, 5)), jnp.ones(7, bool), std="population")
    adv, _ = grpo.group_advantages(jnp.arange(3.0)[:, None] * 1.0, jnp.ones(3, bool), std="biased")
    assert np.all(np.asarray(adv) == 0.0)  # G = 1 biased: every group is zero-variance


# ----------------------------------------------------------------------------- loss values


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("mu", [1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_grpo_loss_matches_reference(loss_type, mu, beta, eps_high):
    lp, old, ref, adv, mask = make_batch(1)
    old_in = old if mu == 2 else None
    max_len = 12 if loss_type == "constant" else None
    kw = dict(epsilon=0.2, epsilon_high=eps_high, beta=beta, loss_type=loss_type, max_len=max_len)
    num, den, sums = grpo.grpo_loss(
        jnp.asarray(lp),
        None if old_in is None else jnp.asarray(old_in),
        jnp.asarray(ref),
        jnp.asarray(adv),
        jnp.asarray(mask),
        **kw,
    )
    want, want_metrics = np_grpo_loss(
        lp,
        old_in,
        ref,
        adv,
        mask,
        eps=0.2,
        eps_high=eps_high,
        beta=beta,
        loss_type=loss_type,
        max_len=max_len,
    )
    np.testing.assert_allclose(grpo.safe_divide(num, den), want, rtol=1e-5, atol=1e-6)
    metrics = grpo.finalize_metrics(sums)
    for key, value in want_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    if mu == 2:  # the random ratios must actually exercise both clip sides
        assert float(metrics["clip_frac_low"]) > 0 and float(metrics["clip_frac_high"]) > 0
    else:
        assert float(metrics["clip_frac"]) == 0.0
        np.testing.assert_allclose(metrics["ratio_mean"], 1.0, rtol=0, atol=0)
    np.testing.assert_allclose(
        metrics["clip_frac"], metrics["clip_frac_low"] + metrics["clip_frac_high"]
    )


def test_grpo_loss_without_reference_and_jit():
    lp, old, _, adv, mask = make_batch(2)
    args = (jnp.asarray(lp), jnp.asarray(old), None, jnp.asarray(adv), jnp.asarray(mask))
    num, den, sums = grpo.grpo_loss(*args, beta=0.5)
    want, _ = np_grpo_loss(
        lp, old, None, adv, mask, eps=0.2, eps_high=None, beta=0.5, loss_type="token_mean"
    )
    np.testing.assert_allclose(num / den, want, rtol=1e-5)
    assert float(sums["kl_sum"]) == 0.0
    jitted = jax.jit(grpo.grpo_loss, static_argnames=("beta", "loss_type"))
    num_j, den_j, _ = jitted(*args, beta=0.5, loss_type="token_mean")
    np.testing.assert_allclose(num_j, num, rtol=1e-6)
    assert float(den_j) == float(den)


def test_seq_mean_equals_trl_when_no_row_is_empty():
    lp, old, ref, adv, mask = make_batch(3, empty_row=False)
    num, den, _ = grpo.grpo_loss(*map(jnp.asarray, (lp, old, ref, adv, mask)), loss_type="seq_mean")
    per_token = np_grpo_loss(
        lp, old, ref, adv, mask, eps=0.2, eps_high=None, beta=0.001, loss_type="seq_mean"
    )[0]
    assert float(den) == lp.shape[0]
    np.testing.assert_allclose(num / den, per_token, rtol=1e-5)


def test_log_ratio_is_clipped_before_exp():
    lp = jnp.zeros((6, 9))
    old = lp.at[0, :2].set([-500.0, 500.0])
    ref = lp.at[0, :2].set([500.0, -500.0])
    mask = jnp.zeros((6, 9), bool).at[0, :2].set(True)
    num, den, sums = grpo.grpo_loss(lp, old, ref, jnp.ones(6), mask, beta=0.1)
    assert np.isfinite(float(num)) and np.isfinite(float(sums["kl_sum"]))
    np.testing.assert_allclose(sums["ratio_sum"], np.exp(20.0) + np.exp(-20.0), rtol=1e-6)


def test_bad_loss_type_rejected():
    lp, old, ref, adv, mask = map(jnp.asarray, make_batch(4))
    with pytest.raises(ValueError, match="loss_type"):
        grpo.grpo_loss(lp, old, ref, adv, mask, loss_type="dapo")


# ----------------------------------------------------------------------------- loss gradients


# Every (loss_type, mu) pair; gradient tests differentiate all of them in one compiled
# jacobian instead of compiling one function per case.
GRAD_CASES = [(loss_type, mu) for loss_type in grpo.LOSS_TYPES for mu in (1, 2)]


def all_case_losses(lp, old, ref, adv, mask, **kw):
    """``[len(GRAD_CASES)]`` vector of full-batch losses."""
    losses = []
    for loss_type, mu in GRAD_CASES:
        num, den, _ = grpo.grpo_loss(
            lp, old if mu == 2 else None, ref, adv, mask, loss_type=loss_type, **kw
        )
        losses.append(num / den)
    return jnp.stack(losses)


def torch_trl_loss_grad(torch, lp, old, ref, adv, mask, *, eps, eps_high, beta, loss_type):
    """Gradient w.r.t. ``lp`` of TRL's loss code path, in float64 autograd (old=None: mu=1)."""
    t_lp = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    t_old = t_lp.detach() if old is None else torch.tensor(old, dtype=torch.float64)
    t_ref = torch.tensor(ref, dtype=torch.float64)
    t_adv = torch.tensor(adv, dtype=torch.float64)[:, None]
    t_mask = torch.tensor(mask, dtype=torch.float64)
    coef1 = torch.exp(t_lp - t_old)
    coef2 = torch.clamp(coef1, 1 - eps, 1 + eps_high)
    per_token = -torch.min(coef1 * t_adv, coef2 * t_adv)
    per_token = per_token + beta * (torch.exp(t_ref - t_lp) - (t_ref - t_lp) - 1)
    if loss_type == "token_mean":
        loss = (per_token * t_mask).sum() / t_mask.sum()
    elif loss_type == "seq_mean":
        n_b = t_mask.sum(-1)
        seq = (per_token * t_mask).sum(-1) / n_b.clamp(min=1.0)
        loss = seq[n_b > 0].mean()
    else:
        loss = (per_token * t_mask).sum() / (lp.shape[0] * lp.shape[1])
    loss.backward()
    return t_lp.grad.numpy()


def test_grpo_loss_gradient_matches_torch():
    torch = pytest.importorskip("torch")
    lp, old, ref, adv, mask = make_batch(5)
    kw = dict(epsilon=0.2, epsilon_high=0.28, beta=0.04)
    jac = jax.jit(
        jax.jacrev(lambda x: all_case_losses(x, *map(jnp.asarray, (old, ref, adv, mask)), **kw))
    )
    g_jax = np.asarray(jac(jnp.asarray(lp)))  # [cases, B, T]
    for k, (loss_type, mu) in enumerate(GRAD_CASES):
        want = torch_trl_loss_grad(
            torch,
            lp,
            old if mu == 2 else None,
            ref,
            adv,
            mask,
            eps=0.2,
            eps_high=0.28,
            beta=0.04,
            loss_type=loss_type,
        )
        assert_close_scaled(g_jax[k], want, 1e-5, err_msg=f"{loss_type} mu={mu}")


def test_gradient_accumulation_is_exact():
    rng = np.random.default_rng(6)
    b, t, d, v = 6, 5, 8, 11
    hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    lm_head = jnp.asarray(0.5 * rng.standard_normal((d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    _, old, ref, adv, mask = map(jnp.asarray, make_batch(6, b=b, t=t))  # row 2 has no tokens

    def nums_aux(w, h, y, old_, ref_, adv_, mask_):
        lp, _ = grpo.token_logprobs_and_entropy(h, w, y, chunk_size=None)
        nums, dens, sums = [], [], []
        for loss_type in grpo.LOSS_TYPES:
            num, den, s = grpo.grpo_loss(
                lp,
                old_,
                ref_,
                adv_,
                mask_,
                epsilon_high=0.28,
                beta=0.04,
                loss_type=loss_type,
                max_len=t,
            )
            nums.append(num)
            dens.append(den)
            sums.append(s)
        return jnp.stack(nums), (jnp.stack(nums), jnp.stack(dens), sums[0])

    # Per micro-batch: differentiate the numerator only; the denominator is parameter-free.
    num_jac = jax.jit(jax.jacrev(nums_aux, has_aux=True))

    def run(sl):
        return num_jac(lm_head, hidden[sl], targets[sl], old[sl], ref[sl], adv[sl], mask[sl])

    g_num, (num, den, sums) = run(slice(None))  # g_num: [loss types, D, V]
    loss_full, grad_full = num / den, g_num / den[:, None, None]

    acc_num, acc_den, acc_grad, acc_sums = 0.0, 0.0, 0.0, None
    for sl in (slice(0, 2), slice(2, 4), slice(4, 6)):
        g_mb, (n_mb, d_mb, s_mb) = run(sl)
        acc_num, acc_den, acc_grad = acc_num + n_mb, acc_den + d_mb, acc_grad + g_mb
        acc_sums = s_mb if acc_sums is None else jax.tree.map(jnp.add, acc_sums, s_mb)
    np.testing.assert_array_equal(acc_den, den)
    np.testing.assert_allclose(acc_num / acc_den, loss_full, rtol=1e-6, atol=1e-7)
    for k, loss_type in enumerate(grpo.LOSS_TYPES):
        acc = acc_grad[k] / acc_den[k]
        assert_close_scaled(acc, grad_full[k], 1e-5, err_msg=loss_type)
    assert np.all(np.abs(np.asarray(grad_full)).max(axis=(1, 2)) > 1e-3)
    full_m, acc_m = grpo.finalize_metrics(sums), grpo.finalize_metrics(acc_sums)
    for key in full_m:
        np.testing.assert_allclose(acc_m[key], full_m[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_loss_denominator_is_grpo_loss_denominator_and_additive(loss_type):
    lp, old, ref, adv, mask = map(jnp.asarray, make_batch(12))  # row 2 has no tokens
    _, den, _ = grpo.grpo_loss(lp, old, ref, adv, mask, loss_type=loss_type, max_len=11)
    full = grpo.loss_denominator(mask, loss_type=loss_type, max_len=11)
    parts = [
        grpo.loss_denominator(mask[i : i + 2], loss_type=loss_type, max_len=11) for i in (0, 2, 4)
    ]
    assert float(full) == float(den) == float(sum(parts)) > 0


def test_masked_positions_get_exactly_zero_gradient():
    rng = np.random.default_rng(7)
    b, t, v = 6, 9, 13
    _, old, ref, adv, mask = make_batch(7, b=b, t=t)
    logits = rng.standard_normal((b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t))
    # Masked positions: the target is impossible (logprob = -inf) and old/ref hold NaN/Inf.
    bi, ti = np.nonzero(~mask)
    logits[bi, ti, targets[bi, ti]] = -np.inf
    old = np.where(mask, old, np.nan).astype(np.float32)
    ref = np.where(mask, ref, np.inf).astype(np.float32)
    inputs = [jnp.asarray(x) for x in (old, ref, adv, mask)]

    def losses(z):
        lp = grpo.token_logprobs(z, jnp.asarray(targets))
        return all_case_losses(lp, *inputs, beta=0.04)

    lp = grpo.token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
    assert np.all(np.isneginf(np.asarray(lp)[~mask]))
    jac_and_value = jax.jit(jax.jacrev(lambda z: (losses(z), losses(z)), has_aux=True))
    jac, values = map(np.asarray, jac_and_value(jnp.asarray(logits)))  # jac: [cases, B, T, V]
    assert np.all(np.isfinite(values))
    assert np.all(np.isfinite(jac))
    for k in range(len(GRAD_CASES)):
        assert np.all(jac[k][~mask] == 0.0), GRAD_CASES[k]
        assert np.any(jac[k][mask] != 0.0), GRAD_CASES[k]


def test_nan_logits_at_masked_positions_with_mask_argument():
    rng = np.random.default_rng(8)
    b, t, v = 3, 4, 6
    logits = rng.standard_normal((b, t, v)).astype(np.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)))
    mask = np.ones((b, t), bool)
    mask[1, 2:] = False
    dirty = logits.copy()
    dirty[~mask] = np.nan
    dirty[0, 0, 0] = 0  # keep one clean masked-in position unchanged
    adv = jnp.asarray(rng.standard_normal(b), jnp.float32)

    def loss(z):
        lp = grpo.token_logprobs(z, targets, mask=jnp.asarray(mask))
        num, den, _ = grpo.grpo_loss(lp, None, None, adv, jnp.asarray(mask))
        return num / den

    loss_and_grad = jax.jit(jax.value_and_grad(loss))
    clean_val, clean_g = loss_and_grad(jnp.asarray(np.where(mask[..., None], dirty, 0)))
    val, g = loss_and_grad(jnp.asarray(dirty))
    g = np.asarray(g)
    assert np.all(g[~mask] == 0.0) and np.all(np.isfinite(g))
    np.testing.assert_array_equal(g, np.asarray(clean_g))
    assert float(val) == float(clean_val)


def test_loss_gradient_wrt_nan_logprobs_is_zero_where_masked():
    lp, old, ref, adv, mask = make_batch(9)
    dirty = np.where(mask, lp, np.nan).astype(np.float32)
    dirty[~mask & (np.arange(lp.shape[1]) % 2 == 0)] = -np.inf
    others = [jnp.asarray(x) for x in (old, ref, adv, mask)]
    jac = jax.jit(jax.jacrev(lambda x: all_case_losses(x, *others, beta=0.04)))
    g_dirty, g_clean = np.asarray(jac(jnp.asarray(dirty))), np.asarray(jac(jnp.asarray(lp)))
    assert np.all(g_dirty[:, ~mask] == 0.0)
    np.testing.assert_array_equal(g_dirty, g_clean)
    loss = lambda x: grpo.safe_divide(*grpo.grpo_loss(jnp.asarray(x), *others)[:2])
    np.testing.assert_array_equal(loss(dirty), loss(lp))


# ----------------------------------------------------------------------------- log-probs


def test_chunked_logprobs_entropy_match_unchunked_and_numpy():
    rng = np.random.default_rng(10)
    b, t, d, v, temp = 3, 10, 8, 50, 0.7
    chunk_sizes = (3, 5, None)  # T = 10: 3 needs padding, 5 divides, None is one chunk
    hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    lm_head = jnp.asarray(rng.standard_normal((d, v)) / np.sqrt(d), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    w_lp = jnp.asarray(rng.standard_normal((b, t)), jnp.float32)
    w_ent = jnp.asarray(rng.standard_normal((b, t)), jnp.float32)

    def with_grads(fn, h, w):
        def objective(h_, w_):
            lp, ent = fn(h_, w_)
            return jnp.sum(w_lp * lp + w_ent * ent), (lp, ent)

        (_, (lp, ent)), (gh, gw) = jax.value_and_grad(objective, (0, 1), has_aux=True)(h, w)
        return lp, ent, gh, gw

    @jax.jit  # one compile for every variant
    def all_variants(h, w):
        unchunked = with_grads(
            lambda h_, w_: logprobs_entropy_from_logits(h_ @ w_, targets, temperature=temp),
            h,
            w,
        )
        chunked = [
            with_grads(
                lambda h_, w_, cs=cs: grpo.token_logprobs_and_entropy(
                    h_, w_, targets, temperature=temp, chunk_size=cs
                ),
                h,
                w,
            )
            for cs in chunk_sizes
        ]
        return unchunked, chunked

    (lp_u, ent_u, gh_u, gw_u), chunked = all_variants(hidden, lm_head)
    want_lp, want_ent = np_log_softmax_entropy(
        np.asarray(hidden, np.float64) @ np.asarray(lm_head, np.float64), np.asarray(targets), temp
    )
    assert_close_scaled(lp_u, want_lp, 1e-5)
    assert_close_scaled(ent_u, want_ent, 1e-5)
    np.testing.assert_allclose(
        grpo.token_logprobs(hidden @ lm_head, targets, temperature=temp), lp_u, rtol=1e-6
    )
    for cs, (lp, ent, gh, gw) in zip(chunk_sizes, chunked):
        msg = f"chunk_size={cs}"
        for got, want in ((lp, lp_u), (ent, ent_u), (gh, gh_u), (gw, gw_u)):
            assert_close_scaled(got, want, 1e-5, err_msg=msg)


def test_token_logprobs_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    logits = (3 * rng.standard_normal((2, 5, 17))).astype(np.float32)
    targets = rng.integers(0, 17, (2, 5))
    lp = grpo.token_logprobs(jnp.asarray(logits), jnp.asarray(targets), temperature=0.9)
    want = torch.log_softmax(torch.tensor(logits, dtype=torch.float64) / 0.9, dim=-1)
    want = want.gather(-1, torch.tensor(targets)[..., None])[..., 0].numpy()
    assert_close_scaled(lp, want, 1e-5)


def test_chunked_masks_nan_hidden_states():
    rng = np.random.default_rng(12)
    b, t, d, v = 2, 6, 4, 9
    hidden = rng.standard_normal((b, t, d)).astype(np.float32)
    mask = np.ones((b, t), bool)
    mask[1, 3:] = False
    dirty = np.where(mask[..., None], hidden, np.nan).astype(np.float32)
    lm_head = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)

    def f(h, w):
        lp, ent = grpo.token_logprobs_and_entropy(
            h, w, targets, chunk_size=4, mask=jnp.asarray(mask)
        )
        return jnp.sum(lp) + jnp.sum(ent)

    loss_and_grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    val, (gh, gw) = loss_and_grad(jnp.asarray(dirty), lm_head)
    val_c, (gh_c, gw_c) = loss_and_grad(jnp.asarray(hidden), lm_head)
    assert np.isfinite(float(val)) and np.all(np.isfinite(gw))
    np.testing.assert_array_equal(gw, gw_c)
    assert np.all(np.asarray(gh)[~mask] == 0.0)
    np.testing.assert_array_equal(np.asarray(gh)[mask], np.asarray(gh_c)[mask])


def test_bf16_inputs_give_float32_logprobs():
    rng = np.random.default_rng(13)
    hidden = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.bfloat16)
    lm_head = jnp.asarray(rng.standard_normal((16, 40)) / 4, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 40, (2, 3)), jnp.int32)
    lp, ent = grpo.token_logprobs_and_entropy(hidden, lm_head, targets, chunk_size=2)
    assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
    want, _ = np_log_softmax_entropy(
        np.asarray(hidden, np.float64) @ np.asarray(lm_head, np.float64), np.asarray(targets)
    )
    assert_close_scaled(lp, want, 1e-5)


def test_chunking_never_materialises_full_logits():
    b, d, v, chunk = 2, 16, 4096, 16

    def temp_bytes(t, chunk_size):
        def f(h, w, y):
            lp, ent = grpo.token_logprobs_and_entropy(h, w, y, chunk_size=chunk_size)
            return jnp.sum(lp) + jnp.sum(ent)

        args = (
            jax.ShapeDtypeStruct((b, t, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32),
        )
        compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full_logits_bytes = b * 512 * v * 4
    assert temp_bytes(512, None) >= full_logits_bytes  # the measurement does see full logits
    chunked = temp_bytes(512, chunk)
    assert chunked < full_logits_bytes // 4
    # Scratch grows with T only by [B, T, D]-sized buffers, not by [B, T, V] logits.
    assert chunked - temp_bytes(256, chunk) < 0.05 * (full_logits_bytes / 2)


def test_chunk_size_validation():
    with pytest.raises(ValueError, match="chunk_size"):
        grpo.token_logprobs_and_entropy(
            jnp.ones((1, 2, 3)), jnp.ones((3, 4)), jnp.zeros((1, 2), jnp.int32), chunk_size=0
        )
    with pytest.raises(ValueError, match="lm_head"):
        grpo.token_logprobs_and_entropy(
            jnp.ones((1, 2, 3)), jnp.ones((4, 3)), jnp.zeros((1, 2), jnp.int32)
        )


def test_masked_mean_and_safe_divide():
    x = jnp.array([[1.0, jnp.nan, 3.0], [jnp.inf, 2.0, 0.0]])
    m = jnp.array([[1, 0, 1], [0, 1, 0]])
    np.testing.assert_allclose(grpo.masked_mean(x, m), 2.0)
    np.testing.assert_allclose(grpo.masked_mean(x, m, axis=1), [2.0, 2.0])
    assert float(grpo.masked_mean(x, jnp.zeros_like(m))) == 0.0
    assert float(grpo.safe_divide(jnp.array(0.0), jnp.array(0.0))) == 0.0


# ----------------------------------------------------------------------------- anchor


def test_anchor_kl_matches_numpy_and_ignores_masked_nan():
    lp, _, ref, _, mask = make_batch(11)
    anchor = ~mask  # the anchored tokens are the ones the loss does not train
    d = ref.astype(np.float64) - lp
    want = ((np.exp(d) - d - 1) * anchor).sum()
    kl, n = grpo.anchor_kl(jnp.asarray(lp), jnp.asarray(ref), jnp.asarray(anchor))
    np.testing.assert_allclose(float(kl), want, rtol=1e-5)
    assert float(n) == anchor.sum()
    # gradient of the k3 sum w.r.t. lp is 1 - exp(ref - lp) on anchored tokens, 0 elsewhere
    dirty = np.where(anchor, lp, np.nan).astype(np.float32)
    grad = jax.grad(lambda x: grpo.anchor_kl(x, jnp.asarray(ref), jnp.asarray(anchor))[0])
    g = np.asarray(grad(jnp.asarray(dirty)))
    np.testing.assert_allclose(g, np.where(anchor, 1 - np.exp(d), 0.0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="anchor_mask"):
        grpo.anchor_kl(jnp.asarray(lp), jnp.asarray(ref), jnp.asarray(anchor[:, :-1]))
