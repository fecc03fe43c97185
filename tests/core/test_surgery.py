"""Tests of module surgery: idempotence, atomicity, optimizer updates."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn as nn

import leanscale.core.surgery as surgery_module
from leanscale.core.errors import InvalidParameterError
from leanscale.core.surgery import count_modules, replace_module_classes
from leanscale.models import GPT, MLP, GPTConfig


def test_doctests():
    result = doctest.testmod(surgery_module)
    assert result.attempted > 0 and result.failed == 0


class _Gated(nn.Module):
    """A stand-in for an MoE layer: another class, more parameters than the MLP it replaces."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(n_embd, hidden, bias=False)
        self.down = nn.Linear(hidden, n_embd, bias=False)
        self.gate = nn.Linear(n_embd, 1)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) * torch.sigmoid(self.gate(x))


def _bn_net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
    )


def test_counts_and_idempotence():
    model = _bn_net()
    seen = []

    def to_group_norm(module, index):
        seen.append(index)
        return nn.GroupNorm(2, module.num_features)

    assert replace_module_classes(model, {nn.BatchNorm2d: to_group_norm}) == {nn.BatchNorm2d: 2}
    assert seen == [0, 1]
    assert count_modules(model, nn.BatchNorm2d) == 0 and count_modules(model, nn.GroupNorm) == 2
    assert replace_module_classes(model, {nn.BatchNorm2d: to_group_norm}) == {nn.BatchNorm2d: 0}
    assert count_modules(model, nn.GroupNorm) == 2
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4, 4, 4)


def test_exact_class_match_and_none_keeps():
    class MyReLU(nn.ReLU):
        pass

    model = nn.Sequential(nn.ReLU(), MyReLU(), nn.ReLU())
    # Subclasses are not rewritten; returning None keeps the module (index 0 here).
    counts = replace_module_classes(model, {nn.ReLU: lambda m, i: nn.GELU() if i > 0 else None})
    assert counts == {nn.ReLU: 1}
    assert [type(m) for m in model] == [nn.ReLU, MyReLU, nn.GELU]


def test_failure_half_way_leaves_the_model_untouched():
    model = _bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = list(model)
    params_before = list(opt.param_groups[0]["params"])

    def policy(module, index):
        if index == 1:
            raise RuntimeError("cannot build the second one")
        return nn.GroupNorm(2, module.num_features)

    with pytest.raises(RuntimeError, match="second one"):
        replace_module_classes(model, {nn.BatchNorm2d: policy}, optimizers=opt)
    assert list(model) == before  # same module objects, in the same places
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params_before))

    with pytest.raises(InvalidParameterError, match="must return a torch.nn.Module or None"):
        replace_module_classes(model, {nn.BatchNorm2d: lambda m, i: "nope" if i else nn.Identity()})
    assert list(model) == before


def test_optimizer_slots_are_replaced_and_state_dropped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(16, 4)
    model(x).sum().backward()
    opt.step()
    old_bn = model[1]
    assert all(p in opt.state for p in old_bn.parameters())

    replace_module_classes(model, {nn.BatchNorm1d: lambda m, i: nn.LayerNorm(m.num_features)}, optimizers=opt)
    new_ln = model[1]
    params = opt.param_groups[0]["params"]
    assert len(params) == 6
    assert params[2] is new_ln.weight and params[3] is new_ln.bias  # same slots as the BN's
    assert not any(p is q for p in old_bn.parameters() for q in params)
    assert not any(p in opt.state for p in old_bn.parameters())  # stale Adam moments dropped

    before = new_ln.weight.detach().clone()
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()  # the new parameters are trained
    assert not torch.equal(new_ln.weight.detach(), before)


