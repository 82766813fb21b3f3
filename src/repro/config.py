"""Structured-config schemas: Hydra checks every `configs/` file and command-line override against these.

A key that is not declared here (a typo such as `model.widht_mult=0.5`) fails when the config is built,
before any work starts. The schemas are registered in Hydra's ConfigStore by `register_configs()`, which
the command-line apps call; YAML files pick their schema with `defaults: [base_<family>, _self_]`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from repro.data.device_decode import DECODES
from repro.data.images import ON_ERROR
from repro.data.transforms import INTERPOLATIONS, PROTOCOLS
from repro.distributed import DEVICE_KINDS
from repro.models import default_resolution, model_options
from repro.models.mobilenet import ACTIVATIONS
from repro.models.resnet import PAD_MODES, SHORTCUTS
from repro.models.weights import WEIGHT_FORMATS
from repro.optim import OPTIMIZERS, SCHEDULES
from repro.scoring import AVERAGES, PRECISIONS


class Choice(str, Enum):
    """One of a few fixed strings: the type of a config option that takes one of them (see `choices`).

    A config built from the schemas refuses any other value, naming the valid ones. A member is its string:
    `==`, `in`, hashing (dict keys), `str`, f-strings (Enum's format follows an overridden `__str__`, Python 3.10
    on), `repr` and `json.dumps` see the plain value, and OmegaConf writes it to YAML as that value. Only pickle
    keeps the Enum: what is saved with torch.save goes through `plain()` first.
    """

    def __str__(self) -> str:
        """The value itself (`bf16`, not `Amp.bf16`)."""
        return str(self.value)

    def __repr__(self) -> str:
        """The value's repr (`'bf16'`), as messages that quote a plain string show it."""
        return repr(self.value)


def choices(name: str, values: Iterable[str]) -> type[Choice]:
    """A Choice type whose members are `values`, each named by its own value (OmegaConf converts a string by member
    name; the functional form also takes values that are Python keywords, such as `raise`)."""
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)  # type: ignore[return-value]


