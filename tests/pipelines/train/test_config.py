"""The training config files: what each shipped config loads to, and how a config extends another."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.train.config import load_config

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs"

# Every field's default, written out: a changed default changes every shipped config that does not set it.
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "preset": "tiny",
        "overrides": {},
        "pretrained_vit": None,
        "pretrained_bert": None,
        "vocab_size": 8192,
        "compile": False,
    },
    "data": {
        "path": "data/synthetic/parquet",
        "train_split": "train",
        "val_split": "val",
        "hflip_prob": 0.5,
        "shuffle_buffer": 512,
    },
    "optim": {
        "epochs": 90,
        "global_batch_size": 256,
        "lr_backbone": 4e-5,
        "lr_head": 4e-4,
        "weight_decay": 1e-4,
        "schedule": "step",
        "decay_epochs": (10, 60),
        "decay_factor": 0.1,
        "warmup_steps": 0,
        "grad_clip": 0.15,
        "max_steps_per_epoch": None,
    },
    "loss": {
        "l1": 1.0,
        "giou": 1.0,
        "focal": 4.0,
        "dice": 4.0,
        "focal_alpha": 0.25,
        "focal_gamma": 2.0,
        "attention": 0.0,
        "category": 0.0,
    },
    "run": {
        "name": "vglaw-synthetic",
        "experiment": "vglaw",
        "num_workers": 2,
        "use_gpu": False,
        "precision": None,
        "cpus_per_worker": 1.0,
        "worker_resources": {},
        "placement_strategy": "PACK",
        "storage_path": "runs",
        "checkpoint_every_steps": 0,
        "num_checkpoints_to_keep": 2,
        "max_failures": 3,
        "log_every_steps": 10,
        "seed": 0,
        "mlflow": True,
        "registered_model_name": "vglaw",
        "overlays": 8,
    },
}

# What the four paper configs share. The optimiser and loss fields equal today's defaults and are written out
# anyway: they are the paper's, whatever the defaults become.
PAPER_RECIPE: dict[str, Any] = {
    "model.preset": "base",
    "model.pretrained_vit": None,
    "model.pretrained_bert": None,
    "data.val_split": "val",
    "optim.epochs": 90,
    "optim.global_batch_size": 256,
    "optim.lr_backbone": 4e-5,
    "optim.lr_head": 4e-4,
    "optim.weight_decay": 1e-4,
    "optim.schedule": "step",
    "optim.decay_epochs": (10, 60),
    "optim.decay_factor": 0.1,
    "optim.warmup_steps": 500,
    "optim.grad_clip": 0.15,
    "loss.l1": 1.0,
    "loss.giou": 1.0,
    "loss.focal": 4.0,
    "loss.dice": 4.0,
    "loss.attention": 0.0,
    "loss.category": 0.0,
    "run.num_workers": 8,
    "run.use_gpu": True,
    "run.cpus_per_worker": 2,
    "run.checkpoint_every_steps": 1000,
}


def _paper(dataset: str, path: str) -> dict[str, Any]:
    names = {f"run.{key}": f"vglaw-{dataset}" for key in ("name", "experiment", "registered_model_name")}
    return {**PAPER_RECIPE, "data.path": path, **names}


SYNTHETIC_SCHEDULE = {"optim.global_batch_size": 32, "optim.lr_backbone": 1e-3, "optim.lr_head": 1e-3}
SYNTHETIC_SCHEDULE |= {"optim.grad_clip": 1.0, "model.vocab_size": 512, "loss.attention": 2.0}

# Each shipped config's fields that differ from DEFAULTS (and, for the paper's, the recipe), as the files
# loaded before they were written as a base and its extensions.
SHIPPED: dict[str, dict[str, Any]] = {
    "refcoco": _paper("refcoco", "data/processed/refcoco_unc"),
    "refcoco+": _paper("refcoco+", "data/processed/refcoco+_unc"),
    "refcocog": _paper("refcocog", "data/processed/refcocog_umd"),
    "referit": _paper("referit", "data/processed/refclef_berkeley"),
    "synthetic": {
        **SYNTHETIC_SCHEDULE,
        "model.overrides": {"categories": 9, "stem": "patch+conv"},
        "data.path": "data/processed/synthetic_unc_128",
        "optim.epochs": 6,
        "optim.schedule": "cosine",
        "optim.decay_epochs": (),
        "optim.warmup_steps": 20,
        "loss.l1": 5.0,
        "optim.grad_clip": 5.0,
        "loss.giou": 5.0,
        "loss.category": 1.5,
        "run.precision": "auto",
        "run.experiment": "vglaw-synthetic",
        "run.registered_model_name": "vglaw-synthetic",
    },
    "synthetic_convergence": {
        **SYNTHETIC_SCHEDULE,
        "model.overrides": {"categories": 6},
        "data.path": "data/processed/synthetic_unc_128",
        "optim.epochs": 12,
        "optim.decay_epochs": (9, 11),
        "optim.warmup_steps": 20,
        "loss.l1": 5.0,
        "loss.giou": 2.0,
        "loss.category": 3.0,
        "run.name": "vglaw-synthetic-convergence",
        "run.experiment": "vglaw-convergence",
        "run.registered_model_name": "vglaw-synthetic-convergence",
    },
    "test": {
        **SYNTHETIC_SCHEDULE,
        "optim.epochs": 8,
        "optim.decay_epochs": (),
        "optim.warmup_steps": 10,
        "run.name": "vglaw-test",
        "run.experiment": "vglaw-tests",
        "run.log_every_steps": 5,
        "run.registered_model_name": "vglaw-test",
        "run.overlays": 4,
    },
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_loads_to_its_pinned_values(name: str) -> None:
    expected = {section: dict(fields) for section, fields in DEFAULTS.items()}
    for key, value in SHIPPED[name].items():
        section, field = key.split(".")
        assert field in expected[section], key
        expected[section][field] = value
    loaded = load_config(CONFIGS / f"{name}.yaml").to_dict()
    # Fields added after these were written are left out: no shipped config can have set them.
    assert {section: {field: loaded[section][field] for field in fields} for section, fields in expected.items()} == (
        expected
    )
    # bool is an int and 8 == 8.0: the types are pinned too.
    for section, fields in expected.items():
        for field, value in fields.items():
            assert type(loaded[section][field]) is type(value), f"{section}.{field}"


def test_each_config_trains_its_own_run_and_registers_its_own_model() -> None:
    """A run name is the resume key and a registered model holds the `best` alias: two configs sharing either would
    resume each other's runs or move each other's alias (paper.yaml is a base that the dataset configs extend)."""
    runs = {name: load_config(CONFIGS / f"{name}.yaml").run for name in SHIPPED}
    for field in ("name", "registered_model_name"):
        values = [getattr(run, field) for run in runs.values()]
        assert len(set(values)) == len(values), {name: getattr(run, field) for name, run in runs.items()}


def test_the_paper_configs_extend_one_recipe_and_every_config_is_pinned() -> None:
    shipped = {path.stem for path in CONFIGS.glob("*.yaml")}
    assert shipped == {*SHIPPED, "paper"}, "pin a new config in SHIPPED"
    for dataset in ("refcoco", "refcoco+", "refcocog", "referit"):
        assert yaml.safe_load((CONFIGS / f"{dataset}.yaml").read_text())["extends"] == "paper.yaml"


# The paper's objective (Sec. 3.4: L1 and GIoU for the box, focal and dice for the mask, weighted 1, 1, 4, 4;
# focal alpha 0.25, gamma 2) and nothing else: every term it does not have is written here at 0.
PAPER_LOSS = {"l1": 1.0, "giou": 1.0, "focal": 4.0, "dice": 4.0, "focal_alpha": 0.25, "focal_gamma": 2.0}
NOT_THE_PAPERS = {"attention": 0.0, "category": 0.0}


@pytest.mark.parametrize("dataset", ["refcoco", "refcoco+", "refcocog", "referit"])
def test_paper_configs_keep_the_papers_objective(dataset: str) -> None:
    """The aids of the from-scratch synthetic runs stay off where the paper's recipe is trained."""
    config = load_config(CONFIGS / f"{dataset}.yaml")
    loss = config.to_dict()["loss"]
    assert set(loss) == set(PAPER_LOSS) | set(NOT_THE_PAPERS), "a new loss term: say here whether it is the paper's"
    assert loss == PAPER_LOSS | NOT_THE_PAPERS
    assert "categories" not in config.model.overrides  # the aid's classifier is not even built
    assert config.model.vglaw_config().head.categories == 0
    assert config.model.vglaw_config().vision.stem == "patch"  # ViTDet's patch projection, as pretrained
    assert (config.optim.schedule, config.optim.decay_epochs) == ("step", (10, 60))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_set_only_what_differs_from_their_base(path: Path) -> None:
    own = yaml.safe_load(path.read_text())
    base = load_config(path.parent / own.pop("extends") if "extends" in own else None).to_dict()
    loaded = load_config(path).to_dict()
    restated = [
        f"{section}.{field}"
        for section, fields in own.items()
        for field in fields
        if loaded[section][field] == base[section][field]
    ]
    assert not restated, f"{path.name} restates what it gets anyway: {restated}"


