"""What the ``jaxdebias`` command runs: inputs, the embedded default model, pruned + debiased inference, figures.

This module imports the model ports lazily; the pure functions in ``jaxdebias`` never depend on it.

Axes: B batch, N = 576 visual tokens (24 x 24 grid, raster order), T prompt tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from importlib import resources

import numpy as np

import jaxdebias as jd
from jaxdebias import evals
from jaxdebias._checks import UserError
from jaxdebias.evals import atomic_open

GRID, N, SIDE = 24, 576, 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT = "USER: <image>\n{} ASSISTANT:"


def default_image_path() -> str:
    return str(resources.files("jaxdebias") / "assets" / "default.png")


def load_image(path, data: bytes | None = None):
    """An RGB PIL image from a file (or from encoded ``data``, ``path`` naming it), or UserError saying what is
    wrong with it."""
    import io

    from PIL import Image, UnidentifiedImageError

    if data is None and not os.path.isfile(path):
        raise UserError(f"Image {path} does not exist.")
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"Image {path} cannot be read ({e.__class__.__name__}: {e}).") from None


def preprocess(image, mean=CLIP_MEAN, std=CLIP_STD, side: int = SIDE):
    """LLaVA-1.5 preprocessing: expand2square with the mean colour, resize to ``side``, normalise.

    Returns (pixel_values float32[3, side, side], letterboxed PIL image, (width, height))."""
    from PIL import Image

    w, h = image.size
    s = max(w, h)
    canvas = Image.new("RGB", (s, s), tuple(int(255 * m) for m in mean))
    canvas.paste(image, ((s - w) // 2, (s - h) // 2))  # as LLaVA's expand2square (one offset is 0)
    square = canvas.resize((side, side), Image.BICUBIC)
    x = (np.asarray(square, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1), square, (w, h)


class ByteTokenizer:
    """The embedded default model's tokenizer: 0 pad, 1 bos, 2 eos, bytes at 3..258, 259 the image token."""

    pad, bos, eos, image = 0, 1, 2, 259
    vocab = 260

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([self.bos] if bos else []) + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint's own tokenizer (copied beside the weights by the converter)."""

    def __init__(self, path, image_token_id: int):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.image, self.eos, self.pad = image_token_id, self.tok.eos_token_id, self.tok.pad_token_id or 0

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return self.tok(text, add_special_tokens=bos).input_ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def default_model():
    """The embedded default: an untrained, deterministically initialised LLaVA-1.5-shaped model (CLIP 336/14 ->
    576 visual tokens, 32 decoder layers so every method's published layer indices apply), tiny in width."""
    from flax import nnx

    from jaxdebias.models import llava
    from jaxdebias.models.clip import ClipVisionConfig
    from jaxdebias.models.llama import LlamaConfig

    t = ByteTokenizer()
    cfg = llava.LlavaConfig(ClipVisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2),
                            LlamaConfig(vocab_size=t.vocab, hidden_size=64, intermediate_size=128, num_layers=32,
                                        num_heads=2, num_kv_heads=2),
                            image_token_id=t.image, pad_token_id=t.pad, eos_token_id=t.eos)
    return llava.Llava(cfg, rngs=nnx.Rngs(0)), t


def load_model(checkpoint):
    """(model, tokenizer, image mean, image std) from a converted checkpoint, or the embedded default."""
    if checkpoint is None:
        model, tok = default_model()
        return model, tok, CLIP_MEAN, CLIP_STD
    from jaxdebias.convert.loader import ConversionError
    from jaxdebias.models import llava

    if not os.path.isfile(os.path.join(checkpoint, "jaxdebias.json")):
        raise UserError(f"{checkpoint} is not a jaxdebias checkpoint (no jaxdebias.json). Convert a Hugging Face "
                        "checkpoint first: jaxdebias-convert SRC DST.")
    try:
        model = llava.load(checkpoint)
    except ConversionError as e:
        raise UserError(str(e)) from None
    mean, std = CLIP_MEAN, CLIP_STD
    pre = os.path.join(checkpoint, "preprocessor_config.json")
    if os.path.isfile(pre):
        with open(pre) as f:
            p = json.load(f)
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    return model, HFTokenizer(checkpoint, model.cfg.image_token_id), mean, std