def plain(cfg: DictConfig) -> Any:
    """The resolved config as plain Python values (choices as their strings): what checkpoints store, so that
    `torch.load(..., weights_only=True)` reads them."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


# The options that take one of a few values. Where code implements the choices (a dict of transforms, the
# optimizers), the values come from there; the others are the config's own.
Device = choices("Device", DEVICE_KINDS)  # auto: CUDA when available
Amp = choices("Amp", ("auto", "bf16", "fp16", "off"))  # training autocast
Precision = choices("Precision", PRECISIONS)  # of evaluation: fp32 = full fp32 (TF32 off on CUDA)
Augment = choices("Augment", ("pad_crop", "scale_aug", "inception", "mobilenet", "none"))
LengthUnit = choices("LengthUnit", ("epochs", "steps"))
Resume = choices("Resume", ("never", "auto"))
OnError = choices("OnError", ON_ERROR)  # what an unusable image does
Decode = choices("Decode", DECODES)  # where training JPEGs are decoded
Protocol = choices("Protocol", PROTOCOLS)
Average = choices("Average", AVERAGES)  # of 10-crop / multi-scale scores
Interpolation = choices("Interpolation", INTERPOLATIONS)
WeightFormat = choices("WeightFormat", WEIGHT_FORMATS)
OptimizerName = choices("OptimizerName", OPTIMIZERS)
ScheduleName = choices("ScheduleName", SCHEDULES)
Format = choices("Format", ("table", "json"))  # of a command's printed report
BenchDevice = choices("BenchDevice", ("cpu", "cuda"))
Backend = choices("Backend", ("eager", "compile", "onnxruntime", "executorch"))  # what repro-bench times
ExportFormat = choices("ExportFormat", ("onnx",))


@dataclass
class ModelConfig:
    """Keys every model config has: the zoo name and the input resolution (the resolution multiplier)."""

    name: str = MISSING
    resolution: int = 224  # input side in pixels (224 ImageNet, 32 CIFAR)
    num_classes: int = 1000


def model_schema(name: str, model: str, doc: str) -> type:
    """The config schema of the family of zoo model `model`: ModelConfig's keys, with the model's resolution, plus its
    options typed and defaulted as its constructor declares them (those in MODEL_CHOICES typed as Choices)."""
    fields: list[tuple[str, Any, Any]] = [("resolution", int, field(default=default_resolution(model)))]
    for key, (hint, default) in model_options(model).items():
        kind = MODEL_CHOICES.get(key)
        fields.append((key, kind or hint, field(default=kind(default) if kind else default)))
    schema = make_dataclass(name, fields, bases=(ModelConfig,), namespace={"__doc__": doc})
    schema.__module__ = __name__  # pickled by reference, as a class written here
    return schema


Shortcut = choices("Shortcut", SHORTCUTS)  # ResNet paper §4.1: A, B, C
ShortcutPad = choices("ShortcutPad", PAD_MODES)  # where option A puts its zero channels
Activation = choices("Activation", ACTIVATIONS)
MODEL_CHOICES = {"shortcut": Shortcut, "shortcut_pad": ShortcutPad, "activation": Activation}

PlainNetConfig = model_schema("PlainNetConfig", "plain18", "ImageNet plain-18/34 (paper Table 1, no shortcuts).")
ResNetConfig = model_schema("ResNetConfig", "resnet18", "ImageNet ResNet-18 ... 152 (paper Table 1).")
CifarPlainNetConfig = model_schema("CifarPlainNetConfig", "plain20", "CIFAR plain-20 ... 110 (paper §4.2).")
CifarResNetConfig = model_schema("CifarResNetConfig", "resnet20", "CIFAR ResNet-20 ... 1202 (paper §4.2).")
MobileNetV1Config = model_schema("MobileNetV1Config", "mobilenet_v1", "MobileNetV1 (Howard et al. Tables 4-9).")
MobileNetV2Config = model_schema("MobileNetV2Config", "mobilenet_v2", "MobileNetV2 (Sandler et al. Table 2).")
MODEL_SCHEMAS = {
    "base_plain": PlainNetConfig,
    "base_resnet": ResNetConfig,
    "base_cifar_plain": CifarPlainNetConfig,
    "base_cifar_resnet": CifarResNetConfig,
    "base_mobilenet_v1": MobileNetV1Config,
    "base_mobilenet_v2": MobileNetV2Config,
}


@dataclass
class DataConfig:
    """Keys every dataset has (`configs/data/`)."""

    name: str = MISSING  # imagenet | folder | cifar10 | cifar100 | synthetic
    split: str = "val"  # what the evaluator reads
    num_classes: Any = 1000  # the model's class count follows it (folder: null = one per class folder)
    batch_size: int = 256  # images per batch per process (ten_crop puts 10 views of each through the net)
    num_workers: int = 8  # loader processes per GPU process
    on_error: OnError = OnError("raise")  # what an unusable image does (skipped ones are counted)
    limit: Any = None  # use at most N images of each split (a seeded sample): quick runs and smoke tests
    decode: Decode = Decode("cpu")  # training JPEGs decoded by the loader workers, or in batches on the GPU (nvJPEG)
    max_pixels: Any = 100_000_000  # larger images (width x height, read from the header) are refused; null = no limit


@dataclass
class FolderDataConfig(DataConfig):
    """ImageNet (class index = sorted 1000 synsets) or any class-folder tree (sorted folder names)."""

    root: Any = None  # holds train/ and val/
    train_dir: Any = None  # default: <root>/train
    val_dir: Any = None  # default: <root>/val


@dataclass
class CifarDataConfig(DataConfig):
    """CIFAR-10/100: torchvision's files or image folders train/<class>/, test/<class>/."""

    root: Any = None
    split: str = "test"
    download: bool = False  # fetch torchvision's files into root (needs the network)
    val_size: int = 5000  # images carved from train for `val` (the paper's 45k/5k)
    split_seed: int = 0
    batch_size: int = 128
    num_workers: int = 2


@dataclass
class SyntheticDataConfig(DataConfig):
    """Random images, for benchmarks and tests."""

    length: int = 256
    image_size: int = 224
    num_workers: int = 0


