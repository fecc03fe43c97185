"""apply_swat on models leanscale did not write: a ResNet-style CNN that calls F.relu in forward,
nn.TransformerEncoder (fused attention: skipped, with the reason), Hugging Face BERT and Llama
(attention projections converted, lm_head kept dense), the conversion report, and a few training
steps on each."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers  # a dev dependency (through sentence-transformers)
from torch import nn

from leanscale.sparse import (
    CompactReLU,
    SWATConv2d,
    SWATLinear,
    apply_swat,
    export_pruned,
    swat_layers,
    track_saved_tensors,
)
from leanscale.sparse.report import swat_conversion_report, swat_report

# ------------------------------------------------------------------------- a ResNet-style CNN


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu, conv-bn, + shortcut, relu; ReLUs functional (or
    nn.ReLU modules with ``modules=True``, the reference)."""

    def __init__(self, c_in, c_out, stride=1, modules=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))
        self.relu1, self.relu2 = (nn.ReLU(), nn.ReLU(inplace=True)) if modules else (None, None)

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        out = self.relu1(out) if self.relu1 is not None else F.relu(out)
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out) if self.relu2 is not None else F.relu(out, inplace=True)


class ResNetish(nn.Module):
    def __init__(self, width=8, n_classes=10, modules=False):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.stem_relu = nn.ReLU(inplace=True) if modules else None
        self.layer1 = nn.Sequential(BasicBlock(width, width, modules=modules), BasicBlock(width, width, modules=modules))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2, modules=modules),
                                    BasicBlock(2 * width, 2 * width, modules=modules))
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x):
        x = self.bn(self.stem(x))
        x = self.stem_relu(x) if self.stem_relu is not None else x.relu_()
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnets(**kw):
    """(dense, functional-ReLU SWAT, nn.ReLU-module SWAT) with the same weights."""
    torch.manual_seed(0)
    dense = ResNetish()
    functional, modules = ResNetish(), ResNetish(modules=True)
    functional.load_state_dict(dense.state_dict())
    modules.load_state_dict(dense.state_dict())
    return dense, apply_swat(functional, 0.8, **kw), apply_swat(modules, 0.8, **kw)


CONVERTED = ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2", "layer2.0.conv1",
             "layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv1", "layer2.1.conv2"]


def saved(model, x):
    with track_saved_tensors(model) as s:
        out = model(x)
    out.sum().backward()
    return s


def test_resnet_first_conv_and_head_stay_dense_and_the_report_says_why():
    _, model, _ = resnets()
    assert [n for n, _ in swat_layers(model)] == CONVERTED
    assert type(model.stem) is nn.Conv2d and type(model.fc) is nn.Linear
    report = swat_conversion_report(model)
    assert [r["layer"] for r in report["converted"]] == CONVERTED
    assert {r["layer"]: r["reason"] for r in report["skipped"]} == {
        "stem": "first layer kept dense (dense_first_layer=True)",
        "fc": "output head kept dense (dense_last_layer=True)"}
    assert report["functional_relu"] is True and report["not_covered"] is None
    assert report["settings"]["dense_last_layer"] is True
    everything = apply_swat(ResNetish(), 0.8, dense_first_layer=False, dense_last_layer=False)
    assert [n for n, _ in swat_layers(everything)] == ["stem", *CONVERTED, "fc"]
    assert swat_conversion_report(everything)["skipped"] == []


