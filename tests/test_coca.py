"""CoCa: the model (decoder init, forward, folders), the caption objective (token-count-exact over micro-batches and
processes), `clipkit train` with train.caption_weight (smoke, bitwise resume), `clipkit caption` and its decoding."""

from __future__ import annotations

import copy
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image

from clipkit.cli import main
from clipkit.config import ModelCfg, RecipeError, load_recipe
from clipkit.loss import ContrastiveLoss
from clipkit.models import load_model, save_model
from clipkit.models.factory import build_model, build_tokenizer, resolve_config
from clipkit.models.generate import beam_search, decode, generate, sample, special_tokens
from clipkit.objectives.caption import CaptionObjective
from clipkit.resume import ResumeError
from clipkit.step import MicroBatch, forward_backward
from clipkit.train import preflight
from tests.coca_workers import TINY_COCA, batch, coca, grads, two_process_worker
from tests.conftest import TINY_MODEL, train_until_preempted
from tests.test_distributed import free_port
from tests.test_resilience import assert_bitwise_equal, weights

# ------------------------------------------------------------------------------------------------- the model


def test_decoder_is_initialized_and_the_forward_gives_caption_logits():
    a, b = coca(), coca()
    proj = a.text_decoder.text_projection
    assert torch.equal(proj, b.text_decoder.text_projection)  # seeded, not torch.empty's leftover memory
    assert abs(proj.std().item() - 32**-0.5) < 0.01
    images, texts = batch(4)
    dense = open_clip.CoCa.forward(a, images, texts)  # open_clip's own forward: logits at every position
    assert dense["logits"].shape == (4, 15, 49408) and torch.equal(dense["labels"], texts[:, 1:])
    out = a.train()(image=images, text=texts)  # as clipkit.step calls it: states before the vocabulary projection
    assert "logits" not in out and out["caption_states"].shape == (4, 15, 32)
    assert torch.allclose(out["caption_states"] @ out["caption_projection"], dense["logits"], atol=1e-12, rtol=0)
    assert torch.allclose(a.eval()(images, texts)["logits"], dense["logits"], atol=1e-12, rtol=0)
    for key in ("image_features", "text_features", "logit_scale"):
        assert torch.equal(out[key], dense[key]), key
    assert torch.allclose(out["image_features"], a.encode_image(images, normalize=True))
    assert torch.allclose(out["text_features"], a.encode_text(texts, normalize=True))


def test_coca_config_errors_name_the_key():
    bad = copy.deepcopy(TINY_COCA)
    bad["multimodal_cfg"]["width"] = 48
    with pytest.raises(RecipeError, match=r"multimodal_cfg.width: 48 must equal .*embed_dim"):
        resolve_config(ModelCfg(config=bad))
    bad = copy.deepcopy(TINY_COCA)
    bad["multimodal_cfg"]["widht"] = 32
    with pytest.raises(RecipeError, match=r"model.config.multimodal_cfg.widht: unknown key"):
        resolve_config(ModelCfg(config=bad))


def test_named_coca_architectures_build():
    with torch.device("meta"):
        model = build_model(resolve_config(ModelCfg(name="coca_ViT-B-32"))["model_cfg"], load_tower_weights=False)
    assert isinstance(model, open_clip.CoCa)


# ------------------------------------------------------------------------------------------------- the objective


def test_caption_loss_equals_open_clip_coca_loss_and_a_hand_count():
    model = coca().train()
    images, texts = batch(6)
    out = model(image=images, text=texts)
    dense = open_clip.CoCa.forward(model, images, texts)
    obj = CaptionObjective(2.0)
    mb = MicroBatch(images, texts)
    obj.begin([mb])
    ours = obj(model, out, mb)
    ref = open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=0.0)
    _, theirs = ref(out["image_features"], out["text_features"], dense["logits"], dense["labels"], out["logit_scale"])
    assert torch.allclose(ours, theirs, atol=1e-12, rtol=0)
    assert torch.allclose(obj(model, dense, mb), theirs, atol=1e-12, rtol=0)  # open_clip's dense logits too
    labels = texts[:, 1:]
    logp = dense["logits"].log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    keep = labels != 0
    assert int(obj.tokens) == int(keep.sum()) == sum((1 + i % 5) + 1 for i in range(6))  # words + end token
    assert torch.allclose(ours, -2.0 * logp[keep].mean(), atol=1e-12, rtol=0)
    assert torch.allclose(obj.last, 2 * ours.detach(), atol=1e-12, rtol=0)  # called twice