# Inheritance, on small files.


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_config_overrides_its_base_field_by_field(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", "optim:\n  epochs: 5\n  warmup_steps: 7\nrun:\n  name: base\n  seed: 3\n")
    child = _write(tmp_path / "child.yaml", "extends: base.yaml\noptim:\n  epochs: 2\nrun:\n  name: child\n")
    config = load_config(child)
    assert (config.optim.epochs, config.optim.warmup_steps) == (2, 7)
    assert (config.run.name, config.run.seed) == ("child", 3)


def test_sections_merge_deeply_and_lists_replace(tmp_path: Path) -> None:
    _write(
        tmp_path / "base.yaml",
        "model:\n  overrides: {categories: 6, window_size: 2}\noptim:\n  decay_epochs: [1, 2, 3]\n"
        "run:\n  worker_resources: {a: 1.0}\n",
    )
    child = _write(
        tmp_path / "child.yaml",
        "extends: base.yaml\nmodel:\n  overrides: {window_size: 8}\noptim:\n  decay_epochs: [4]\nloss:\n  l1: 2.0\n",
    )
    config = load_config(child)
    assert config.model.overrides == {"categories": 6, "window_size": 8}
    assert config.optim.decay_epochs == (4,)
    assert config.run.worker_resources == {"a": 1.0}  # a section the child does not name is the base's
    assert config.loss.l1 == 2.0


def test_a_base_path_is_relative_to_the_file_that_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "shared" / "recipe.yaml", "optim:\n  epochs: 4\n")
    child = _write(tmp_path / "configs" / "child.yaml", "extends: ../shared/recipe.yaml\nrun:\n  name: c\n")
    monkeypatch.chdir(tmp_path / "shared")  # a base looked up from the working directory would not be found
    assert load_config(child).optim.epochs == 4
    assert load_config(Path("../configs/child.yaml")).optim.epochs == 4


