"""The command line on a converted tiny LLaVA-OneVision checkpoint (SigLIP 32 px tiles, 5 x 5 patches per view,
anyres_max_9 over pinpoints up to 4 x 4 tiles, a Qwen2 decoder, a character tokenizer with the Qwen2 chat tokens):
preprocessing and prompts equal to transformers' processor, `jaxdebias run`, `eval` on images and videos,
`calibrate` (one curve per view), `bias` and `eval-grid`, and what is refused (a released curve, --keep past the
model's capacity, an encoder-side method)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import jaxdebias as jd

from jaxdebias.cli import onevision
from jaxdebias.cli.families import load_model
from jaxdebias.cli.main import main
from jaxdebias.models.llava_next import image_tokens

torch = pytest.importorskip("torch")

from ..eval.test_video_benchmarks import write_video_bench  # noqa: E402
from ..models.hf_tiny_onevision import IMAGE_TOKEN, PINPOINTS, SIDE, VIDEO_TOKEN, make_hf_onevision  # noqa: E402
from .samples import write_pope  # noqa: E402

# the chat template llava-hf ships with its OneVision checkpoints (chat_template.json)
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
            "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}"
            "{% endfor %}{# Render all video then #}{% for content in message['content'] | selectattr('type', "
            "'equalto', 'video') %}{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
            "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
            "{{ '\\n' + content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | "
            "selectattr('type', 'equalto', 'text') %}{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}"
            "{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|im_start|>assistant\\n' }}{% endif %}")
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
# (width, height): wide, tall, a tiny one in the 1-tile bucket, and two whose 4 x 4 / 3 x 4 tile grids pass
# anyres_max_9's limit (downscaled bilinearly)
SIZES = [(100, 60), (40, 90), (20, 12), (130, 126), (125, 94)]


def save_qwen_char_tokenizer(path):
    """A character-level fast tokenizer with Qwen2's chat tokens (0 <|endoftext|> pad, 1 <|im_start|>, 2
    <|im_end|> eos), printable ASCII from 3, and the placeholders <image> / <video> at the tiny model's ids."""
    import string

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for c in string.printable[:95]:
        vocab.setdefault(c, len(vocab))
    assert len(vocab) < IMAGE_TOKEN
    vocab |= {"<image>": IMAGE_TOKEN, "<video>": VIDEO_TOKEN}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in
                            ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                            pad_token="<|endoftext|>").save_pretrained(path)


def image_processor():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
        LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(size={"height": SIDE, "width": SIDE}, image_grid_pinpoints=PINPOINTS,
                                           image_mean=MEAN, image_std=STD)


def hf_processor(checkpoint, monkeypatch):
    """transformers' LlavaOnevisionProcessor with the PIL image processor and no video processor (transformers'
    needs torchvision, absent here; its class check is skipped)."""
    from transformers import AutoTokenizer, LlavaOnevisionProcessor

    monkeypatch.setattr(LlavaOnevisionProcessor, "check_argument_for_proper_class", lambda *a: None)
    return LlavaOnevisionProcessor(image_processor=image_processor(), tokenizer=AutoTokenizer.from_pretrained(
        checkpoint), video_processor=None, num_image_tokens=25, vision_feature_select_strategy="full",
        chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from jaxdebias.convert import convert

    path = tmp_path_factory.mktemp("onevision_cli")
    hf = make_hf_onevision(seed=4, layers=4)
    hf.config.text_config.eos_token_id = 2  # <|im_end|>, as on llava-hf OneVision
    hf.save_pretrained(path / "hf")
    save_qwen_char_tokenizer(path / "hf")
    image_processor().save_pretrained(path / "hf")
    convert(path / "hf", path / "ckpt", dtype="float32", progress=False)
    return str(path / "ckpt")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint)


def picture(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8))