@dataclass
class DigitsDataConfig(DataConfig):
    """scikit-learn's bundled handwritten digits (1797 real 8x8 scans), upscaled: trains anywhere, offline."""

    split: str = "test"
    image_size: int = 32  # upscaled from 8x8
    test_size: int = 360  # held out for test (and val) with a fixed seed
    split_seed: int = 0
    num_classes: Any = 10
    batch_size: int = 64
    num_workers: int = 0


@dataclass
class CheckpointDataConfig:
    """repro-eval's default `data`: the checkpoint's own data config, each key given here (not null) replacing it."""

    name: str = "checkpoint"
    root: Any = None
    train_dir: Any = None
    val_dir: Any = None
    split: Any = None
    batch_size: Any = None
    num_workers: Any = None
    on_error: OnError | None = None
    limit: Any = None
    download: Any = None


DATA_SCHEMAS = {
    "base_checkpoint": CheckpointDataConfig,
    "base_folder": FolderDataConfig,
    "base_cifar": CifarDataConfig,
    "base_synthetic": SyntheticDataConfig,
    "base_digits": DigitsDataConfig,
}


@dataclass
class OptimizerConfig:
    """The optimizer of a recipe."""

    name: OptimizerName = OptimizerName("sgd")  # rmsprop_tf: TF's RMSProp (epsilon inside the root, timm's RMSpropTF)
    lr: float = 0.1  # at recipe.lr_batch_size; scaled linearly with the global batch when recipe.scale_lr
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_decay_depthwise: bool = False  # no weight decay on depthwise filters (MobileNet)
    no_decay_bn_bias: bool = False  # no weight decay on BN scales/shifts and biases
    alpha: float = 0.9  # rmsprop_tf: decay of the squared-gradient average
    eps: float = 1.0  # rmsprop_tf: epsilon (inside the square root), slim's default 1.0


@dataclass
class ScheduleConfig:
    """The learning-rate schedule, in the recipe's own length units (`recipe.length_unit`).

    A shortened run (trainer.max_epochs / trainer.max_steps) stretches milestones and decay steps in proportion.
    """

    name: ScheduleName = ScheduleName("multistep")
    milestones: list[float] = field(default_factory=list)  # multistep: where lr is multiplied by gamma
    gamma: float = 0.1  # multistep / plateau factor; exponential: factor per `every`
    every: float = 1.0  # exponential: decay step (staircase)
    patience: int = 5  # plateau: evaluations without improvement of the validation error before decaying
    min_lr: float = 0.0
    warmup_lr: float = 0.0  # >0: start at this lr ...
    warmup_until_train_err: float = 0.0  # ... until the running training error (%) falls below this
    warmup_max_steps: int = 0  # ... or this many steps have passed (ResNet-110: 0.01 until < 80%, ~400 it)


@dataclass
class AugmentConfig:
    """Training augmentation (uint8, in the loader) and device-side color augmentation."""

    train: Augment = Augment("pad_crop")  # pad_crop (CIFAR) | scale_aug (ResNet §3.4) | inception | mobilenet | none
    crop: Any = "auto"  # training crop side: auto = the model's resolution
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # inception/mobilenet: crop area fraction
    min_size: int = 256  # scale_aug: shorter side range
    max_size: int = 480
    pad: int = 4  # pad_crop
    flip: bool = True
    lighting: float = 0.0  # AlexNet PCA lighting std (ResNet: 0.1)
    color_jitter: float = 0.0  # fb.resnet.torch: brightness, contrast, saturation factors in 1 +- this (0.4)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # pixels in [0, 1]
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    per_pixel_mean: bool = False  # subtract the training split's mean image (ResNet CIFAR), no std


