"""LoRA (reflax.models.lora): the config keys, a train step against a hand-written LoRA
reference, rank 0 as full fine-tuning, adapter-only optimizer state and checkpoints, the
merged HF export and the PEFT directory against transformers / peft, and the sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import (
    assert_close_scaled,
    cpu_mesh,
    load_torch,
    padded_batch,
    tiny_hf_checkpoint,
    tiny_train_config,
    torch_logits,
)
from jax.sharding import PartitionSpec

from reflax import api, grpo, optim
from reflax.batch import Batch, shard_batch
from reflax.checkpoint import Checkpointer
from reflax.config import ConfigError, base_config, validate
from reflax.models import abstract_model, create, lora
from reflax.models.hf import load_pretrained, save_pretrained
from reflax.runtime import (
    add_lora,
    check_resume,
    checkpoint_dir,
    restore_params,
    restore_state,
    state_to_dict,
)
from reflax.sampler import Sampler
from reflax.sampling import SamplingSpec
from reflax.sharding import LORA_A, LORA_B, LORA_TARGETS, make_mesh
from reflax.trainer import CompiledSteps, StepConfig, init_state, make_grad_fn, make_train_step

CFG = tiny_train_config()
SPEC = lora.LoraSpec(rank=4, alpha=8.0, targets=LORA_TARGETS)


def lora_model(config=CFG, spec=SPEC, mesh=None, model=None):
    """(the base's graphdef, a model with adapters whose B is random, not 0: a fresh B is
    0, and a test of a fresh adapter could not tell A, B or the scale apart)."""
    model = create(config, mesh=mesh, seed=1) if model is None else model
    base_graphdef = nnx.graphdef(model)
    lora.attach(model, spec, seed=3, mesh=mesh)
    for i, name in enumerate(lora.adapter_names(model)):
        if name.endswith(LORA_B):
            var = getattr(model.layers, name)
            noise = 0.5 * jax.random.normal(jax.random.key(i), var.shape, var.dtype)
            var[...] = jax.device_put(noise, var[...].sharding)
    return base_graphdef, model


def make_batch(B=8, T=12, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, T + 1, B)
    mask = np.arange(T)[None] < lengths[:, None]
    loss_mask = np.zeros((B, T), np.float32)
    for b, n in enumerate(lengths):
        loss_mask[b, n // 2 : n] = 1.0
    return Batch(
        tokens=jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)) * mask, jnp.int32),
        positions=jnp.asarray(np.broadcast_to(np.arange(T), (B, T)), jnp.int32),
        mask=jnp.asarray(mask),
        loss_mask=jnp.asarray(loss_mask),
        anchor_mask=jnp.zeros((B, T), jnp.float32),
        advantages=jnp.asarray(rng.normal(size=B), jnp.float32),
        old_logprobs=jnp.zeros((B, T), jnp.float32),
    )


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_config_keys_validated():
    c = base_config()
    assert c.lora.rank == 0  # off by default: full fine-tuning
    assert lora.LoraSpec.from_config(c.lora) is None
    c.lora.rank, c.lora.alpha, c.lora.targets = -1, 0.0, ("q_proj", "qkv")
    c.rollout.failures = "x"
    with pytest.raises(ConfigError) as e:
        validate(c)
    msg = str(e.value)
    assert "lora.rank" in msg and "lora.alpha" in msg and "lora.targets" in msg, msg
    with pytest.raises(ValueError, match="targets must be distinct names"):
        lora.LoraSpec(4, 8.0, ("q_proj", "q_proj"))


def test_a_checkpoint_from_before_lora_resumes_only_without_it():
    c = base_config()
    saved = c.to_dict()
    del saved["lora"]  # a run from before the keys existed
    check_resume(c, {"config": saved}, "ckpt/5")  # lora.rank 0: the same recipe
    c.lora.rank = 8
    with pytest.raises(ConfigError, match="lora.rank"):
        check_resume(c, {"config": saved}, "ckpt/5")


def test_fresh_adapters_leave_the_model_exactly_as_it_was():
    model = create(CFG, seed=1)
    tokens, mask = padded_batch(CFG.vocab_size, [5, 9], 9)
    before = np.asarray(api.logits(model, tokens, mask))
    lora.attach(model, SPEC, seed=3)  # B = 0: each adapter adds exactly 0
    after = np.asarray(api.logits(model, tokens, mask))
    np.testing.assert_array_equal(after, before)
    adapters, base = lora.split(nnx.state(model))
    names = {k for k in adapters["layers"]}
    assert names == {t + s for t in LORA_TARGETS for s in (LORA_A, LORA_B)}
    assert "q_proj" in base["layers"] and "q_proj_lora_a" not in base["layers"]


def test_rank0_is_full_finetuning_bitwise():
    # lora.rank 0 adds nothing: the graph and the weights of a model built without LoRA,
    # so one program steps both, to bitwise the same weights
    c = base_config()
    model = create(CFG, seed=1)
    graphdef0, params0 = nnx.split(model)
    graphdef, params = nnx.split(add_lora(c, create(CFG, seed=1), None))
    assert graphdef == graphdef0
    for x, y in zip(jax.tree.leaves(host(params0)), jax.tree.leaves(host(params))):
        np.testing.assert_array_equal(x, y)
    tx = optax.sgd(0.1)
    batch = make_batch()
    ref = jax.tree.map(jnp.copy, params0)
    step = jax.jit(make_train_step(graphdef0, tx, StepConfig(beta=0.04, max_len=12)))
    a, _ = step(init_state(params0, tx), batch, ref)
    b, _ = step(init_state(params, tx), batch, ref)  # the same program: the same graph
    for x, y in zip(jax.tree.leaves(host(a.params)), jax.tree.leaves(host(b.params))):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(jax.tree.leaves(host(a.params))[0], jax.tree.leaves(params0)[0])


def test_lora_step_equals_hand_written_reference():
    """One sharded LoRA step (8 devices) == the full-fine-tuning gradient of the merged
    model W' = W + A B s, taken by the chain rule to dA = G (B s)^T, dB = s A^T G by hand,
    and an SGD update; the KL reference is the base alone."""
    mesh = cpu_mesh()
    base_graphdef, model = lora_model(mesh=mesh)
    graphdef, full = nnx.split(model)
    adapters, base = lora.split(full)
    lr = 0.5
    tx = optax.sgd(lr)
    cfg = StepConfig(beta=0.04, max_len=12)
    batch = make_batch()

    # the reference: merged kernels in float64 NumPy, then the full-fine-tuning gradient
    a_np, s = host(adapters)["layers"], SPEC.scale
    base_np = host(base)
    merged = jax.tree.map(np.copy, base_np)
    for t in LORA_TARGETS:
        a, b = a_np[t + LORA_A], a_np[t + LORA_B]
        w = base_np["layers"][t].astype(np.float64)
        merged["layers"][t] = (w + s * np.einsum("lir,lro->lio", a, b)).astype(np.float32)
    merged_state = jax.tree.map(jnp.asarray, merged)
    grads, loss, sums, _ = jax.jit(make_grad_fn(base_graphdef, cfg))(
        merged_state, batch, jax.tree.map(jnp.asarray, base_np)
    )
    g = host(grads)["layers"]

    state = init_state(adapters, tx, mesh)
    # sharded along the big dim as the kernel (q_proj [L, embed: fsdp, heads: tensor])
    spec = lambda n: jax.tree.leaves(state.params["layers"][n])[0].sharding.spec
    assert spec("q_proj_lora_a") == PartitionSpec(None, "fsdp", None)
    assert spec("q_proj_lora_b") == PartitionSpec(None, None, "tensor")
    steps = CompiledSteps(graphdef, tx, cfg, state, base, mesh, ref_graphdef=base_graphdef)
    sharded = shard_batch(batch, mesh)
    with jax.set_mesh(mesh):
        new, m = steps.step(sharded)(state, sharded, base)
    new = host(new.params)["layers"]
    assert float(m["applied"]) == 1.0
    assert_close_scaled(float(m["loss"]), float(loss), 1e-5, scale=abs(float(loss)), err_msg="loss")
    # the reference is the base: KL(merged policy || base) > 0, as the step measured it
    kl = float(grpo.finalize_metrics(sums)["kl"])
    assert kl > 1e-4
    assert_close_scaled(float(m["kl"]), kl, 1e-4, scale=kl, err_msg="kl")
    for t in LORA_TARGETS:
        a, b = a_np[t + LORA_A].astype(np.float64), a_np[t + LORA_B].astype(np.float64)
        gw = g[t].astype(np.float64)  # [L, in, out]
        d_a = np.einsum("lio,lro->lir", gw, s * b)
        d_b = s * np.einsum("lir,lio->lro", a, gw)
        for name, d, old in ((t + LORA_A, d_a, a), (t + LORA_B, d_b, b)):
            assert np.abs(d).max() > 0, f"{name}: no gradient, the check would be vacuous"
            assert_close_scaled(new[name] - old, -lr * d, 1e-4, err_msg=name)
    # the base is frozen: neither in the state nor changed by the step
    for x, y in zip(jax.tree.leaves(host(base)), jax.tree.leaves(base_np)):
        np.testing.assert_array_equal(x, y)


def test_optimizer_state_and_checkpoint_hold_adapters_only(tmp_path):
    mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])  # the sharded step: the test above
    _, model = lora_model(mesh=mesh)
    graphdef, full = nnx.split(model)
    adapters, base = lora.split(full)
    tx, _ = optim.make_optimizer(total_steps=10, learning_rate=1e-3)
    state = init_state(adapters, tx, mesh)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    # AdamW: two moments per adapter leaf, nothing of the base
    assert len(moments) == 2 * len(jax.tree.leaves(adapters))
    assert nbytes(moments) == 2 * nbytes(adapters)
    assert nbytes(adapters) < nbytes(base) / 4
    base_shapes = {x.shape for x in jax.tree.leaves(base)}
    assert not any(x.shape in base_shapes for x in moments)
    # an abstract model gets the same adapters, abstract (ahead-of-time compiles)
    abstract, _ = lora.split(nnx.state(lora.attach(abstract_model(CFG), SPEC)))
    shapes = lambda tree: [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
    assert shapes(abstract) == shapes(adapters)

    ckpt = Checkpointer(checkpoint_dir(str(tmp_path)))
    ckpt.save(3, state_to_dict(state), {})
    ckpt.wait()
    restored, _ = restore_state(ckpt, 3, jax.eval_shape(lambda x: x, adapters), tx, mesh)
    ckpt.close()
    for x, y in zip(
        jax.tree.leaves(host(state_to_dict(restored))), jax.tree.leaves(host(state_to_dict(state)))
    ):
        np.testing.assert_array_equal(x, y)
    # the evaluation CLIs' restore: the base of `like`, the adapters of the checkpoint
    fresh = nnx.state(lora.attach(create(CFG, mesh=mesh, seed=1), SPEC, seed=9, mesh=mesh))
    params, step = restore_params(fresh, str(tmp_path))
    assert step == 3
    got, _ = lora.split(params)
    for x, y in zip(jax.tree.leaves(host(got)), jax.tree.leaves(host(adapters))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "arch,targets",
    [("qwen2", LORA_TARGETS), ("phi3", ("q_proj", "v_proj", "o_proj", "up_proj"))],
)
def test_merged_export_and_peft_match_reflax(tmp_path, arch, targets):
    # phi3 fuses q/k/v and gate/up in one HF weight: its PEFT adapter is the parts'
    # adapters side by side (block-diagonal B), some parts without one
    from peft import PeftModel

    path = tiny_hf_checkpoint(tmp_path, arch)
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=targets)
    _, model = lora_model(spec=spec, model=load_pretrained(path))
    tokens, mask = padded_batch(model.config.vocab_size, [6, 9], 9)
    ours = np.asarray(api.logits(model, tokens, mask))[mask]
    base = torch_logits(load_torch(path), tokens, mask)[mask]
    assert np.abs(ours - base).max() > 0.1 * np.abs(base).max(), "adapters change nothing"

    save_pretrained(lora.merged(model), tmp_path / "merged")
    assert_close_scaled(torch_logits(tmp_path / "merged", tokens, mask)[mask], ours, 1e-5)
    lora.save_peft(model, tmp_path / "peft", base_model_name=str(path))
    peft_model = PeftModel.from_pretrained(load_torch(path), str(tmp_path / "peft")).eval()
    assert_close_scaled(torch_logits(peft_model, tokens, mask)[mask], ours, 1e-5)


def test_sampler_with_adapters_equals_merged_weights():
    _, model = lora_model()
    prompts = [[5, 9, 3, 7], [11, 2]]
    spec = SamplingSpec(greedy=True, logprobs=False)
    kw = dict(max_new_tokens=8, rng=0, num_samples=2, keep_cache=False)
    adapted = Sampler(model, None).sample(nnx.state(model), prompts, spec, **kw)
    merged = lora.merged(model)
    plain = Sampler(merged, None).sample(nnx.state(merged), prompts, spec, **kw)
    np.testing.assert_array_equal(np.asarray(adapted.tokens), np.asarray(plain.tokens))
    # not vacuous: the adapters change the next token of the prompts
    tokens, mask = padded_batch(CFG.vocab_size, [4, 2], 4)
    for row, p in enumerate(prompts):
        tokens[row, -len(p) :] = p
    firsts = [
        np.argmax(api.logits(m, tokens, mask)[:, -1], -1) for m in (model, lora.base_model(model))
    ]
    np.testing.assert_array_equal(firsts[0], np.asarray(adapted.tokens)[::2, 0])
    assert not np.array_equal(firsts[0], firsts[1])
