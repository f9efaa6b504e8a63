# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Calibrate a debiasing curve and evaluate with and without it
#
# 1. Stream a benchmark subset through the model and fit the positional trend of FastV's scores
#    (`jaxdebias calibrate`), 2. evaluate POPE pruned to `KEEP` tokens without debiasing, with padding
#    suppression, and with padding + the calibrated curve, 3. plot the comparison.
#
# On Colab point `DATA` at a POPE folder in the LLaVA layout (`llava_pope_test.jsonl` with labels + `images/`)
# and `CHECKPOINT` at a converted model (see the quickstart). With the defaults (CI) a tiny sample data set is
# written here and the embedded untrained model runs: the numbers are then meaningless, the pipeline is real.

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

from jaxdebias import app

if DATA is None:  # a tiny POPE-style sample: letterboxed images of three aspect ratios, yes/no labels
    DATA = os.path.join(OUT, "sample")
    os.makedirs(os.path.join(DATA, "images"), exist_ok=True)
    base = Image.open(app.default_image_path())
    with open(os.path.join(DATA, "questions.jsonl"), "w") as f:
        for i, (size, obj, label) in enumerate([((640, 427), "ball", "yes"), ((427, 640), "car", "no"),
                                                ((500, 500), "tree", "yes"), ((800, 300), "dog", "no"),
                                                ((300, 800), "sun", "yes"), ((640, 480), "cat", "no")]):
            base.resize(size).save(os.path.join(DATA, "images", f"{i}.png"))
            f.write(json.dumps({"question_id": i, "image": f"{i}.png", "label": label,
                                "text": f"Is there a {obj} in the image?"}) + "\n")

# %%
record = app.calibrate(CHECKPOINT, DATA, os.path.join(OUT, "curve.json"), "fastv", "exp", limit=LIMIT,
                       batch_size=2, progress=False)
print(record["curve"], record["fit_of_mean"])

# %%
results = {}
for name, mode, curve in (("no debias", "off", None), ("padding", "pad", None),
                          ("padding + calibrated curve", "pad+curve", os.path.join(OUT, "curve.json"))):
    debias = app.parse_debias(mode, 0.5, curve, "pope")
    results[name] = app.evaluate(CHECKPOINT, "pope", DATA, os.path.join(OUT, name.replace(" ", "_")),
                                 ("fastv", KEEP, debias), limit=LIMIT, batch_size=2, progress=False)

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(list(results), [r["f1"] for r in results.values()], color=["#999", "#69c", "#c63"])
ax.set_ylabel("POPE F1")
ax.set_title(f"FastV keep {KEEP}")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "comparison.png"), dpi=110)
print({k: round(v["f1"], 4) for k, v in results.items()})
