import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesafe.errors import EdgesafeError, RecipeError
from edgesafe.recipe import REGISTRIES, Recipe, load_recipe, recipe_from_dict, registry

from .conftest import RECIPES, ROOT

TINY = ROOT / "recipes" / "tiny-shapes.yaml"


def tiny_data() -> dict:
    return yaml.safe_load(TINY.read_text())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.concepts, "every shipped recipe names concepts to suppress"


def test_defaults_are_filled_and_round_trip():
    recipe = load_recipe(TINY)
    assert recipe.finetune.lower.feature_align == "kept"
    assert recipe.export.parity["fp32"].max_abs == 1e-3
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"budget.ratio": 1.5}, "budget.ratio: Input should be less than or equal to 1 (got 1.5)"),
        ({"budget.ratio": "half"}, "budget.ratio: Input should be a valid number"),
        ({"device": "nokia-3310"}, "device: unknown device 'nokia-3310'"),
        ({"finetune.stepz": 3}, "finetune.stepz: unknown key"),
        ({"budget.metric": "latency", "budget.ms_per_step": 90}, "budget: a latency budget needs exactly one of"),
        ({"concepts": [], "finetune.solver": "kd"}, None),
        ({"concepts": [], "finetune.solver": "two-stage"}, "finetune.solver two-stage needs at least one concept"),
        ({"export.quantize": ["int4-magic"]}, "export.quantize.0: unknown quantizer 'int4-magic'"),
        ({"prune.method": "blocks"}, "prune: method 'blocks' needs 'blocks'"),
        # numbers are finite, in a sane range, and never booleans
        ({"finetune.lr": 1e308}, "finetune.lr: Input should be less than or equal to 1"),
        ({"finetune.lr": 10**40}, "finetune.lr: Input should be less than or equal to 1"),
        ({"finetune.lr": "1e9999"}, "finetune.lr: Input should be a finite number"),
        ({"finetune.lr": True}, "finetune.lr: expected a number, not a boolean"),
        ({"finetune.steps": True}, "finetune.steps: expected a number, not a boolean"),
        ({"finetune.lower.output_kd": float("nan")}, "finetune.lower.output_kd: Input should be a finite number"),
        ({"sampling.guidance_scale": 1e9}, "sampling.guidance_scale: Input should be less than or equal to 100"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        # concept names name files and report sections
        ({"concepts.0.name": "../../etc/passwd"}, "concepts.0.name: String should match pattern"),
        ({"concepts.0.name": " "}, "concepts.0.name: String should match pattern"),
        ({"concepts.0.name": "star\x00\u202e"}, "concepts.0.name: String should match pattern"),
        # settings nothing would read are refused
        ({"data.kind": "hf-dataset"}, "data.kind: unknown data kind 'hf-dataset'; known: zoo, folder, jsonl"),
        ({"export.parity.fp16": {"psnr_db": 30}}, "export.parity.fp16.[key]: unknown parity precision 'fp16'"),
        ({"bench.attacks": ["gcg"]}, "bench.attacks: unknown key"),
        ({"export.quantize": ["openvino-int8"]},
         "export: openvino-int8 is a variant of the openvino target, which export.targets does not list "
         "(onnx, coreml)"),
    ],
)
def test_bad_fields_name_file_path_and_expectation(override, expected):
    if expected is None:  # an empty concept list is allowed for distillation alone
        assert load_recipe(TINY, overrides=override).concepts == []
        return
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, overrides=override)
    message = str(err.value)
    assert message.startswith(str(TINY) + ": ")
    assert expected in message
    assert "\n" not in message


def test_concept_without_prompts_and_prompt_without_target():
    data = tiny_data()
    data["concepts"][0]["prompts"] = []
    with pytest.raises(RecipeError, match=r"concepts\.0\.prompts"):
        recipe_from_dict(data, source="x.yaml")
    data = tiny_data()
    data["concepts"][1]["prompts"].append("a red circle")
    with pytest.raises(RecipeError, match="does not contain the target 'star'"):
        recipe_from_dict(data, source="x.yaml")


