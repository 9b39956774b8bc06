"""The declarative spec: defaults, TOML and dict round trips, flag overrides, errors that name the key,
file and line, per-layer rules by glob, and docs/spec.md matching the code."""

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compressc.errors import UserError
from compressc.spec import (ALLOWED_BITS, SPARSITY_KINDS, Actions, Finetune, LayerRule, ResolvedRule, Search, Spec,
                            SpecError, parse_flops)

ROOT = Path(__file__).resolve().parent.parent

EXAMPLE = """\
target_size = "20KB"
solver = "convex"
seed = 7

[actions]
bits = [2, 4, 8]
sparsity = ["unstructured"]

[finetune]
epochs = 3

[solver_options]
max_iters = 50
weights = {size = 1.0}

[rules."*"]
min_channels = 4

[rules."classifier.*"]
bits = 8
prune = false
"""


def _write(tmp_path, text, name="compress.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- defaults ---------------------------------------------------------------------------------------------
def test_defaults():
    spec = Spec()
    assert (spec.target_size, spec.target_flops, spec.max_accuracy_drop) == (None, None, None)
    assert not spec.has_target and Spec(max_accuracy_drop=0.01).has_target and Spec(target_flops="1G").has_target
    assert (spec.seed, spec.device, spec.solver, spec.importance, spec.solver_options) == (0, "cpu", "convex", "l1", {})
    a = spec.actions
    assert (a.prune_channels, a.remove_layers, a.sparsity, a.quant_scheme) == (True, False, (), "symmetric")
    assert a.bits == (2, 3, 4, 5, 6, 8) and a.sparsity_levels == (0.0, 0.25, 0.5, 0.75, 0.9)
    assert a.keep_ratios[:8] == (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.1875)
    assert min(a.keep_ratios) == 0.125 and a.auto_extend
    assert dataclasses.astuple(spec.finetune) == (0, 0.02, "sgd", 0.0, "cosine", 0.05, 4.0, 0.7, "auto", 5.0, None,
                                                  "auto", None, "auto", 2)
    assert spec.rules == () and Spec.from_dict({}) == spec
    assert hash(spec) == hash(Spec())  # frozen and hashable, solver_options aside


def test_grids_always_hold_the_identity_and_arrays_become_tuples():
    a = Actions(bits=[8, 4], keep_ratios=[0.5, 0.25], sparsity_levels=[0.5])
    assert a.bits == (8, 4) and a.bit_choices == (4, 8, 32) and Actions(bits=()).bit_choices == (32,)
    assert a.keep_ratio_choices == (1.0, 0.5, 0.25) and a.sparsity_level_choices == (0.0, 0.5)


def test_targets_resolve_against_the_original():
    assert Spec(target_size="20KB").target_bytes() == 20_000
    assert Spec(target_size=123456).target_bytes() == 123456
    assert Spec(target_size="25%").target_bytes(reference=4_000_000) == 1_000_000
    assert Spec(target_size="8x").target_bytes(reference=4_000_000) == 500_000
    assert Spec().target_bytes(10) is None and Spec().target_flops_value(10) is None
    assert Spec(target_flops="150M").target_flops_value() == 150_000_000
    assert Spec(target_flops="50%").target_flops_value(reference_flops=3_000) == 1_500
    assert Spec(target_flops="4x").target_flops_value(reference_flops=3_000) == 750
    assert Spec(max_accuracy_drop="1%").max_accuracy_drop == 0.01 == Spec(max_accuracy_drop=0.01).max_accuracy_drop
    assert Spec(max_accuracy_drop="0.01").max_accuracy_drop == 0.01  # the command line passes text
    with pytest.raises(SpecError, match=r"max_accuracy_drop: 2\.0 is out of range; allowed: \[0, 1\]"):
        Spec(max_accuracy_drop="2")


@pytest.mark.parametrize("text,expected", [("150M", 150 * 10**6), ("1.2G", 12 * 10**8), ("2T", 2 * 10**12),
                                           ("3k", 3000), ("150 MFLOPs", 150 * 10**6), ("1e6", 10**6),
                                           (42, 42), (3e8, 3 * 10**8), ("7flops", 7)])
def test_parse_flops(text, expected):
    assert parse_flops(text) == expected


@pytest.mark.parametrize("text", ["", "M", "1.2Q", "-5M", "150%", "0.5x", "0", "nan"])
def test_bad_flops(text):
    with pytest.raises(SpecError, match="target_flops"):
        parse_flops(text, reference=1000)


# -- round trips ----------------------------------------------------------------------------------------
def test_toml_round_trip(tmp_path):
    spec = Spec.from_toml(_write(tmp_path, EXAMPLE))
    assert spec.target_size == "20KB" and spec.seed == 7 and spec.actions.bits == (2, 4, 8)
    assert spec.actions.sparsity == ("unstructured",) and spec.finetune.epochs == 3
    assert spec.solver_options == {"max_iters": 50, "weights": {"size": 1.0}}
    assert spec.rules == (LayerRule("*", min_channels=4), LayerRule("classifier.*", bits=8, prune=False))
    d = spec.to_dict()
    raw = tomllib.loads(EXAMPLE)
    for table in ("actions", "finetune"):  # what the file says is what to_dict says, defaults filled in
        assert d[table].items() >= raw.pop(table).items()
    assert d.items() >= raw.items()
    assert Spec.from_dict(d) == spec
    assert Spec.from_dict(json.loads(json.dumps(d))) == spec  # as report.json stores it


def test_flags_override_file_values_field_by_field(tmp_path):
    spec = Spec.from_toml(_write(tmp_path, EXAMPLE))
    flags = {"target_size": "16KB", "target_flops": None, "seed": None,
             "actions": {"bits": [4, 8], "sparsity": None},
             "finetune": {"lr": 0.01},
             "solver_options": {"weights": {"flops": 2.0}},
             "rules": {"classifier.*": {"bits": 4}, "head": {"prune": False}}}
    out = spec.merged(flags)
    assert out.target_size == "16KB" and out.seed == 7 and out.target_flops is None
    assert out.actions.bits == (4, 8) and out.actions.sparsity == ("unstructured",)
    assert out.finetune == Finetune(epochs=3, lr=0.01)
    assert out.solver_options == {"max_iters": 50, "weights": {"size": 1.0, "flops": 2.0}}
    assert [r.pattern for r in out.rules] == ["*", "classifier.*", "head"]
    assert out.rules[1] == LayerRule("classifier.*", bits=4, prune=False)
    assert spec.merged({}) == spec and spec.merged({"actions": None}) == spec
    assert spec.target_size == "20KB"  # the original is untouched


def test_override_errors_name_the_command_line():
    with pytest.raises(SpecError, match=r"^command line: finetune.epochs: -2 is out of range"):
        Spec().merged({"finetune": {"epochs": -2}})


# -- errors ----------------------------------------------------------------------------------------------
BAD_FILES = [
    # (text, key path, line, something else the message or hint must say)
    ('target_sise = "4MB"\n', "target_sise", 1, "did you mean `target_size`?"),
    ('[actions]\nbits = [2, 4, 9]\n', "actions.bits[2]", 2, "allowed: 1 to 8, 16, 32"),
    ('[actions]\nbits = [4, "8"]\n', "actions.bits[1]", 2, 'expected an integer, got a string "8"'),
    ('[actions]\nbits = [4, 4]\n', "actions.bits[1]", 2, "listed twice"),
    ('[actions]\nsparsity = ["structured"]\n', "actions.sparsity[0]", 2, '"unstructured", "kernel"'),
    ('[actions]\nkeep_ratios = [1.0, 1.5]\n', "actions.keep_ratios[1]", 2, "allowed: (0, 1]"),
    ('[actions]\nsparsity_levels = [1.0]\n', "actions.sparsity_levels[0]", 2, "allowed: [0, 1)"),
    ('[actions]\nquant_scheme = "asymetric"\n', "actions.quant_scheme", 2, 'did you mean "asymmetric"?'),
    ('[actions]\nprune_channels = "yes"\n', "actions.prune_channels", 2, "expected a boolean"),
    ('seed = 1\n\n[finetune]\nepochs = -1\n', "finetune.epochs", 4, "allowed: >= 0"),
    ('[finetune]\nepochs = 2.5\n', "finetune.epochs", 2, "expected an integer, got a float 2.5"),
    ('[finetune]\nlr = 0\n', "finetune.lr", 2, "allowed: (0, ∞)"),
    ('[finetune]\ndistill_weight = 1.5\n', "finetune.distill_weight", 2, "allowed: [0, 1]"),
    ('[finetune]\nepochs = 1\ntarget_size = "4MB"\n', "finetune.target_size", 3, "is a top-level key"),
    ('epochs = 3\n', "epochs", 1, "did you mean `finetune.epochs`?"),
    ('target_size = "4MBs"\n', "target_size", 1, "unknown unit 'MBs'"),
    ('target_size = "150%"\n', "target_size", 1, "(0, 100]%"),
    ('target_size = [1]\n', "target_size", 1, "expected a size"),
    ('target_flops = "1.2Q"\n', "target_flops", 1, "unknown suffix"),
    ('max_accuracy_drop = "one point"\n', "max_accuracy_drop", 1, "as an accuracy drop"),
    ('max_accuracy_drop = 2\n', "max_accuracy_drop", 1, "allowed: [0, 1]"),
    ('max_accuracy_drop = "150%"\n', "max_accuracy_drop", 1, "0% to 100%"),
    ('seed = -1\n', "seed", 1, "0 to 4294967295"),
    ('device = "gpu"\n', "device", 1, '"cpu", "cuda"'),
    ('solver = ""\n', "solver", 1, "non-empty string"),
    ('solver_options = 3\n', "solver_options", 1, "expected a table"),
    ('[actoins]\nbits = [4]\n', "actoins", 1, "did you mean `actions`?"),
    ('seed = 0\n[rules."classifier.*"]\nbitz = 8\n', 'rules."classifier.*".bitz', 3, "did you mean `rules.\"classifier.*\".bits`?"),
    ('[rules."classifier.*"]\nbits = 12\n', 'rules."classifier.*".bits', 2, "allowed: 1 to 8, 16, 32"),
    ('[rules."fc"]\nmin_channels = 0\n', 'rules.fc.min_channels', 2, "allowed: >= 1"),
    ('[rules]\n"a.b" = {round_to = 0}\n', 'rules."a.b".round_to', 2, "allowed: >= 1"),
    ('[rules."fc"]\nsparsity = 0.5\n', "rules.fc.sparsity", 2, 'sparsity = ["unstructured"]'),
    ('rules = ["fc"]\n', "rules", 1, '[rules."classifier.*"]'),
    ('[rules]\nfc = 8\n', "rules.fc", 2, "expected a table"),
]


@pytest.mark.parametrize("text,key,line,says", BAD_FILES, ids=[k for _, k, _, _ in BAD_FILES])
def test_bad_spec_files_name_file_line_and_key(tmp_path, text, key, line, says):
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        Spec.from_toml(path)
    e = err.value
    assert isinstance(e, UserError) and e.exit_code == 2
    assert e.key == key and e.line == line
    assert str(e).startswith(f"{path}:{line}: {key}: ")
    assert says in str(e)


def test_toml_syntax_errors_show_tomllib_message(tmp_path):
    path = _write(tmp_path, 'seed = 1\n[actions]\nbits = [2 4]\n')
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}:3: invalid TOML: .*line 3, column") as err:
        Spec.from_toml(path)
    assert err.value.exit_code == 2


