"""The typed run config: the objects are the config, config.json only their serialised form (runs/config.py)."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields, replace

import pytest

from difflab.core.conditions import ConditionSpec
from difflab.core.losses import AutoencoderLoss, ClassifierLoss, ContrastiveLoss, SimpleLoss
from difflab.core.processes import ContinuousVP, Process, VarianceExploding
from difflab.data.images import load_images
from difflab.distill.student import student_config
from difflab.evaluation.feature_training import FeatureTraining, features_config
from difflab.evaluation.identity import IdentityTraining, identity_config
from difflab.guidance.classifier import classifier_config
from difflab.latent.autoencoder import autoencoder_config
from difflab.nets.mlp import MLPConfig
from difflab.nets.text import TextConfig, fit_vocabulary
from difflab.nets.unet import UNetConfig
from difflab.personalize.method import personalized_config
from difflab.runs.config import (
    CheckpointError,
    Distillation,
    LatentRecord,
    Personalization,
    RunConfig,
    TextRecord,
    load_config,
    save_config,
)
from difflab.runs.presets import preset_for, with_class_labels, with_latent, with_low_res, with_text
from difflab.runs.shipped import SHIPPED_DIR
from difflab.runs.shipped import names as shipped_names
from difflab.text.clip import clip_config

CAPTIONS = ["a red bag to the left of a blue coat", "a white sandal", "a green shirt on the right"]


def _default(field):
    value = field.default_factory() if field.default is MISSING else field.default
    return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))


def _as_written(again: dict, read: dict, cls) -> dict:
    """``again`` (a re-saved dict) less the keys the file ``read`` lacks, each of which must hold the default of
    ``cls``'s field: the file was written before that field existed."""
    defaults = {f.name: f for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}
    for key in set(again) - set(read):
        assert key in defaults and again[key] == _default(defaults[key]), (cls.__name__, key, again[key])
    return {k: v for k, v in again.items() if k in read}


def _typed(cfg: RunConfig) -> None:
    assert isinstance(cfg.process, Process)
    assert type(cfg.net) is cfg.net_config_class and type(cfg.loss) is cfg.kind.loss_config
    assert all(isinstance(c, ConditionSpec) for c in cfg.conditions)


@pytest.mark.parametrize("name", shipped_names())
def test_every_shipped_config_reads_as_objects_and_saves_as_it_was_written(name):
    read = json.loads((SHIPPED_DIR / name / "config.json").read_text())
    cfg = RunConfig.from_dict(read)
    _typed(cfg)
    again = cfg.to_dict()
    assert RunConfig.from_dict(again) == cfg
    assert json.loads(cfg.to_json()) == again  # JSON-ready: lists, not tuples
    for key, cls in (("net", type(cfg.net)), ("loss", type(cfg.loss)), ("train", type(cfg.train))):
        again[key] = _as_written(again[key], read[key], cls)
    assert _as_written(again, read, RunConfig) == read


def _built() -> dict[str, RunConfig]:
    digits, pairs, toy = preset_for("digits"), preset_for("fashion-pairs"), preset_for("swissroll")
    joint = TextConfig(fit_vocabulary(CAPTIONS), max_len=12, width=32, heads=2, layers=1)
    text = with_text(pairs, TextRecord("joint"), joint.width, joint.to_dict())
    latent = with_latent(pairs, LatentRecord("ae", "0123", 0.7, 4, [3, 32, 64]), [4, 8, 16])
    minilm = with_text(latent, TextRecord("minilm", "pkg", "ab" * 32, max_tokens=19), 384, p_drop=0.2)
    teacher = with_class_labels(digits, 10)
    record = Distillation("progressive", "t", "f", 8, 2, [[8, 8], [8, 4], [4, 2]], guidance_range=[0, 4])
    person = Personalization("textual-inversion", "sandal", base="b", base_fingerprint="f", caption_dropout=0.3)
    data = load_images("digits", "train")
    return {
        "toy": toy,
        "toy-ve": replace(toy, process=VarianceExploding(), target="eps", loss=SimpleLoss(target="x0")),
        "digits-class": teacher,
        "digits-low-res": with_low_res(replace(digits, process=ContinuousVP()), 2),
        "text-joint-class": with_class_labels(text, 10, 0.2),
        "latent-minilm": minilm,
        "classifier": classifier_config(digits, 10),
        "autoencoder": autoencoder_config(pairs),
        "autoencoder-disc": autoencoder_config(pairs, disc_weight=0.1, disc_start=3),
        "clip-sides": clip_config(pairs, CAPTIONS),
        "clip-plain": clip_config(pairs, ["a bag", "a coat"]),
        "features": features_config("digits", data, FeatureTraining()),
        "identity": identity_config(IdentityTraining()),
        "student": student_config(teacher, record, 10, 1e-4, 8),
        "personalized": personalized_config(with_class_labels(text, 10), person, 10, 1e-4, 4),
    }