def test_images_and_prompts_equal_the_processors(loaded, checkpoint, monkeypatch):
    from transformers import AutoImageProcessor

    assert type(loaded).__name__ == "OnevisionLoadedModel" and loaded.image_mean == tuple(MEAN)
    proc = image_processor()
    auto = AutoImageProcessor.from_pretrained(checkpoint)
    processor = hf_processor(checkpoint, monkeypatch)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|im_start|>user <image>\nWhat is it?<|im_end|><|im_start|>assistant\n"
    for i, (w, h) in enumerate(SIZES):
        image = picture(w, h, i)
        ref = proc(images=[image], return_tensors="np")
        request = loaded.request(image, "What is it?")
        assert request.size == (w, h) and request.pixel_values.shape == ref["pixel_values"].shape[1:]
        np.testing.assert_allclose(request.pixel_values, ref["pixel_values"][0], rtol=0, atol=1e-6)
        if type(auto).__name__.endswith("Pil"):  # the backend transformers picks here (no torchvision)
            np.testing.assert_allclose(request.pixel_values, auto(images=[image], return_tensors="np")[
                "pixel_values"][0], rtol=0, atol=1e-6)
        ids = processor(text=[text], images=[image], return_tensors="np")["input_ids"][0]
        np.testing.assert_array_equal(request.input_ids, ids)  # the template, its tokens and the image's count
        assert ids[request.instruction_pos] == processor.tokenizer.convert_tokens_to_ids("?")  # the question's end
        count = int((ids == IMAGE_TOKEN).sum())
        assert image_tokens(loaded.model.images([request.pixel_values], [request.size]))[0] == count
        if (w, h) == (130, 126):  # 4 x 4 tiles: a 20 x 20 grid, nothing cut, past 1.1^2 x 9 x 25: 15 x 15
            assert count == 25 + 15 * 16


def test_video_frames_and_count_equal_the_processors(loaded, checkpoint, monkeypatch):
    frames = [picture(40, 30, 10 + f) for f in range(3)]
    request = loaded.video_request(frames, "what happens?")
    assert request.video and request.pixel_values.shape == (3, 3, SIDE, SIDE)
    # transformers' LlavaOnevisionVideoProcessor (it needs torchvision, which has no CPU build here) resizes the
    # uint8 frames [F, 3, H, W] with torchvision's resize, which on CPU calls this torch kernel on the uint8 tensor,
    # then normalises in float32 with the rescale fused into mean and std (TorchvisionBackend.rescale_and_normalize)
    video = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).permute(0, 3, 1, 2).contiguous()
    resized = torch.nn.functional.interpolate(video, size=[SIDE, SIDE], mode="bicubic", antialias=True)
    mean, std = torch.tensor(MEAN) * (1.0 / (1 / 255)), torch.tensor(STD) * (1.0 / (1 / 255))
    ref = resized.to(torch.float32).sub_(mean[:, None, None]).div_(std[:, None, None]).numpy()
    np.testing.assert_array_equal(request.pixel_values, ref)
    np.testing.assert_array_equal(np.stack([np.asarray(f) for f in request.letterboxed]),
                                  resized.permute(0, 2, 3, 1).numpy())  # the frames the figures show
    count = hf_processor(checkpoint, monkeypatch)._get_num_multimodal_tokens(video_sizes=[(3, SIDE, SIDE)])["num_video_tokens"][0]
    assert (request.input_ids == VIDEO_TOKEN).sum() == count == loaded.model.cfg.video_slots(3)
    batch = loaded.batch([request, loaded.video_request(frames[:1] * 3, "and?")])
    assert batch.pixel_values.video and batch.pixel_values.num_slots == count
    with pytest.raises(Exception, match="mixes images and videos"):
        loaded.batch([request, loaded.request(picture(50, 40), "what?")])



def test_frames_normalise_like_the_torchvision_backend():
    # a mean and std that are not 0.5 (CLIP's), where the rescale fused into them in float32 matters
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    frames = [picture(50, 37, f) for f in range(2)]
    pixels, resized = onevision.preprocess_frames(frames, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SIDE)
    video = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).permute(0, 3, 1, 2).contiguous()
    x = torch.nn.functional.interpolate(video, size=[SIDE, SIDE], mode="bicubic", antialias=True).to(torch.float32)
    mean = torch.tensor(OPENAI_CLIP_MEAN) * (1.0 / (1 / 255))
    std = torch.tensor(OPENAI_CLIP_STD) * (1.0 / (1 / 255))
    np.testing.assert_array_equal(pixels, x.sub_(mean[:, None, None]).div_(std[:, None, None]).numpy())
    assert [f.size for f in resized] == [(SIDE, SIDE)] * 2