def test_gpt_mlp_to_another_class_with_more_parameters():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=30, block_size=8, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    )
    n_before = sum(len(g["params"]) for g in opt.param_groups)

    counts = replace_module_classes(model, {MLP: lambda m, i: _Gated(m.n_embd, m.hidden)}, optimizers=opt)
    assert counts == {MLP: 2}
    gated = [m for m in model.modules() if isinstance(m, _Gated)]
    # Per layer: up/down take the MLP's two weight slots (group 0); gate.weight and gate.bias are
    # appended to group 0, the group of the replaced MLP's parameters.
    assert sum(len(g["params"]) for g in opt.param_groups) == n_before + 2 * 2
    in_group0 = {id(p) for p in opt.param_groups[0]["params"]}
    assert all(id(p) in in_group0 for m in gated for p in m.parameters())
    assert {id(p) for p in model.parameters()} == {id(p) for g in opt.param_groups for p in g["params"]}

    idx = torch.randint(0, 30, (4, 8))
    _, loss = model(idx, targets=idx)
    loss.backward()
    before = gated[0].gate.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, gated[0].gate.weight.detach())
    assert replace_module_classes(model, {MLP: lambda m, i: _Gated(m.n_embd, m.hidden)}) == {MLP: 0}


def test_new_parameters_without_a_home_raise_before_changing_anything():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}]
    opt = torch.optim.SGD(groups, lr=0.1)
    with pytest.raises(InvalidParameterError, match="which of the optimizer's 2 param groups"):
        replace_module_classes(model, {nn.ReLU: lambda m, i: nn.PReLU()}, optimizers=opt)
    assert type(model[1]) is nn.ReLU
    # With one group there is no doubt.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    replace_module_classes(model, {nn.ReLU: lambda m, i: nn.PReLU()}, optimizers=opt)
    assert opt.param_groups[0]["params"][-1] is model[1].weight


def test_shared_and_tied_parameters():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    counts = replace_module_classes(model, {nn.Linear: lambda m, i: nn.Linear(3, 3, bias=False)})
    assert counts == {nn.Linear: 1}  # offered once...
    assert model[0] is model[2] and model[0] is not shared  # ...replaced everywhere

    # A weight tied to a module that stays is kept in the optimizer.
    emb, head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict(dict(emb=emb, head=head))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    replace_module_classes(model, {nn.Linear: lambda m, i: nn.Linear(4, 5)}, optimizers=opt)
    params = opt.param_groups[0]["params"]
    assert any(p is emb.weight for p in params)
    assert {id(p) for p in model.parameters()} == {id(p) for p in params}


def test_indices_continue_numbering():
    model = nn.Sequential(nn.ReLU(), nn.ReLU())
    indices = {nn.ReLU: 5}
    seen = []
    replace_module_classes(model, {nn.ReLU: lambda m, i: seen.append(i)}, indices=indices)
    assert seen == [5, 6] and indices == {nn.ReLU: 7}


def test_bad_input():
    with pytest.raises(InvalidParameterError, match="'model' parameter of replace_module_classes"):
        replace_module_classes([nn.ReLU()], {nn.ReLU: lambda m, i: None})
    with pytest.raises(InvalidParameterError, match="must be subclasses of torch.nn.Module"):
        replace_module_classes(nn.Sequential(), {"ReLU": lambda m, i: None})
    with pytest.raises(InvalidParameterError, match="must be callable"):
        replace_module_classes(nn.Sequential(), {nn.ReLU: nn.GELU()})  # an instance, not a function
    with pytest.raises(InvalidParameterError, match="must be callable"):
        replace_module_classes(nn.Sequential(), {nn.ReLU: 3})
    with pytest.raises(InvalidParameterError, match="'optimizers' parameter"):
        replace_module_classes(nn.Sequential(), {nn.ReLU: lambda m, i: None}, optimizers=[1])
    with pytest.raises(InvalidParameterError, match="'model' parameter of count_modules"):
        count_modules("model", nn.ReLU)


@pytest.mark.parametrize("cls", ["Linear", (), (nn.Linear, "x"), None])
def test_count_modules_refuses_a_non_class(cls):
    with pytest.raises(InvalidParameterError, match="'cls' parameter of count_modules must be a class"):
        count_modules(nn.Linear(2, 2), cls)
