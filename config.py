"""Settings: `config_default.ini`, then `./config.ini`, then `--config PATH`, read once.

The result is a frozen `Config` made of one frozen dataclass per INI section. Code reads
`cfg.train.n_batch`, never a ConfigParser. An override file may only name sections and keys
that exist in `config_default.ini`; a wrong section, key or value stops the program with a
one-line `ConfigError` that names the file, section and key.
"""
from __future__ import annotations

import configparser
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent / "config_default.ini"
USER_PATH = Path("config.ini")


class InputError(Exception):
    """Bad input from the user (file, folder, setting). Scripts print it on one line and exit 2."""


class ConfigError(InputError):
    pass


def _choices(*values: str):
    return field(metadata={"choices": values})


def _at_least(low: float):
    return field(metadata={"min": low})


def _between(low: float, high: float):
    return field(metadata={"min": low, "max": high})


@dataclass(frozen=True)
class ModelConfig:
    model: str = _choices("unet", "caunet", "camunet")
    encoder: str = _choices("plain", "resnet18", "resnet34", "resnet101", "vgg16_bn", "densenet121")
    shared_decoder: bool
    pretrained: bool
    weights_path: str | None
    conv_order: str = _choices("cab", "cba", "bca", "bac", "acb", "abc")
    n_filter: int = _at_least(1)
    freeze_encoder_epochs: int = _at_least(0)

    @property
    def heads(self) -> tuple[str, ...]:
        return {"unet": ("semantic",), "caunet": ("semantic", "contour"),
                "camunet": ("semantic", "contour", "marker")}[self.model]


@dataclass(frozen=True)
class LossConfig:
    weight_map: bool
    terms: tuple[str, ...] = _choices("iou", "focal", "bce")
    head_weights: tuple[float, ...]
    focal_gamma: float = _at_least(0)
    focal_alpha: float = _between(0, 1)


@dataclass(frozen=True)
class TrainConfig:
    learn_rate: float = _at_least(0)
    weight_decay: float = _at_least(0)
    lr_schedule: str = _choices("constant", "step", "cosine")
    lr_step: int = _at_least(1)
    lr_gamma: float = _at_least(0)
    warmup: float = _between(0, 1)
    n_epoch: int = _at_least(0)
    n_ckpt_epoch: int = _at_least(1)
    n_cv_epoch: int = _at_least(0)
    n_batch: int = _at_least(1)
    n_worker: int = _at_least(0)
    grad_accum: int = _at_least(1)
    grad_clip: float = _at_least(0)
    ema_decay: float = _between(0, 0.99999)
    amp: str = _choices("auto", "off", "float16", "bfloat16")
    channels_last: bool
    seed: int
    balance_group: bool
    balance_family: bool
    checkpoint_dir: str
    log_dir: str
    sync_bn: bool
    valid_max_images: int = _at_least(0)
    valid_max_minutes: float = _at_least(0)


@dataclass(frozen=True)
class ContourConfig:
    detect: bool
    exclusive: bool
    precise: bool
    adjacent_boundary_only: bool
    thickness: int = _at_least(1)


@dataclass(frozen=True)
class TargetConfig:
    marker_depth: int = _at_least(0)
    weight_contour: float = _at_least(0)
    weight_centre: float = _at_least(0)
    fill_holes: bool


@dataclass(frozen=True)
class PreConfig:
    width: int = _at_least(8)
    rescale: bool
    rescale_min: float = _at_least(0.01)
    rescale_max: float = _at_least(0.01)
    flip: bool
    rotate: bool
    elastic: bool
    elastic_alpha: float = _at_least(0)
    elastic_sigma: float = _at_least(0.1)
    color_jitter: bool
    channel_shuffle: bool
    grayscale: float = _between(0, 1)
    color_invert: bool
    stretch: bool
    clahe: bool
    stain_norm: str = _choices("off", "hematoxylin", "inverted_grey")
    invert_bright: bool
    stain_jitter: float = _between(0, 1)
    resolution_jitter: float = _between(0, 1)
    aspect_jitter: float = _between(1, 4)
    nucleus_texture: float = _between(0, 1)
    nucleus_texture_on: str = _choices("all", "colour")
    background_texture: float = _between(0, 1)
    noise: bool
    noise_sigma: float = _at_least(0)
    size_norm: bool
    nucleus_diameter: float = _between(4, 512)


@dataclass(frozen=True)
class DatasetConfig:
    root: str
    csv_file: str | None
    source: tuple[str, ...]
    major_category: tuple[str, ...]
    sub_category: tuple[str, ...]
    group_column: str
    cv_ratio: float = _between(0, 1)
    split_seed: int
    cache_dir: str | None
    layout: str = _choices("auto", "dsb2018", "im_mask", "timelapse", "label_images")
    split_csv: str | None
    normalize: str = _choices("auto", "percentile", "range")
    percentile_low: float = _between(0, 100)
    percentile_high: float = _between(0, 100)


