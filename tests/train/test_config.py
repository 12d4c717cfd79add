"""Config tree: defaults, dotted overrides, type/key errors, YAML recipes, save/load round trip."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from pipelines.spec import AugmentSpec
from train.config import (
    CHOICES,
    RANGES,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    Range,
    TrainConfig,
    build_config,
    load_config,
    load_yaml,
    parse_overrides,
    save_config,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "train" / "configs").glob("*.yaml"))
SECTIONS = {
    "data": DataConfig, "augment": AugmentSpec, "model": ModelConfig, "loss": LossConfig,
    "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig,
}


def _leaves(cfg) -> dict:
    """{'section.key': value} for every leaf of a Config, read straight off the dataclasses."""
    return {f"{s}.{f.name}": getattr(getattr(cfg, s), f.name)
            for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))}


def _one_line_error(overrides=None, path=None, tree=None) -> str:
    with pytest.raises(ConfigError) as info:
        if tree is not None:
            build_config(tree)
        else:
            load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_build_to_the_dataclass_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert [f.name for f in dataclasses.fields(Config)] == list(SECTIONS)
    assert build_config({}) == Config()
    for name, cls in SECTIONS.items():
        assert getattr(cfg, name) == cls()  # each section is its own dataclass's defaults
    assert isinstance(cfg.augment, AugmentSpec)


# --- overrides --------------------------------------------------------------------------------

OVERRIDES = [
    # (dotted key, raw CLI value, expected value, expected type)
    ("optim.lr", "0.5", 0.5, float),
    ("optim.lr", "2", 2.0, float),  # int promoted to float
    ("optim.epochs", "7", 7, int),
    ("model.arch", "resnet18", "resnet18", str),
    ("model.small_stem", "true", True, bool),
    ("model.width", "1", 1.0, float),
    ("train.knn_every", "-1", -1, int),
    ("data.backend", "ffcv", "ffcv", str),
    ("augment.crop_area", "[0.2, 1]", (0.2, 1.0), tuple),  # list -> tuple, ints promoted
    ("augment.mean", "[0.1, 0.2, 0.3]", (0.1, 0.2, 0.3), tuple),
    ("eval.l2_grid", "[1, 0.5, 0.25]", (1.0, 0.5, 0.25), tuple),  # variable-length tuple
]


@pytest.mark.parametrize("form", ["equals", "space"])
@pytest.mark.parametrize("key,raw,want,typ", OVERRIDES, ids=[f"{o[0]}={o[1]}" for o in OVERRIDES])
def test_override_changes_exactly_that_field(key, raw, want, typ, form):
    args = [f"--{key}={raw}"] if form == "equals" else [f"--{key}", raw]
    cfg = load_config(None, args)
    before, after = _leaves(Config()), _leaves(cfg)
    assert after[key] == want and type(after[key]) is typ
    if typ is tuple:
        assert all(type(v) is float for v in after[key])
    changed = {k for k in before if before[k] != after[k]}
    assert changed <= {key}  # nothing else moved (the new value may equal the default)


def test_parse_overrides_builds_a_nested_tree_of_yaml_values():
    tree = parse_overrides(["--optim.lr=0.5", "--model.arch", "resnet18",
                            "--augment.crop_area=[0.3, 0.9]", "--train.knn_every", "-1",
                            "--data.path="])
    assert tree == {"optim": {"lr": 0.5}, "model": {"arch": "resnet18"},
                    "augment": {"crop_area": [0.3, 0.9]}, "train": {"knn_every": -1},
                    "data": {"path": ""}}


def test_overrides_win_over_the_recipe_and_keep_its_other_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 1.5\n  epochs: 3\nmodel:\n  arch: resnet34\n")
    cfg = load_config(recipe, ["--optim.lr=0.25"])
    assert cfg.optim.lr == 0.25 and cfg.optim.epochs == 3 and cfg.model.arch == "resnet34"
    assert cfg.optim.momentum == OptimConfig().momentum


@pytest.mark.parametrize("args", [["optim.lr=1"], ["--optim.lr"], ["--"]])
def test_malformed_override_arguments_fail(args):
    _one_line_error(args)


# --- errors name the key ----------------------------------------------------------------------


@pytest.mark.parametrize("arg,key,suggestion", [
    ("--optim.lrr=0.5", "optim.lrr", "optim.lr"),
    ("--model.head_outt=64", "model.head_outt", "model.head_out"),
    ("--augment.flipp=0.5", "augment.flipp", "augment.flip_p"),
    ("--train.zzzz=1", "train.zzzz", None),
])
def test_unknown_key_is_a_one_line_error_naming_it(arg, key, suggestion):
    msg = _one_line_error([arg])
    assert f"'{key}'" in msg and "unknown" in msg
    if suggestion:
        assert f"'{suggestion}'" in msg


def test_unknown_key_in_a_yaml_recipe_is_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.1\n  warmup: 3\n")  # a silently dropped key would be a bug
    assert "'optim.warmup'" in _one_line_error(path=recipe)
    recipe.write_text("optimizer:\n  lr: 0.1\n")
    assert "'optimizer'" in _one_line_error(path=recipe)


def test_a_removed_key_in_a_saved_run_is_skipped_with_a_one_line_warning(tmp_path, capsys):
    saved = tmp_path / "config.yaml"  # as an older version wrote it into a run directory
    saved.write_text("optim:\n  lr: 0.1\n  lars_strategy: gram\n")
    assert load_config(saved).optim.lr == 0.1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "'optim.lars_strategy'" in err
    assert build_config(load_yaml(saved)).optim.lr == 0.1  # linear_eval reads a checkpoint so
    assert "'optim.lars_strategyy'" in _one_line_error(["--optim.lars_strategyy=gram"])


@pytest.mark.parametrize("arg,key", [
    ("--optim.lr=fast", "optim.lr"),  # str for float
    ("--optim.epochs=true", "optim.epochs"),  # bool for int
    ("--train.seed=1.5", "train.seed"),  # float for int
    ("--augment.size=32.0", "augment.size"),  # an integral float is still not an int
    ("--model.small_stem=1", "model.small_stem"),  # int for bool
    ("--model.arch=[1, 2]", "model.arch"),  # list for str
    ("--optim=3", "optim"),  # scalar for a section
    ("--augment=[1, 2]", "augment"),
    ("--augment.crop_area=[0.5]", "augment.crop_area"),  # wrong tuple length
    ("--augment.mean=[0.1, 0.2, 0.3, 0.4]", "augment.mean"),
    ("--augment.mean=0.5", "augment.mean"),  # scalar for a tuple
    ("--eval.l2_grid=[0.1, x]", "eval.l2_grid"),  # bad element of a variable-length tuple
    ("--optim.lr.x=1", "optim.lr"),  # a value used as a section
])
def test_wrong_type_is_a_one_line_error_naming_the_key(arg, key):
    assert f"'{key}'" in _one_line_error([arg])


def test_wrong_type_in_a_built_tree_names_the_key():
    assert "'loss.temperature'" in _one_line_error(tree={"loss": {"temperature": "hot"}})
    assert "'data'" in _one_line_error(tree={"data": ["a"]})


# every documented choice must be selectable unquoted, from the CLI and from YAML (a choice
# spelled like a YAML 1.1 bool, e.g. "no", would parse as False and be refused)
CHOICE_CASES = [pytest.param(key, good, id=f"{key}={good}")
                for key in sorted(CHOICES) for good in CHOICES[key]]


@pytest.mark.parametrize("key,good", CHOICE_CASES)
@pytest.mark.parametrize("source", ["cli", "yaml"])
def test_every_documented_choice_is_accepted(tmp_path, key, good, source):
    if source == "cli":
        cfg = load_config(None, [f"--{key}={good}"])
    else:
        section, leaf = key.split(".")
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"{section}:\n  {leaf}: {good}\n")
        cfg = load_config(recipe)
    assert _leaves(cfg)[key] == good


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_values_outside_the_choices_are_rejected(key):
    msg = _one_line_error([f"--{key}=not_a_choice"])
    assert f"'{key}'" in msg and all(c in msg for c in CHOICES[key])
    section, leaf = key.split(".")
    tree = {section: {leaf: CHOICES[key][0].upper() + "x"}}
    assert f"'{key}'" in _one_line_error(tree=tree)


def test_choice_keys_exist_in_the_tree():
    assert set(CHOICES) <= set(_leaves(Config()))


@pytest.mark.parametrize("arg,field", [
    ("--augment.flip_p=1.5", "flip_p"),
    ("--augment.grayscale_p=-0.1", "grayscale_p"),
    ("--augment.crop_area=[0.9, 0.1]", "crop_area"),
    ("--augment.crop_ratio=[0, 1]", "crop_ratio"),
    ("--augment.size=4", "size"),
    ("--augment.jitter_strength=2", "jitter_strength"),
    ("--augment.std=[1, 0, 1]", "std"),
])
def test_augment_spec_validation_surfaces_as_config_error(arg, field):
    with pytest.raises(ValueError):  # the spec itself rejects the value...
        AugmentSpec(**parse_overrides([arg])["augment"])
    msg = _one_line_error([arg])  # ...and the config reports it as a ConfigError naming the section
    assert "augment" in msg and field in msg


# --- value ranges -----------------------------------------------------------------------------

# Written out by hand from what each value means, not read from RANGES: (override, key, wording).
OUT_OF_RANGE = [
    ("--data.batch_size=0", "data.batch_size", ">= 2"),
    ("--data.batch_size=-8", "data.batch_size", ">= 2"),
    ("--data.batch_size=1", "data.batch_size", ">= 2"),  # one image has no negatives
    ("--data.num_workers=-1", "data.num_workers", ">= 0"),
    ("--data.path=", "data.path", "empty"),
    ("--model.arch=resnet9", "model.arch", "resnet18"),
    ("--model.width=0", "model.width", "> 0"),
    ("--model.width=-1", "model.width", "> 0"),
    ("--model.head_out=0", "model.head_out", ">= 1"),
    ("--model.head_hidden=-1", "model.head_hidden", ">= 0"),
    ("--model.head_layers=-1", "model.head_layers", ">= 0"),
    ("--loss.temperature=0", "loss.temperature", "> 0"),
    ("--loss.temperature=-0.5", "loss.temperature", "> 0"),
    ("--loss.temperature=.inf", "loss.temperature", "finite"),
    ("--loss.scale=0", "loss.scale", "> 0"),
    ("--optim.lr=.nan", "optim.lr", "finite"),
    ("--optim.lr=nan", "optim.lr", "finite"),  # the string 'nan' parses as a float too
    ("--optim.lr=-0.1", "optim.lr", ">= 0"),
    ("--optim.momentum=1", "optim.momentum", "[0, 1)"),
    ("--optim.weight_decay=-1e-6", "optim.weight_decay", ">= 0"),
    ("--optim.eta=0", "optim.eta", "> 0"),
    ("--optim.warmup_epochs=-1", "optim.warmup_epochs", ">= 0"),
    ("--optim.epochs=0", "optim.epochs", ">= 1"),
    ("--train.seed=-1", "train.seed", "[0, 4294967295]"),
    ("--train.checkpoint_every=-5", "train.checkpoint_every", ">= 0"),
    ("--train.keep_checkpoints=-1", "train.keep_checkpoints", ">= 0"),
    ("--train.log_every=0", "train.log_every", ">= 1"),
    ("--train.max_steps=-1", "train.max_steps", ">= 0"),
    ("--train.time_budget_s=-1", "train.time_budget_s", ">= 0"),
    ("--train.time_budget_s=.nan", "train.time_budget_s", "finite"),
    ("--train.knn_every=-2", "train.knn_every", ">= -1"),
    ("--train.knn_k=0", "train.knn_k", ">= 1"),
    ("--train.knn_train_samples=0", "train.knn_train_samples", ">= 1"),
    ("--eval.batch_size=0", "eval.batch_size", ">= 1"),
    ("--eval.max_iter=0", "eval.max_iter", ">= 1"),
    ("--eval.val_fraction=0", "eval.val_fraction", "(0, 1)"),
    ("--eval.val_fraction=1", "eval.val_fraction", "(0, 1)"),
    ("--eval.l2_grid=[]", "eval.l2_grid", "empty"),
    ("--eval.l2_grid=[1.0, 0]", "eval.l2_grid", "> 0"),
    ("--augment.mean=[.nan, 0.5, 0.5]", "augment.mean", "finite"),
]


@pytest.mark.parametrize("arg,key,wording", OUT_OF_RANGE, ids=[a for a, _, _ in OUT_OF_RANGE])
def test_out_of_range_value_is_a_one_line_error_naming_key_and_range(arg, key, wording):
    msg = _one_line_error([arg])
    assert f"'{key}'" in msg and wording in msg, msg


IN_RANGE = [  # the edges each meaning allows, and the documented sentinels
    "--data.batch_size=2", "--data.num_workers=0", "--model.width=0.01", "--model.head_hidden=0",
    "--model.head_layers=0", "--loss.temperature=0.001", "--optim.lr=0", "--optim.momentum=0",
    "--optim.weight_decay=0", "--optim.warmup_epochs=0", "--optim.epochs=1", "--train.seed=0",
    "--train.seed=4294967295", "--train.checkpoint_every=0", "--train.keep_checkpoints=0",
    "--train.max_steps=0", "--train.time_budget_s=0", "--train.knn_every=-1", "--train.knn_k=1",
    "--eval.val_fraction=0.5", "--eval.l2_grid=[1e-9]",
]


@pytest.mark.parametrize("arg", IN_RANGE)
def test_values_at_the_edge_of_their_range_are_accepted(arg):
    key, _, raw = arg[2:].partition("=")
    cfg = load_config(None, [arg])
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    want = tuple(float(v) for v in yaml.safe_load(raw)) if raw.startswith("[") else float(raw)
    assert got == want


def test_every_number_in_the_config_has_a_range_and_the_defaults_are_inside_it():
    numeric = {k: v for k, v in _leaves(Config()).items() if not k.startswith("augment.")
               and (isinstance(v, (int, float)) and not isinstance(v, bool)
                    or isinstance(v, tuple) and all(isinstance(x, float) for x in v))}
    assert set(numeric) <= set(RANGES), sorted(set(numeric) - set(RANGES))
    for key, value in numeric.items():
        assert all(v in RANGES[key] for v in (value if isinstance(value, tuple) else (value,))), key


def test_range_text_reads_as_its_bounds():
    assert str(Range(2)) == ">= 2" and str(Range(0, lo_open=True)) == "> 0"
    assert str(Range(0, 1, hi_open=True)) == "in [0, 1)" and str(Range(0.5, 2.5)) == "in [0.5, 2.5]"
    assert 0 not in Range(0, lo_open=True) and 1e-300 in Range(0, lo_open=True)
    assert float("nan") not in Range() and float("inf") not in Range(0)


@pytest.mark.parametrize("arg", ["--data.batch_size=0", "--loss.temperature=-1", "--train.knn_k=0",
                                 "--model.arch=resnet9", "--optim.lr=.nan"])
def test_pretrain_rejects_a_bad_value_before_creating_the_run(tmp_path, capsys, arg):
    from train.pretrain import main

    run = tmp_path / "run"
    assert main(["--config", str(REPO / "train/configs/fashion_mnist_demo.yaml"),
                 f"--train.out_dir={run}", f"--data.path={tmp_path / 'no-data'}", arg]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and arg[2:].split("=")[0] in err, err
    assert not run.exists()


# --- YAML files -------------------------------------------------------------------------------


def test_missing_yaml_file_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in _one_line_error(path=missing)
    with pytest.raises(ConfigError):
        load_yaml(missing)


@pytest.mark.parametrize("text", ["optim:\n  lr: [0.1, 0.2\n", "a: b: c\n", "optim:\n\tlr: 1\n"])
def test_invalid_yaml_is_a_one_line_error(tmp_path, text):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(yaml.YAMLError):  # the oracle: PyYAML itself rejects the text
        yaml.safe_load(text)
    assert str(bad) in _one_line_error(path=bad)


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- optim\n- lr\n")
    _one_line_error(path=bad)


@pytest.mark.parametrize("text", ["", "# nothing here\n", "\n\n  \n# a: 1\n"])
def test_empty_or_comment_only_yaml_is_a_one_line_error(tmp_path, text):
    """A recipe that says nothing is a mistake (a wrong file, a truncated copy), not a request for
    the defaults, which come from leaving --config out."""
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    assert yaml.safe_load(text) is None  # the oracle: PyYAML reads no document
    msg = _one_line_error(path=empty)
    assert str(empty) in msg and "no settings" in msg and "--config" in msg
    assert load_config(None) == Config()  # no file: the defaults


def test_binary_or_unreadable_yaml_is_a_one_line_error(tmp_path):
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UnicodeDecodeError):  # the oracle: not UTF-8 text
        binary.read_text(encoding="utf-8")
    msg = _one_line_error(path=binary)
    assert str(binary) in msg and "not a text file" in msg
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.yaml"
        locked.write_text("optim:\n  lr: 1\n")
        locked.chmod(0)
        assert "unreadable" in _one_line_error(path=locked)


def _non_default_config() -> Config:
    return load_config(None, [
        "--data.path=/tmp/x y", "--data.batch_size=64", "--augment.size=32",
        "--augment.crop_area=[0.2, 0.9]", "--augment.mean=[0.5, 0.25, 0.125]",
        "--augment.blur_sigma=[0.3, 1.7]", "--model.arch=resnet18", "--model.width=0.375",
        "--model.small_stem=true", "--loss.temperature=0.5", "--optim.name=sgd", "--optim.lr=0.1",
        "--optim.weight_decay=0.0005", "--train.out_dir=123", "--train.knn_every=-1",
        "--eval.l2_grid=[0.001, 0.01, 0.1]",
    ])


@pytest.mark.parametrize("make", [Config, _non_default_config], ids=["defaults", "overridden"])
def test_save_then_load_round_trips(tmp_path, make):
    cfg = make()
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert not path.with_name(path.name + ".tmp").exists()  # written atomically, temp file gone
    again = load_config(path)
    assert again == cfg
    pairs = zip(_leaves(again).values(), _leaves(cfg).values(), strict=True)
    assert _leaves(again) == _leaves(cfg) and all(type(a) is type(b) for a, b in pairs)
    assert yaml.safe_load(path.read_text())["augment"]["crop_area"] == list(cfg.augment.crop_area)


def test_recipes_exist():
    assert RECIPES, "no YAML recipes under train/configs/"


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(recipe, tmp_path):
    cfg = load_config(recipe)
    tree = yaml.safe_load(recipe.read_text()) or {}
    leaves = _leaves(cfg)
    for section, values in tree.items():  # every value the recipe sets is the one in the Config
        for key, value in values.items():
            got = leaves[f"{section}.{key}"]
            assert got == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


# PyYAML (YAML 1.1) reads '1e-6' (no dot) as a string: float fields must still take it.


@pytest.mark.parametrize("source", ["cli", "yaml"])
def test_scientific_notation_without_a_dot_is_a_float(tmp_path, source):
    if source == "cli":
        cfg = load_config(None, ["--optim.weight_decay=1e-6"])
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text("optim:\n  weight_decay: 1e-6\n")
        cfg = load_config(recipe)
    assert cfg.optim.weight_decay == float("1e-6")


def test_resume_differences_allow_how_the_run_goes_on_and_refuse_what_it_trains():
    from train.config import RESUMABLE, config_to_dict, resume_differences

    saved = config_to_dict(load_config(REPO / "train/configs/fashion_mnist_demo.yaml"))
    same = resume_differences(saved, saved)
    assert same == ([], [])
    now = config_to_dict(load_config(REPO / "train/configs/fashion_mnist_demo.yaml", [
        "--train.time_budget_s=60", "--train.log_every=5", "--data.path=/elsewhere",
        "--eval.max_iter=7", "--model.width=0.25", "--data.batch_size=128",
        "--augment.crop_area=[0.2, 1.0]", "--loss.temperature=0.5", "--train.seed=1"]))
    allowed, refused = resume_differences(saved, now)
    assert sorted(line.split()[0] for line in allowed) == [
        "data.path", "eval.max_iter", "train.log_every", "train.time_budget_s"]
    assert sorted(line.split()[0] for line in refused) == [
        "augment.crop_area", "data.batch_size", "loss.temperature", "model.width", "train.seed"]
    assert "train.time_budget_s 300.0 -> 60.0" in allowed
    # every allowed key names a setting that exists
    flat = {f"{s}.{k}" for s, sub in saved.items() for k in sub}
    assert all(r in flat or any(f.startswith(r) for f in flat) for r in RESUMABLE)
    old = {k: v for k, v in saved.items() if k != "eval"}  # a checkpoint from before eval.*
    assert resume_differences(old, now)[0] == [a for a in allowed if not a.startswith("eval.")]


def test_dataset_fingerprint_follows_the_contents_not_the_place(tmp_path):
    import shutil

    from pipelines.sources import open_dataset
    from tests.fashion_mnist import make_subset

    a = make_subset(tmp_path / "a", 64, 32)
    b = make_subset(tmp_path / "b", 64, 32, classes=(1, 2))  # the same sizes, other images
    moved = tmp_path / "moved"
    shutil.copytree(a, moved)
    fa, fb = open_dataset(a).fingerprint("train"), open_dataset(b).fingerprint("train")
    assert fa and fb and fa != fb
    assert open_dataset(moved).fingerprint("train") == fa
    assert open_dataset(a).fingerprint("test") not in (None, fa)
