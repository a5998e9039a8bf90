"""Experiment 6: classifier guidance (Dhariwal & Nichol 2021) of the unconditional v model.

Run:  taskset -c 1 python3 -m experiments.classifier_guidance --workdir /tmp/exp \
          --out experiments/results
Expect: experiments/results/classifier_guidance.{json,png}: a noise-aware classifier
p_phi(y | x_t, t) (a small MLP on the 8x8 x_t plus a sinusoidal embedding of t) is trained on
noised train digits, x_t = q_sample(x0, t, eps) with t uniform in [0, T - 1] on the base model's
schedule; its accuracy on noised test digits per t bucket says how much signal its gradient
carries at each noise level. The base model is experiment 1's unconditional v model
(configs/default.py with diffusion.prediction = 'v', trained first if `experiments.
parameterization` has not run), sampled with DDIM-50 (eta 0, trailing spacing, clip_denoised)
through `jax_diffusion.guidance.classifier_guidance` (Algorithm 2: eps_hat - s sigma_t
grad log p_phi(y | x_t, t)) at classifier scales s = 0, 1, 2, 4, 8, 16, balanced labels, the
same x_T at every scale. Per scale, as experiment 4: the shipped digits classifier's accuracy on
the intended labels (an independent judge: the guiding classifier is not it), Frechet distance
to the train digits, precision / recall, the inception score and the within-class variance.
"""

from __future__ import annotations

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from jax_diffusion import data as data_lib
from jax_diffusion import diffusion as diffusion_lib
from jax_diffusion import guidance as guidance_lib
from jax_diffusion import samplers
from jax_diffusion.models import timestep_embedding

NAME = "classifier_guidance"
SCALES = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
NUM_CLASSES = 10
NUM_BUCKETS = 10  # per-t accuracy: buckets of T / 10 steps
BUCKET_DRAWS = 8  # draws of (t, eps) per test digit and bucket
LOG_EVERY = 100  # training-loss curve: the mean loss of every LOG_EVERY steps


class NoisyClassifier(nn.Module):
    """Logits of p_phi(y | x_t, t): an MLP on the flattened x_t, t added by a sinusoidal embedding.

    ADM's noisy classifier (Dhariwal & Nichol 2021, section 4.1) is the UNet's encoder; on 8x8
    digits a 3-layer MLP whose hidden layers each add a projection of the embedding of t is
    enough, and its input gradient is cheap next to the UNet call of each sampling step.
    """

    hidden: int = 256
    num_layers: int = 3
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, t):
        """x: [B, H, W, C] float x_t; t: int [B] in [0, T - 1]. Returns [B, num_classes]."""
        emb = timestep_embedding(jnp.asarray(t), self.hidden)
        emb = nn.Dense(self.hidden)(nn.silu(nn.Dense(self.hidden)(emb)))
        h = x.reshape(x.shape[0], -1)
        for _ in range(self.num_layers):
            h = nn.silu(nn.Dense(self.hidden)(h) + nn.Dense(self.hidden)(emb))
        return nn.Dense(self.num_classes)(h)


def main(argv: list[str] | None = None) -> dict:
    parser = common.parse_args(__doc__.splitlines()[0], num_samples=500, bpd_examples=None)
    parser.add_argument(
        "--clf-steps", type=common._positive_int, default=4000, help="classifier train steps"
    )
    parser.add_argument("--clf-lr", type=float, default=1e-3, help="classifier peak Adam lr")
    args = common.parse(parser, argv)
    if not args.clf_lr > 0:  # refused before training
        parser.error(f"need --clf-lr > 0; got {args.clf_lr}")
    common.setup_compile_cache()
    t0 = time.perf_counter()
    num = 20 if args.smoke else args.num_samples
    scales = (0.0, 4.0) if args.smoke else SCALES
    clf_steps = 20 if args.smoke else args.clf_steps
    config = common.make_config({"diffusion.prediction": "v"}, steps=args.steps, smoke=args.smoke)
    workdir = common.run_dir(args.workdir, "param_v", args.smoke)  # experiment 1's v model
    common.log(f"base model: training in {workdir}")
    info = common.train_run(workdir, config)
    run = common.load(workdir)
    clf = NoisyClassifier()
    clf_params, record = train_classifier(clf, run, steps=clf_steps, lr=args.clf_lr, seed=args.seed)
    common.log(
        f"classifier: {record['train_seconds']:.0f} s, loss {record['final_loss']:.4g}, "
        f"test accuracy per t bucket {np.round(record['accuracy_by_t']['accuracy'], 3)}"
    )
    labels = np.arange(num) % NUM_CLASSES
    results: dict = {
        "command": "python3 -m experiments.classifier_guidance " + " ".join(argv or sys.argv[1:]),
        "run": common.run_info(config, info),
        "sampler": "ddim, 50 steps, eta 0, trailing spacing, clip_denoised (of the guided x0)",
        "guidance": "classifier_guidance (Dhariwal & Nichol 2021, Algorithm 2), prediction v",
        "num_samples": num,
        "classifier": record,
        "rows": [],
    }
    sample_fn = make_sampler(run, clf, num_steps=min(50, run.schedule.num_timesteps))
    grids = {}
    for s in scales:
        samples, seconds = draw(sample_fn, run, clf_params, labels, s, seed=args.seed)
        row = {"scale": s, **common.measure(samples, labels), "seconds": seconds}
        results["rows"].append(row)
        grids[s] = samples[:20]
        common.log(f"s={s}: {row}")
    results["reference"] = common.reference_metrics(run.shape[0])
    return common.finish(args.out, NAME, results, t0, lambda r, path: plot(r, grids, path))