@dataclass(frozen=True)
class ValidConfig:
    pred_orig_size: bool
    pad_mode: str = _choices("reflect", "replicate", "constant")
    tile_size: int = _at_least(0)
    tile_overlap: int = _at_least(0)
    test_time_augment: bool
    tta_rotate: bool
    ensemble: str = _choices("mean", "vote")
    max_memory_mb: int = _at_least(0)
    diameter_scale: tuple[float, ...] = _between(0.25, 4)
    size_passes: int = _between(1, 10)


@dataclass(frozen=True)
class PostConfig:
    policy: str = _choices("ws", "rw")
    threshold: float = _between(0, 1)
    threshold_edge: float = _between(0, 1)
    threshold_mark: float = _between(0, 1)
    min_object_size: int = _at_least(0)
    fill_holes: bool
    seed_peaks: bool
    semantic_only: bool
    min_confidence: float = _between(0, 1)
    confidence: str = _choices("mean", "median")
    peak_height: float = _between(0, 1)
    seam_width: float = _between(0, 0.5)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "contour": ContourConfig,
    "target": TargetConfig,
    "pre": PreConfig,
    "dataset": DatasetConfig,
    "valid": ValidConfig,
    "post": PostConfig,
}


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    contour: ContourConfig
    target: TargetConfig
    pre: PreConfig
    dataset: DatasetConfig
    valid: ValidConfig
    post: PostConfig
    # (section, key, raw text, file that set it), for settings that differ from the defaults
    overrides: tuple[tuple[str, str, str, str], ...] = ()
    # (section, key, file that set it), for every key an override file names, even at its default
    explicit: tuple[tuple[str, str, str], ...] = ()

    def replace(self, section: str, **values) -> "Config":
        """A copy with some keys of one section changed (values already typed)."""
        new = dataclasses.replace(getattr(self, section), **values)
        _check_ranges(new, section, "<code>")
        return dataclasses.replace(self, **{section: new})

    def as_dict(self) -> dict[str, dict[str, object]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def source_of(self, section: str, key: str) -> str | None:
        """The file that set [section] key explicitly (config.ini or --config), or None."""
        for s, k, src in self.explicit:
            if (s, k) == (section, key):
                return src
        return None

    def describe_overrides(self) -> list[str]:
        """Lines such as '[train] n_batch = 4   (config.ini)' for every non-default setting."""
        return [f"[{s}] {k} = {v}   ({src})" for s, k, v, src in self.overrides]


def _parse_value(kind, text: str, where: str):
    origin = typing.get_origin(kind)
    if kind is bool:
        low = text.strip().lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{where}: expected True or False, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {text!r}") from None
    if kind is str:
        if not text.strip():
            raise ConfigError(f"{where}: must not be empty")
        return text.strip()
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        inner = [a for a in typing.get_args(kind) if a is not type(None)][0]
        return None if not text.strip() else _parse_value(inner, text, where)
    if origin is tuple:
        inner = typing.get_args(kind)[0]
        items = [t.strip() for t in text.split(",") if t.strip()]
        return tuple(_parse_value(inner, t, where) for t in items)
    raise TypeError(f"unsupported setting type {kind!r}")  # a bug in this file, not user input


def check_field(f: dataclasses.Field, value, where: str) -> None:
    """A ConfigError naming `where` when `value` breaks the field's choices or range (its metadata)."""
    for v in value if isinstance(value, tuple) else (value,):
        if "choices" in f.metadata and v not in f.metadata["choices"]:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(f.metadata['choices'])}")
        if "min" in f.metadata and v is not None and v < f.metadata["min"]:
            raise ConfigError(f"{where}: {v} is below the minimum {f.metadata['min']}")
        if "max" in f.metadata and v is not None and v > f.metadata["max"]:
            raise ConfigError(f"{where}: {v} is above the maximum {f.metadata['max']}")


def _check_ranges(obj, section: str, source: str) -> None:
    for f in dataclasses.fields(obj):
        check_field(f, getattr(obj, f.name), f"{source}: [{section}] {f.name}")


def read_ini(path: Path) -> configparser.ConfigParser:
    """One settings file as a parser (keys case-sensitive); ConfigError naming the file when it is
    missing or not INI."""
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    parser.optionxform = str  # keys are case-sensitive, as written in config_default.ini
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path}: not a valid INI file ({first})") from None
    return parser