def test_unreadable_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read the spec") as err:
        Spec.from_toml(tmp_path / "missing.toml")
    assert str(tmp_path / "missing.toml") in str(err.value)


@pytest.mark.parametrize("data,key,says", [
    ({"rules": {3: {"bits": 8}}}, "rules", "expected a rule pattern: a non-empty string (a glob), got an integer 3"),
    ({"rules": {"": {"bits": 8}}}, "rules", "non-empty string"),
    ({"rules": {"fc": {"pattern": "fc"}}}, "rules.fc.pattern", "unknown key"),
    ({"actions": {"bits": 8}}, "actions.bits", "expected an array, got an integer 8"),
    ({"actions": [4]}, "actions", "expected a table"),
    ({"solver_options": {"y": {1: 2}}}, "solver_options.y", "string keys"),
    ({"solver_options": {"x": None}}, "solver_options.x", "got nothing"),
    ({1: 2}, "", "string keys"),
])
def test_bad_dicts(data, key, says):
    with pytest.raises(SpecError) as err:
        Spec.from_dict(data, source="flags.json")
    assert err.value.key == key and says in str(err.value)
    assert str(err.value).startswith("flags.json: ")


def test_python_construction_is_validated_the_same_way():
    with pytest.raises(SpecError, match=r"^actions.bits\[0\]: 9 is not an allowed bit width"):
        Actions(bits=(9,))
    with pytest.raises(SpecError, match=r"^rules: expected a rule pattern"):
        LayerRule(3, bits=8)
    with pytest.raises(SpecError, match=r'^rules\[1\]: the pattern "fc" has two rules'):
        Spec(rules=(LayerRule("fc", bits=8), LayerRule("fc", prune=False)))
    with pytest.raises(SpecError, match=r"^actions: expected an Actions"):
        Spec(actions={"bits": [4]})


