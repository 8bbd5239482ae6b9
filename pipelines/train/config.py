"""The training run's typed configuration: YAML presets in ``configs/`` plus ``section.field=value`` overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vglaw.losses import LossWeights
from vglaw.precision import check_precision

if TYPE_CHECKING:
    from vglaw.config import VGLAWConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ModelSection:
    """Which VG-LAW to train and where its pretrained parts come from (local paths only)."""

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # vglaw.create_model(preset, **overrides)
    pretrained_vit: str | None = None  # ViTDet .pkl, SAM / timm ViT .safetensors / .pth
    pretrained_bert: str | None = None  # a local Hugging Face BERT directory (its vocab.txt is the tokenizer)
    vocab_size: int = 8192  # WordPiece vocab trained on the training expressions when no BERT is given
    compile: bool = False  # torch.compile the model (GPU runs)

    def __post_init__(self) -> None:
        import vglaw

        if self.preset not in vglaw.list_models():
            raise ValueError(f"model.preset '{self.preset}' is not one of {vglaw.list_models()}")
        model = self.vglaw_config()  # validates the overrides now, not on a worker
        if self.pretrained_vit is not None and model.vision.stem != "patch":
            raise ValueError(
                f"model.pretrained_vit needs the patch stem, which pretrained ViTs have; the model's stem is "
                f"{model.vision.stem!r} (model.overrides.stem)"
            )
        for path in (self.pretrained_vit, self.pretrained_bert):
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"pretrained weights not found: {path}")

    def vglaw_config(self) -> VGLAWConfig:
        """The model's resolved configuration: the preset with ``overrides`` applied."""
        import vglaw

        return vglaw.get_config(self.preset, **self.overrides)


@dataclass
class DataSection:
    """The preprocessed dataset (output of ``jobs.preprocess``)."""

    path: str = "data/synthetic/parquet"
    train_split: str = "train"
    val_split: str = "val"
    hflip_prob: float = 0.5  # horizontal flip with left/right swapped in the expression
    shuffle_buffer: int = 512  # rows in each worker's local shuffle buffer
    prefetch_batches: int = 2  # batches each worker's ingest decodes ahead of the step
    ingest_cpus: float = 1.0  # CPUs per Ray Data decode task (pipelines.train.ingest.encode_training_rows)
    # Where the JPEG canvases are decoded: "ingest" (Ray Data CPU tasks) or "device" (nvJPEG on the workers' GPUs)
    image_decode: str = "ingest"

    def __post_init__(self) -> None:
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError("data.hflip_prob must be in [0, 1]")
        if self.prefetch_batches < 0:
            raise ValueError("data.prefetch_batches must be >= 0")
        if self.ingest_cpus <= 0:
            raise ValueError("data.ingest_cpus must be > 0")
        if self.image_decode not in ("ingest", "device"):
            raise ValueError(f"data.image_decode must be 'ingest' or 'device', got {self.image_decode!r}")


@dataclass
class OptimSection:
    """The paper's recipe by default: AdamW, 4e-5 backbones / 4e-4 rest, wd 1e-4, x0.1 at epochs 10 and 60."""

    epochs: int = 90
    global_batch_size: int = 256
    lr_backbone: float = 4e-5
    lr_head: float = 4e-4
    weight_decay: float = 1e-4
    # "step": x decay_factor at each of decay_epochs (the paper's); "cosine" and "linear": from the peak down to zero
    # over the run
    schedule: str = "step"
    decay_epochs: tuple[int, ...] = (10, 60)
    decay_factor: float = 0.1
    warmup_steps: int = 0
    grad_clip: float | None = 0.15
    max_steps_per_epoch: int | None = None  # cap for quick runs

    def __post_init__(self) -> None:
        self.decay_epochs = tuple(int(e) for e in self.decay_epochs)
        if self.epochs <= 0 or self.global_batch_size <= 0:
            raise ValueError("optim.epochs and optim.global_batch_size must be positive")
        if self.lr_backbone < 0 or self.lr_head <= 0:
            raise ValueError("learning rates must be positive")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError("optim.grad_clip must be positive or null")
        if self.schedule not in ("step", "cosine", "linear"):
            raise ValueError(f"optim.schedule must be 'step', 'cosine' or 'linear', got {self.schedule!r}")
        if self.schedule != "step" and self.decay_epochs:
            raise ValueError(f"optim.decay_epochs belong to the step schedule: set them to [] for {self.schedule!r}")