def build_prompt(tok, question: str, n_image: int = N):
    """(input_ids int[T], instruction position): LLaVA-1.5's conversation template with the image expanded."""
    pre, post = PROMPT.format(question).split("<image>")
    question_part = tok.encode(post.rsplit(" ASSISTANT:", 1)[0])
    ids = tok.encode(pre, bos=True) + [tok.image] * n_image + tok.encode(post)
    return np.asarray(ids, np.int32), len(tok.encode(pre, bos=True)) + n_image + len(question_part) - 1


@dataclasses.dataclass
class Request:
    """One prompt + image, ready to batch."""

    input_ids: np.ndarray
    pixel_values: np.ndarray
    size: tuple[int, int]
    instruction_pos: int


def make_batch(requests: list[Request], pad_id: int):
    """Right-pads requests into a ``pruning.Batch``."""
    from jaxdebias.models.pruning import Batch

    T = max(len(r.input_ids) for r in requests)
    ids = np.full((len(requests), T), pad_id, np.int32)
    am = np.zeros((len(requests), T), bool)
    for b, r in enumerate(requests):
        ids[b, :len(r.input_ids)] = r.input_ids
        am[b, :len(r.input_ids)] = True
    return Batch(ids, np.stack([r.pixel_values for r in requests]), am,
                 image_sizes=np.asarray([r.size for r in requests], np.int32),
                 instruction_pos=np.asarray([r.instruction_pos for r in requests], np.int32))


def parse_debias(mode: str, pad_tau: float, curve_file: str | None, task: str) -> jd.Debias:
    """--debias off|pad|pad+curve|curve with --curve FILE (else the released curve) or --curve online."""
    if mode not in ("off", "pad", "curve", "pad+curve"):
        raise UserError(f"--debias must be off, pad, curve or pad+curve, got {mode!r}.")
    curve = None
    if "curve" in mode:
        if curve_file in (None, "released"):
            curve = "released"
        elif curve_file == "online":
            curve = "online"
        else:
            if not os.path.isfile(curve_file):
                raise UserError(f"Curve file {curve_file} does not exist (write one with jaxdebias calibrate).")
            with open(curve_file) as f:
                try:
                    curve = jd.curve_from_dict(json.load(f)["curve"])
                except (KeyError, ValueError, json.JSONDecodeError) as e:
                    raise UserError(f"{curve_file} is not a curve file written by jaxdebias calibrate ({e}).") from None
    return jd.Debias(curve=curve, pad_tau=pad_tau if "pad" in mode else None, task=task)


def check_keep(keep: int):
    if not 0 < keep <= N:
        raise UserError(f"--keep must be in 1..{N} (the visual tokens of one image), got {keep}.")


