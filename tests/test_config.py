"""Recipes and overrides: every recipe loads, the default recipe is the built-in default, errors name keys."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from bytemamba.config import (Config, ConfigError, DataConfig, ModelConfig, load_config, section_from_dict,
                              to_toml)
from bytemamba.errors import UserError

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.toml"))


def test_there_are_recipes():
    assert any(p.name == "text_default.toml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)
    # every key the recipe sets is applied (nothing silently dropped)
    raw = tomllib.loads(recipe.read_text())
    for section, table in raw.items():
        for key, value in table.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value or (isinstance(got, float) and got == float(value)), f"{section}.{key}"


def test_text_default_recipe_is_the_builtin_default():
    assert load_config(Path(__file__).resolve().parent.parent / "recipes" / "text_default.toml") == Config()
    assert load_config(None) == Config()


@pytest.mark.parametrize("override,section,key,value", [
    ("model.d_model=32", "model", "d_model", 32),
    ("train.max_steps=1_000", "train", "max_steps", 1000),
    ("optim.lr=3e-4", "optim", "lr", 3e-4),
    ("optim.lr=1", "optim", "lr", 1.0),
    ("model.tie_embeddings=false", "model", "tie_embeddings", False),
    ("data.doc_boundaries=True", "data", "doc_boundaries", True),
    ("data.doc_boundaries=0", "data", "doc_boundaries", False),
    ("data.path=/some/where=odd", "data", "path", "/some/where=odd"),
    ("generate.prompt=", "generate", "prompt", ""),
])
def test_override_coercion(override, section, key, value):
    cfg = load_config(None, [override])
    got = getattr(getattr(cfg, section), key)
    assert got == value and type(got) is type(value)


def test_overrides_win_over_recipe(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text("[model]\nd_model = 64\n[train]\nmax_steps = 5\n")
    cfg = load_config(r, ["model.d_model=32"])
    assert cfg.model.d_model == 32 and cfg.train.max_steps == 5


@pytest.mark.parametrize("override,needle", [
    ("nosuch.key=1", "nosuch"),
    ("model.nosuch=1", "model.nosuch"),
    ("model.d_model=abc", "model.d_model"),
    ("model.d_model=1.5", "model.d_model"),
    ("optim.lr=fast", "optim.lr"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings"),
    ("model.d_model", "model.d_model"),
    ("d_model=3", "d_model=3"),
    ("model.d_model=-1", "model.d_model"),
    ("model.scan_backend=triton", "model.scan_backend"),
    ("train.log_every=0", "train.log_every"),
    ("train.eval_every=0", "train.eval_every"),
    ("train.save_every=0", "train.save_every"),
    ("train.eval_batches=0", "train.eval_batches"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("generate.top_k=-2", "generate.top_k"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert isinstance(e.value, UserError)


@pytest.mark.parametrize("body,needle", [
    ("[nosuch]\nx = 1\n", "nosuch"),
    ("[model]\nd_modle = 32\n", "model.d_modle"),
    ("[model]\nd_model = \"big\"\n", "model.d_model"),
    ("[model]\nd_model = 32.5\n", "model.d_model"),
    ("[model]\ntie_embeddings = 1\n", "model.tie_embeddings"),
    ("[data]\npath = 3\n", "data.path"),
    ("[optim]\nlr = true\n", "optim.lr"),
    ("d_model = 32\n", "d_model"),
    ("[model\n", "not valid TOML"),
])
def test_bad_recipes_name_the_key(tmp_path, body, needle):
    r = tmp_path / "bad.toml"
    r.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_config(r)
    assert needle in str(e.value)


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "nope.toml")


def test_to_toml_round_trip(tmp_path):
    cfg = load_config(None, ["model.d_model=48", "optim.lr=1.5e-05", "data.path=a \"quoted\" \\path",
                             "generate.prompt=line1\nline2", "model.tie_embeddings=false"])
    text = to_toml(cfg)
    tomllib.loads(text)                                 # valid TOML
    r = tmp_path / "round.toml"
    r.write_text(text)
    assert load_config(r) == cfg
    assert load_config(r).generate.prompt == "line1\nline2"


def test_to_toml_escapes_control_characters(tmp_path):
    cfg = Config()
    cfg.generate.prompt = "a\rb\x01c\x7fd\te\u00e9\"q\\z\n"
    r = tmp_path / "round.toml"
    r.write_text(to_toml(cfg))
    assert load_config(r).generate.prompt == cfg.generate.prompt


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_round_trips(tmp_path, recipe):
    cfg = load_config(recipe)
    r = tmp_path / "round.toml"
    r.write_text(to_toml(cfg))
    assert load_config(r) == cfg


def test_section_from_dict():
    m = section_from_dict(ModelConfig, dataclasses.asdict(ModelConfig(d_model=48)), "x")
    assert m == ModelConfig(d_model=48)
    with pytest.raises(ConfigError, match="nosuch"):
        section_from_dict(DataConfig, {"nosuch": 1}, "x")
    with pytest.raises(ConfigError, match="d_model"):
        section_from_dict(ModelConfig, {"d_model": "wide"}, "x")


def test_dt_rank_and_d_inner():
    assert ModelConfig(d_model=256).dt_rank_value == 16
    assert ModelConfig(d_model=33).dt_rank_value == 3
    assert ModelConfig(d_model=33, dt_rank=5).dt_rank_value == 5
    assert ModelConfig(d_model=10, expand=3).d_inner == 30