def test_functional_relus_save_what_relu_modules_save():
    dense, functional, modules = resnets()
    x = torch.randn(8, 3, 12, 12)
    s_dense, s_fn, s_mod = saved(dense, x), saved(functional, x), saved(modules, x)
    # the same bytes as the nn.ReLU-module model, whose ReLUs CompactReLU replaced
    assert s_fn.total_bytes == pytest.approx(s_mod.total_bytes, rel=0.01)
    assert s_fn.total_bytes < 0.7 * s_dense.total_bytes
    # what the converted layers hold falls by ~77% (0.2 * 4 + 1/8 bytes per element instead of 4)
    held_dense = sum(s_dense.held_by_module[n] for n in CONVERTED)
    held_fn = sum(s_fn.held_by_module[n] for n in CONVERTED)
    assert held_fn < 0.27 * held_dense
    # without the functional coverage the ReLU outputs stay dense: nothing saved overall
    _, uncovered, _ = resnets(compact_relu=False)
    assert saved(uncovered, x).total_bytes > s_dense.total_bytes
    report = swat_conversion_report(uncovered, x)
    assert report["functional_relu"] is False
    assert {r["layer"] for r in report["not_covered"]} == set(CONVERTED)
    for row in report["not_covered"]:
        assert "ReluBackward0" in {s["made_by"] for s in row["held_densely_by"]}
        assert row["input_bytes"] > 0
    assert "not covered: the input of layer1.0.conv1" in report["text"]
    covered = swat_conversion_report(functional, x)
    assert covered["not_covered"] == [] and len(covered["coverage"]) == len(CONVERTED)