def make_spec(method: str, keep: int, debias: jd.Debias, n_layers: int) -> jd.PruneSpec:
    check_keep(keep)
    try:
        spec = jd.PruneSpec(method, keep=keep, debias=debias)
        spec.schedule(N, n_layers)
    except (ValueError, KeyError) as e:
        raise UserError(str(e)) from None
    return spec


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def figure_kept(square, kept_by_name: dict, path: str, pad_mask=None):
    """The letterboxed image with kept patches highlighted, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(kept_by_name), figsize=(4.2 * len(kept_by_name), 4.4))
    axes = np.atleast_1d(axes)
    cell = SIDE / GRID
    for ax, (name, kept) in zip(axes, kept_by_name.items()):
        ax.imshow(square)
        shade = np.ones((GRID, GRID, 4)) * np.array([0, 0, 0, 0.6])
        shade[kept.reshape(GRID, GRID)] = (0, 0, 0, 0)
        ax.imshow(shade, extent=(0, SIDE, SIDE, 0), interpolation="nearest")
        if pad_mask is not None:
            for r, c in zip(*np.nonzero(kept.reshape(GRID, GRID) & ~pad_mask.reshape(GRID, GRID))):
                ax.add_patch(plt.Rectangle((c * cell, r * cell), cell, cell, fill=False, ec="red", lw=1))
        ax.set_title(f"{name}: {int(kept.sum())} kept", fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_curve(series: dict, path: str, title: str):
    """Mean score per grid row (raster order top to bottom), one line per series, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, s in series.items():
        s = np.asarray(s, np.float64).reshape(-1, N)
        with warnings.catch_warnings():  # an all-padding grid row has no mean: NaN, left out of the line
            warnings.simplefilter("ignore", RuntimeWarning)
            rows = np.nanmean(s.reshape(s.shape[0], GRID, GRID), axis=(0, 2))  # NaN marks excluded (padding) tokens
        ax.plot(np.arange(GRID), rows / max(np.nanmean(rows), 1e-12), marker="o", ms=3, label=name)
    ax.set_xlabel("grid row (later in the sequence ->)")
    ax.set_ylabel("mean score / overall mean")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(checkpoint, image_path, prompt, method, keep, debias: jd.Debias, out_dir, max_new_tokens=32, var=None,
        log=print) -> dict:
    """Unpruned, pruned and pruned + debiased inference on one image; figures and a summary JSON in ``out_dir``."""
    from jaxdebias.models import pruning

    image = load_image(image_path)  # cheap checks first: nothing is built for a bad request
    check_keep(keep)
    model, tok, mean, std = load_model(checkpoint)
    pixels, square, size = preprocess(image, mean, std, model.cfg.vision.image_size)
    n = model.cfg.vision.num_features
    ids, instr = build_prompt(tok, prompt, n)
    batch = make_batch([Request(ids, pixels, size, instr)], tok.pad)
    spec = make_spec(method, keep, debias, model.cfg.text.num_layers)
    plain_spec = dataclasses.replace(spec, debias=jd.Debias())
    os.makedirs(out_dir, exist_ok=True)
    results, times = {}, {}
    for name, s in (("unpruned", None), ("pruned", plain_spec), ("pruned + debiased", spec)):
        pruning.prefill_and_generate(model, batch, prune=s, max_new_tokens=max_new_tokens, var=var)  # compile
        results[name], times[name] = timed(
            lambda s=s: pruning.prefill_and_generate(model, batch, prune=s, max_new_tokens=max_new_tokens, var=var))
    if checkpoint is None:
        log("NOTE: no --checkpoint: this is the embedded default, an untrained tiny model. Its answer is "
            "meaningless; the token selection, the bias numbers, the figures and the timings are real.")
    pad = np.asarray(jd.pad_mask_expand2square(*size, grid=GRID, tau=debias.pad_tau or 0.5))
    kept = {}
    for name in ("pruned", "pruned + debiased"):
        idx, slot = results[name].kept[0]
        m = np.zeros(N, bool)
        m[idx[0][slot[0]]] = True
        kept[name] = m
    figure_kept(square, {f"{method} keep {keep}": kept["pruned"], f"{method} keep {keep}, debiased": kept[
        "pruned + debiased"]}, os.path.join(out_dir, "kept.png"), pad)
    before, after = results["pruned + debiased"].scores[0], results["pruned + debiased"].debiased[0]
    figure_curve({"scores": before, "debiased": np.where(after > 0, after, np.nan)},
                 os.path.join(out_dir, "curve.png"), f"{method} first-stage scores by position")
    stats_before = {k: float(v) for k, v in jd.bias_strength(before, pad_mask=pad).items()}
    stats_after = {k: float(v) for k, v in jd.bias_strength(np.where(pad, after, 0.0), pad_mask=pad).items()}
    summary = {
        "answers": {k: tok.decode(r.tokens[0]) for k, r in results.items()},
        "kept": {k: int(v.sum()) for k, v in kept.items()},
        "padding_kept": {k: int((v & ~pad).sum()) for k, v in kept.items()},
        "bias_before": stats_before, "bias_after": stats_after,
        "seconds": times, "stage_lengths": {k: r.stage_lengths for k, r in results.items()},
        "figures": [os.path.join(out_dir, "kept.png"), os.path.join(out_dir, "curve.png")],
    }
    with atomic_open(os.path.join(out_dir, "run.json")) as f:
        json.dump(summary, f, indent=1)
    log(f"answer (pruned + debiased): {summary['answers']['pruned + debiased']!r}")
    log(f"kept {keep} of {n} visual tokens with {method}; padding patches kept: "
        f"{summary['padding_kept']['pruned']} without debias, {summary['padding_kept']['pruned + debiased']} with")
    log(f"positional slope b: {stats_before['slope']:.5f} before, {stats_after['slope']:.5f} after debiasing; "
        f"padding/content score ratio {stats_before['pad_ratio']:.2f}")
    t0 = times["unpruned"]
    log("time for prefill + {} tokens: ".format(max_new_tokens) + ", ".join(
        f"{k} {v * 1e3:.0f} ms ({v / t0:.2f}x)" for k, v in times.items()))
    log(f"figures: {', '.join(summary['figures'])}")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Data sets in the LLaVA evaluation layout: a question JSONL ({"question_id", "image", "text", ...} per line)