def test_run_on_an_image(checkpoint, tmp_path, capsys):
    image = tmp_path / "wide.png"
    picture(100, 60).save(image)
    out = tmp_path / "out"
    code = main(["run", "--checkpoint", checkpoint, "--image", str(image), "--prompt", "what?", "--method", "fastv",
                 "--keep", "8", "--debias", "pad+curve", "--curve", "online", "--max-new-tokens", "3",
                 "--decode", "fast", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.load(open(out / "run.json"))
    assert summary["kept"] == {"pruned": 8, "pruned + debiased": 8}
    assert summary["padding_kept"]["pruned + debiased"] == 0
    assert set(summary["answers"]) == {"unpruned", "pruned", "pruned + debiased"}
    for f in summary["figures"]:
        assert os.path.getsize(f) > 2000


def test_refusals(checkpoint, tmp_path, capsys):
    image = tmp_path / "wide.png"
    picture(100, 60).save(image)
    args = ["run", "--checkpoint", checkpoint, "--image", str(image), "--max-new-tokens", "2", "--out",
            str(tmp_path / "out")]
    assert main(args + ["--keep", "8"]) == 2  # the default curve is the released one: none exists for OneVision
    err = capsys.readouterr().err
    assert "No positional curve was released for LLaVA-OneVision" in err and "jaxdebias calibrate" in err
    assert main(args + ["--keep", "51", "--curve", "online"]) == 2  # 25 base + the 1-tile bucket's 5 x 5 grid
    assert "--keep must be in 1..50" in capsys.readouterr().err
    assert main(args + ["--keep", "8", "--method", "visionzip", "--debias", "off"]) == 2
    assert "SigLIP tower has no CLS token" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_on_images_and_on_videos(checkpoint, tmp_path, capsys):
    root = write_pope(tmp_path / "pope")
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", checkpoint, "--bench", "pope", "--data", str(root), "--method", "fastv",
                 "--keep", "10", "--debias", "pad+curve", "--curve", "online", "--max-new-tokens", "2", "--batch",
                 "2", "--limit", "2", "--decode", "fast", "--out", str(out)]) == 0, capsys.readouterr().err
    answers = [json.loads(x) for x in open(out / "pope_answers.jsonl")]
    assert [a["question_id"] for a in answers] == [0, 1]  # 640 x 400 (12 tiles) and 300 x 500 (16, downscaled)
    assert "f1" in json.dumps(json.load(open(out / "pope_metrics.json")))
    videos = write_video_bench(tmp_path / "videos")
    out = tmp_path / "eval_video"
    assert main(["eval", "--checkpoint", checkpoint, "--bench", "msvd", "--data", str(videos), "--method",
                 "fastv", "--keep", "12", "--decode", "fast", "--debias", "curve", "--curve", "online", "--max-new-tokens", "2",
                 "--batch", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in open(out / "merge.jsonl")]
    assert [x["id"] for x in lines] == ["q0", "q1"] and all(isinstance(x["pred"], str) for x in lines)


def test_calibrate_per_view_then_eval_and_bias(checkpoint, tmp_path, capsys):
    root = write_pope(tmp_path / "pope")
    curve = tmp_path / "curve.json"
    assert main(["calibrate", "--checkpoint", checkpoint, "--data", str(root), "--bench", "pope", "--method",
                 "fastv", "--form", "exp", "--batch", "2", "--limit", "2", "--out", str(curve)]) == 0, capsys.readouterr().err
    record = json.load(open(curve))
    views = record["curve"]["views"]
    assert record["view_names"] == ["base", "tiles"] and len(views) == 2 and record["samples"] == 2
    assert views[0] != views[1]
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", checkpoint, "--bench", "pope", "--data", str(root), "--method", "fastv",
                 "--keep", "10", "--debias", "pad+curve", "--curve", str(curve), "--max-new-tokens", "2",
                 "--batch", "2", "--limit", "2", "--decode", "fast", "--out", str(out)]) == 0, capsys.readouterr().err
    assert len(open(out / "pope_answers.jsonl").readlines()) == 2
    bias = tmp_path / "bias"
    assert main(["bias", "--checkpoint", checkpoint, "--data", str(root), "--bench", "pope", "--method", "fastv",
                 "--batch", "2", "--limit", "2", "--out", str(bias)]) == 0, capsys.readouterr().err
    report = json.load(open(bias / "bias.json"))
    assert report["positions"] == "base view" and report["samples"] == 2
    assert len(report["before"]["row_means"]) == 5  # the 5 x 5 base view of the tiny model


