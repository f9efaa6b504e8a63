# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Calibrate a debiasing curve and evaluate with and without it
#
# 1. Stream a benchmark subset through the model and fit the positional trend of FastV's scores
#    (what `jaxdebias calibrate` does), 2. evaluate POPE pruned to `KEEP` tokens without debiasing, with padding
#    suppression, and with padding + the calibrated curve, 3. plot the comparison.
#
# On Colab point `DATA` at a POPE folder in the LLaVA layout (`llava_pope_test.jsonl` with labels + `images/`)
# and `CHECKPOINT` at a converted model (see the quickstart). With the defaults (CI) a tiny sample data set is
# written here and the embedded toy model runs (it knows only generated shapes: its numbers on these images mean
# little; the toy experiment, `python -m jaxdebias.toy.experiment`, is the meaningful small-scale run).

# %% tags=["parameters"]
CHECKPOINT = None
DATA = None
KEEP = 64
LIMIT = 6
OUT = "calibrate-out"

# %%
import json
import os

from PIL import Image

from jaxdebias.cli import images

os.makedirs(OUT, exist_ok=True)
if DATA is None:  # a tiny POPE-style sample: letterboxed images of three aspect ratios, yes/no labels
    DATA = os.path.join(OUT, "sample")
    os.makedirs(os.path.join(DATA, "images"), exist_ok=True)
    base = Image.open(images.default_image_path())
    with open(os.path.join(DATA, "questions.jsonl"), "w") as f:
        for i, (size, obj, label) in enumerate([((640, 427), "ball", "yes"), ((427, 640), "car", "no"),
                                                ((500, 500), "tree", "yes"), ((800, 300), "dog", "no"),
                                                ((300, 800), "sun", "yes"), ((640, 480), "cat", "no")]):
            base.resize(size).save(os.path.join(DATA, "images", f"{i}.png"))
            f.write(json.dumps({"question_id": i, "image": f"{i}.png", "label": label,
                                "text": f"Is there a {obj} in the image?"}) + "\n")

# %% [markdown]
# Calibration: run FastV with nothing pruned (keep = all visual tokens) to get its first-stage scores, average
# them position by position over the images with `jd.Calibration` (letterbox padding excluded), and fit the
# exponential trend `w_i = exp(-b i)` that debiasing divides out.

# %%
import numpy as np

import jaxdebias as jd
from jaxdebias.cli import families, figures
from jaxdebias.eval.benchmarks import read_any
from jaxdebias.models.generate import generate

loaded = families.load_model(CHECKPOINT)  # None: the embedded toy model (jaxdebias.toy)
rows, image_dir = read_any(DATA, "pope")
keep_all = jd.PruneSpec("fastv", keep=loaded.n_visual)
calibration = jd.Calibration.init(loaded.n_visual)
for row in rows[:LIMIT]:
    request = loaded.request(images.load_image(os.path.join(image_dir, row["image"])), row["text"])
    result = generate(loaded.model, loaded.batch([request]), prune=keep_all, max_new_tokens=1)
    calibration = calibration.update(result.scores, loaded.content_mask(request.size)[None])
curve = calibration.fit("exp")
mean = np.asarray(calibration.mean())
with open(os.path.join(OUT, "curve.json"), "w") as f:
    json.dump({"curve": jd.curve_to_dict(curve), "method": "fastv", "form": "exp"}, f)
trend = np.asarray(1.0 / curve.weights(loaded.n_visual)) * mean[mean > 0].mean()  # the fit, on the mean's scale
figures.figure_curve({"mean score": mean, "fitted trend": trend}, os.path.join(OUT, "curve.png"),
                     f"FastV: calibrated over {int(calibration.n_samples)} images")
print(jd.curve_to_dict(curve), {k: float(v) for k, v in jd.bias_strength(mean, mean > 0).items()})

# %% [markdown]
# Evaluation: POPE pruned to `KEEP` tokens without debiasing, with padding suppression, and with padding + the
# calibrated curve. `evaluate` is what `jaxdebias eval` runs: LLaVA's answer file (resumable), the official
# metric, one compiled program per batch shape.

# %%
from jaxdebias.cli.evaluate import evaluate

results = {}
for name, debias in (("no debias", jd.Debias()), ("padding", jd.Debias(pad_tau=0.5)),
                     ("padding + calibrated curve", jd.Debias(curve=curve, pad_tau=0.5))):
    spec = jd.PruneSpec("fastv", keep=KEEP, debias=debias)
    results[name] = evaluate("pope", DATA, os.path.join(OUT, name.replace(" ", "_")), spec=spec, model=loaded,
                             limit=LIMIT, batch_size=2, progress=False)

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(list(results), [r["f1"] for r in results.values()], color=["#999", "#69c", "#c63"])
ax.set_ylabel("POPE F1")
ax.set_title(f"FastV keep {KEEP}")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "comparison.png"), dpi=110)
print({k: round(v["f1"], 4) for k, v in results.items()})