# and an image folder.

def check_images(rows, image_dir):
    for r in rows:
        if "image_b64" not in r and not os.path.isfile(os.path.join(image_dir, r["image"])):
            raise UserError(f"Image {r['image']} of question {r['question_id']} is missing from {image_dir}.")


class Runner:
    """Batched pruned inference over questions with one compiled program per shape bucket."""

    def __init__(self, checkpoint, spec_args, batch_size: int, var=None, devices=None):
        import jax

        self.model, self.tok, self.mean, self.std = load_model(checkpoint)
        method, keep, debias = spec_args
        self.spec = make_spec(method, keep, debias, self.model.cfg.text.num_layers)
        self.var, self.mesh = var, None
        devices = jax.local_devices() if devices is None else devices
        if len(devices) > 1:  # split every batch over this process's devices
            from jaxdebias.models.llava import shard_model

            self.mesh = jax.make_mesh((len(devices), 1), ("data", "model"), devices=devices,
                                      axis_types=(jax.sharding.AxisType.Auto,) * 2)
            shard_model(self.model, self.mesh)
            batch_size = -(-batch_size // len(devices)) * len(devices)
        self.batch_size = batch_size

    def requests(self, rows, image_dir):
        out = []
        for r in rows:
            name = os.path.join(image_dir, r["image"]) if "image" in r else f"of question {r['question_id']}"
            pixels, _, size = preprocess(load_image(name, r.get("image_b64")), self.mean, self.std,
                                         self.model.cfg.vision.image_size)
            ids, instr = build_prompt(self.tok, r["text"], self.model.cfg.vision.num_features)
            out.append(Request(ids, pixels, size, instr))
        return out

    def __call__(self, rows, image_dir, max_new_tokens):
        """Yields (row, its Request, result of its batch, index in the batch) in order; the last batch is padded
        by repetition so that every batch has the same shape."""
        from jaxdebias.models import pruning

        for lo in range(0, len(rows), self.batch_size):
            chunk = rows[lo:lo + self.batch_size]
            reqs = self.requests(chunk, image_dir)
            reqs += [reqs[-1]] * (self.batch_size - len(reqs))
            res = pruning.prefill_and_generate(self.model, make_batch(reqs, self.tok.pad), prune=self.spec,
                                               max_new_tokens=max_new_tokens, var=self.var, mesh=self.mesh)
            for i, row in enumerate(chunk):
                yield row, reqs[i], res, i


def _read_done(path) -> dict:
    """Answers already written (resume), by (question_id, prompt): some benchmarks (MME) ask several questions
    under one question_id. A torn last line from an interrupted run is dropped from the file."""
    done = {}
    if not os.path.isfile(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    keep = data[:data.rfind(b"\n") + 1]  # complete lines only
    if len(keep) != len(data):
        with open(path, "wb") as f:
            f.write(keep)
    for line in keep.decode().splitlines():
        if line.strip():
            row = json.loads(line)
            done[row["question_id"], row["prompt"]] = row
    return done


def evaluate(checkpoint, bench, data_dir, out_dir, spec_args, *, limit=None, batch_size=4, max_new_tokens=8,
             var=None, log=print, progress=True, devices=None) -> dict:
    """Pruned inference over a benchmark in the LLaVA layout (``jaxdebias.evals``): answers in LLaVA's answer-file
    format (``<bench>_answers.jsonl``, resumable: a rerun skips what is there and never double-counts), the files
    the official scorers take, and the metric where the ground truth is local (``<bench>_metrics.json``; without
    it the metrics say ``"metric": null``). Batches are split over ``devices`` (default: this process's devices;
    the batch size is rounded up to a multiple of their number). Under ``jax.distributed`` (several processes,
    e.g. the hosts of a TPU pod slice) process i answers questions i, i + P, ... into its own part file; process 0
    merges them in question order and scores, the others return ``{"process": i, "answered": n}``."""
    import jax
    from tqdm.auto import tqdm

    b = evals.get(bench)
    rows, image_dir = evals.read_any(data_dir, bench)
    if limit is not None:
        rows = rows[:limit]
    check_images(rows, image_dir)
    os.makedirs(out_dir, exist_ok=True)
    answers_path = os.path.join(out_dir, f"{bench}_answers.jsonl")
    pid, nproc = jax.process_index(), jax.process_count()
    mine = rows[pid::nproc]  # under jax.distributed every process answers its own share, on its own devices

    def part(i):
        return answers_path if nproc == 1 else os.path.join(out_dir, f"{bench}_answers.part{i}of{nproc}.jsonl")

    done = _read_done(part(pid))
    todo = [r for r in mine if (r["question_id"], r["text"]) not in done]
    runner = Runner(checkpoint, spec_args, batch_size, var, devices) if todo else None
    model_id = f"jaxdebias-{spec_args[0]}-{spec_args[1]}"
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"{bench} keep {spec_args[1]}",
               disable=not progress)
    t0, tokens = time.perf_counter(), 0
    with open(part(pid), "a") as f:
        for row, _, res, i in (runner(todo, image_dir, max_new_tokens) if todo else ()):
            text = runner.tok.decode(res.tokens[i])
            line = {"question_id": row["question_id"], "prompt": row["text"], "text": text,
                    "answer_id": f"{row['question_id']}", "model_id": model_id, "metadata": {}}
            f.write(json.dumps(line) + "\n")  # one write per answer, flushed: a kill leaves whole lines
            f.flush()
            done[row["question_id"], row["text"]] = line
            tokens += len(res.tokens[i])
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}")
    bar.close()
    if nproc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxdebias eval {bench}")  # every share is written
        if pid != 0:
            return {"process": pid, "answered": len(mine)}
        for other in range(1, nproc):
            done.update(_read_done(part(other)))
        with atomic_open(answers_path) as f:  # the merged file, in question order, as one process writes it
            f.writelines(json.dumps(done[r["question_id"], r["text"]]) + "\n" for r in rows)
    answers = [done[r["question_id"], r["text"]]["text"] for r in rows]
    files = b.export(rows, answers, out_dir)
    truth = b.has_truth(rows)
    metrics = b.score(rows, answers) if truth else {"metric": None, "n": len(rows)}
    with atomic_open(os.path.join(out_dir, f"{bench}_metrics.json")) as f:
        json.dump(metrics, f, indent=1)
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    log(f"{bench}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in flat.items())
        + (f"; wrote {', '.join(files)}" if files else "")
        + ("" if truth else " (no local ground truth: submit the files above)"))
    return metrics


