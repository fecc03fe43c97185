"""SavedTensors.savers_of: which module and which operation saved a tensor's storage for backward."""

import torch
from torch import nn

from leanscale.sparse import track_saved_tensors


class TanhNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        self.hidden = torch.tanh(self.a(x))  # tanh saves its output, which b saves again
        return self.b(self.hidden)


def test_savers_of_names_module_and_operation():
    model = TanhNet()
    x = torch.randn(4, 6)
    with track_saved_tensors(model) as saved:
        out = model(x)
    hidden = model.hidden
    assert saved.savers_of(hidden) == [("", "TanhBackward0"), ("b", "TanhBackward0")]
    assert saved.savers_of(x) == [("a", "leaf")]  # the input of a, which has no grad_fn
    assert saved.savers_of(out) == []  # nothing saves the output
    assert saved.savers_of(model.a.weight) == []  # parameters are resident: not counted
    assert saved.savers_of("not a tensor") == []
    # bytes: the input (4 x 6) and the hidden (4 x 5) float32, each counted once
    assert saved.total_bytes == 4 * (4 * 6 + 4 * 5)
    assert saved.held_by_module == {"a": 4 * 4 * 6, "": 4 * 4 * 5, "b": 4 * 4 * 5}
    out.sum().backward()
