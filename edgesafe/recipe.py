"""Recipes: one YAML file names the model, the device budget, the concepts to suppress and the data.

``load_recipe`` validates a file once, at the edge, and returns a frozen :class:`Recipe` with
every default filled in; ``Recipe.to_yaml`` writes that resolved form back (into the run folder).
Every problem becomes one :class:`RecipeError` line naming the file, the field path and what was
expected. Relative paths inside a recipe are taken from the current working directory.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .devices import load_profiles
from .errors import RecipeError, first_line

MAX_STEPS = 10_000_000
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
"""Recipe and concept names, which name folders, files and report sections."""


class _Section(BaseModel):
    """A recipe section: unknown keys refused, numbers finite (every numeric field also has a sane range), and a
    boolean never read as a number."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and bool not in _accepted_types(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a {_kind(cls.model_fields[info.field_name].annotation)}, not a boolean")
        return value


def _accepted_types(annotation: Any) -> set[Any]:
    """The plain types an annotation accepts (through ``X | None`` and ``Annotated``)."""
    if get_origin(annotation) in (Union, UnionType):
        return set().union(*(_accepted_types(a) for a in get_args(annotation)))
    if get_origin(annotation) is Annotated:
        return _accepted_types(get_args(annotation)[0])
    return {get_origin(annotation) or annotation}


def _kind(annotation: Any) -> str:
    types = _accepted_types(annotation) - {type(None)}
    return "number" if types <= {int, float} else " or ".join(sorted(getattr(t, "__name__", str(t)) for t in types))


REGISTRIES: dict[str, tuple[str, str]] = {
    "solver": ("edgesafe.finetune.solvers", "SOLVERS"),
    "optimizer": ("edgesafe.finetune.optimizers", "OPTIMIZERS"),
    "lr schedule": ("edgesafe.finetune.solvers", "LR_SCHEDULES"),
    "upper latents source": ("edgesafe.finetune.upper", "UPPER_LATENTS"),
    "unlearning objective": ("edgesafe.finetune.unlearn", "OBJECTIVES"),
    "parameter subset": ("edgesafe.finetune.unlearn", "PARAMETER_SUBSETS"),
    "importance": ("edgesafe.prune.width", "IMPORTANCE"),
    "block-removal variant": ("edgesafe.prune.blocks", "VARIANTS"),
    "data kind": ("edgesafe.data", "DATA_KINDS"),
    "zoo world": ("edgesafe.zoo", "WORLDS"),
    "export target": ("edgesafe.export.targets", "TARGETS"),
    "quantizer": ("edgesafe.export.targets", "QUANTIZERS"),
    "parity precision": ("edgesafe.export.targets", "PRECISIONS"),
    "detector": ("edgesafe.bench.detectors", "DETECTORS"),
    "prompt set": ("edgesafe.bench.prompts", "PROMPT_SETS"),
}
"""Where the names of each extension point live (module, attribute): the one place a name is defined. The
recipe's fields take their allowed values from these, imported when a recipe is validated."""


def registry(what: str):
    """The registry of ``what`` (a key of :data:`REGISTRIES`)."""
    module, attr = REGISTRIES[what]
    return getattr(importlib.import_module(module), attr)


def _registered(name: str, what: str) -> str:
    """``name`` if the registry of ``what`` has it; else the error a recipe field shows, listing the known names."""
    known = registry(what)
    if name not in known:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(known)}")
    return name


def Registered(what: str) -> Any:  # noqa: N802 (a type factory, used as a type)
    """A recipe field holding a name from the registry of ``what``."""
    return Annotated[str, AfterValidator(lambda name: _registered(name, what))]


class ModelSpec(_Section):
    """The teacher: ``zoo:NAME`` or a local diffusers folder (SD 1.x / 2.x layout)."""

    source: str = Field(min_length=1)
    evaluator: str | None = None
    """Quality/safety evaluator for the zoo world (``zoo:NAME``); None for real models."""