@dataclass
class RecipeConfig:
    """A paper's training recipe: optimizer + schedule + augmentation + length + batch."""

    name: str = MISSING
    batch_size: int = 256  # the global batch: images per optimizer step, summed over processes and grad_accum
    lr_batch_size: Any = None  # the global batch the paper quotes optimizer.lr (and a length in steps) for;
    #                            null = batch_size. Recipes set it, so that overriding batch_size rescales
    scale_lr: bool = True  # lr x batch_size / lr_batch_size
    length: float = 90  # run length in length_unit
    length_unit: LengthUnit = LengthUnit("epochs")
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # >0: keep an exponential moving average of the weights, evaluated too
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainerConfig:
    """How a run executes (`configs/trainer/`): device, precision, length overrides, logging, checkpoints."""

    device: Device = Device("auto")
    max_epochs: Any = None  # shorten (or lengthen) the recipe to this many epochs
    max_steps: Any = None  # ... or to this many optimizer steps (wins over max_epochs)
    grad_accum: int = 1  # micro-batches per optimizer step (keeps the paper's batch on fewer GPUs)
    amp: Amp = Amp("auto")  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    channels_last: bool = True  # model and batches in NHWC (CUDA and CPU)
    compile: bool = False  # torch.compile the model
    cudnn_benchmark: bool = True
    sync_bn: bool = False  # SyncBatchNorm across ranks
    eval_every: int = 1  # validate every N epochs (and at the end)
    checkpoint_every: int = 500  # write checkpoints/last.pt every N optimizer steps (and at the end)
    checkpoint_every_s: Any = 1800  # ... and every N seconds (checked at log steps under torchrun); null = off
    eval_precision: Precision = Precision("fp32")  # of the evaluations (per epoch and final); fp32: TF32 off
    log_every: int = 20  # TensorBoard train scalars every N steps
    dist_timeout_s: float = 1800  # torchrun: a collective waiting longer on a stopped or hung rank stops the run
    progress: bool = True  # progress bars with throughput


@dataclass
class TrainConfig:
    """`repro-train`: model + data + recipe + trainer."""

    model: Any = MISSING
    data: Any = MISSING
    recipe: RecipeConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    name: str = MISSING  # the run dir's name under outputs/train/ (default: a timestamp)
    seed: int = 0
    resume: Resume = Resume("never")  # auto: continue this run dir from checkpoints/last.pt, if any
    train_split: str = "train"
    val_split: Any = "val"  # the split evaluated after each epoch (curves, best.pt); null = none
    test_split: Any = None  # also evaluated at the end (e.g. CIFAR test); null = none
    final_protocols: list[Protocol] = field(default_factory=lambda: [Protocol("center")])  # of the final evaluation


@dataclass
class WeightsConfig:
    """Which weights to evaluate and how they are stored."""

    path: Any = None  # a checkpoint file
    format: WeightFormat = WeightFormat("repro")


@dataclass
class EvalOptions:
    """The test protocols (`repro-eval eval.*`)."""

    protocols: list[Protocol] = field(default_factory=lambda: [Protocol("center")])
    average: Average = Average("softmax")  # softmax (authors' Caffe models) | logits (fb.resnet.torch)
    resize: Any = "auto"  # shorter side before cropping; auto = resolution / 0.875 (CIFAR: none); null = none
    crop: Any = "auto"  # auto = the model's resolution (CIFAR: none); null = the whole image
    scales: list[int] = field(default_factory=lambda: [224, 256, 384, 480, 640])  # multi_scale shorter sides
    flip: bool = True  # multi_scale: average each scale with its horizontal flip
    interpolation: Interpolation = Interpolation("bilinear")
    antialias: bool = True  # torchvision's preset
    central_fraction: float = 0.875  # slim_center: central fraction of each side, then resized to crop x crop
    bn_recalibrate: int = 0  # >0: also evaluate after recomputing BN statistics over this many training images
    bn_recalibrate_split: str = "train"  # the split those images come from
    save_predictions: bool = False  # also write predictions.csv
    device: Device = Device("auto")
    amp: bool = False  # bf16 autocast on CUDA (the same as precision=bf16)
    precision: Precision | None = None  # null = fp32 (TF32 off), or bf16 with eval.amp=true
    progress: bool = True


@dataclass
class EvalConfig:
    """`repro-eval`: a checkpoint under the papers' test protocols."""

    model: Any = None  # null: taken from a repro checkpoint
    data: Any = None  # data=checkpoint (the default): the checkpoint's own, keys given on the command line replacing
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    eval: EvalOptions = field(default_factory=EvalOptions)


@dataclass
class SummaryConfig:
    """`repro-summary`: complexity of one model."""

    model: Any = MISSING
    format: Format = Format("table")