def test_accumulation_gives_the_big_batch_gradient():
    """K=2 micro-batches (with 9 and 15 caption tokens) give the gradient of one batch: token-count-exact."""
    model = coca().train()
    images, texts = batch(8)
    loss_fn = ContrastiveLoss("clip")

    def run(micro):
        model.zero_grad()
        obj = CaptionObjective(2.0)
        loss = forward_backward(model, micro, loss_fn, objectives=[obj])
        return loss, obj.last, grads(model)

    big_loss, big_caption, big = run([MicroBatch(images, texts)])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(big) == trainable  # every parameter takes part (DDP needs no find_unused_parameters)
    small_loss, small_caption, small = run([MicroBatch(images[:4], texts[:4]), MicroBatch(images[4:], texts[4:])])
    assert torch.allclose(small_loss, big_loss, atol=1e-12)
    assert torch.allclose(small_caption, big_caption, atol=1e-12)
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-10, rtol=0), name


def test_each_process_share_is_scaled_by_the_world_size(monkeypatch):
    """Arithmetic of the DDP scaling: 2 processes holding the same batch give each the single-process loss (the
    count is all-reduced to twice the tokens, the share times W = 2), so DDP's average is the big batch's gradient."""
    from clipkit.objectives import caption

    model = coca().train()
    images, texts = batch(6)
    mb = MicroBatch(images, texts)
    out = model(image=images, text=texts)
    single = CaptionObjective(2.0)
    single.begin([mb])
    monkeypatch.setattr(caption, "world", lambda: (0, 2))
    monkeypatch.setattr(caption.dist, "all_reduce", lambda t: t.mul_(2))  # the other process: the same tokens
    shared = CaptionObjective(2.0)
    shared.begin([mb])
    assert int(shared.tokens) == 2 * int(single.tokens)
    assert torch.allclose(shared(model, out, mb), single(model, out, mb), atol=1e-12, rtol=0)


@pytest.mark.dist
@pytest.mark.slow  # ~20 s on 2 busy cores: two spawned interpreters
def test_two_processes_with_accumulation_equal_one_process_big_batch(tmp_path):
    """W=2 processes x K=2 micro-batches: the caption share of each process is scaled by W for DDP's average."""
    out = str(tmp_path / "r.pt")
    mp.start_processes(two_process_worker, args=(2, free_port(), out), nprocs=2, start_method="spawn", join=True)
    model = coca().train()
    images, texts = batch(8)
    obj = CaptionObjective(2.0)
    loss = forward_backward(model, [MicroBatch(images, texts)], ContrastiveLoss("clip"), objectives=[obj])
    got = torch.load(out)
    assert torch.allclose(got["parts"], torch.stack([loss, obj.last]), atol=1e-12, rtol=0)
    ref = grads(model)
    assert got["grads"].keys() == ref.keys()
    worst = max((got["grads"][k] - ref[k]).abs().max().item() for k in ref)
    assert worst < 1e-10, f"max abs gradient difference {worst:.3e}"


# ------------------------------------------------------------------------------------------------- decoding