def calibrate(checkpoint, data_dir, out, method, form="exp", *, bench=None, limit=None, batch_size=4, pad_tau=0.5,
              log=print, progress=True, devices=None) -> dict:
    """Streams a data set through the model, averages the method's first-stage scores position by position with
    ``jd.Calibration`` (padding excluded), fits ``form`` and writes the curve with its statistics and a plot."""
    from tqdm.auto import tqdm

    rows, image_dir = evals.read_any(data_dir, bench)
    rows = rows[:limit]
    check_images(rows, image_dir)
    runner = Runner(checkpoint, (method, N, jd.Debias()), batch_size, devices=devices)
    cal = jd.Calibration.init(N)
    for _, req, res, i in tqdm(runner(rows, image_dir, 1), total=len(rows), desc="calibrating",
                               disable=not progress):
        content = np.asarray(jd.pad_mask_expand2square(*req.size, tau=pad_tau))
        cal = cal.update(res.scores[i], content)
    curve = cal.fit(form)
    mean = np.asarray(cal.mean())
    stats = {k: float(v) for k, v in jd.bias_strength(mean, np.asarray(cal.count) > 0).items() if k != "pad_ratio"}
    record = {"curve": jd.curve_to_dict(curve), "method": method, "form": form, "samples": int(cal.n_samples),
              "fit_of_mean": stats}
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    with atomic_open(out) as f:
        json.dump(record, f, indent=1)
    plot = os.path.splitext(out)[0] + ".png"
    figure_curve({"mean score": mean, "fitted trend": np.asarray(1.0 / curve.weights(N)) * mean[mean > 0].mean()},
                 plot, f"{method}: calibrated over {int(cal.n_samples)} samples ({form})")
    log(f"wrote {out} ({form}, {int(cal.n_samples)} samples, slope {stats['slope']:.5f}) and {plot}")
    return record