@dataclass
class TablesConfig:
    """`repro-tables`: the papers' tables and figures from run directories."""

    runs: Any = None  # run dir(s), folder(s) or glob(s); null: results/runs/, outputs/, multirun/ where they exist
    out: Any = None  # where tables and figures go; null: this command's run dir
    tables: Any = None  # table ids to write; null: all
    figures: bool = True  # also draw out/figures/*.png
    fig7_images: int = 1000  # images per checkpoint for ResNet Fig. 7's response stds
    readme: Any = None  # a README whose "Reproduction status" section (between its markers) is regenerated
    bench: Any = "results/bench/latency.json"  # repro-bench JSON: MobileNetV2 Table 4's measured latency


@dataclass
class AnalyzeConfig:
    """`repro-analyze`: ResNet Fig. 7's layer-response stds of given checkpoints."""

    checkpoints: Any = None  # one path or a list
    data_root: Any = None  # overrides the checkpoints' data.root
    split: Any = None  # null: each run's test split, else its val split
    images: Any = 1000  # per checkpoint; null: all
    device: Device = Device("auto")
    format: Format = Format("table")


@dataclass
class SelfcheckConfig:
    """`repro-selfcheck`: is this machine ready? PASS / FAIL / SKIP per check."""

    format: Format = Format("table")
    device: Device = Device("auto")  # the device checks run on (CUDA checks SKIP on a CPU)
    checks: Any = None  # groups to run (environment, collectives, training, ...); null: all
    train_steps: int = 30  # optimizer steps of each training check
    cpu_batch: int = 32  # ResNet-20 batch of the digits checks (CPU training, parity, resume)
    gpu_batch: int = 64  # ResNet-50 batch of the GPU training and throughput checks
    throughput_steps: int = 10  # timed steps (and loader batches) of the throughput check
    resume_steps: int = 6  # steps of the resume check (stopped halfway)


@dataclass
class ExportOptions:
    """`repro-export export.*`: the format, the output file and the self-check."""

    format: ExportFormat = ExportFormat("onnx")  # onnx
    out: Any = None  # the file to write (e.g. mobilenet_v2.onnx); its folder must exist
    opset: Any = None  # ONNX opset; null = the exporter's default
    check_images: Any = "auto"  # folder of images for the self-check; auto = ../shared/data (ImageNet or CIFAR)
    check_count: int = 32  # images of that folder (spread evenly over its sorted files); random inputs when absent
    tolerance: float = 1e-4  # max |ONNX Runtime logits - PyTorch logits| accepted


@dataclass
class ExportConfig:
    """`repro-export`: a zoo model (trained or random weights) to a deployable file, checked against PyTorch."""

    model: Any = None  # null: taken from a repro checkpoint
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    export: ExportOptions = field(default_factory=ExportOptions)


@dataclass
class BenchOptions:
    """`repro-bench bench.*`: what is timed and how."""

    backends: list[Backend] = field(default_factory=lambda: [Backend("eager"), Backend("onnxruntime")])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    threads: int = 1  # torch intra/inter-op threads and ONNX Runtime / ExecuTorch threads, set alike
    device: BenchDevice = BenchDevice("cpu")
    warmup: int = 10  # untimed calls first (oneDNN / ORT build their kernels on the first calls)
    iters: int = 50  # timed calls; latency_ms is their median, latency_ms_p90 the 90th percentile
    channels_last: bool = True  # eager and compile: NHWC memory format (as repro-eval; faster on the CPU)


@dataclass
class BenchConfig:
    """`repro-bench`: latency and throughput of one model per backend and batch size."""

    model: Any = None  # null: taken from a repro checkpoint
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    bench: BenchOptions = field(default_factory=BenchOptions)
    format: Format = Format("table")


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for name, node in MODEL_SCHEMAS.items():
        cs.store(group="model", name=name, node=node)
    for name, node in DATA_SCHEMAS.items():
        cs.store(group="data", name=name, node=node)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(group="recipe", name="base_recipe", node=RecipeConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="summary_schema", node=SummaryConfig)
    cs.store(name="tables_schema", node=TablesConfig)
    cs.store(name="analyze_schema", node=AnalyzeConfig)
    cs.store(name="selfcheck_schema", node=SelfcheckConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="bench_schema", node=BenchConfig)