def naive_greedy(model, image: torch.Tensor, special, max_length: int) -> list[int]:
    """One image, one token at a time through the full forward (image re-encoded each step)."""
    seq = [special.sot]
    while len(seq) < max_length:
        logits = model(image=image[None], text=torch.tensor([seq]), output_labels=False)["logits"][0, -1].clone()
        logits[special.pad] = float("-inf")
        if len(seq) == 1:
            logits[special.eot] = float("-inf")  # min_length 1
        if len(seq) == max_length - 1:
            seq.append(special.eot)
            break
        seq.append(int(logits.argmax()))
        if seq[-1] == special.eot:
            break
    return seq[1:]


def test_greedy_equals_a_naive_loop_and_top_k_1_is_greedy():
    model = coca(torch.float32).eval()
    images, _ = batch(2, torch.float32)
    special = special_tokens(build_tokenizer(TINY_COCA))
    ours = sample(model, images, special, "greedy", max_length=8)
    assert ours == [naive_greedy(model, im, special, 8) for im in images]
    assert all(len(x) == 7 and x[-1] == special.eot for x in ours)  # untrained: runs to the end
    assert sample(model, images, special, "top_k", max_length=8, top_k=1) == ours
    draw = [sample(model, images, special, "top_p", 8, generator=torch.Generator().manual_seed(1)) for _ in "ab"]
    assert draw[0] == draw[1]  # a seed gives the same captions


def test_beam_scores_are_the_sequences_log_probabilities():
    model = coca(torch.float64).eval()
    images, _ = batch(2)
    special = special_tokens(build_tokenizer(TINY_COCA))
    for im, (ids, score) in zip(images, beam_search(model, images, special, num_beams=3, max_length=8), strict=True):
        seq = torch.tensor([[special.sot, *ids]])
        logits = model(image=im[None], text=seq[:, :-1], output_labels=False)["logits"][0]
        logp = logits.log_softmax(-1).gather(-1, seq[0, 1:, None]).sum()  # the model's, unconstrained
        assert ids[-1] == special.eot and abs(logp.item() - score) < 1e-9


# ------------------------------------------------------------------------------------------------- recipes


def recipe_data(root, **train) -> dict:
    return {
        "data_root": str(root),
        "model": {"config": copy.deepcopy(TINY_COCA)},
        "data": {"sources": [{"shards": "train-*.tar"}], "batch_size": 8, "workers": 1, "shuffle_buffer": 50},
        "train": {"steps": 6, "warmup": 1, "lr": 1e-3, "log_every": 1, "checkpoint_every": 3,
                  "caption_weight": 2.0, **train},
        "eval": {"tasks": [{"task": "zeroshot", "dataset": "digits", "shards": "test-*.tar",
                            "classnames": "classnames.txt", "templates": "templates.txt"},
                           {"task": "retrieval", "dataset": "digits", "shards": "test-*.tar"}]},
    }  # fmt: skip


def test_caption_weight_is_checked_against_the_model(tmp_path):
    clip = recipe_data(tmp_path)
    clip["model"]["config"] = copy.deepcopy(TINY_MODEL)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(clip))
    with pytest.raises(RecipeError, match=r"train.caption_weight: 2.0 needs a CoCa model"):
        load_recipe(path)
    assert load_recipe(path, ["train.caption_weight=null"]).train.caption_weight is None
    path.write_text(yaml.safe_dump(recipe_data(tmp_path)))
    for value in ("null", "0", "-1"):
        with pytest.raises(RecipeError, match=r"train.caption_weight: .* set its weight > 0"):
            load_recipe(path, [f"train.caption_weight={value}"])
    named = load_recipe(path, ["model.config=null", "model.name=coca_ViT-B-32", "train.caption_weight=null"])
    with pytest.raises(RecipeError, match=r"train.caption_weight: None: a CoCa model"):
        preflight(named)  # before any shard is read


@pytest.fixture(scope="module")
def coca_run(digits_dir, tmp_path_factory):
    """The tiny CoCa trained 6 steps on the real digits through `clipkit train` (evals included)."""
    root = tmp_path_factory.mktemp("coca")
    recipe = root / "coca.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data(digits_dir)))
    assert main(["train", str(recipe), "--out", str(root / "straight")]) == 0
    return recipe, root / "straight"