def train_classifier(clf, run, *, steps: int, lr: float, seed: int, batch_size: int = 128):
    """Trains p_phi(y | x_t, t) with cross-entropy on noised train digits (Adam, cosine decay).

    Each step draws a batch of train digits, t uniform in [0, T - 1] and eps, and classifies
    x_t = q_sample(x0, t, eps) on the base model's schedule. Returns (params, a record: steps,
    batch, lr, train seconds, loss curve, final loss, test accuracy per t bucket).
    """
    images, labels = data_lib.load_digits(run.shape[0], "train")
    images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    T = run.schedule.num_timesteps
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0xC1F)
    params = clf.init(rng, images[:1], jnp.zeros((1,), jnp.int32))["params"]
    opt_state = tx.init(params)

    def loss_fn(params, x0, y, t, eps):
        xt = diffusion_lib.q_sample(run.schedule, x0=x0, t=t, noise=eps)
        logits = clf.apply({"params": params}, xt, t)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, rng):
        i_rng, t_rng, n_rng = jax.random.split(rng, 3)
        idx = jax.random.randint(i_rng, (batch_size,), 0, images.shape[0])
        t = jax.random.randint(t_rng, (batch_size,), 0, T, jnp.int32)
        x0 = images[idx]
        eps = jax.random.normal(n_rng, x0.shape)
        loss, grads = jax.value_and_grad(loss_fn)(params, x0, labels[idx], t, eps)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses, curve, t0 = [], [], time.perf_counter()
    for k in range(steps):  # a Python loop of jitted steps (lax.scan of steps is slow on CPU)
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(rng, k + 1))
        losses.append(loss)
        if len(losses) == LOG_EVERY or k == steps - 1:
            curve.append([k + 1, float(np.mean(jax.device_get(losses)))])
            losses = []
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    if not np.isfinite(curve[-1][1]):
        raise FloatingPointError(f"classifier loss is not finite: {curve[-1]}")
    record = {
        "architecture": f"MLP {clf.num_layers} x {clf.hidden}, SiLU, + embedding of t per layer",
        "num_params": int(sum(p.size for p in jax.tree.leaves(params))),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": lr,
        "lr_schedule": "cosine decay to 0 (Adam)",
        "train_seconds": seconds,
        "final_loss": curve[-1][1],
        "loss_curve": curve,
        "accuracy_by_t": accuracy_by_t(clf, params, run, seed=seed),
    }
    return params, record