def test_a_base_may_extend_another(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "optim:\n  epochs: 1\n  warmup_steps: 1\n  grad_clip: 1.0\n")
    _write(tmp_path / "sub" / "b.yaml", "extends: ../a.yaml\noptim:\n  warmup_steps: 2\n  grad_clip: 2.0\n")
    c = _write(tmp_path / "sub" / "c.yaml", "extends: b.yaml\noptim:\n  grad_clip: 3.0\n")
    optim = load_config(c).optim
    assert (optim.epochs, optim.warmup_steps, optim.grad_clip) == (1, 2, 3.0)


def test_a_cycle_is_an_error_that_names_it(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "extends: b.yaml\n")
    _write(tmp_path / "b.yaml", "extends: c.yaml\n")
    _write(tmp_path / "c.yaml", "extends: a.yaml\n")
    with pytest.raises(ValueError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path / "self.yaml", "extends: ./self.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_a_missing_base_is_an_error_that_names_both_files(tmp_path: Path) -> None:
    child = _write(tmp_path / "child.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"child\.yaml extends 'nowhere\.yaml', but .*nowhere\.yaml"):
        load_config(child)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ValueError, match="path of one YAML file"):
        load_config(_write(tmp_path / "list.yaml", "extends: [a.yaml, b.yaml]\n"))


def test_overrides_apply_after_the_whole_chain(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", "model:\n  overrides: {categories: 6}\noptim:\n  epochs: 5\n  decay_epochs: [1]\n")
    child = _write(tmp_path / "child.yaml", "extends: base.yaml\noptim:\n  epochs: 2\n")
    config = load_config(child, ["optim.epochs=9", "optim.decay_epochs=[]", "model.overrides.window_size=2"])
    assert (config.optim.epochs, config.optim.decay_epochs) == (9, ())
    assert config.model.overrides == {"categories": 6, "window_size": 2}


def test_an_empty_section_keeps_the_base_section(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", "run:\n  name: base\n")
    child = _write(tmp_path / "child.yaml", "extends: base.yaml\nrun:\n  # name: child\n")
    assert load_config(child, ["run.seed=4"]).run.name == "base"


def test_the_documented_override_example_loads_on_the_default_config() -> None:
    # docs/training.md and `jobs.train --help` show this override; it must work on the default (tiny) config.
    help_text = (REPO / "jobs" / "train.py").read_text() + (REPO / "docs" / "training.md").read_text()
    (example,) = set(re.findall(r"model\.overrides='(\{[^']*\})'", help_text))
    vision = load_config(None, [f"model.overrides={example}"]).model.vglaw_config().vision
    assert (vision.depth, vision.global_blocks) == (2, (1,))


def test_numbers_written_as_people_write_them_are_numbers(tmp_path: Path) -> None:
    # PyYAML reads "2e-4" as text (YAML 1.1 wants "2.0e-4"); a learning rate written so must still be 0.0002.
    config = load_config(None, ["optim.lr_head=2e-4", "optim.lr_backbone=4E-5", "loss.focal=1e1"])
    assert (config.optim.lr_head, config.optim.lr_backbone, config.loss.focal) == (2e-4, 4e-5, 10.0)
    file = _write(tmp_path / "c.yaml", "optim:\n  weight_decay: 5e-2\n")
    assert load_config(file).optim.weight_decay == 0.05
    with pytest.raises(ValueError, match=r"optim\.lr_head must be a number, got 'fast'"):
        load_config(None, ["optim.lr_head=fast"])


def test_a_pretrained_vit_needs_the_patch_stem(tmp_path: Path) -> None:
    """A ViT checkpoint holds a patch projection only; a patch+conv model fails before any worker starts."""
    checkpoint = tmp_path / "vit.pth"
    checkpoint.write_bytes(b"")  # only its existence is checked here; tests/vglaw/test_vision.py loads one
    assert load_config(None, [f"model.pretrained_vit={checkpoint}"]).model.vglaw_config().vision.stem == "patch"
    with pytest.raises(ValueError, match=r"model\.pretrained_vit needs the patch stem.*'patch\+conv'"):
        load_config(None, [f"model.pretrained_vit={checkpoint}", "model.overrides={stem: patch+conv}"])