def test_train_logs_the_caption_loss_and_exports_an_open_clip_coca(coca_run):
    _, run = coca_run
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/caption" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(np.isfinite(r["loss/caption"]) and r["loss/caption"] > 0 for r in steps)
    assert steps[-1]["loss/caption"] < steps[0]["loss/caption"]  # 2 * ln(49408) = 21.6 at the start
    assert "eval/digits/acc1" in rows[-1] and "eval/digits/image_retrieval_recall@1" in rows[-1]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run / 'model'}")
    model.eval()
    assert isinstance(model, open_clip.CoCa)
    ours = load_model(run / "model").model
    image = preprocess(Image.new("RGB", (20, 20), "white"))[None]
    text = open_clip.get_tokenizer(f"local-dir:{run / 'model'}")(["the number three."])
    with torch.no_grad():
        assert torch.equal(model.encode_image(image), ours.encode_image(image))
        assert torch.equal(model(image, text)["logits"], ours(image, text)["logits"])


def test_resume_is_bitwise_and_refuses_a_changed_caption_weight(coca_run, tmp_path, monkeypatch):
    recipe, straight = coca_run
    run = tmp_path / "stopped"
    train_until_preempted(recipe, run, 4, monkeypatch)
    with pytest.raises(ResumeError, match=r"train.caption_weight: 2.0 in recipe.yaml -> 1.0 now"):
        from clipkit.train import train

        train(load_recipe(recipe, ["train.caption_weight=1.0"]), run, resume="latest")
    assert main(["train", str(recipe), "--out", str(run), "--resume", "latest"]) == 0
    assert_bitwise_equal(weights(run), weights(straight))


def digit_png(path) -> str:
    from sklearn.datasets import load_digits

    from clipkit.data.builtin.digits import to_image

    to_image(load_digits().images[3], 16).save(path)
    return str(path)


def test_caption_command_prints_captions(coca_run, tmp_path, capsys):
    _, run = coca_run
    png = digit_png(tmp_path / "three.png")
    assert main(["caption", "--checkpoint", str(run / "model"), "--image", png, png, "--max-length", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{png}\t") and line.split("\t")[1] for line in lines)
    argv = ["caption", "--checkpoint", str(run / "model"), "--image", png, "--method", "top_k", "--json", "--seed", "3",
            "--max-length", "6"]  # fmt: skip
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == first and first[0]["image"] == png and first[0]["caption"]


def test_caption_refuses_a_clip_model_and_bad_arguments(tmp_path, capsys):
    config = resolve_config(ModelCfg(config=copy.deepcopy(TINY_MODEL)))
    save_model(tmp_path / "clip", build_model(config["model_cfg"]), config)
    png = digit_png(tmp_path / "three.png")
    assert main(["caption", "--checkpoint", str(tmp_path / "clip"), "--image", png]) == 2
    assert "not a CoCa model" in capsys.readouterr().err
    assert main(["caption", "--checkpoint", str(tmp_path / "clip"), "--image", png, "--max-length", "1"]) == 2
    assert "--max-length 1" in capsys.readouterr().err
    assert main(["caption", "--checkpoint", str(tmp_path / "clip"), "--image", str(tmp_path / "no.png")]) == 2
    assert "no.png" in capsys.readouterr().err


def test_generate_refuses_a_clip_model():
    model = build_model(copy.deepcopy(TINY_MODEL))
    with pytest.raises(ValueError, match="no text decoder"):
        generate(model, torch.zeros(1, 3, 16, 16), special_tokens(build_tokenizer(TINY_MODEL)))
    tokenizer = build_tokenizer(TINY_MODEL)
    assert decode(tokenizer, [49406, 320, 2368, 49407, 0], special_tokens(tokenizer)) == "a cat"
    ids = tokenizer(["a photo of a cat, sitting."])[0].tolist()
    assert decode(tokenizer, ids, special_tokens(tokenizer)) == "a photo of a cat, sitting."