def accuracy_by_t(clf, params, run, *, seed: int) -> dict:
    """The classifier's accuracy on noised test digits per t bucket (BUCKET_DRAWS draws each).

    Bucket b holds t in [b T / n, (b + 1) T / n); each test digit gets BUCKET_DRAWS draws of t
    uniform in the bucket and of eps. Also the mean log p_phi(y | x_t, t) of the true label.
    """
    images, labels = data_lib.load_digits(run.shape[0], "test")
    images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    T = run.schedule.num_timesteps
    edges = np.linspace(0, T, NUM_BUCKETS + 1).round().astype(int)

    @jax.jit
    def bucket(lo, hi, rng):
        def one(r):
            t_rng, n_rng = jax.random.split(r)
            t = jax.random.randint(t_rng, (images.shape[0],), lo, hi, jnp.int32)
            eps = jax.random.normal(n_rng, images.shape)
            xt = diffusion_lib.q_sample(run.schedule, x0=images, t=t, noise=eps)
            log_p = jax.nn.log_softmax(clf.apply({"params": params}, xt, t))
            hit = jnp.mean(log_p.argmax(axis=1) == labels)
            return jnp.stack([hit, jnp.mean(log_p[jnp.arange(labels.shape[0]), labels])])

        return jax.vmap(one)(jax.random.split(rng, BUCKET_DRAWS)).mean(axis=0)

    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0xACC)
    out = np.asarray(
        [
            jax.device_get(bucket(int(lo), int(hi), jax.random.fold_in(rng, b)))
            for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))
        ],
        np.float64,
    )
    return {
        "bucket_edges": [int(e) for e in edges],
        "accuracy": out[:, 0].tolist(),
        "log_prob": out[:, 1].tolist(),
        "test_digits": int(images.shape[0]),
        "draws": BUCKET_DRAWS,
    }


def make_sampler(run, clf, *, num_steps: int):
    """A jitted DDIM sampler of the base model guided by the classifier at a traced scale s."""
    d, s_cfg = run.config.diffusion, run.config.sample

    @jax.jit
    def fn(params, clf_params, x_T, labels, scale):
        def log_prob(x, t):
            logits = clf.apply({"params": clf_params}, x, t)
            return jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), labels]

        guided = guidance_lib.classifier_guidance(
            lambda x, t: run.apply(params, x, t),
            guidance_lib.classifier_grad(log_prob),
            run.schedule,
            scale,
            prediction=d.prediction,
            variance=d.variance,
        )
        return samplers.ddim_sample(
            guided,
            run.schedule,
            x_T,
            num_steps=num_steps,
            eta=0.0,
            spacing="trailing",
            prediction=d.prediction,
            variance=d.variance,
            clip_denoised=s_cfg.clip_denoised,
        )

    return fn


def draw(sample_fn, run, clf_params, labels, scale, *, seed: int, batch_size: int = 500):
    """Samples for `labels` at classifier scale `scale`; returns (samples, seconds).

    As `common.draw_samples`: batch i draws x_T from fold_in(PRNGKey(seed), i) (the first of its
    split, so x_T is the one draw_samples uses), the last batch padded.
    """
    num = len(labels)
    bs = min(batch_size, num)
    rng = jax.random.PRNGKey(seed)
    s = jnp.asarray(scale, jnp.float32)
    chunks, t0 = [], time.perf_counter()
    for i in range(-(-num // bs)):
        x_rng, _ = jax.random.split(jax.random.fold_in(rng, i))
        x_T = jax.random.normal(x_rng, (bs, *run.shape))
        y = jnp.asarray(np.resize(labels[i * bs : (i + 1) * bs], bs), jnp.int32)
        chunks.append(np.asarray(jax.device_get(sample_fn(run.params, clf_params, x_T, y, s))))
    samples = np.concatenate(chunks)[:num]
    seconds = time.perf_counter() - t0
    if not np.isfinite(samples).all():
        raise FloatingPointError(f"classifier scale {scale}: some samples are not finite")
    return samples, seconds


def plot(results: dict, grids: dict, path: str) -> None:
    plt = common.pyplot()
    fig = plt.figure(figsize=(16, 7))
    rows = results["rows"]
    s = [r["scale"] for r in rows]
    panels = (
        ("class_accuracy", "accuracy of the intended label (shipped classifier)", None),
        ("fd_train", "Frechet distance to train", None),
        ("recall", "precision / recall", "precision"),
    )
    for i, (key, title, extra) in enumerate(panels):
        ax = fig.add_subplot(2, 4, i + 1)
        ax.plot(s, [r[key] for r in rows], "o-", label=key)
        if extra:
            ax.plot(s, [r[extra] for r in rows], "s--", label=extra)
            ax.legend(fontsize=8)
        ax.set_xlabel("classifier scale s")
        ax.set_title(title, fontsize=9)
    acc = results["classifier"]["accuracy_by_t"]
    edges = acc["bucket_edges"]
    ax = fig.add_subplot(2, 4, 4)
    centres = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    ax.plot(centres, acc["accuracy"], "o-")
    ax.axhline(1 / NUM_CLASSES, color="gray", ls=":", label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("t")
    ax.set_title("noise-aware classifier: test accuracy on x_t", fontsize=9)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(2, 1, 2)
    common.sample_strips(ax, grids, s, "s", "classifier scale")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
