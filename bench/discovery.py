"""Object-discovery cost: batched jnp k-means vs scikit-learn, in one run.

  python bench/discovery.py             # 32 images, 56x56 cells, D=128, K=16
  python bench/discovery.py --size=112  # Odin: 448 px spanning view, stride 4
  python bench/discovery.py --skip_kmeans   # only the step-time ratios
  python bench/discovery.py --smoke     # tiny k-means, `:test` nets: tests

The data imitate the discovery network's output: per image, a random number
of Voronoi regions on the size x size grid, each with its own direction in
D dimensions, plus per-cell noise, L2-normalised. Both sides use k-means++
with one initialisation; scikit-learn (Lloyd, its default tol and max_iter)
runs image by image as a host-side implementation would, jnp runs the whole
batch in one jitted call with a fixed number of iterations. Prints the time
ratio (scikit-learn total / jnp batch, after warm-up, block_until_ready) and
the inertia ratio (jnp / scikit-learn, summed over images). Goal: >= 10x
faster at <= 1.02x inertia.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # step_time

import jax  # noqa: E402
import numpy as np  # noqa: E402

from odin_jax import numerics  # noqa: E402
from odin_jax import kmeans as km  # noqa: E402


def synthetic_features(rng, batch: int, size: int, dim: int,
                       noise: float = 0.6):
  """Segment-like L2-normalised features: float32 [B, size*size, dim]."""
  yy, xx = np.mgrid[:size, :size]
  cells = np.stack([yy.ravel(), xx.ravel()], -1).astype(np.float32)
  out = np.empty((batch, size * size, dim), np.float32)
  for b in range(batch):
    regions = rng.integers(4, 25)
    seeds = rng.random((regions, 2)) * size
    label = ((cells[:, None] - seeds[None]) ** 2).sum(-1).argmin(1)
    mu = rng.normal(size=(regions, dim))
    mu = numerics.l2_normalize(mu)
    f = mu[label] + noise / np.sqrt(dim) * rng.normal(size=(size * size, dim))
    out[b] = numerics.l2_normalize(f)
  return out


def bench_kmeans(batch: int = 32, size: int = 56, dim: int = 128,
                 clusters: int = 16, iters: int = 10, repeats: int = 3,
                 sklearn_threads: int | None = 1,
                 seed: int = 0) -> dict[str, float]:
  """Times and compares jnp and scikit-learn k-means; prints a table."""
  # Only the benchmark needs scikit-learn (and its threadpoolctl).
  import threadpoolctl
  from sklearn.cluster import KMeans

  x = synthetic_features(np.random.default_rng(seed), batch, size, dim)
  n = size * size

  def run_sklearn(r):
    """One image at a time, as a host-side implementation would."""
    inertias, n_iters = [], []
    t = time.perf_counter()
    for b in range(batch):
      ref = KMeans(clusters, init="k-means++", n_init=1, algorithm="lloyd",
                   random_state=r * batch + b).fit(x[b])
      inertias.append(ref.inertia_)
      n_iters.append(ref.n_iter_)
    return time.perf_counter() - t, inertias, n_iters

  xd = jax.device_put(x)
  key = jax.random.PRNGKey(seed)

  def run_jnp(r):
    t = time.perf_counter()
    out = km.kmeans(xd, clusters, jax.random.fold_in(key, r), num_iters=iters)
    jax.block_until_ready(out)
    return time.perf_counter() - t, out

  # Warm-up (jit compile, BLAS), then interleaved repeats; the minimum of
  # each is the least disturbed by other load on the host. scikit-learn's
  # threads are capped (default 1): with XLA's thread pool alive on a
  # machine with few cores, OpenMP's spinning threads oversubscribe it and
  # a multi-threaded fit was measured ~20x slower than a single-threaded one.
  with threadpoolctl.threadpool_limits(limits=sklearn_threads):
    KMeans(clusters, n_init=1, random_state=0).fit(x[0])   # warm-up
  run_jnp(0)
  sk_times, sk_inertias, sk_iters, jnp_times, jnp_inertias = [], [], [], [], []
  for r in range(repeats):
    with threadpoolctl.threadpool_limits(limits=sklearn_threads):
      elapsed, inertias, n_iters = run_sklearn(r)
    sk_times.append(elapsed)
    sk_inertias.append(inertias)
    sk_iters += n_iters
    elapsed, (a, c) = run_jnp(r)
    jnp_times.append(elapsed)
    jnp_inertias.append(np.asarray(km.inertia(xd, c, a), np.float64))
  sk_time, jnp_time = min(sk_times), min(jnp_times)
  # Both sides seed differently in each repeat: inertias are averaged over
  # repeats (one seed's luck moves an image's inertia by up to ~10 %).
  sk_inertia = np.mean(sk_inertias, axis=0)
  jnp_inertia = np.mean(jnp_inertias, axis=0)

  time_ratio = sk_time / jnp_time
  inertia_ratio = float(jnp_inertia.sum() / np.sum(sk_inertia))
  per_image = jnp_inertia / np.asarray(sk_inertia)
  platform = jax.devices()[0].platform
  print(f"k-means: B={batch} images of N={size}x{size}={n} points, D={dim}, "
        f"K={clusters}; jnp on {platform} x{jax.device_count()}, "
        f"min of {repeats} interleaved runs")
  print(f"  {'':30s} {'time (s)':>9s} {'inertia':>10s}")
  print(f"  {f'scikit-learn, {sklearn_threads} thread(s)':30s} "
        f"{sk_time:9.3f} {np.sum(sk_inertia):10.2f}")
  print(f"  {f'jnp batched, {iters} Lloyd iters':30s} {jnp_time:9.3f} "
        f"{jnp_inertia.sum():10.2f}")
  print(f"  scikit-learn Lloyd iterations per image: median "
        f"{int(np.median(sk_iters))}, max {max(sk_iters)}")
  print(f"  speed-up scikit-learn / jnp: {time_ratio:.2f}x "
        f"(goal >= 10x)")
  print(f"  inertia jnp / scikit-learn: {inertia_ratio:.4f} (goal <= 1.02; "
        f"per image {per_image.min():.3f}..{per_image.max():.3f})")
  if platform == "cpu":
    print("  note: on a CPU both sides do the same float32 FLOPs on the same "
          "cores; the speed-up target is for an accelerator.")
  return {"sklearn_s": sk_time,
          "jnp_s": jnp_time, "time_ratio": time_ratio,
          "inertia_ratio": inertia_ratio}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=56,
                 help="feature grid side (112 = Odin's 448 px view, stride 4)")
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--clusters", type=int, default=16)
  p.add_argument("--iters", type=int, default=10, help="jnp Lloyd iterations")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--sklearn_threads", type=int, default=1,
                 help="OpenMP/BLAS threads for scikit-learn (0: its default)")
  p.add_argument("--skip_kmeans", action="store_true")
  p.add_argument("--skip_steps", action="store_true")
  p.add_argument("--step_batch", type=int, default=16)
  p.add_argument("--step_image_size", type=int, default=96)
  p.add_argument("--step_repeats", type=int, default=5,
                 help="interleaved timed steps per method")
  p.add_argument("--smoke", action="store_true",
                 help="2 images of 8x8 cells for k-means; the steps on the "
                 "`:test` preset (ResNet-18 x0.125, 64 px, batch 8), 1 "
                 "timed step: the CPU smoke test")
  args = p.parse_args(argv)
  preset, width, warmup, refresh_repeats = "demo", 0.5, 2, 5
  if args.smoke:
    args.batch, args.size, args.dim, args.clusters = 2, 8, 8, 4
    args.iters, args.repeats = 3, 1
    args.step_batch, args.step_image_size, args.step_repeats = 8, 64, 1
    preset, width, warmup, refresh_repeats = "test", 0.125, 1, 1
  if not args.skip_kmeans:
    bench_kmeans(args.batch, args.size, args.dim, args.clusters, args.iters,
                 args.repeats, args.sklearn_threads or None)
  if not args.skip_steps:
    bench_steps(args.step_batch, args.step_image_size, args.step_repeats,
                preset=preset, width=width, warmup=warmup,
                refresh_repeats=refresh_repeats)


def bench_steps(batch: int, image_size: int, steps: int = 5, *,
                preset: str = "demo", width: float = 0.5, warmup: int = 2,
                refresh_repeats: int = 5) -> dict:
  """Step-time ratios of Odin against DetCon-B, measured in one run.

  All on ResNet-18 x`width` (the `preset` config's heads) at the given view
  size and batch:
    detcon_b        DetCon-B, stage-4 features (the foundation's step);
    detcon_b_fpn    DetCon-B with the FPN and stride-4 'p2' features, masks
                    from the data;
    odin_cached     Odin with odin.tau_update='copy', odin.cached=True: the
                    masks come from records refreshed once per copy period
                    (methods/odin_cache.py), so the step is detcon_b_fpn's plus
                    the τ ← θ copy; the refresh (τ's forward pass on every
                    image at 2x, + k-means) is timed per image and amortised
                    over odin.copy_every_epochs epochs;
    odin            Odin with continuous τ: + the discovery network on the
                    2x spanning view and k-means (K=16) every step;
    r2o             R2O: + target C4 on the spanning view, region k-means.
  Goals (issue): Odin-continuous / DetCon-B <= 1.6, Odin-cached / DetCon-B
  with the same FPN backbone <= 1.05. All steps (and Odin's discovery parts,
  timed alone) are compiled first, then timed round by round, interleaved.
  """
  import step_time  # pylint: disable=g-import-not-at-top
  from configs import detcon_b, odin, r2o  # pylint: disable=g-import-not-at-top
  args = argparse.Namespace(depth=18, width=width, image_size=image_size,
                            batch=batch, steps=steps, warmup=warmup,
                            preset=preset)
  fpn = step_time.bench_config(detcon_b, args)
  fpn.model.fpn_channels = odin.get_config(preset).model.fpn_channels
  fpn.model.feature_stage = "p2"
  configs = {"detcon_b": step_time.bench_config(detcon_b, args),
             "detcon_b_fpn": fpn,
             "odin": step_time.bench_config(odin, args),
             "r2o": step_time.bench_config(r2o, args)}
  configs["r2o"].r2o.group_size = batch // 2
  cached = step_time.bench_config(odin, args)
  cached.odin.tau_update, cached.odin.cached = "copy", True
  configs["odin_cached"] = cached
  runners = {name: step_time.make_runner(c) for name, c in configs.items()}
  runners.update(_discovery_runners(configs["odin"]))
  times = step_time.time_runners(runners, args, reduce=None)
  t = {name: float(np.median(v)) for name, v in times.items()}
  fastest = {name: min(v) for name, v in times.items()}
  refresh = _refresh_seconds_per_image(cached, batch, refresh_repeats)
  print(f"\nstep time, ResNet-18 x{width:g}, {image_size}px views, batch "
        f"{batch} "
        f"({jax.devices()[0].platform} x{jax.device_count()}, {steps} "
        f"interleaved steps, load average {os.getloadavg()[0]:.1f}): median "
        f"(min, the least disturbed by other load)")
  rows = (("detcon_b", "detcon_b"), ("detcon_b_fpn", "detcon_b"),
          ("odin", "detcon_b"), ("odin", "detcon_b_fpn"),
          ("odin_cached", "detcon_b_fpn"), ("r2o", "detcon_b"),
          # What Odin adds to detcon_b_fpn, measured on its own.
          ("odin tau fwd", "detcon_b"), ("odin k-means", "detcon_b"))
  for name, base in rows:
    print(f"  {name:13s} {1000 * t[name]:7.1f} ms ({1000 * fastest[name]:7.1f})"
          f"  {t[name] / t[base]:6.3f} x {base} "
          f"({fastest[name] / fastest[base]:.3f})")
  # Arithmetic, whatever the hardware: Odin's step is detcon_b_fpn's plus
  # τ's forward pass on the 2x view plus k-means (analytic: XLA's cost
  # analysis counts a loop body once).
  flops = {name: runners[name].flops for name in
           ("detcon_b", "detcon_b_fpn", "odin tau fwd", "odin k-means")}
  flops["odin"] = (flops["detcon_b_fpn"] + flops["odin tau fwd"]
                   + flops["odin k-means"])
  print("  GFLOP per step (XLA cost analysis; k-means analytic): " + ", ".join(
      f"{name} {flops[name] / 1e9:.1f}" for name in flops)
        + f"; odin / detcon_b = {flops['odin'] / flops['detcon_b']:.2f}, "
        f"without k-means {(flops['odin'] - flops['odin k-means']) / flops['detcon_b']:.2f}")
  t["flops"] = flops
  # Per epoch the refresh costs N * refresh / copy_every_epochs against the
  # training's N / batch steps.
  per_image_step = t["odin_cached"] / batch
  epochs = odin.get_config().odin.copy_every_epochs
  print(f"  odin_cached refresh: {1000 * refresh:.1f} ms per image "
        f"({refresh / per_image_step:.2f} x a training step's time per image);"
        f" amortised over a copy period of {epochs:g} epochs: "
        f"+{100 * refresh / per_image_step / epochs:.3f} %")
  t["refresh_per_image"] = refresh
  return t


def _discovery_runners(config) -> dict:
  """Odin's discovery branch in two parts, each a run() -> seconds:
  'odin tau fwd' (τ's per-pixel projections of the 2x spanning view, BN on
  batch statistics, as in the step) and 'odin k-means' (on those
  projections, L2-normalised)."""
  from odin_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from odin_jax import methods  # pylint: disable=g-import-not-at-top
  model = methods.get(config).network()
  tx = step_lib.make_optimizer(config, lambda count: 0.0)
  state = step_lib.create_train_state(config, model, tx, jax.random.PRNGKey(0))
  side = int(round(config.odin.span_scale * config.image_size))
  span = jax.random.uniform(jax.random.PRNGKey(1),
                            (config.batch_size, side, side, 3))
  import step_time  # pylint: disable=g-import-not-at-top
  project = jax.jit(lambda p, s, x: model.apply(
      {"params": p, "batch_stats": s}, x, train=True,
      method=model.dense_projection, mutable=["batch_stats"])[0])
  project = project.lower(state.method_state["tau"], state.batch_stats,
                          span).compile()
  z = project(state.method_state["tau"], state.batch_stats, span)
  b, h, w, d = z.shape
  z = numerics.l2_normalize(z.reshape(b, h * w, d))
  o = config.odin
  cluster = jax.jit(lambda z, key: km.kmeans(z, o.num_clusters, key,
                                             num_iters=o.kmeans_iters)[0])
  key = jax.random.PRNGKey(2)

  def timed(fn, flops, *args):
    def run():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      return time.perf_counter() - start
    run.flops = flops
    return run

  return {"odin tau fwd": timed(project, step_time.compiled_flops(project),
                                state.method_state["tau"], state.batch_stats,
                                span),
          "odin k-means": timed(cluster, kmeans_flops(
              b, h * w, d, o.num_clusters, o.kmeans_iters), z, key)}


def kmeans_flops(batch: int, points: int, dim: int, clusters: int,
                 iters: int, trials: int | None = None) -> float:
  """Multiply-add FLOPs of km.kmeans with k-means++ (its module docstring):
  K-1 seeding passes of N·L·D, then per Lloyd iteration the sums and the
  distances, N·K·D each."""
  if trials is None:
    trials = 2 + int(np.log(clusters))
  per_image = dim * points * (trials * (clusters - 1) + 2 * clusters * iters)
  return 2.0 * batch * per_image


def _refresh_seconds_per_image(config, batch: int, repeats: int = 5) -> float:
  """Time of the refresh's device part (τ forward at span size + k-means)."""
  from odin_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from odin_jax import methods  # pylint: disable=g-import-not-at-top
  from odin_jax.methods import odin as odin_method  # pylint: disable=g-import-not-at-top
  model = methods.get(config).network()
  tx = step_lib.make_optimizer(config, lambda count: 0.0)
  state = step_lib.create_train_state(config, model, tx, jax.random.PRNGKey(0))
  side = int(round(config.odin.span_scale * config.image_size))
  span = jax.random.uniform(jax.random.PRNGKey(1), (batch, side, side, 3))
  discover = jax.jit(odin_method.make_discover(config, model))
  key = jax.random.PRNGKey(2)
  discover(state.method_state["tau"], state.batch_stats, span,
           key).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    discover(state.method_state["tau"], state.batch_stats, span,
             key).block_until_ready()
    times.append(time.perf_counter() - start)
  return float(np.median(times)) / batch


if __name__ == "__main__":
  main()
