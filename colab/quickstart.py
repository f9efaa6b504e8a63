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
CHECKPOINT = None  # None: the embedded untrained tiny model (CI); the Colab cells set the converted path
IMAGE = None  # None: the image shipped with jaxdebias
PROMPT = "What is in the picture? Answer briefly."
METHOD, KEEP = "fastv", 128  # fastv, pdrop, sparsevlm, himap, tokencarve or visionzip
OUT = "quickstart-out"

# %% tags=["colab"]
# %pip install -q "jaxdebias[tpu]"   # from a checkout of this repository: pip install -e ".[tpu]"

# %% tags=["colab"]
import os

from huggingface_hub import snapshot_download

from jaxdebias.convert.checkpoint import convert

src = snapshot_download(HF_REPO, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
CHECKPOINT = "/content/llava-1.5-7b-jax"
if not os.path.exists(CHECKPOINT):
    convert(src, CHECKPOINT, dtype="bfloat16")  # tensor by tensor: host memory stays near one tensor

# %%
import jax

from jaxdebias import app

print("devices:", jax.devices())
debias = app.parse_debias("pad+curve", 0.5, None, "gqa")  # padding suppression + the released FastV curve
summary = app.run(CHECKPOINT, IMAGE or app.default_image_path(), PROMPT, METHOD, KEEP, debias, OUT,
                  max_new_tokens=16)

# %%
from IPython.display import Image, display

for path in summary["figures"]:
    display(Image(filename=path))
print({k: round(v, 3) for k, v in summary["seconds"].items()})
print("bias before:", {k: round(v, 5) for k, v in summary["bias_before"].items()})
print("bias after: ", {k: round(v, 5) for k, v in summary["bias_after"].items()})
