"""Cross-device batch statistics on 4 simulated CPU devices (in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r'''
    import functools
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    import bnlab

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    mesh = jax.make_mesh((4,), ("batch",))
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("batch")))
    F = 3

    def ref(x, mask=None):  # float64 masked moments over all but the last axis
        x = np.asarray(x, np.float64).reshape(-1, F)
        w = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
        mu = np.where(w, x, 0).sum(0) / w.sum(0)
        return mu, np.where(w, (x - mu) ** 2, 0).sum(0) / w.sum(0)

    scale = rng.uniform(0.5, 2, F).astype(np.float32)
    bias = rng.normal(size=F).astype(np.float32)
    mean0, var0 = np.zeros(F, np.float32), np.ones(F, np.float32)

    def sharded_bn(variance, masked, **kw):
        def f(x, *mask):
            o = bnlab.batch_norm(x, scale, bias, mean0, var0, train=True, momentum=0.5,
                                 variance=variance, axis_name="batch",
                                 mask=mask[0] if mask else None, **kw)
            return tuple(o)
        specs = (P("batch"), P("batch")) if masked else (P("batch"),)
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=(P("batch"), P(), P())))

    # 1. global statistics: per-device outputs and stats == single device on the global batch
    for shape in [(16, F), (8, 3, 2, F)]:
        x = rng.normal(50.0, 2.0, shape).astype(np.float32)
        for variance in ("shifted", "two_pass", "fast"):
            y, m, v = map(np.asarray, sharded_bn(variance, False)(shard(x)))
            single = bnlab.batch_norm(x, scale, bias, mean0, var0, train=True, momentum=0.5,
                                      variance=variance)
            tol = 1e-3 if variance == "fast" else 1e-5  # fast: |mean| = 50 costs digits
            np.testing.assert_allclose(y, single.y, rtol=tol, atol=tol)
            np.testing.assert_allclose(m, single.mean, rtol=1e-5)
            np.testing.assert_allclose(v, single.var, rtol=tol)
            mu, var = ref(x)
            np.testing.assert_allclose(m, 0.5 * mean0 + 0.5 * mu, rtol=1e-5)
            np.testing.assert_allclose(v, 0.5 * var0 + 0.5 * var, rtol=tol)

    # 2. masks with different counts per device: exactly the global masked statistics
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.5, axis_name="batch",
                           use_fast_variance=False)
    v0 = flax_bn.init(jax.random.key(0), np.zeros((4, F), np.float32))
    def flax_f(x, mask):
        _, s = flax_bn.apply(v0, x, mask=mask, mutable=["batch_stats"])
        return s["batch_stats"]["mean"]
    flax_sharded = jax.jit(jax.shard_map(flax_f, mesh=mesh, in_specs=(P("batch"), P("batch")),
                                         out_specs=P()))
    x0 = rng.normal(5.0, 3.0, (16, F)).astype(np.float32)
    x0[:4] += 10.0  # devices hold differently distributed data
    for counts in ([4, 1, 3, 2], [4, 1, 3, 0]):  # the last: a device with nothing valid
        mask = np.zeros((16, 1), bool)
        for dev, valid in enumerate(counts):
            mask[4 * dev: 4 * dev + valid] = True
        x = np.where(mask, x0, np.float32(1e30))  # padding
        mu, var = ref(x, mask)
        for variance in ("shifted", "two_pass", "fast", "flax_two_pass"):
            y, m, v = map(np.asarray, sharded_bn(variance, True)(shard(x), shard(mask)))
            np.testing.assert_allclose(m, 0.5 * mean0 + 0.5 * mu, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(v, 0.5 * var0 + 0.5 * var, rtol=1e-5)
            xhat = (x[mask[:, 0]] - mu) / np.sqrt(var + 1e-5)
            np.testing.assert_allclose(y[mask[:, 0]], xhat * scale + bias, rtol=1e-4, atol=1e-4)
        if 0 not in counts:  # flax's pmean of per-device means weighs devices equally
            flax_mean = np.asarray(flax_sharded(shard(np.where(mask, x, 0)), shard(mask)))
            assert np.abs(flax_mean - 0.5 * mu).min() > 0.2, (flax_mean, 0.5 * mu)

    # 3. the linen module with axis_name: same as flax's on equal, unmasked shards
    def module_f(module, x):
        v = module.init(jax.random.key(0), x)
        y, s = module.apply(v, x, mutable=["batch_stats"])
        return y, s["batch_stats"]["mean"], s["batch_stats"]["var"]
    x = rng.normal(1.0, 2.0, (16, F)).astype(np.float32)
    outs = [jax.jit(jax.shard_map(functools.partial(module_f, m), mesh=mesh, in_specs=P("batch"),
                                  out_specs=(P("batch"), P(), P())))(shard(x))
            for m in (bnlab.BatchNorm(use_running_average=False, axis_name="batch"),
                      nn.BatchNorm(use_running_average=False, axis_name="batch",
                                   use_fast_variance=False))]
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    # 4. axis_index_groups (pmap): per-group statistics
    x = rng.normal(3.0, 2.0, (4, 5, F)).astype(np.float32)
    groups = [[0, 2], [1, 3]]
    for variance in ("shifted", "two_pass", "fast"):
        f = jax.pmap(lambda x: tuple(bnlab.batch_norm(
            x, None, None, mean0, var0, train=True, momentum=0.0, variance=variance,
            axis_name="d", axis_index_groups=groups)), axis_name="d")
        y, m, v = map(np.asarray, f(x))
        for g in groups:
            mu, var = ref(x[g])
            for d in g:
                np.testing.assert_allclose(m[d], mu, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(v[d], var, rtol=1e-4)
                np.testing.assert_allclose(y[d], (x[d] - mu) / np.sqrt(var + 1e-5),
                                           rtol=1e-4, atol=1e-4)
    # 5. a batch sharded in its type (JAX's explicit sharding), under jit with no axis name
    # (conv-shaped: the shifted variance's first image cannot be sliced off a sharded axis)
    x = rng.normal(50.0, 2.0, (32, 4, 4, F)).astype(np.float32)
    mu, var = ref(x)
    for variance in ("shifted", "two_pass", "fast"):
        y, m, v = map(np.asarray, jax.jit(lambda x: tuple(bnlab.batch_norm(
            x, scale, bias, mean0, var0, train=True, momentum=0.5, variance=variance)))(shard(x)))
        tol = 1e-3 if variance == "fast" else 1e-5
        np.testing.assert_allclose(m, 0.5 * mean0 + 0.5 * mu, rtol=1e-5)
        np.testing.assert_allclose(v, 0.5 * var0 + 0.5 * var, rtol=tol)
    module = bnlab.BatchNorm(use_running_average=False)
    vs = module.init(jax.random.key(0), x)
    y, s = jax.jit(lambda vs, x: module.apply(vs, x, mutable=["batch_stats"]))(vs, shard(x))
    np.testing.assert_allclose(np.asarray(y), (x - mu) / np.sqrt(var + 1e-5), rtol=1e-4,
                               atol=1e-4)
    print("OK")
''')


def test_cross_device_statistics():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