def test_relative_targets_need_a_reference():
    spec = Spec(target_size="25%", target_flops="4x")  # valid syntax, resolved later
    for call, key in ((spec.target_bytes, "target_size"), (spec.target_flops_value, "target_flops")):
        with pytest.raises(SpecError, match=rf"^{key}: .* is relative") as err:
            call()
        assert err.value.exit_code == 2 and "reference" in str(err.value)


# -- rules ----------------------------------------------------------------------------------------------
def test_rules_merge_in_order_field_by_field():
    spec = Spec(actions=Actions(sparsity=("kernel",)), rules=(
        LayerRule("*", bits=4, min_channels=8),
        LayerRule("classifier.*", bits=8, prune=False),
        LayerRule("classifier.1", min_channels=2, sparsity=0.5),
        LayerRule("*.downsample.*", round_to=8),
    ))
    assert spec.rule_for("classifier.1") == ResolvedRule(
        module="classifier.1", bits=8, prune=False, sparsity=0.5, min_channels=2, round_to=1,
        matched=("*", "classifier.*", "classifier.1"))
    assert spec.rule_for("classifier.0") == ResolvedRule(
        module="classifier.0", bits=8, prune=False, sparsity=None, min_channels=8, round_to=1,
        matched=("*", "classifier.*"))
    r = spec.rule_for("layer1.0.downsample.0")
    assert (r.bits, r.prune, r.round_to, r.matched) == (4, True, 8, ("*", "*.downsample.*"))
    # the order decides: the same two rules the other way round
    flipped = Spec(rules=(LayerRule("classifier.*", bits=8), LayerRule("*", bits=4)))
    assert flipped.rule_for("classifier.0").bits == 4