def test_eval_grid_with_a_decoder_method(checkpoint, tmp_path, capsys):
    root = write_pope(tmp_path / "pope")
    out = tmp_path / "grid"
    args = ["eval-grid", "--checkpoint", checkpoint, "--bench", "pope", "--data", str(root), "--methods",
            "tokencarve", "--keep", "10", "--presets", "after", "--limit", "2", "--batch", "2",
            "--max-new-tokens", "2", "--no-unpruned", "--out", str(out)]
    assert main(args) == 2  # "after" takes the released curve by default: there is none for OneVision
    assert "No positional curve was released" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--curve", "online"]) == 0, capsys.readouterr().err
    table = open(out / "summary.csv").read()
    assert table.count("tokencarve") == 1 and "online curve" in table
    assert len(open(out / "tokencarve-after" / "pope_answers.jsonl").readlines()) == 2


def test_run_calibrate_and_eval_on_videos(checkpoint, tmp_path, capsys):
    """`run --video`, `calibrate` over videos (one curve over the frames' pooled patches in order) and `eval`
    with that curve; an image calibration's per-view curve is refused on videos."""
    videos = write_video_bench(tmp_path / "videos")
    frames = tmp_path / "frames.npy"
    np.save(frames, np.random.default_rng(1).integers(0, 255, (10, 30, 40, 3), dtype=np.uint8))
    out = tmp_path / "run"
    assert main(["run", "--checkpoint", checkpoint, "--video", str(frames), "--prompt", "what happens?", "--method",
                 "fastv", "--keep", "12", "--debias", "pad+curve", "--curve", "online", "--max-new-tokens", "2",
                 "--decode", "fast", "--out", str(out)]) == 0, capsys.readouterr().err
    assert "no padding to suppress" in capsys.readouterr().out
    summary = json.load(open(out / "run.json"))
    assert summary["frames"] == 8 and summary["visual_tokens"] == 8 * 9 + 1  # 5 x 5 pooled to 3 x 3, a newline
    assert summary["kept"] == {"pruned": 12, "pruned + debiased": 12}
    assert [sum(v) for v in summary["kept_per_frame"].values()] == [12, 12]  # the newline is never kept
    assert all(os.path.getsize(f) > 2000 for f in summary["figures"])
    curve = tmp_path / "video_curve.json"
    assert main(["calibrate", "--checkpoint", checkpoint, "--data", str(videos), "--bench", "msvd", "--method",
                 "fastv", "--batch", "2", "--out", str(curve)]) == 0, capsys.readouterr().err
    record = json.load(open(curve))
    assert record["positions"] == 72 and record["samples"] == 2 and "views" not in record["curve"]
    eval_out = tmp_path / "eval"
    args = ["eval", "--checkpoint", checkpoint, "--bench", "msvd", "--data", str(videos), "--method", "fastv",
            "--keep", "12", "--debias", "curve", "--max-new-tokens", "2", "--batch", "2", "--decode", "fast", "--out",
            str(eval_out)]
    assert main(args + ["--curve", str(curve)]) == 0, capsys.readouterr().err
    assert len(open(eval_out / "merge.jsonl").readlines()) == 2
    views = tmp_path / "views.json"
    json.dump({"curve": jd.curve_to_dict((jd.ExpCurve(0.01), jd.ExpCurve(0.02)))}, open(views, "w"))
    assert main(args[:-1] + [str(tmp_path / "eval2"), "--curve", str(views)]) == 2
    assert "a LLaVA-OneVision video is one view" in capsys.readouterr().err
    assert not (tmp_path / "eval2").exists()
