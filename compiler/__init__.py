"""compressc: a declarative model-compression compiler for PyTorch.

>>> import torch, compressc
>>> g = compressc.trace(torch.nn.Linear(8, 2), (torch.randn(1, 8),))
>>> g.totals().params
18
"""

from .errors import ModelFileError, PassPreconditionError, TraceError, UserError
from .ir import CostTotals, Graph, LeafReport, NodeCost, NodeInfo, NodeKind, TensorMeta
from .frontends.fx import trace
from .passes.analysis.channel_groups import ChannelGroup, GroupMember, channel_groups
from .passes.analysis.channel_plan import InfeasiblePlanError, predict_cost
from .passes.analysis.channel_probe import register_channel_rule
from .passes.lowering.prune_channels import masked_reference, prune_channels
from .plan import LayerSettings, Plan
from .spec import Spec, SpecError
from .artifact.bundle import load
from .driver import CompileResult, compile

__version__ = "0.1.0"

__all__ = [
    "trace",
    "channel_groups",
    "register_channel_rule",
    "prune_channels",
    "masked_reference",
    "predict_cost",
    "InfeasiblePlanError",
    "Plan",
    "LayerSettings",
    "Spec",
    "SpecError",
    "load",
    "compile",
    "CompileResult",
    "ChannelGroup",
    "GroupMember",
    "Graph",
    "NodeKind",
    "NodeInfo",
    "NodeCost",
    "CostTotals",
    "TensorMeta",
    "LeafReport",
    "UserError",
    "ModelFileError",
    "TraceError",
    "PassPreconditionError",
    "__version__",
]
