"""Frontend: tracing every reference model, the leaf fallback, and the trace's failure modes."""

import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import compressc
from compressc import NodeKind, TraceError

from .models import REFERENCE_MODELS


def _flat(out):
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_reference_model_traces_with_shapes_and_exact_param_totals(name):
    model, inputs = REFERENCE_MODELS[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = compressc.trace(model, inputs)
    for node in g.nodes():
        rec = g.info(node)
        assert isinstance(rec.kind, NodeKind)
        constant_input = rec.kind is NodeKind.INPUT and node.args  # keyword constant traced as its default
        if rec.kind not in (NodeKind.OUTPUT, NodeKind.SHAPE, NodeKind.GETITEM) and not constant_input:
            assert rec.outputs, f"{name}: node {rec.name} ({rec.kind}) has no output tensor recorded"
    assert g.totals().params == sum(p.numel() for p in model.parameters())
    assert g.totals().macs > 0
    with torch.no_grad():
        expected, actual = _flat(model(*inputs)), _flat(g.module(*inputs))
    assert [t.shape for t in actual] == [t.shape for t in expected]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "tracing changed the model's state"


def test_control_flow_submodule_becomes_a_named_leaf():
    model, inputs = REFERENCE_MODELS["control_flow"]()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    g = compressc.trace(model, inputs)
    assert len(g.leaves) == 1
    leaf = g.leaves[0]
    assert "sum" in leaf.reason or "Proxy" in leaf.reason or "symbolically traced" in leaf.reason
    leaf_nodes = [r for r in g.records() if r.kind is NodeKind.LEAF]
    assert [r.module_path for r in leaf_nodes] == [leaf.module_path]
    # the rest of the model is traced through, not hidden inside the leaf
    assert sum(r.kind is NodeKind.CONV for r in g.records()) >= 1


def test_nested_leaf_is_the_smallest_failing_module():
    class Inner(nn.Module):
        def forward(self, x):
            return x * 2 if x.mean() > 0 else x

    class Middle(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.inner = Inner()

        def forward(self, x):
            return self.inner(self.fc(x))

    g = compressc.trace(nn.Sequential(Middle(), nn.ReLU()), (torch.randn(2, 4),))
    assert [leaf.module_path for leaf in g.leaves] == ["0.inner"]
    assert any(r.module_path == "0.fc" and r.kind is NodeKind.LINEAR for r in g.records())


def test_untraceable_root_fails_with_module_name_and_reason():
    class Root(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(TraceError) as err:
        compressc.trace(Root(), (torch.randn(3),))
    assert "Root.forward" in str(err.value) and "test_trace.py" in str(err.value)
    assert err.value.exit_code == 2


def test_wrong_number_of_example_inputs():
    with pytest.raises(TraceError, match="example_inputs"):
        compressc.trace(nn.Bilinear(2, 2, 2), (torch.randn(1, 2),))


def test_keyword_only_constant_and_dict_outputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(5, 2)

        def forward(self, x, y, *, scale: float = 0.5, mode: str = "sum"):
            out = self.a(x) * scale
            if mode == "sum":  # a constant: traced as its default
                out = out + self.b(y)
            return {"logits": out, "aux": (x.mean(), y)}

    net = Net()
    inputs = (torch.randn(4, 3), torch.randn(4, 5))
    g = compressc.trace(net, inputs)
    assert sum(r.kind is NodeKind.INPUT and bool(r.outputs) for r in g.records()) == 2
    got = g.module(*inputs)
    torch.testing.assert_close(got["logits"], net(*inputs)["logits"])


def test_training_mode_model_is_not_changed_by_tracing():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    stats = net[1].running_mean.clone()
    compressc.trace(net, (torch.randn(2, 2, 6, 6),))
    assert net.training and all(m.training for m in net.modules())
    assert torch.equal(net[1].running_mean, stats)
    assert int(net[1].num_batches_tracked) == 0


def test_missing_info_names_the_pass_to_run():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    g = compressc.Graph(module=gm, example_inputs=(torch.randn(1, 2),))
    with pytest.raises(compressc.PassPreconditionError, match="compressc.trace"):
        g.info("_0")