def load_config(extra: str | os.PathLike | None = None, *, user_path: Path | None = USER_PATH,
                default_path: Path = DEFAULT_PATH) -> Config:
    """Read the defaults, then `user_path` if it exists, then `extra` (which must exist)."""
    raw: dict[str, dict[str, tuple[str, str]]] = {}
    defaults = read_ini(default_path)
    for section, cls in SECTIONS.items():
        if not defaults.has_section(section):
            raise ConfigError(f"{default_path}: section [{section}] is missing")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in names:
            if not defaults.has_option(section, key):
                raise ConfigError(f"{default_path}: [{section}] {key} is missing")
        raw[section] = {k: (v, str(default_path)) for k, v in defaults.items(section) if k in names}

    explicit: dict[tuple[str, str], str] = {}
    files = []
    if user_path is not None and Path(user_path).is_file():
        files.append(Path(user_path))
    if extra is not None:
        files.append(Path(extra))
    for path in files:
        parser = read_ini(path)
        for section in parser.sections():
            if section not in SECTIONS:
                raise ConfigError(f"{path}: unknown section [{section}] "
                                  f"(known: {', '.join(SECTIONS)})")
            for key, value in parser.items(section):
                if key not in raw[section]:
                    raise ConfigError(f"{path}: [{section}] unknown key {key!r}")
                raw[section][key] = (value, str(path))
                explicit[section, key] = str(path)

    built = {}
    overrides = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            text, source = raw[section][f.name]
            where = f"{source}: [{section}] {f.name}"
            values[f.name] = _parse_value(hints[f.name], text, where)
            check_field(f, values[f.name], where)
            if source != str(default_path):
                default_value = _parse_value(hints[f.name], defaults.get(section, f.name), where)
                if values[f.name] != default_value:
                    overrides.append((section, f.name, text.strip(), source))
        built[section] = cls(**values)
    cfg = Config(**built, overrides=tuple(overrides),
                 explicit=tuple((s, k, src) for (s, k), src in explicit.items()))
    if cfg.pre.rescale_min > cfg.pre.rescale_max:
        raise ConfigError(f"{raw['pre']['rescale_min'][1]}: [pre] rescale_min {cfg.pre.rescale_min}"
                          f" is above rescale_max {cfg.pre.rescale_max}")
    if cfg.pre.size_norm and not cfg.valid.pred_orig_size:
        raise ConfigError(f"{raw['pre']['size_norm'][1]}: [pre] size_norm sets the prediction scale itself and "
                          f"needs [valid] pred_orig_size = True (False in {raw['valid']['pred_orig_size'][1]})")
    if cfg.dataset.percentile_low >= cfg.dataset.percentile_high:
        raise ConfigError(f"{raw['dataset']['percentile_low'][1]}: [dataset] percentile_low "
                          f"{cfg.dataset.percentile_low} must be below percentile_high {cfg.dataset.percentile_high}")
    if not cfg.valid.diameter_scale:
        raise ConfigError(f"{raw['valid']['diameter_scale'][1]}: [valid] diameter_scale needs at least one number")
    if len(cfg.loss.head_weights) != 3:
        raise ConfigError(f"{raw['loss']['head_weights'][1]}: [loss] head_weights needs 3 numbers "
                          f"(semantic, contour, marker), got {len(cfg.loss.head_weights)}")
    if cfg.train.balance_group and cfg.train.balance_family:
        raise ConfigError(f"{raw['train']['balance_family'][1]}: [train] balance_family and balance_group "
                          f"(set in {raw['train']['balance_group'][1]}) cannot both be on: choose one")
    return cfg


def _as_text(value) -> str:
    """A typed setting back to the text an INI file would hold for it."""
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    return str(value)


def under_saved(cfg: Config, saved: dict, where: str) -> tuple[Config, list[tuple[str, str, object]]]:
    """The settings `saved` (a `Config.as_dict()` stored with a checkpoint), with the keys the user
    set explicitly (`cfg.explicit`) kept as the user set them.

    Every saved value is checked like a value read from a file (`where` names the checkpoint in
    the error). Keys the saved settings lack (an older checkpoint) keep `cfg`'s value. Returns the
    merged Config and the (section, key, value) list of saved values that differ from `cfg`'s.
    """
    built, taken = {}, []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        ours = getattr(cfg, section)
        theirs = saved.get(section) or {}
        values = {}
        for f in dataclasses.fields(cls):
            value = getattr(ours, f.name)
            if f.name in theirs and cfg.source_of(section, f.name) is None:
                at = f"{where}: saved [{section}] {f.name}"
                value = _parse_value(hints[f.name], _as_text(theirs[f.name]), at)
                check_field(f, value, at)
                if value != getattr(ours, f.name):
                    taken.append((section, f.name, value))
            values[f.name] = value
        built[section] = cls(**values)
    return dataclasses.replace(cfg, **built), taken


def load_and_report(extra: str | os.PathLike | None = None) -> Config:
    """`load_config` for the scripts: also print every setting that differs from the defaults."""
    cfg = load_config(extra)
    for line in cfg.describe_overrides():
        print("setting", line)
    return cfg


def run_main(main, argv=None):
    """Call main(argv); an InputError becomes one line on stderr and exit status 2, and Ctrl-C
    (KeyboardInterrupt) one line and exit status 130. Every output is renamed into place only
    when complete, so an interrupted run leaves whole files or none.

    Under IPython's %run a SystemExit is reported and the kernel keeps running.
    """
    try:
        return main(argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted; files already written are complete, nothing is half-written", file=sys.stderr)
        raise SystemExit(130) from None