BUILT = _built()


@pytest.mark.parametrize("name", sorted(BUILT))
def test_a_built_config_round_trips_through_its_file(name, tmp_path):
    cfg = BUILT[name]
    cfg.validate()
    _typed(cfg)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    save_config(tmp_path, cfg)
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()
    assert load_config(tmp_path) == cfg
    (tmp_path / "again").mkdir()
    save_config(tmp_path / "again", load_config(tmp_path))
    assert (tmp_path / "again" / "config.json").read_bytes() == (tmp_path / "config.json").read_bytes()


def test_losses_keep_the_layout_they_were_written_in():
    assert BUILT["autoencoder"].to_dict()["loss"] == {"recon": "l1", "kl_weight": 1e-6}
    assert BUILT["autoencoder-disc"].loss == AutoencoderLoss("l1", 1e-6, 0.1, 3)
    assert BUILT["clip-plain"].to_dict()["loss"] == {} and BUILT["clip-plain"].loss == ContrastiveLoss()
    assert BUILT["clip-sides"].to_dict()["loss"] == {"hard_negatives": "sides"}
    assert BUILT["classifier"].to_dict()["loss"] == {} and BUILT["classifier"].loss == ClassifierLoss()
    assert BUILT["toy"].to_dict()["process"] == {"kind": "ddpm", "T": 1000, "schedule": "cosine"}


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d.update(data_kind="pixels"), "data_kind must be one of 'points', 'images', got 'pixels'"),
        (lambda d: d.update(target="noise"), "target must be one of 'x0', 'eps', 'v', 'score', got 'noise'"),
        (lambda d: d["train"].update(precision="fp64"), "train.precision must be one of 'fp32', 'bf16', 'fp16'"),
        (lambda d: d["train"].update(lr_schedule="step"), "train.lr_schedule must be one of 'constant', 'cosine'"),
        (lambda d: d["loss"].update(target="z"), "loss.target must be one of 'x0', 'eps', 'v', 'score' or None"),
        (lambda d: d["loss"].update(weighting="p2"), "unknown loss weighting 'p2'"),
        (lambda d: d["loss"].update(recon="l1"), "unknown field 'recon' in loss"),
        (lambda d: d["process"].update(T="many"), "process 'ddpm'"),
        (lambda d: d.update(process=[]), "process must be an object, got list"),
        (lambda d: d.update(conditions={}), "conditions must be a list"),
        (
            lambda d: d.update(conditions=[{"name": "class_labels", "drop": 0.1}]),
            "unknown field 'drop' in conditions[0]",
        ),
        (lambda d: d.update(conditions=[{"name": "y", "kind": "label"}]), "conditions[0]: condition 'y'"),
        (lambda d: d.update(run_kind="gan"), "unknown run kind 'gan'"),
        (lambda d: d["net"].update(image_size=9), "config: net: UNetConfig.image_size=9 must be divisible"),
    ],
)
def test_a_bad_field_is_one_line_naming_it(edit, needle):
    d = preset_for("digits").to_dict()
    RunConfig.from_dict(json.loads(json.dumps(d)))
    edit(d)
    with pytest.raises(CheckpointError) as e:
        RunConfig.from_dict(d)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_a_config_made_in_code_holds_objects_not_dicts():
    toy = preset_for("swissroll")
    for changes, needle in (
        ({"net": {"dim": 2}}, "net must be a MLPConfig for net_kind 'mlp', got dict"),
        ({"net": UNetConfig()}, "net must be a MLPConfig for net_kind 'mlp', got UNetConfig"),
        ({"process": {"kind": "ddpm"}}, "process must be a Process"),
        ({"loss": {"weighting": "snr"}}, "loss must be a SimpleLoss for a diffusion run, got dict"),
        ({"conditions": [{"name": "class_labels"}]}, "conditions[0] must be a ConditionSpec"),
        ({"train": replace(toy.train, precision="fp64")}, "train.precision must be one of"),
    ):
        with pytest.raises(CheckpointError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            replace(toy, **changes).validate()
    assert replace(toy, net=MLPConfig(hidden=64)).build_net().config.hidden == 64
