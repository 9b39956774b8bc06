"""The torch.export frontend: chosen when fx cannot trace the root, the same IR as fx where both
trace, dynamic batch sizes, plain outputs (cache objects as tensor tuples), and its failure modes."""

import textwrap

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten

import compressc
from compressc import NodeKind, TraceError
from compressc.codegen import verify_roundtrip
from compressc.spec import Spec, SpecError
from compressc.frontends.export import export_graph_module, plain_outputs

from .models import REFERENCE_MODELS


class Cache:
    """A KV-cache-like object: tensors held in attributes (not a pytree)."""

    def __init__(self, k, v):
        self.layers = [{"keys": k, "values": v}]


class KwargsNet(nn.Module):
    """Takes **kwargs in its root forward (fx cannot trace it) and returns a dict with a cache object."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, ids, **kwargs):
        x = self.embed(ids)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = self.norm(x + self.proj(a.transpose(1, 2).reshape(b, n, 16)))
        return {"hidden": x, "cache": Cache(k, v)}


def _ids(batch=2, length=6):
    return torch.randint(0, 20, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length))


def _flat(out):
    return [t for t in tree_flatten(plain_outputs(out))[0] if isinstance(t, torch.Tensor)]


def test_kwargs_root_falls_back_to_export_with_layers_as_call_modules():
    model = KwargsNet().eval()
    g = compressc.trace(model, (_ids(),))
    modules = {g.info(n).module_path: g.info(n).kind for n in g.nodes() if n.op == "call_module"}
    assert modules == {"embed": NodeKind.EMBEDDING, "qkv": NodeKind.LINEAR, "proj": NodeKind.LINEAR,
                       "norm": NodeKind.NORM}
    assert g.module.get_submodule("qkv") is model.qkv  # layers are shared, as fx shares them
    assert {g.info(n).kind for n in g.nodes()} >= {NodeKind.ATTENTION, NodeKind.RESHAPE, NodeKind.PERMUTE}
    assert g.totals().params == sum(p.numel() for p in model.parameters())
    out = g.module(_ids())
    assert set(out) == {"hidden", "cache"} and len(out["cache"]) == 2  # the cache as its tensors


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 5), length=st.integers(1, 9))
def test_export_graph_equals_the_model_bit_for_bit_at_any_batch_and_length(batch, length):
    model = KwargsNet().eval()
    gm = export_graph_module(model, (_ids(),))
    x = _ids(batch, length)
    with torch.no_grad():
        expected, actual = _flat(model(x)), _flat(gm(x))
    assert len(expected) == len(actual) and all(torch.equal(a, e) for a, e in zip(actual, expected))


def test_forced_fx_names_the_export_frontend_and_auto_reports_both_failures():
    with pytest.raises(TraceError, match="torch.fx cannot trace") as info:
        compressc.trace(KwargsNet(), (_ids(),), frontend="fx")
    assert "export" in info.value.hint

    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceError, match=r"torch.fx cannot trace .*; and torch.export cannot export") as info:
        compressc.trace(DataDependent(), (torch.ones(2),))
    assert "test_export_frontend.py" in str(info.value) and len(str(info.value).splitlines()) == 2


def test_export_failure_prints_nothing(capfd):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceError):
        compressc.trace(DataDependent(), (torch.ones(2),), frontend="export")
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("name", ["conv1d_net", "handwritten_attention", "shufflenet_v2", "se_net"])
def test_export_builds_the_same_ir_as_fx(name):
    model, inputs = REFERENCE_MODELS[name]()
    a, b = (compressc.trace(model, inputs, frontend=f) for f in ("fx", "export"))

    def kinds(g):
        return sorted(r.kind.value for r in g.records() if r.kind not in (NodeKind.SHAPE, NodeKind.CONSTANT))

    assert kinds(a) == kinds(b)
    assert a.totals() == b.totals()
    groups = [sorted((grp.size, grp.prunable, len(grp.members)) for grp in compressc.channel_groups(g)) for g in (a, b)]
    assert groups[0] == groups[1]
    keep_half = {grp.id: list(range(0, grp.size, 2)) for grp in compressc.channel_groups(b) if grp.prunable}
    with torch.no_grad():
        pruned = compressc.prune_channels(b, keep_half)(*inputs)
        reference = compressc.masked_reference(b, keep_half)(*inputs)
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-5)


def test_export_graph_round_trips_through_model_py():
    model = KwargsNet().eval()
    g = compressc.trace(model, (_ids(),), frontend="export")
    verify_roundtrip(g.module, (_ids(3, 4),))


def test_frontend_choice_is_validated():
    with pytest.raises(ValueError, match="frontend must be one of auto, fx, export"):
        compressc.trace(KwargsNet(), (_ids(),), frontend="tvm")
    with pytest.raises(SpecError, match="frontend"):
        Spec(frontend="tvm")
    assert Spec.from_dict({"frontend": "export"}).to_dict()["frontend"] == "export"


def test_cli_frontend_flag(tmp_path):
    from click.testing import CliRunner

    from compressc.cli import main

    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent("""\
        import torch
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        example_input = torch.randn(2, 8)
        """))
    result = CliRunner().invoke(main, ["inspect", str(path), "--frontend", "export", "--json"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["inspect", str(path), "--frontend", "tvm"])
    assert result.exit_code == 2 and "tvm" in result.output