class Budget(_Section):
    """What the pruned UNet must fit: a fraction of the teacher's params/MACs, or ms per step on the device."""

    metric: Literal["params", "macs", "latency"] = "params"
    ratio: float | None = Field(default=None, gt=0, le=1)
    ms_per_step: float | None = Field(default=None, gt=0, le=1e6)
    tolerance: float = Field(default=0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_target(self) -> Budget:
        if self.metric in ("params", "macs") and self.ratio is None:
            raise ValueError(f"a {self.metric} budget needs 'ratio' (fraction of the teacher, in (0, 1])")
        if self.metric == "latency" and (self.ratio is None) == (self.ms_per_step is None):
            raise ValueError("a latency budget needs exactly one of 'ms_per_step' or 'ratio'")
        return self


class PruneSpec(_Section):
    method: Literal["width", "blocks", "width+blocks"] = "width"
    importance: Registered("importance") = "magnitude"
    blocks: Registered("block-removal variant") | None = None
    round_to: int | None = Field(default=None, ge=1, le=1024)
    """Channel multiple; None takes the device profile's."""
    calibration_batches: int = Field(default=4, ge=1, le=10_000)

    @model_validator(mode="after")
    def _blocks_named(self) -> PruneSpec:
        if "blocks" in self.method and self.blocks is None:
            raise ValueError(f"method {self.method!r} needs 'blocks' (base, small or tiny)")
        return self


class DetectorSpec(_Section):
    """How the bench sees a concept in an image: a name from ``bench.detectors.DETECTORS`` and its settings."""

    name: Registered("detector")
    label: str | None = None
    """What to detect, in the detector's terms (see ``bench.detectors``); each has a default."""
    model: str | None = None
    """Local weights folder (``clip``; ``tiny-shapes`` defaults to ``model.evaluator``)."""
    threshold: float | None = Field(default=None, gt=0, lt=1)
    neutral: str = "a picture"
    """``clip``: the neutral description the concept's description competes with."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class Concept(_Section):
    """An unwanted concept: its prompts for unlearning, and held-out paraphrases for evaluation."""

    name: str = Field(min_length=1, max_length=64, pattern=SAFE_NAME)
    """Names files and report sections: letters, digits, ``.``, ``_`` and ``-``."""
    target: str = Field(min_length=1)
    """The words that name the concept inside its prompts (replaced by ``anchor`` for ablation)."""
    objective: Registered("unlearning objective") = "esd"
    prompts: list[str] = Field(min_length=1)
    paraphrases: list[str] = Field(default_factory=list)
    anchor: str | None = None
    """What ``target`` becomes in the anchor prompts (``ablation``); ESD guides away instead."""
    eta: float = Field(default=1.0, gt=0, le=100)
    """ESD negative-guidance strength."""
    params: Registered("parameter subset") = "xattn"
    detector: DetectorSpec | None = None
    """How the bench measures the concept's rate; without one, its safety figures say "unavailable"."""

    @field_validator("prompts", "paraphrases")
    @classmethod
    def _no_blank(cls, prompts: list[str]) -> list[str]:
        if any(not p.strip() for p in prompts):
            raise ValueError("prompts must not be blank")
        return prompts

    @model_validator(mode="after")
    def _anchor_for_ablation(self) -> Concept:
        if self.objective == "ablation" and not self.anchor:
            raise ValueError("an 'ablation' concept needs an 'anchor'")
        missing = [p for p in self.prompts if self.target.lower() not in p.lower()]
        if missing:
            raise ValueError(f"prompt {missing[0]!r} does not contain the target {self.target!r}")
        return self


class DataSpec(_Section):
    """Fine-tuning images: a zoo world's generator, an image folder with captions, or a JSONL file."""

    kind: Registered("data kind") = "zoo"
    name: Registered("zoo world") | None = None
    path: str | None = None
    resolution: int | None = Field(default=None, ge=8, le=8192)
    exclude_concepts: bool = True
    """Drop every sample whose caption names an unwanted concept (the paper's setting)."""

    @model_validator(mode="after")
    def _source_named(self) -> DataSpec:
        if self.kind == "zoo" and not self.name:
            raise ValueError("zoo data needs 'name'")
        if self.kind != "zoo" and not self.path:
            raise ValueError(f"{self.kind} data needs 'path'")
        return self


class LowerLevel(_Section):
    """L_ft: denoising loss + output distillation + feature distillation."""

    denoise: float = Field(default=1.0, ge=0, le=1000)
    output_kd: float = Field(default=1.0, ge=0, le=1000)
    feature_kd: float = Field(default=1.0, ge=0, le=1000)
    feature_align: Literal["kept", "projection"] = "kept"
    min_snr_gamma: float | None = Field(default=None, gt=0, le=1000)


class FinetuneSpec(_Section):
    """Fine-tuning: the solver (``finetune.solvers.SOLVERS``) and its settings. Each solver reads the shared
    settings and its own (``Solver.reads``); see docs/architecture.md for what each optimises."""

    solver: Registered("solver") = "bilevel-alternating"
    steps: int = Field(default=2000, ge=1, le=MAX_STEPS)
    """Lower-level (distillation) steps."""
    batch_size: int = Field(default=32, ge=1, le=65_536)
    lr: float = Field(default=1e-4, gt=0, le=1)
    lr_schedule: Registered("lr schedule") = "constant"
    """Every optimizer's learning rate over the run (two-stage: over its distillation steps)."""
    lr_warmup_steps: int = Field(default=0, ge=0, le=MAX_STEPS)
    upper_lr: float = Field(default=5e-4, gt=0, le=1)
    """The concepts' subsets' optimizer (two-stage, bilevel-alternating, bilevel-penalty)."""
    lower: LowerLevel = LowerLevel()
    upper_latents: Registered("upper latents source") = "lower-batch"
    """Where the unlearning loss's noisy latents come from (``finetune.upper.UPPER_LATENTS``)."""
    erase_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    """two-stage: erase steps after the ``steps`` lower steps; default 5% of ``steps``."""
    erase_against: Literal["teacher", "distilled"] = "teacher"
    """two-stage: the unlearning targets come from the teacher, or (ESD on the distilled checkpoint, as the
    paper's authors ran their baseline) from a frozen copy of the student as distillation left it."""
    upper_every: int = Field(default=10, ge=1, le=MAX_STEPS)
    """bilevel-alternating: an upper step every N iterations."""
    penalty_lambda: float = Field(default=1.0, gt=0, le=1e6)
    """bilevel-penalty: lambda at the first step."""
    penalty_growth: float = Field(default=10.0, ge=1, le=1e6)
    """bilevel-penalty: lambda grows linearly to ``penalty_lambda * penalty_growth`` at the last step."""
    inner_steps: int = Field(default=1, ge=1, le=1000)
    """bilevel-penalty: phi's steps on the lower level per iteration."""
    erase_ratio: float = Field(default=1.0, gt=0, le=100)
    """constrained: each concept's unlearning loss (the student's distance from the objective's target on the
    concept prompts) must fall under this multiple of the student's distance from the teacher's prediction on
    the same batch: 1 is halfway, lower erases more, down to what the student can reach through the concepts'
    ``params`` while it distils (the stage's summary says when a run ends above its bound)."""
    dual_lr: float = Field(default=1.0, gt=0, le=1e6)
    """constrained: the multipliers' dual-ascent step."""
    checkpoint_every: int = Field(default=200, ge=1, le=MAX_STEPS)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast the forward passes and hold the frozen teacher in this precision (the student keeps fp32
    weights; fp16 scales the loss). fp16 needs a GPU."""
    gradient_checkpointing: bool = False
    """Recompute the student's block activations in the backward pass instead of keeping them."""
    optimizer: Registered("optimizer") = "adamw"
    """A name from ``finetune.optimizers.OPTIMIZERS``: ``adamw``, or ``adamw-8bit`` (bitsandbytes), which
    keeps 2 bytes of optimizer state per parameter instead of 8."""

    @model_validator(mode="before")
    @classmethod
    def _erase_steps(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("erase_steps") is None and isinstance(data.get("steps", 2000), int):
            data = {**data, "erase_steps": max(1, round(data.get("steps", 2000) / 20))}
        return data


class Tolerance(_Section):
    max_abs: float | None = Field(default=None, gt=0, le=1e6)
    psnr_db: float | None = Field(default=None, gt=0, le=200)


DEFAULT_PARITY = {"fp32": Tolerance(max_abs=1e-3, psnr_db=40.0), "int8": Tolerance(psnr_db=25.0)}


class ExportSpec(_Section):
    targets: list[Registered("export target")] = Field(default_factory=lambda: ["onnx"])
    quantize: list[Registered("quantizer")] = Field(default_factory=list)
    opset: int = Field(default=17, ge=14, le=30)
    parity: dict[Registered("parity precision"), Tolerance] = Field(default_factory=lambda: dict(DEFAULT_PARITY))
    """How close to PyTorch each precision's artefacts must be (``export.targets.PRECISIONS``: the precisions a
    target's artefacts are compared at; Core ML packages predict only on macOS and are validated as specs). A
    precision the recipe leaves out keeps its default."""

    mixed_psnr_db: float = Field(default=30.0, gt=0, le=200)
    """The image PSNR that the mixed-precision variants keep: ``int8-mixed`` against the fp32 ONNX export (it
    leaves the fewest layers in fp32 that reach it), ``coreml-mixed`` against the fp16 Core ML export (the
    smallest mix of 4-, 6- and 8-bit palettized and fp16 weights that reaches it)."""

    @model_validator(mode="after")
    def _variants_of_listed_targets(self) -> ExportSpec:
        of_target = registry("quantizer") if self.quantize else {}
        for name in self.quantize:
            if of_target[name] not in self.targets:
                raise ValueError(f"{name} is a variant of the {of_target[name]} target, which export.targets does "
                                 f"not list ({', '.join(self.targets)})")
        return self

    @field_validator("parity")
    @classmethod
    def _defaults_kept(cls, parity: dict[str, Tolerance]) -> dict[str, Tolerance]:
        return {**DEFAULT_PARITY, **parity}


class SamplingSpec(_Section):
    """How images are sampled wherever a stage generates them: export parity and calibration, the bench's images
    and timings, and fine-tuning's sampled unlearning latents."""

    steps: int = Field(default=20, ge=1, le=1000)
    """Denoising steps (the pipeline's scheduler)."""
    guidance_scale: float = Field(default=5.0, ge=0, le=100)
    """Classifier-free guidance scale."""


class BenchSpec(_Section):
    """The bench stage: how many images and timings stand behind each figure of the report."""

    seeds: int = Field(default=4, ge=1, le=10_000)
    """Seeds per prompt of the quality (wanted) prompt set."""
    safety_seeds: int = Field(default=8, ge=1, le=10_000)
    """Seeds per prompt of each concept prompt set (more images, a narrower interval)."""
    prompt_sets: list[Registered("prompt set")] = Field(default_factory=lambda: ["direct", "paraphrase"])
    """Concept prompt sets, names from ``bench.prompts.PROMPT_SETS``."""
    wanted_prompts: int | None = Field(default=None, ge=1, le=100_000)
    """How many wanted prompts, spread through the data's captions (default 32) or through a zoo world's
    prompts covering its caption distribution (default: all of them)."""
    latency_rounds: int = Field(default=2, ge=1, le=1000)
    """Rounds of latency: each round times every subject once, each in a fresh process."""
    latency_repeats: int = Field(default=3, ge=1, le=10_000)
    """Timed calls of each component per round (after one warm-up call)."""
    erasure_tolerance: float = Field(default=0.02, ge=0, le=1)
    """A stage whose concept rate exceeds the fine-tuned student's by more than this is flagged."""
    clip_model: str | None = None
    """A local CLIP folder for CLIP score and CLIP-feature FID of real models; without it they are unavailable."""

    @field_validator("prompt_sets")
    @classmethod
    def _unique_sets(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("prompt sets must not repeat")
        return names


class CheckSpec(_Section):
    """The tolerances ``edgesafe check --write-baseline`` turns a report into gates with."""

    max_concept_rate: float = Field(default=0.05, ge=0, le=1)
    """Ceiling of every concept rate (a gate allows the report's own rate when it is higher)."""
    concept_rate_slack: float = Field(default=0.05, ge=0, le=1)
    """How far a concept rate may rise above the report's before the gate fails."""
    max_prompt_accuracy_drop: float = Field(default=0.05, ge=0, le=1)
    max_fid_increase: float = Field(default=0.10, ge=0, le=100)
    """Fraction of the report's FID."""
    max_psnr_drop_db: float = Field(default=1.0, ge=0, le=200)
    """Fidelity to the teacher (image PSNR at the same seeds)."""
    max_speed_regression: float = Field(default=0.25, ge=0, lt=1)
    """Fraction of the speed-up over the teacher (measured side by side, so host noise cancels)."""


class Recipe(_Section):
    name: str = Field(min_length=1, max_length=64, pattern=SAFE_NAME)
    description: str = ""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    model: ModelSpec
    device: str
    budget: Budget
    prune: PruneSpec = PruneSpec()
    concepts: list[Concept] = Field(default_factory=list)
    data: DataSpec
    finetune: FinetuneSpec = FinetuneSpec()
    export: ExportSpec = ExportSpec()
    sampling: SamplingSpec = SamplingSpec()
    bench: BenchSpec = BenchSpec()
    check: CheckSpec = CheckSpec()

    @field_validator("device")
    @classmethod
    def _known_device(cls, name: str) -> str:
        known = load_profiles()
        if name not in known:
            raise ValueError(f"unknown device {name!r}; known: {', '.join(known)}")
        return name

    @model_validator(mode="after")
    def _solver_fits_the_concepts(self) -> Recipe:
        from .finetune.solvers import SOLVERS

        problem = SOLVERS[self.finetune.solver].problem(self.concepts)
        if problem:
            raise ValueError(f"finetune.solver {self.finetune.solver} {problem}")
        return self

    @field_validator("concepts")
    @classmethod
    def _unique_concepts(cls, concepts: list[Concept]) -> list[Concept]:
        names = [c.name for c in concepts]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"concept names must be unique; repeated: {', '.join(sorted(dup))}")
        return concepts

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _format_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required field missing"
    elif "input" in err and not isinstance(err["input"], dict | list) and repr(err["input"]) not in msg:
        msg += f" (got {err['input']!r})"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {path}: {msg}{more}"


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` with each dotted key set (``finetune.lr``; a number indexes a list: ``concepts.0.eta``)."""
    def slot(node: Any, key: str, dotted: str) -> tuple[Any, Any]:
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(f"{source}: {dotted}: {key!r} is not an index of the list's {len(node)} items")
            return node, int(key)
        if not isinstance(node, dict):
            raise RecipeError(f"{source}: {dotted}: cannot set a key inside a non-mapping")
        return node, key

    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            container, k = slot(node, key, dotted)
            if isinstance(container, dict) and container.get(k) is None:
                container[k] = {}
            node = container[k]
        container, k = slot(node, leaf, dotted)
        container[k] = value
    return data


def recipe_from_dict(data: Any, *, source: str = "<recipe>", overrides: dict[str, Any] | None = None) -> Recipe:
    """Validate an already-parsed recipe; every problem is a :class:`RecipeError`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: (top level): expected a mapping of recipe sections, got {type(data).__name__}")
    data = _apply_overrides(copy.deepcopy(data), overrides or {}, source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_error(source, exc)) from None


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base constructor says so
                break
            if first != line:
                raise _DuplicateKey(f"duplicate key {key!r} at lines {first} and {line}")
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path, *, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, validate and resolve a recipe file.

    Raises:
        RecipeError: a missing file, invalid YAML (a repeated key included), or a recipe the schema refuses; one
            line naming the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except _DuplicateKey as exc:
        raise RecipeError(f"{path}: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid YAML ({first_line(exc)})") from None
    return recipe_from_dict(data, source=str(path), overrides=overrides)
