"""Trains the toy LLaVA on generated scenes: ``python -m jaxdebias.toy.train --out DIR [--steps N ...]``.

LLaVA-1.5 starts from a pretrained CLIP and a pretrained Vicuna; the toy model starts from nothing, so a run has
up to three stages, each with its own warmup/cosine schedule and fresh optimizer moments:

1. vision (``--vision-steps``): the CLIP-shaped tower learns to see, from linear heads that classify each
   patch's object colour and shape and, from the mean patch feature, which shapes and colour-shape pairs the
   image holds (a stand-in for CLIP's image-level pretraining);
2. text (``--text-steps``): the decoder learns to answer the questions from the scene described in words where
   the image will be (``data.text_batch``; a stand-in for the LLM's pretraining, which knows language and how to
   answer from a context before LLaVA shows it an image);
3. llava (the rest): LLaVA's instruction tuning on images and their questions, with the loss on the answer
   tokens (each question a single-turn prompt behind the shared image, ``data.branched``), plus our patch-naming
   loss (``--patch-loss``, ``loss_fn``). Unlike LLaVA, the tower is trained too: its pretraining here is a small
   stand-in for CLIP's.

The shipped model is trained in two steps (progressive stacking, ``model.stack``): this script on the "shallow"
preset (6 decoder layers: four times cheaper per step), then ``stack(..., mode="identity")`` into the 24 layers of
"shipped" (each trained layer followed by 3 silent copies; no training after it), or ``--preset shipped --init
SHALLOW/model`` to stack (default mode "split") and train on. README.md gives the commands and their wall times.

AdamW (weight decay on matrices only), global-norm gradient clipping. One jitted step per stage; the batch is split
over this process's devices along a "data" mesh axis (parameters replicated), so the same code runs on 1 CPU, 8
fake CPU devices or a GPU/TPU host.

Resumable: every ``--ckpt-minutes`` (and at the end, and on Ctrl-C) the parameters, the optimizer state and the
step go to ``DIR/checkpoints/step_XXXXXXX`` (Orbax; written to a temporary directory and renamed, so a kill never
leaves a half checkpoint). Batch ``s`` is a pure function of (``--seed``, ``s``), so a run killed and restarted
with the same arguments continues from its last checkpoint with the same data order and ends with the same
parameters as an uninterrupted run. The finished model goes to ``DIR/model`` in the format
``jaxdebias.convert.load`` reads, with its tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxdebias.toy import data, evaluate, model as toy_model, tokenizer
from jaxdebias.toy.checkpoints import latest_checkpoint, restore_checkpoint, save_checkpoint


STAGES = ("vision", "text", "llava")
# What each stage trains (paths under the state {"model": parameters, "head": vision pretraining head}); the rest
# is frozen (stop_gradient, and no weight decay).
TRAINABLE = {"vision": (("model", "vision_tower"), ("head",)),
             "text": (("model", "language_model"),),
             "llava": (("model", "vision_tower"), ("model", "multi_modal_projector"), ("model", "language_model"))}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A run: ``steps`` in all, the first ``vision_steps`` pretraining the vision tower, the next ``text_steps``
    pretraining the decoder on text, the rest (LLaVA's instruction tuning) training the projector and decoder."""

    steps: int = 1700
    vision_steps: int = 200
    text_steps: int = 400
    seed: int = 0
    preset: str = "shallow"
    batch_size: int = 8  # images per step of the LLaVA stage
    pre_batch_size: int = 16  # images / conversations per step of the two pretraining stages
    lr: float = 2e-3
    pre_lr: float = 3e-3
    warmup: int = 20  # per stage
    weight_decay: float = 0.05
    clip: float = 1.0
    turns: int = 8  # questions per image (data.branched)
    max_len: int | None = None  # default: visual tokens + 192
    init: str | None = None  # start from this exported toy model (same preset, or a shallower one: stacked)
    patch_loss: float = 1.0  # weight of the LLaVA stage's patch-naming loss (``loss_fn``); 0 turns it off

    def check(self):
        if self.steps <= 0 or self.batch_size <= 0 or self.pre_batch_size <= 0:
            raise ValueError(f"steps and batch sizes must be positive, got {self.steps}, {self.batch_size}, "
                             f"{self.pre_batch_size}.")
        if min(self.vision_steps, self.text_steps) < 0 or self.vision_steps + self.text_steps >= self.steps:
            raise ValueError(f"vision_steps {self.vision_steps} + text_steps {self.text_steps} must leave steps "
                             f"for the LLaVA stage (steps {self.steps}).")

    def stages(self) -> list[tuple[str, int, int]]:
        """(stage, first step index, end) for every stage with steps."""
        bounds = np.cumsum([0, self.vision_steps, self.text_steps, self.steps - self.vision_steps - self.text_steps])
        return [(name, int(a), int(b)) for name, a, b in zip(STAGES, bounds[:-1], bounds[1:]) if b > a]

    def stage_at(self, step: int) -> tuple[str, int, int]:
        return next(st for st in self.stages() if st[1] <= step < st[2])

    def schedule(self, stage: str) -> optax.Schedule:
        """Linear warmup, then cosine decay to 5% of the peak at the stage's last step (per stage)."""
        _, a, b = next(st for st in self.stages() if st[0] == stage)
        n, peak = b - a, self.lr if stage == "llava" else self.pre_lr
        warmup = min(self.warmup, max(1, n // 10))
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(n, warmup + 1), end_value=peak * 0.05)


class Interrupted(Exception):
    """Raised by ``train(..., interrupt_at=k)`` after step k, with no checkpoint written (a simulated kill)."""


@functools.lru_cache(maxsize=None)
def optimizer(weight_decay: float, clip: float) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW's direction (Adam + decoupled weight decay on matrices); the step's
    learning rate multiplies it in ``train_step`` (an argument, so that one compiled step serves every schedule).
    Cached: equal settings give the same object, hence one compilation."""
    decay = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(clip), optax.scale_by_adam(b1=0.9, b2=0.98),
                       optax.add_decayed_weights(weight_decay, mask=decay))


def _names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def trainable_mask(state, stage: str):
    """bool per leaf of ``state``: trained in ``stage``."""
    prefixes = TRAINABLE[stage]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(_names(path)[:len(p)] == p for p in prefixes), state)


def init_head(vision_width: int, seed: int) -> dict:
    """The vision pretraining head: linear maps from a patch feature to its colour (7) and shape (6) classes, and
    from the mean patch feature to what the image holds (35 shapes and colour-shape pairs)."""
    kc, ks, kp = jax.random.split(jax.random.key(seed + 1), 3)
    linear = lambda k, n: {"kernel": 0.02 * jax.random.normal(k, (vision_width, n)), "bias": jnp.zeros(n)}  # noqa
    return {"color": linear(kc, 7), "shape": linear(ks, 6), "present": linear(kp, 35)}


def _ce(logits, labels, weights):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def loss_fn(state, graphdef, rest, batch, stage: str, patch_loss: float = 0.0):
    """The stage's loss. vision: cross-entropy of each patch's colour and shape class (object and background
    patches weighted equally in total); text: next-token loss on the answer tokens of questions about a scene
    described in words; llava: next-token loss on the answer tokens, plus ``patch_loss`` times the patch-naming
    loss: at each image token on an object, the decoder's output (through its LM head) names the object's colour
    word and its shape word (cross-entropy of each, averaged). Our addition, not LLaVA's: naming the patches puts
    what each image token shows into the words the answers use, which the questions' attention can then read (on a
    64-token variant it took held-out colour accuracy from 0.14 to 0.82 in 500 steps; README "The toy world")."""
    mask = trainable_mask(state, stage)
    state = jax.tree.map(lambda x, m: x if m else jax.lax.stop_gradient(x), state, mask)
    m = nnx.merge(graphdef, state["model"], rest)
    if stage == "vision":
        feats = m.vision_tower(batch["pixel_values"])  # [B, N, Dv]
        obj = (batch["shapes"] > 0).astype(jnp.float32)
        loss = 0.0
        for name, labels in (("color", batch["colors"]), ("shape", batch["shapes"])):
            h = state["head"][name]
            logits = feats @ h["kernel"] + h["bias"]
            loss = loss + _ce(logits, labels, obj) + _ce(logits, labels, 1.0 - obj)
        h = state["head"]["present"]  # image level, as CLIP learns: what the image holds, from the mean feature
        present = jnp.mean(feats, axis=1) @ h["kernel"] + h["bias"]
        return loss / 2 + jnp.mean(optax.sigmoid_binary_cross_entropy(present, batch["present"])) * 10
    # one image (or, in the text stage, its description) as a shared prefix, its questions side by side
    # (data.branched)
    h, _ = m.embed(batch["input_ids"], batch.get("pixel_values"))
    lm = m.language_model
    h = lm.run_layers(h, batch["positions"], data.branch_mask(batch["turns"]), real=batch["attention_mask"]).h
    logits = lm.logits(h)
    loss = _ce(logits, batch["targets"], batch["weights"])
    if patch_loss and stage == "llava":
        at_image = jnp.take_along_axis(logits, batch["image_positions"][..., None], axis=1)  # [B, N, V]
        words = batch["patch_words"]  # [B, 2, N]: colour word, shape word (-1: background)
        loss = loss + patch_loss * sum(_ce(at_image, jnp.maximum(words[:, j], 0), words[:, j] >= 0)
                                       for j in (0, 1)) / 2
    return loss


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "stage", "patch_loss"), donate_argnums=(0, 1))
def train_step(state, opt_state, rest, batch, lr, *, graphdef, tx, stage, patch_loss=0.0):
    """One AdamW step of ``stage`` at learning rate ``lr`` (float32[]): only the stage's parameters change.
    Returns (state, opt_state, loss, gradient norm)."""
    loss, grads = jax.value_and_grad(loss_fn)(state, graphdef, rest, batch, stage, patch_loss)
    direction, opt_state = tx.update(grads, opt_state, state)
    state = jax.tree.map(lambda p, d, m: p - lr * d if m else p, state, direction, trainable_mask(state, stage))
    return state, opt_state, loss, optax.tree.norm(grads)


# --- the loop ----------------------------------------------------------------------------------------------


def mesh_for(devices=None) -> jax.sharding.Mesh:
    devices = jax.local_devices() if devices is None else devices
    return jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))


def make_batch(cfg: TrainConfig, tok, dcfg: data.DataConfig, image_id: int, step: int) -> dict:
    """The batch of step index ``step`` (a pure function of the seed and the step)."""
    stage, a, _ = cfg.stage_at(step)
    if stage == "vision":
        return data.vision_batch(dcfg, cfg.seed, step - a, cfg.pre_batch_size)
    if stage == "text":
        return data.text_batch(tok, dcfg, image_id, cfg.seed, step - a, cfg.pre_batch_size)
    return data.batch(tok, dcfg, image_id, cfg.seed, step - a, cfg.batch_size)


def train(out, cfg: TrainConfig = TrainConfig(), *, ckpt_minutes: float = 5.0, ckpt_every: int | None = None,
          progress: bool = True, interrupt_at: int | None = None, devices=None, export: bool = True,
          log=print) -> dict:
    """Trains (or resumes) a run in ``out``. Returns {"state" ({"model": parameters, "head": ...}), "losses"
    (this invocation's, by step), "model_dir" (the exported model or None), "resumed_from"}."""
    from tqdm.auto import tqdm

    cfg.check()
    os.makedirs(out, exist_ok=True)
    tok = tokenizer.build()
    image_id = tokenizer.image_token_id(tok)
    model = toy_model.init(cfg.preset, tok, cfg.seed)
    if cfg.init is not None:
        start_from, _ = toy_model.load(cfg.init)  # a shallower model is stacked into the preset's depth
        model = start_from if start_from.cfg == model.cfg else toy_model.stack(start_from, cfg.preset, tok)
    dcfg = toy_model.data_config(model.cfg, cfg.max_len, cfg.turns)
    mesh = mesh_for(devices)
    n_dev = mesh.shape["data"]
    if cfg.batch_size % n_dev or cfg.pre_batch_size % n_dev:
        raise ValueError(f"Batch sizes ({cfg.batch_size}, {cfg.pre_batch_size}) must be multiples of the {n_dev} "
                         "local devices.")
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optimizer(cfg.weight_decay, cfg.clip)
    state = jax.device_put({"model": params, "head": init_head(model.cfg.vision.hidden_size, cfg.seed)}, replicated)
    rest = jax.device_put(rest, replicated)
    opt_state = jax.device_put(tx.init(state), replicated)
    meta = {"config": dataclasses.asdict(cfg), "data": dataclasses.asdict(dcfg), "vocab": len(tok)}
    start, resumed = 0, None
    found = latest_checkpoint(out)
    if found is not None:
        with open(os.path.join(found[1], "meta.json")) as f:
            old = json.load(f)
        if old["config"] != meta["config"] or old["data"] != meta["data"]:
            raise ValueError(f"{out} holds a run with other settings ({old['config']}); resume it with the same "
                             "arguments or choose another --out.")
        state, opt_state = restore_checkpoint(found[1], state, opt_state, replicated)
        start = resumed = found[0]
        log(f"resuming from {found[1]} (step {start})")
    schedules = {name: cfg.schedule(name) for name, _, _ in cfg.stages()}
    starts = {a for _, a, _ in cfg.stages()}
    losses: dict[int, float] = {}
    feed = data.Prefetch(lambda i: make_batch(cfg, tok, dcfg, image_id, i), start, cfg.steps)
    bar = tqdm(total=cfg.steps, initial=start, desc="training", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)
    last_save, t0, seen, tokens, ema = time.time(), time.time(), 0, 0, None
    step = start
    try:
        with open(os.path.join(out, "train_log.jsonl"), "a") as logf:
            while step < cfg.steps:
                i, b = feed.next()
                assert i == step
                stage, a, _ = cfg.stage_at(step)
                if step in starts:  # a new stage starts with fresh optimizer moments
                    opt_state = jax.device_put(tx.init(state), replicated)
                    ema = None
                arrays = {k: jax.device_put(v, split) for k, v in b.items()}
                lr = jnp.asarray(schedules[stage](step - a + 1), jnp.float32)  # the first update is not at lr 0
                state, opt_state, loss, gnorm = train_step(state, opt_state, rest, arrays, lr, graphdef=graphdef,
                                                           tx=tx, stage=stage, patch_loss=cfg.patch_loss)
                loss = float(loss)
                step += 1
                losses[step] = loss
                n = len(next(iter(b.values())))
                seen += n
                tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else dcfg.n_image * n
                ema = loss if ema is None else 0.95 * ema + 0.05 * loss
                dt = time.time() - t0
                logf.write(json.dumps({"step": step, "stage": stage, "loss": loss, "grad_norm": float(gnorm),
                                       "lr": float(lr), "seconds": round(dt, 2)}) + "\n")
                logf.flush()
                bar.update(1)
                bar.set_postfix(stage=stage, loss=f"{ema:.3f}", samples_s=f"{seen / dt:.2f}",
                                tok_s=f"{tokens / dt:.0f}")
                if interrupt_at is not None and step == interrupt_at:
                    raise Interrupted(f"interrupted after step {step}")
                due = (ckpt_every is not None and step % ckpt_every == 0) or \
                    time.time() - last_save > 60 * ckpt_minutes or step == cfg.steps
                if due:
                    save_checkpoint(out, step, state, opt_state, meta)
                    last_save = time.time()
    except KeyboardInterrupt:
        save_checkpoint(out, step, state, opt_state, meta)
        log(f"\ninterrupted: saved step {step} to {out}/checkpoints; run the same command again to resume.")
        raise
    finally:
        bar.close()
        feed.close()
    model_dir = None
    if export:
        model = nnx.merge(graphdef, state["model"], rest)
        model_dir = os.path.join(out, "model")
        shutil.rmtree(model_dir, ignore_errors=True)
        facts = {"training": {**dataclasses.asdict(cfg), "final_loss_ema": ema,
                              "seconds_this_invocation": round(time.time() - t0, 1), "resumed_from": resumed}}
        toy_model.save(model, tok, toy_model.hf_config(cfg.preset, tok), model_dir, extra=facts)
        log(f"wrote {model_dir}")
    return {"state": state, "losses": losses, "model_dir": model_dir, "resumed_from": resumed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxdebias.toy.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run folder: checkpoints, log, the finished model in OUT/model")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="all stages together")
    p.add_argument("--vision-steps", type=int, default=TrainConfig.vision_steps)
    p.add_argument("--text-steps", type=int, default=TrainConfig.text_steps)
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    p.add_argument("--preset", default=TrainConfig.preset, choices=sorted(toy_model.PRESETS))
    p.add_argument("--batch", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak rate of the LLaVA stage")
    p.add_argument("--pre-lr", type=float, default=TrainConfig.pre_lr, help="peak rate of the pretraining stages")
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument("--turns", type=int, default=TrainConfig.turns, help="questions per image")
    p.add_argument("--patch-loss", type=float, default=TrainConfig.patch_loss,
                   help="weight of the patch-naming loss of the LLaVA stage (0: off)")
    p.add_argument("--init", default=None, help="start from an exported toy model (DIR/model of an earlier run)")
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--eval", type=int, default=200, help="held-out questions to score the finished model on")
    args = p.parse_args(argv)
    cfg = TrainConfig(steps=args.steps, vision_steps=args.vision_steps, text_steps=args.text_steps, seed=args.seed,
                      preset=args.preset, batch_size=args.batch, lr=args.lr, pre_lr=args.pre_lr, warmup=args.warmup,
                      turns=args.turns, patch_loss=args.patch_loss, init=args.init and os.path.abspath(args.init))
    try:
        cfg.check()
        t = time.time()
        result = train(args.out, cfg, ckpt_minutes=args.ckpt_minutes)
    except ValueError as e:
        p.error(str(e))
    except KeyboardInterrupt:
        return 130
    print(f"trained {cfg.steps} steps in {time.time() - t:.0f} s (this invocation)")
    if args.eval:
        m, tok = toy_model.load(result["model_dir"])
        report = evaluate.heldout(m, tok, args.eval, seed=cfg.seed)
        with open(os.path.join(args.out, "heldout.json"), "w") as f:
            json.dump(report, f, indent=1)
        print("held-out accuracy: " + ", ".join(f"{k} {v['accuracy']:.3f} ({v['n']})" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