def test_unmatched_layers_and_globs():
    spec = Spec(actions=Actions(prune_channels=False), rules=(LayerRule("features.0", prune=True),
                                                            LayerRule("Features.*", bits=8)))
    assert spec.rule_for("conv") == ResolvedRule("conv", None, False, None, 1, 1, ())
    assert spec.rule_for("features.0").prune is True  # a rule wins over the action switch
    assert spec.rule_for("features.0.conv").matched == ()  # no `*`: the whole name must match
    assert spec.unmatched_rules(["features.0", "features.1"]) == ["Features.*"]  # case-sensitive
    assert spec.unmatched_rules(iter(["features.0", "Features.x"])) == []


# -- property: every valid spec round-trips -------------------------------------------------------------
_unit_float = st.floats(0, 1, exclude_max=True, allow_subnormal=False)
_json = st.recursive(st.none().flatmap(lambda _: st.one_of(
    st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=8))),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


@st.composite
def specs(draw):
    sparsity = tuple(draw(st.lists(st.sampled_from(SPARSITY_KINDS), unique=True)))
    actions = Actions(
        prune_channels=draw(st.booleans()), remove_layers=draw(st.booleans()), sparsity=sparsity,
        sparsity_levels=tuple(draw(st.lists(_unit_float, unique=True, max_size=5))),
        bits=tuple(draw(st.lists(st.sampled_from(ALLOWED_BITS), unique=True))),
        quant_scheme=draw(st.sampled_from(["symmetric", "asymmetric", "codebook"])),
        keep_ratios=tuple(draw(st.lists(st.floats(0, 1, exclude_min=True), unique=True, max_size=5))),
        auto_extend=draw(st.booleans()))
    finetune = Finetune(
        epochs=draw(st.integers(0, 100)), lr=draw(st.just("auto") | st.floats(1e-6, 10)),
        temperature=draw(st.floats(0.1, 20)), distill_weight=draw(st.floats(0, 1)),
        batches_per_epoch=draw(st.none() | st.integers(1, 1000)), optimizer=draw(st.sampled_from(["sgd", "adam"])),
        weight_decay=draw(st.floats(0, 1)), schedule=draw(st.sampled_from(["cosine", "constant"])),
        warmup=draw(st.floats(0, 0.5)), soft_loss=draw(st.sampled_from(["auto", "kl", "mse"])),
        grad_clip=draw(st.floats(0, 10)), float_fraction=draw(st.just("auto") | st.floats(0, 1)),
        patience=draw(st.none() | st.integers(1, 10)), candidates=draw(st.just("auto") | st.integers(1, 5)),
        probe_epochs=draw(st.integers(1, 5)))
    patterns = draw(st.lists(st.text(st.sampled_from("ab.*?_0[]!"), min_size=1, max_size=6), unique=True,
                             max_size=4))
    rules = tuple(LayerRule(
        p, bits=draw(st.none() | st.sampled_from(ALLOWED_BITS)), prune=draw(st.none() | st.booleans()),
        sparsity=draw(st.none() | (_unit_float if sparsity else st.just(0.0))),
        min_channels=draw(st.none() | st.integers(1, 512)), round_to=draw(st.none() | st.integers(1, 64)))
        for p in patterns)
    size = st.none() | st.integers(1, 10**12) | st.builds("{}{}".format, st.integers(1, 10**6),
                                                          st.sampled_from(["", "B", "KB", "kib", "MB", "GiB"]))
    relative = st.builds("{}%".format, st.integers(1, 100)) | st.builds("{}x".format, st.integers(1, 64))
    flops = st.none() | st.integers(1, 10**15) | st.builds("{}{}".format, st.integers(1, 10**4),
                                                           st.sampled_from(["", "k", "M", "G", "T"]))
    return Spec(
        target_size=draw(size | relative), target_flops=draw(flops | relative),
        max_accuracy_drop=draw(st.none() | st.floats(0, 1)), seed=draw(st.integers(0, 2**32 - 1)),
        device=draw(st.sampled_from(["cpu", "cuda"])), solver=draw(st.sampled_from(["convex", "greedy", "ga"])),
        importance=draw(st.sampled_from(["l1", "taylor"])),
        solver_options=draw(st.dictionaries(st.text(max_size=5), _json, max_size=3)),
        actions=actions, finetune=finetune, rules=rules)