def bias_report(checkpoint, data_dir, out_dir, method="fastv", *, bench=None, limit=None, batch_size=4, pad_tau=0.5,
                sink_dims=None, log=print, progress=True, devices=None) -> dict:
    """The bias of a method's first-stage scores over a data set, before and after debiasing (padding +
    the method's released curve): mean score by grid row and column, fitted slope, padding-to-content ratio,
    and the visual sink tokens VAR would find (layer 2's input; ``sink_dims`` or discovered)."""
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from jaxdebias.models.llava import layer_input

    rows, image_dir = evals.read_any(data_dir, bench)
    rows = rows[:limit]
    check_images(rows, image_dir)
    runner = Runner(checkpoint, (method, N, jd.Debias()), batch_size, devices=devices)
    method = runner.spec.method  # the canonical name ("pyramiddrop" -> "pdrop")
    curve = jd.released_curve(method, "gqa") if method in {*jd.RELEASED_EXP_B, *jd.RELEASED_POLY3_INVERSE} else None
    before, after, pads, sinks = [], [], [], []
    for _, req, res, i in tqdm(runner(rows, image_dir, 1), total=len(rows), desc="bias", disable=not progress):
        pad = np.asarray(jd.pad_mask_expand2square(*req.size, tau=pad_tau))
        s = res.scores[i]
        before.append(s)
        after.append(np.asarray(jd.debias(s, curve=curve, pad_mask=pad)))
        pads.append(pad)
        ids = jnp.asarray(req.input_ids)[None]
        h = layer_input(runner.model, ids, jnp.asarray(req.pixel_values)[None], jnp.ones(ids.shape, bool), 2)
        dims = sink_dims if sink_dims is not None else jd.discover_sink_dims(h, top=2)[0]
        is_sink = np.asarray(jd.sink_tokens(h, dims))[0]
        sinks.append(int((is_sink & (req.input_ids == runner.tok.image)).sum()))
    before, after, pads = np.stack(before), np.stack(after), np.stack(pads)

    def numbers(s):
        st = jd.bias_strength(s, pad_mask=pads)
        grid = s.reshape(-1, GRID, GRID)
        return {"slope": float(np.mean(st["slope"])), "trend_ratio": float(np.mean(st["trend_ratio"])),
                "pad_ratio": float(np.nanmean(np.asarray(st["pad_ratio"]))),
                "row_means": grid.mean(axis=(0, 2)).round(6).tolist(), "col_means": grid.mean(axis=(0, 1)).round(6).tolist()}

    report = {"method": method, "samples": len(rows), "before": numbers(before),
              "after": numbers(np.where(pads, after, 0.0)), "visual_sinks_per_image": float(np.mean(sinks))}
    os.makedirs(out_dir, exist_ok=True)
    with atomic_open(os.path.join(out_dir, "bias.json")) as f:
        json.dump(report, f, indent=1)
    figure_curve({"before": before, "after (padding + released curve)": np.where(pads, after, np.nan)},
                 os.path.join(out_dir, "bias.png"), f"{method}: score by position over {len(rows)} samples")
    b, a = report["before"], report["after"]
    log(f"slope {b['slope']:.5f} -> {a['slope']:.5f}; padding/content {b['pad_ratio']:.2f} -> {a['pad_ratio']:.2f}; "
        f"visual sinks per image {report['visual_sinks_per_image']:.1f}; wrote {out_dir}/bias.json, bias.png")
    return report