def test_a_repeated_key_is_refused_naming_both_lines(tmp_path):
    text = TINY.read_text().replace("seed: 0\n", "seed: 0\nseed: 7\n", 1)
    assert "seed: 7" in text
    (tmp_path / "twice.yaml").write_text(text)
    line = text.splitlines().index("seed: 0") + 1
    with pytest.raises(RecipeError, match=rf"twice.yaml: duplicate key 'seed' at lines {line} and {line + 1}$"):
        load_recipe(tmp_path / "twice.yaml")


def test_setting_one_parity_tolerance_keeps_the_others():
    recipe = load_recipe(TINY, overrides={"export.parity.int8": {"psnr_db": 20.0}})
    assert recipe.export.parity["int8"].psnr_db == 20.0 and recipe.export.parity["fp32"].max_abs == 1e-3


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(bad)


def test_overrides_do_not_touch_the_input():
    data = tiny_data()
    before = copy.deepcopy(data)
    recipe = recipe_from_dict(data, overrides={"finetune.steps": 7})
    assert recipe.finetune.steps == 7
    assert data == before


# --- property test: mutated recipes either load or fail with an EdgesafeError -----------------

_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = [p for p in _paths(tiny_data()) if p]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.sampled_from(ALL_PATHS), st.sampled_from(["delete", "set"]), _values), max_size=4)
)
def test_mutated_recipes_load_or_raise_edgesafe_error(edits):
    data = tiny_data()
    for path, action, value in edits:
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            if action == "delete":
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    try:
        assert isinstance(recipe_from_dict(data, source="mutated.yaml"), Recipe)
    except EdgesafeError as exc:
        assert str(exc).startswith("mutated.yaml: ")


# every registry (edgesafe.recipe.REGISTRIES) -> a recipe field that takes its names, set by an override
REGISTERED_FIELDS = {
    "solver": "finetune.solver", "optimizer": "finetune.optimizer", "lr schedule": "finetune.lr_schedule",
    "upper latents source": "finetune.upper_latents", "unlearning objective": "concepts.0.objective",
    "parameter subset": "concepts.0.params", "importance": "prune.importance",
    "block-removal variant": "prune.blocks", "data kind": "data.kind", "zoo world": "data.name",
    "export target": "export.targets.0", "quantizer": "export.quantize.0", "detector": "concepts.0.detector.name",
    "prompt set": "bench.prompt_sets.0", "parity precision": "export.parity",
}
AS_KEY = {"parity precision": lambda name: {name: {"psnr_db": 30.0}}}  # registries that name a mapping's keys