@dataclass
class RunSection:
    """Where and how the run executes and is recorded."""

    name: str = "vglaw-synthetic"
    experiment: str = "vglaw"
    num_workers: int = 2
    use_gpu: bool = False
    # fp32 / bf16 (autocast) / auto (bf16 where the hardware computes in bf16); None: bf16 on GPU workers, fp32 on CPU
    precision: str | None = None
    cpus_per_worker: float = 1.0
    # Further Ray resources each training worker needs, e.g. {"accelerator_type:A100": 0.001} or a custom
    # resource that only the training nodes advertise; they decide where the workers can land.
    worker_resources: dict[str, float] = field(default_factory=dict)
    placement_strategy: str = "PACK"  # of the workers' placement group: PACK, SPREAD or STRICT_SPREAD
    storage_path: str = "runs"  # Ray Train checkpoints; relative paths are under the repository root
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    num_checkpoints_to_keep: int = 2
    max_failures: int = 3
    log_every_steps: int = 10
    progress_every_s: float = 30.0  # a progress line this often when the output is not a terminal (logs, jobs)
    seed: int = 0
    mlflow: bool = True
    registered_model_name: str | None = "vglaw"
    overlays: int = 8  # prediction overlays logged per epoch

    def __post_init__(self) -> None:
        if not self.progress_every_s > 0:
            raise ValueError("run.progress_every_s must be > 0")
        if self.num_workers <= 0:
            raise ValueError("run.num_workers must be positive")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_SPREAD"):
            raise ValueError(
                f"run.placement_strategy must be PACK, SPREAD or STRICT_SPREAD, got {self.placement_strategy!r}"
            )
        if any(value < 0 for value in self.worker_resources.values()) or "CPU" in self.worker_resources:
            raise ValueError("run.worker_resources takes non-negative amounts, and CPUs go in run.cpus_per_worker")
        check_precision(self.precision, "run.precision")
        if not self.name or "/" in self.name:
            raise ValueError("run.name must be a non-empty name without '/'")

    @property
    def storage_dir(self) -> Path:
        path = Path(self.storage_path)
        return path if path.is_absolute() else REPO_ROOT / path


@dataclass
class TrainConfig:
    """One training job."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossWeights = field(default_factory=LossWeights)  # the paper's weights unless a config says otherwise
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        if self.optim.global_batch_size % self.run.num_workers:
            raise ValueError(
                f"optim.global_batch_size {self.optim.global_batch_size} is not divisible by "
                f"run.num_workers {self.run.num_workers}"
            )
        if self.loss.category > 0 and not self.model.vglaw_config().head.categories:
            raise ValueError(
                "loss.category needs the model's category classifier: set model.overrides.categories to one more "
                "than the largest category id"
            )
        if self.data.image_decode == "device" and not self.run.use_gpu:
            raise ValueError(
                "data.image_decode=device decodes on the workers' GPUs: set run.use_gpu=true, or decode in the "
                "ingest (data.image_decode=ingest)"
            )

    @property
    def batch_per_worker(self) -> int:
        return self.optim.global_batch_size // self.run.num_workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        sections = {
            "model": ModelSection,
            "data": DataSection,
            "optim": OptimSection,
            "loss": LossWeights,
            "run": RunSection,
        }
        unknown = set(data) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; expected {sorted(sections)}")
        kwargs = {}
        for name, section in sections.items():
            values = dict(data.get(name) or {})
            known = {f.name for f in dataclasses.fields(section)}
            bad = set(values) - known
            if bad:
                raise ValueError(f"unknown fields in '{name}': {sorted(bad)}")
            kwargs[name] = section(**_numbers_read(name, section, values))
        return cls(**kwargs)


def _numbers_read(name: str, section: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the text of a number turned into the number for a float field.

    YAML 1.1 (PyYAML) reads ``2e-4`` as text: a float needs a dot there (``2.0e-4``). Users write the former.
    """
    floats = {f.name for f in dataclasses.fields(section) if str(f.type).replace(" ", "") in ("float", "float|None")}
    read = dict(values)
    for key in floats & set(values):
        if isinstance(values[key], str):
            try:
                read[key] = float(values[key])
            except ValueError:
                raise ValueError(f"{name}.{key} must be a number, got {values[key]!r}") from None
    return read


EXTENDS_KEY = "extends"  # a config file's top-level key naming the file it builds on


def _merged(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key at every depth; anything else (lists too) replaces."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merged(merged[key], value)
        merged[key] = value
    return merged


def _read_config_file(path: Path, extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The sections of the YAML file at ``path``, merged over those of the file it extends, and so on up the chain.

    Args:
        path: the file to read.
        extended_by: the files read so far that extend ``path``, the one given to ``load_config`` first.
    """
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in extended_by:
        chain = " -> ".join(str(p) for p in (*extended_by, resolved))
        raise ValueError(f"config files extend each other in a cycle: {chain}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must be a mapping of sections, not {type(data).__name__}")
    base = data.pop(EXTENDS_KEY, None)
    # An empty section (a header with every line under it commented out) reads as null: it sets nothing.
    data = {section: {} if fields is None else fields for section, fields in data.items()}
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ValueError(f"'{EXTENDS_KEY}' in {path} must be the path of one YAML file, got {base!r}")
    # NOTE: relative to the extending file, so that a config means the same from any working directory.
    base_path = resolved.parent / base
    if not base_path.is_file():
        raise FileNotFoundError(f"config file {path} extends '{base}', but {base_path} does not exist")
    return _merged(_read_config_file(base_path, (*extended_by, resolved)), data)


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``section.field=value`` overrides.

    A config may start with ``extends: <file>``, a path relative to the config itself: it then holds only what
    differs from that file, which may extend another in turn. Sections merge key by key (lists and other values
    replace), so a file changes the fields it names and keeps the rest of its base. The overrides apply last.

    Values are parsed as YAML, so ``optim.epochs=3``, ``run.use_gpu=true`` and
    ``model.overrides={depth: 2, global_blocks: [1]}`` all work.
    """
    data: dict[str, Any] = {} if path is None else _read_config_file(Path(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2:
            raise ValueError(f"override '{item}' is not of the form section.field=value")
        target = data.setdefault(parts[0], {})
        for part in parts[1:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = yaml.safe_load(raw)
    return TrainConfig.from_dict(data)