def test_compact_functional_relus_change_no_value_or_gradient():
    _, compact, _ = resnets()
    _, plain, _ = resnets(compact_relu=False)
    x = torch.randn(4, 3, 12, 12)
    out_c, out_p = compact(x), plain(x)
    torch.testing.assert_close(out_c, out_p, rtol=0, atol=0)
    out_c.pow(2).sum().backward()
    out_p.pow(2).sum().backward()
    for (name, a), b in zip(compact.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


def test_functional_relu_calls_are_each_covered():
    class Calls(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d, self.e = (nn.Linear(16, 16) for _ in range(5))

        def forward(self, x):
            x = torch.relu(self.a(x))
            x = self.b(x).relu()
            x = F.relu(self.c(x), inplace=True)
            h = self.d(x)
            h.relu_()
            return self.e(h)

    model = apply_swat(Calls(), 0.5, dense_first_layer=False, dense_last_layer=False)
    x = torch.randn(64, 16)
    report = swat_conversion_report(model, x)
    assert report["not_covered"] == []  # every ReLU output feeding a SWAT layer is held as bits only
    ref = apply_swat(Calls(), 0.5, dense_first_layer=False, dense_last_layer=False, compact_relu=False)
    ref.load_state_dict(model.state_dict())
    assert {r["layer"] for r in swat_conversion_report(ref, x)["not_covered"]} == {"b", "c", "d", "e"}
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    with torch.no_grad():  # no gradient: plain ReLUs, same values
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_the_function_mode_switches_off_where_no_functional_relu_runs():
    from leanscale.sparse.swat import _FunctionalReLUHook

    def hook_of(model):
        return next(h.__self__ for h in model._forward_pre_hooks.values()
                    if isinstance(getattr(h, "__self__", None), _FunctionalReLUHook))

    _, functional, modules = resnets()
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        functional(x)
        modules(x)
    assert hook_of(functional).skip == 0  # F.relu runs: the mode stays on
    assert hook_of(modules).skip == _FunctionalReLUHook.REPROBE - 2  # all ReLUs are CompactReLU modules
    with torch.no_grad():
        modules(x)  # forwards without gradients neither count nor probe
    assert hook_of(modules).skip == _FunctionalReLUHook.REPROBE - 2


@pytest.mark.parametrize("reentrant", [False, True])
def test_functional_relus_under_activation_checkpointing(reentrant):
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self, use_checkpoint):
            super().__init__()
            self.inp, self.a, self.b, self.out = (nn.Linear(8, 8) for _ in range(4))
            self.use_checkpoint = use_checkpoint

        def block(self, h):
            return self.b(F.relu(self.a(h)))

        def forward(self, x):
            h = self.inp(x)
            h = checkpoint(self.block, h, use_reentrant=reentrant) if self.use_checkpoint else self.block(h)
            return self.out(F.relu(h))

    torch.manual_seed(0)
    plain, ckpt = Checkpointed(False), Checkpointed(True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 8)
    for model in (plain, ckpt):
        apply_swat(model, 0.5, dense_first_layer=False, dense_last_layer=False)
        model(x).pow(2).sum().backward()  # the recomputation matches the first pass: no CheckpointError
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_report_measuring_restores_the_model():
    _, model, _ = resnets()
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swat_conversion_report(model, x)
    assert not model.training and not any(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics and SWAT steps untouched


def test_resnet_flops_memory_report_and_training():
    dense, model, _ = resnets()
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))
    report = swat_report(dense, model, x)
    assert [r["layer"] for r in report["layers"]] == CONVERTED
    for r in report["layers"]:
        assert r["train_flops_swat"] / r["train_flops_dense"] == pytest.approx(0.2, abs=0.03)
        assert r["held_bytes_swat"] < 0.3 * r["held_bytes_dense"]
    t = report["total"]
    assert t["train_flops_swat"] < 0.4 * t["train_flops_dense"]
    assert t["saved_bytes_swat"] < 0.7 * t["saved_bytes_dense"]
    assert report["conversion"]["not_covered"] == []
    assert "output head kept dense" in report["text"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2


def test_copy_pickle_and_export_keep_or_drop_the_functional_coverage():
    _, model, _ = resnets()
    x = torch.randn(4, 3, 16, 16)
    clone = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))  # the hook is a module-level class: picklable
    ref = saved(model, x).total_bytes
    assert saved(clone, x).total_bytes == ref and saved(restored, x).total_bytes == ref
    export_pruned(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(isinstance(m, (SWATConv2d, CompactReLU)) for m in model.modules())


# ------------------------------------------------------------------------- nn.TransformerEncoder


def encoder(**kw):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, **kw)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_transformer_encoder_attention_skipped_with_the_reason():
    model = encoder()
    with pytest.warns(UserWarning, match=r"apply_swat left 4 layer\(s\).*'layers.0.self_attn' \(MultiheadAttention\)"
                                         r".*swat_conversion_report"):
        apply_swat(model, 0.8, dense_first_layer=False, dense_last_layer=False)
    assert [n for n, _ in swat_layers(model)] == ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1",
                                                    "layers.1.linear2"]
    x = torch.randn(4, 6, 16)
    report = swat_conversion_report(model, x)
    reasons = {r["layer"]: r["reason"] for r in report["skipped"]}
    assert set(reasons) == {"layers.0.self_attn", "layers.0.self_attn.out_proj", "layers.1.self_attn",
                            "layers.1.self_attn.out_proj"}
    assert "fused in_proj_weight" in reasons["layers.0.self_attn"]
    assert "out_proj of nn.MultiheadAttention" in reasons["layers.1.self_attn.out_proj"]
    assert report["not_covered"] == []  # linear2's input: the functional ReLU's output, compact
    stepwise = encoder()
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        apply_swat(stepwise, 0.8, layers=["layers.0.linear1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second conversion does not warn about the same layers again
        apply_swat(stepwise, 0.8, layers=["layers.1.linear2"])
    reasons = {r["layer"]: r["reason"] for r in swat_conversion_report(stepwise)["skipped"]}
    assert reasons["layers.0.linear2"] == reasons["layers.1.linear1"] == "not named in 'layers'"
    assert "layers.0.linear1" not in reasons and "layers.1.linear2" not in reasons
    assert "fused in_proj_weight" in reasons["layers.1.self_attn"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.randn(4, 6, 16)
    losses = []
    for _ in range(8):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_transformer_encoder_at_zero_sparsity_equals_dense():
    dense, model = encoder(), encoder()
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        apply_swat(model, 0.0, dense_first_layer=False, dense_last_layer=False)
    x = torch.randn(3, 5, 16)
    out_d, out_s = dense(x), model(x)
    torch.testing.assert_close(out_s, out_d)
    out_d.pow(2).sum().backward()
    out_s.pow(2).sum().backward()
    for (name, a), b in zip(model.named_parameters(), dense.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# ------------------------------------------------------------------------- Hugging Face BERT and Llama


def test_hf_bert_attention_projections_converted():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = apply_swat(transformers.BertModel(config), 0.8)
    attn = model.encoder.layer[1].attention
    assert all(isinstance(m, SWATLinear) for m in (attn.self.query, attn.self.key, attn.self.value, attn.output.dense))
    assert type(model.pooler.dense) is nn.Linear  # the last layer, kept dense
    ids = torch.randint(0, 100, (4, 12))
    report = swat_conversion_report(model, {"input_ids": ids})
    reasons = {r["layer"]: r["reason"] for r in report["skipped"]}
    assert reasons["encoder.layer.0.attention.self.query"].startswith("first layer kept dense")
    assert reasons["pooler.dense"].startswith("output head kept dense")
    assert reasons["embeddings.word_embeddings"].startswith("not a SWAT target")
    # the dense first projection saves its input, which key and value share: measured and reported
    not_covered = {r["layer"]: r for r in report["not_covered"]}
    assert {"encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value"} <= set(not_covered)
    assert not_covered["encoder.layer.0.attention.self.key"]["held_densely_by"][0]["module"] == \
        "encoder.layer.0.attention.self.query"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    target = torch.randn(4, 12, 32)
    losses = []
    for _ in range(6):
        loss = F.mse_loss(model(input_ids=ids).last_hidden_state, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def test_hf_llama_lm_head_stays_dense_and_training_lowers_the_loss():
    model = apply_swat(tiny_llama(), 0.8, dense_first_layer=False)
    assert type(model.lm_head) is nn.Linear  # found through get_output_embeddings()
    names = [n for n, _ in swat_layers(model)]
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    report = swat_conversion_report(model)
    assert {r["layer"]: r["reason"] for r in report["skipped"]}["lm_head"] == \
        "output head kept dense (dense_last_layer=True)"
    ids = torch.randint(0, 128, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    head = apply_swat(tiny_llama(), 0.8, dense_last_layer=False)
    assert isinstance(head.lm_head, SWATLinear)


def test_hf_llama_saved_bytes_fall_and_the_report_names_what_stays_dense():
    dense = tiny_llama()
    model = apply_swat(tiny_llama(), 0.8, dense_first_layer=False)
    ids = torch.randint(0, 128, (4, 32))
    report = swat_report(dense, model, ids)
    t = report["total"]
    assert "LlamaRMSNorm" in t["flops_not_counted"] and "LlamaRMSNorm" in report["text"]
    assert t["held_bytes_converted_swat"] < 0.35 * t["held_bytes_converted_dense"]
    assert t["train_flops_swat"] < t["train_flops_dense"]
    # fused attention (scaled_dot_product_attention) keeps its output for its backward: o_proj's input
    not_covered = {r["layer"]: r for r in report["conversion"]["not_covered"]}
    for r in not_covered.values():
        assert r["layer"].endswith("o_proj")
    for r in report["conversion"]["coverage"]:
        if r["layer"] not in not_covered:
            assert r["ran"] and r["held_densely_by"] == []


def test_reports_refuse_what_they_cannot_read():
    from leanscale.core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=r"'model' parameter of swat_conversion_report has no SWAT layer"):
        swat_conversion_report(ResNetish())

    class Ints(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return {"n": int(self.c(self.b(self.a(x))).sum() > 0)}

    dense, model = Ints(), apply_swat(Ints(), 0.5)
    with pytest.raises(InvalidParameterError, match=r"must return a tensor .* Got dict"):
        swat_report(dense, model, torch.randn(2, 4))


def test_hf_gpt2_conv1d_is_named_when_nothing_can_be_converted():
    from leanscale.core.errors import InvalidParameterError

    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(InvalidParameterError, match=r"nothing to convert: .*besides the first.*4 layer\(s\) with "
                                                    r"weights are of types SWAT cannot convert: "
                                                    r"'transformer.h.0.attn.c_attn' \(Conv1D\)"):
        apply_swat(model, 0.8)
    with pytest.warns(UserWarning, match=r"apply_swat left 4 layer\(s\).*Conv1D"):
        apply_swat(model, 0.8, dense_first_layer=False, dense_last_layer=False)
    reasons = {r["layer"]: r["reason"] for r in swat_conversion_report(model)["skipped"]}
    assert "Hugging Face Conv1D" in reasons["transformer.h.0.mlp.c_fc"]
    assert [n for n, _ in swat_layers(model)] == ["lm_head"]
