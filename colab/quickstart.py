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
# # jaxdebias quickstart: debiased visual token pruning for LLaVA-1.5 on a TPU
#
# Open in Colab with a TPU runtime (v5e-1, 16 GB). The notebook installs jaxdebias for TPU, converts
# `llava-hf/llava-1.5-7b-hf` from a Hub snapshot to an Orbax checkpoint (streaming, bf16, ~14 GB), loads it
# straight onto the TPU, and answers a question about an image with FastV pruning, with and without debiasing,
# showing which visual tokens were kept and the attention-by-position curve.
#
# Cells tagged `colab` (install, download) are skipped when CI runs this notebook on the embedded tiny model.

# %% tags=["parameters"]
HF_REPO = "llava-hf/llava-1.5-7b-hf"  # converted once in the `colab` cells below
CHECKPOINT = None  # None: the embedded toy model (CI); the Colab cells set the converted path
IMAGE = None  # None: the image shipped with jaxdebias
PROMPT = "What is in the picture? Answer briefly."
METHOD, KEEP = "fastv", 128  # fastv, pdrop, sparsevlm, himap, tokencarve or visionzip
OUT = "quickstart-out"

# %% tags=["colab"]
# %pip install -q "jaxdebias[tpu]"   # from a checkout of this repository: pip install -e ".[tpu]"

# %% tags=["colab"]
import os

from huggingface_hub import snapshot_download

from jaxdebias.convert.write import convert

src = snapshot_download(HF_REPO, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
CHECKPOINT = "/content/llava-1.5-7b-jax"
if not os.path.exists(CHECKPOINT):
    convert(src, CHECKPOINT, dtype="bfloat16")  # tensor by tensor: host memory stays near one tensor

# %% [markdown]
# Load the model with its tokenizer and image normalisation, turn the image and the question into a batch, and
# generate three times: unpruned, pruned by `METHOD` to `KEEP` visual tokens, and pruned with the debiased
# selection (padding suppression + the method's released positional curve).

# %%
import jax
import numpy as np

import jaxdebias as jd
from jaxdebias.cli import families, figures, images
from jaxdebias.models.generate import generate

print("devices:", jax.devices())
loaded = families.load_model(CHECKPOINT)  # onto the device in bf16; None: the embedded toy model
request = loaded.request(images.load_image(IMAGE or images.default_image_path()), PROMPT)
batch = loaded.batch([request])
debias = jd.Debias(curve="released", pad_tau=0.5, task="gqa")
specs = {"unpruned": None, "pruned": jd.PruneSpec(METHOD, keep=KEEP),
         "pruned + debiased": jd.PruneSpec(METHOD, keep=KEEP, debias=debias)}
results = {name: generate(loaded.model, batch, prune=spec, max_new_tokens=16) for name, spec in specs.items()}
for name, result in results.items():
    print(f"{name:18s} {loaded.decode(result.tokens[0])!r}  decoder lengths {result.stage_lengths}")
if loaded.embedded:
    print("(the embedded toy model was trained on generated shapes only: its answers about other images mean little)")

# %% [markdown]
# Which visual tokens were kept (letterbox padding outlined in red where a selection kept it), and the
# first-stage scores by grid row before and after debiasing.

# %%
import os

from IPython.display import Image, display

os.makedirs(OUT, exist_ok=True)
content = loaded.content_mask(request.size, tau=0.5)  # bool[N], True = image content, False = letterbox padding
kept = {f"{name}, keep {KEEP}": np.asarray(jd.kept_mask(*results[name].kept[0], loaded.n_visual))[0]
        for name in ("pruned", "pruned + debiased")}
scores, debiased = results["pruned + debiased"].scores[0], results["pruned + debiased"].debiased[0]
display(Image(filename=figures.figure_kept(request.letterboxed, kept, os.path.join(OUT, "kept.png"), content)))
display(Image(filename=figures.figure_curve({"scores": scores, "debiased": np.where(debiased > 0, debiased, np.nan)},
                                            os.path.join(OUT, "curve.png"), f"{METHOD}: first-stage scores")))
print("padding patches kept:", {name: int((mask & ~content).sum()) for name, mask in kept.items()})
print("bias before:", {k: round(float(v), 5) for k, v in jd.bias_strength(scores, content=content).items()})
print("bias after: ", {k: round(float(v), 5) for k, v in jd.bias_strength(np.where(content, debiased, 0.0),
                                                                       content=content).items()})
