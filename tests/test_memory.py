"""Bounded memory (issue 15): a data-free compile copies no model per measurement.

The compile runs in a fresh process so that its peak resident memory is its own; ``report.json``'s
``memory`` gives the peak of each phase. The sensitivity phase measures ~70 one-knob modules of a
19 MB (fp32) MLP: with a pruned copy (or its sliced tensors) kept alive per measurement until the
cyclic garbage collector ran, that phase grew by ~30x the weights; now it grows by well under 4x.
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, torch, compressc
from compressc.perf import peak_rss_bytes
torch.set_num_threads(1)
torch.manual_seed(0)
net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(768, 768), torch.nn.ReLU()) for _ in range(8)],
                          torch.nn.Linear(768, 10)).eval()
base = peak_rss_bytes()
result = compressc.compile(net, (torch.randn(2, 768),), target_size="25%", progress=False, cache_dir=False)
print(json.dumps({"base": base, "memory": result.report["memory"], "fp32": 4 * sum(p.numel() for p in net.parameters())}))
"""


def test_data_free_compile_memory_is_bounded_by_the_weights():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    fp32, base, phases = out["fp32"], out["base"], out["memory"]["phases"]
    assert phases["sensitivity"] - base <= 4 * fp32 + 150e6, (phases, fp32)
    assert out["memory"]["peak_rss_bytes"] - base <= 4 * fp32 + 400e6, (phases, fp32)