def _with(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return data


@pytest.mark.parametrize("what", sorted(REGISTRIES))
def test_the_schema_takes_every_registered_name_and_only_those(what):
    """The schema's allowed values are the registry's names: each validates (or fails for another reason
    than its name), and an unknown one is refused with exactly the registry's names listed."""
    base = tiny_data()
    base["export"] = {"targets": ["onnx"], "quantize": ["int8-ort-dynamic"]}
    base["concepts"][0]["detector"] = {"name": "tiny-shapes"}
    base.setdefault("bench", {})["prompt_sets"] = ["direct"]
    field = REGISTERED_FIELDS[what]
    names = list(registry(what))
    assert names
    value = AS_KEY.get(what, lambda name: name)
    for name in names:
        try:
            recipe_from_dict(_with(base, field, value(name)))
        except RecipeError as exc:
            assert "unknown" not in str(exc), exc
    with pytest.raises(RecipeError) as refused:
        recipe_from_dict(_with(base, field, value("no-such-name")))
    assert f"unknown {what} 'no-such-name'; known: {', '.join(names)}" in str(refused.value)


def test_every_registry_has_a_field():
    assert set(REGISTERED_FIELDS) == set(REGISTRIES)


def test_two_stage_erases_for_five_percent_of_the_steps_by_default():
    assert load_recipe(TINY, overrides={"finetune.steps": 600}).finetune.erase_steps == 30
    assert load_recipe(TINY, overrides={"finetune.steps": 600, "finetune.erase_steps": 7}).finetune.erase_steps == 7


def test_the_finetune_key_holds_only_what_the_solver_reads():
    from edgesafe.pipeline import FINETUNE
    from edgesafe.runs import field_values

    def key(**overrides):
        recipe = load_recipe(TINY, overrides=overrides)
        return field_values(recipe, FINETUNE.reads(recipe))

    kd = {"finetune.solver": "kd"}
    assert key(**kd) == key(**kd, **{"finetune.penalty_lambda": 7.0, "finetune.upper_every": 3})
    assert key(**kd) != key(**kd, **{"finetune.lr": 3e-3})
    pen = {"finetune.solver": "bilevel-penalty"}
    assert key(**pen) != key(**pen, **{"finetune.penalty_lambda": 7.0})
    assert key(**pen) == key(**pen, **{"finetune.upper_every": 3})
    # sampled upper latents depend on the sampler's settings; the lower batch's do not
    assert key(**pen) == key(**pen, **{"sampling.steps": 9})
    sampled = {**pen, "finetune.upper_latents": "model-samples"}
    assert key(**sampled) != key(**sampled, **{"sampling.steps": 9})
    # a concept's paraphrases are the bench's, not fine-tuning's
    assert key(**pen) == key(**pen, **{"concepts.0.paraphrases": ["a red circle on a chessboard background"]})


def test_bilevel_penalty_needs_a_lower_level_left_by_the_concepts():
    data = yaml.safe_load(TINY.read_text())
    data["concepts"][1]["params"] = "noxattn"  # with the other's xattn: the whole UNet
    with pytest.raises(RecipeError, match="leave no rest; give every concept the same xattn or noxattn subset"):
        recipe_from_dict(data, overrides={"finetune.solver": "bilevel-penalty"})
    assert recipe_from_dict(data, overrides={"finetune.solver": "bilevel-alternating"}).concepts[1].params == "noxattn"


_line_edits = st.sampled_from(["value", "delete", "repeat", "bytes", "truncate", "indent"])


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(RECIPES),
       edits=st.lists(st.tuples(_line_edits, st.integers(0, 10**6), _values), min_size=1, max_size=3))
def test_mutated_recipe_files_load_or_name_the_file_and_the_field(tmp_path, path, edits):
    """Shipped recipes mutated as text (values of any type, lost or repeated lines, bytes that are not UTF-8, cut
    files, broken indentation): each loads, or fails with one RecipeError naming the file and then the field (or
    the YAML problem), never another exception."""
    import re

    lines = path.read_bytes().splitlines(keepends=True)
    for kind, n, value in edits:
        i = n % len(lines)
        if kind == "value" and b":" in lines[i]:
            key = lines[i].split(b":", 1)[0]
            lines[i] = key + b": " + yaml.safe_dump(value, default_flow_style=True).strip().encode() + b"\n"
        elif kind == "delete":
            del lines[i]
        elif kind == "repeat":
            lines.insert(i, lines[i])
        elif kind == "bytes":
            lines[i] = lines[i][: n % 7] + bytes([0xFF, 0xFE, n % 256]) + lines[i][n % 7:]
        elif kind == "truncate":
            lines[i] = lines[i][: n % max(1, len(lines[i]))]
            del lines[i + 1:]
        elif kind == "indent":
            lines[i] = b"   " + lines[i]
        if not lines:
            lines = [b"\n"]
    mutated = tmp_path / path.name
    mutated.write_bytes(b"".join(lines))
    try:
        assert isinstance(load_recipe(mutated), Recipe)
    except RecipeError as exc:
        message = str(exc)
        assert message.startswith(f"{mutated}: "), message
        rest = message[len(f"{mutated}: "):]
        assert re.match(r"(\(top level\)|[\w.\[\]-]+): |not valid YAML|duplicate key ", rest), message