@settings(max_examples=60, deadline=None)
@given(specs())
def test_any_valid_spec_round_trips(spec):
    d = spec.to_dict()
    assert Spec.from_dict(d) == spec
    assert Spec.from_dict(json.loads(json.dumps(d))) == spec
    assert spec.merged({}) == spec


# -- docs/spec.md matches the code ------------------------------------------------------------------------
def _doc_tables():
    """{section heading: {key: default cell}} for the key tables of docs/spec.md."""
    tables, section = {}, None
    for line in (ROOT / "docs" / "spec.md").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("| `") and section is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 5:
                tables.setdefault(section, {})[cells[0].strip("`")] = cells[2]
    return tables


def _default(cell):
    return None if cell == "unset" else tomllib.loads(f"v = {cell.strip('`')}")["v"]


def test_docs_list_every_key_with_its_default():
    tables = _doc_tables()
    d = Spec().to_dict()
    sections = {"Top-level keys": (Spec, d), "`[actions]`": (Actions, d["actions"]),
                "`[finetune]`": (Finetune, d["finetune"]), "`[search]`": (Search, d["search"]),
                '`[rules."GLOB"]`': (LayerRule, {})}
    for prefix, (cls, defaults) in sections.items():
        documented = next(t for s, t in tables.items() if s.startswith(prefix))
        keys = list(cls._checks)
        if cls is Spec:
            keys = [k for k in keys if k not in ("solver_options", "actions", "finetune", "search", "rules")]
        assert list(documented) == keys, prefix
        for k, cell in documented.items():
            assert _default(cell) == defaults.get(k), (prefix, k)


def test_docs_examples_are_valid_specs():
    text = (ROOT / "docs" / "spec.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        spec = Spec.from_dict(tomllib.loads(block), source="docs/spec.md")
        assert spec.has_target


# Each error sample in docs/spec.md, and a compress.toml that produces it.
ERROR_SAMPLES = {
    "compress.toml:5: actions.bits[2]": 'target_size = "20KB"\n\n\n[actions]\nbits = [2, 4, 9]\n',
    'compress.toml:12: rules."classifier.*".bitz': 'target_size = "20KB"\n' + "\n" * 9 + '[rules."classifier.*"]\nbitz = 8\n',
    "compress.toml:10: finetune.target_size": "\n" * 8 + '[finetune]\ntarget_size = "20KB"\n',
    "compress.toml:1: lr": "lr = 0.01\n",
    "compress.toml:9: finetune.epochs": "\n" * 7 + "[finetune]\nepochs = -1\n",
    "compress.toml:1: target_size": 'target_size = "4MBs"\n',
    "compress.toml:5: invalid TOML": "\n" * 4 + "bits = [2 4]\n",
}


def test_the_docs_error_samples_are_what_compressc_prints(tmp_path):
    text = (ROOT / "docs" / "spec.md").read_text()
    samples = re.findall(r"^(compress\.toml:\d+: .*)$", text, re.M)
    assert len(samples) == len(ERROR_SAMPLES)
    for sample in samples:
        where = next(k for k in ERROR_SAMPLES if sample.startswith(k + ":"))
        path = tmp_path / "compress.toml"
        path.write_text(ERROR_SAMPLES[where])
        with pytest.raises(SpecError) as err:
            Spec.from_toml(path)
        printed = str(err.value).splitlines()[0].replace(str(path), "compress.toml")
        assert printed == sample or (sample.endswith("...") and printed.startswith(sample[:-3])), (printed, sample)
