"""apply_swat on models leanscale did not write: a ResNet-style CNN that calls F.relu in forward,
nn.TransformerEncoder (nn.MultiheadAttention's fused projections: sparse weights only, said so in
the report), Hugging Face BERT and Llama (attention projections converted, lm_head kept dense),
GPT-2 (Conv1D, (in, out) weights), the conversion report, export and a few training steps on each."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers  # a dev dependency (through sentence-transformers)
from torch import nn
from transformers.pytorch_utils import Conv1D

from leanscale.sparse import (
    CompactReLU,
    SWATConv2d,
    SWATLinear,
    apply_swat,
    export_pruned,
    load_pruned,
    save_pruned,
    swat_layers,
    to_sparse_kernels,
    track_saved_tensors,
)
from leanscale.sparse.export import SparseLinear
from leanscale.sparse.report import swat_conversion_report, swat_report
from leanscale.sparse.swat import SWATConv1D, SWATMultiheadAttention

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


# (nn.TransformerEncoder / nn.MultiheadAttention and GPT-2's Conv1D: at the end of this file)


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
    assert set(t["flops_not_counted"]) <= {"LlamaRMSNorm"}  # counted once core.flops has an RMSNorm rule
    assert all(n in report["text"] for n in t["flops_not_counted"])
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


# ------------------------------------------------------------------------- Hugging Face GPT-2: Conv1D


def brute_topk(t, density):
    """Mask of the K = round(density * numel) largest |t| (a full sort; no ties in random data)."""
    k = max(1, round(density * t.numel()))
    flat = torch.zeros(t.numel(), dtype=torch.bool)
    flat[t.detach().abs().reshape(-1).argsort(descending=True)[:k]] = True
    return flat.view_as(t)


def conv1d_pair(nf=24, nx=16):
    torch.manual_seed(0)
    dense = Conv1D(nf, nx)
    with torch.no_grad():
        dense.bias.normal_()
    ref = copy.deepcopy(dense)
    return dense, ref


def test_conv1d_at_zero_sparsity_equals_the_dense_layer():
    layer, ref = conv1d_pair()
    swat = SWATConv1D.from_dense(layer, sparsity=0.0)
    assert swat.weight is layer.weight and swat.weight.shape == (16, 24)  # (in, out) kept, Parameters shared
    x = torch.randn(3, 5, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = swat(x), ref(x_ref)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(swat.weight.grad, ref.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(swat.bias.grad, ref.bias.grad, rtol=0, atol=0)


@pytest.mark.parametrize("structured", [False, True])
def test_conv1d_at_sparsity_s_is_the_top_k_masked_dense_layer(structured):
    layer, ref = conv1d_pair()
    swat = SWATConv1D.from_dense(layer, sparsity=0.75, activation_sparsity=0.5, structured=structured)
    w = ref.weight.detach()
    if structured:  # whole output channels: the columns of the (in, out) weight, by L2 norm
        keep = brute_topk(w.norm(dim=0), 0.25)
        w_mask = keep.view(1, -1).expand_as(w)
    else:
        w_mask = brute_topk(w, 0.25)
    assert torch.equal(swat.weight_mask(), w_mask)
    x = torch.randn(4, 6, 16, requires_grad=True)
    out = swat(x)
    expected = x.detach() @ (w * w_mask) + ref.bias.detach()  # the dense Conv1D with the masked weight
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad, g @ (w * w_mask).t())  # through the same sparse weights
    x2 = x.detach().reshape(-1, 16)
    if structured:  # the input channels (features) with the largest L2 norm over the batch
        a_mask = brute_topk(x2.norm(dim=0), 0.5).view(1, -1).expand_as(x2)
    else:
        a_mask = brute_topk(x2, 0.5)
    # dense in W: every (in, out) entry, pruned ones included, gets g^T topk(x) -- transposed to (in, out)
    torch.testing.assert_close(swat.weight.grad, (x2 * a_mask).t() @ g.reshape(-1, 24))
    torch.testing.assert_close(swat.bias.grad, g.reshape(-1, 24).sum(0))
    assert swat.last_stats["weight_density"] == pytest.approx(0.25, abs=0.01)


def tiny_gpt2(n_layer=2):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=n_layer, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


GPT2_CONVERTED = [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                          "mlp.c_proj")]


def test_gpt2_conv1d_converted_lm_head_dense_and_training_lowers_the_loss():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unconverted to warn about
        model = apply_swat(tiny_gpt2(), 0.8, dense_first_layer=False)
    assert [n for n, _ in swat_layers(model)] == GPT2_CONVERTED
    assert all(isinstance(m, SWATConv1D) for _, m in swat_layers(model))
    assert type(model.lm_head) is nn.Linear
    ids = torch.randint(0, 64, (4, 16))
    report = swat_conversion_report(model, {"input_ids": ids})
    assert [r["layer"] for r in report["converted"]] == GPT2_CONVERTED
    assert {r["type"] for r in report["converted"]} == {"SWATConv1D"}
    reasons = {r["layer"]: r["reason"] for r in report["skipped"]}
    assert reasons == {"lm_head": "output head kept dense (dense_last_layer=True)",
                       "transformer.wte": reasons["transformer.wte"], "transformer.wpe": reasons["transformer.wpe"]}
    assert reasons["transformer.wte"].startswith("not a SWAT target")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(m.last_stats["weight_density"] == pytest.approx(0.2, abs=0.01) for _, m in swat_layers(model))
    # the default keeps the first layer (block 0's c_attn) dense
    default = apply_swat(tiny_gpt2(), 0.8)
    assert [n for n, _ in swat_layers(default)] == GPT2_CONVERTED[1:]


def test_gpt2_flops_and_saved_bytes_fall():
    dense, model = tiny_gpt2(), apply_swat(tiny_gpt2(), 0.8, dense_first_layer=False)
    ids = torch.randint(0, 64, (4, 16))
    report = swat_report(dense, model, ids)
    for r in report["layers"]:
        assert r["train_flops_swat"] / r["train_flops_dense"] == pytest.approx(0.2, abs=0.03)
        assert r["held_bytes_swat"] < 0.35 * r["held_bytes_dense"]
    assert "Conv1D" not in report["total"]["flops_not_counted"]


def test_gpt2_save_pretrained_round_trips_before_and_after_export(tmp_path):
    model = apply_swat(tiny_gpt2(), 0.8, dense_first_layer=False)
    ids = torch.randint(0, 64, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()  # a step, so that the state is a trained one
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    # the SWAT model in training form: Conv1D's keys and (in, out) shapes, plus the step counters
    state = model.state_dict()
    dense_state = tiny_gpt2().state_dict()
    assert {k: v.shape for k, v in state.items() if not k.endswith("swat_step")} == \
        {k: v.shape for k, v in dense_state.items()}
    model.save_pretrained(tmp_path / "swat")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "swat")  # dense weights, swat_step ignored
    apply_swat(reloaded, 0.8, dense_first_layer=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    # hard-pruned: plain Conv1D with zeros, loadable without leanscale
    export_pruned(model)
    assert all(type(model.transformer.h[i].attn.c_attn) is Conv1D for i in range(2))
    assert model.transformer.h[1].mlp.c_fc.weight.shape == (16, 64)
    assert float((model.transformer.h[1].mlp.c_fc.weight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
    model.save_pretrained(tmp_path / "pruned")
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected)


def test_gpt2_save_pruned_load_pruned_and_sparse_kernels(tmp_path):
    model = apply_swat(tiny_gpt2(), 0.9, dense_first_layer=False)
    ids = torch.randint(0, 64, (2, 12))
    export_pruned(model).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    path = save_pruned(model, tmp_path / "gpt2.pt")
    blob = torch.load(path, weights_only=True)
    record = blob["state"]["transformer.h.0.mlp.c_fc.weight"]
    assert isinstance(record, dict) and record["shape"] == (16, 64)  # CSR of the (in, out) weight
    assert record["values"].numel() == round(0.1 * 16 * 64)
    fresh = tiny_gpt2()
    torch.manual_seed(1)
    load_pruned(fresh, path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=0, atol=0)
    to_sparse_kernels(fresh, min_sparsity=0.85)
    assert isinstance(fresh.transformer.h[0].attn.c_attn, SparseLinear)
    assert fresh.transformer.h[0].attn.c_attn.weight_csr.shape == (48, 16)  # (out, in)
    assert type(fresh.lm_head) is nn.Linear  # dense head: below the threshold
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_conv1d_bad_input():
    from leanscale.core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=r"'module' parameter of SWATConv1D.from_dense must be a "
                                                    r"transformers.pytorch_utils.Conv1D. Got torch.nn.*Linear"):
        SWATConv1D.from_dense(nn.Linear(2, 2))
    with pytest.raises(InvalidParameterError, match=r"'x' parameter of SWATConv1D must be a floating tensor of "
                                                    r"shape \(\.\.\., nx=16\)"):
        SWATConv1D(8, 16)(torch.randn(2, 8))
    with pytest.raises(InvalidParameterError, match=r"'nf' parameter of SWATConv1D must be a positive int"):
        SWATConv1D(0, 16)


# ------------------------------------------------------------------------- nn.MultiheadAttention


def encoder(**kw):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, **kw)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


ENCODER_CONVERTED = ["layers.0.self_attn", "layers.0.linear1", "layers.0.linear2", "layers.1.self_attn",
                     "layers.1.linear1", "layers.1.linear2"]


def mha_blocks_mask(mha, density):
    """Brute-force masks: the q, k and v blocks of in_proj_weight each keep their own top-K, and so
    does out_proj.weight."""
    e = mha.embed_dim
    w = mha.in_proj_weight.detach()
    return (torch.cat([brute_topk(w[i * e:(i + 1) * e], density) for i in range(3)]),
            brute_topk(mha.out_proj.weight.detach(), density))


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_is_the_dense_attention_with_top_k_weights(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    ref = copy.deepcopy(mha)
    swat = SWATMultiheadAttention.from_dense(mha, sparsity=0.7)
    assert swat.in_proj_weight is mha.in_proj_weight and swat.out_proj is mha.out_proj
    in_mask, out_mask = mha_blocks_mask(ref, 0.3)
    assert torch.equal(swat.weight_masks()[0], in_mask) and torch.equal(swat.weight_masks()[1], out_mask)
    with torch.no_grad():  # the reference: the plain attention with the masked weights
        ref.in_proj_weight.mul_(in_mask)
        ref.out_proj.weight.mul_(out_mask)
    shape = (2, 5, 16) if batch_first else (5, 2, 16)
    q = torch.randn(*shape, requires_grad=True)
    kv = torch.randn(*shape, requires_grad=True)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    q_ref, kv_ref = (t.detach().clone().requires_grad_() for t in (q, kv))
    for args, args_ref in (((q, q, q), (q_ref, q_ref, q_ref)), ((q, kv, kv), (q_ref, kv_ref, kv_ref))):
        out, attn = swat(*args, key_padding_mask=pad)
        out_ref, attn_ref = ref(*args_ref, key_padding_mask=pad)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(attn, attn_ref)
        g = torch.randn_like(out)
        out.backward(g)
        out_ref.backward(g)
    torch.testing.assert_close(q.grad, q_ref.grad)  # the input gradient through the sparse weights
    torch.testing.assert_close(kv.grad, kv_ref.grad)
    # the weight gradient is dense in W: the reference's gradient w.r.t. the masked weight, everywhere
    torch.testing.assert_close(swat.in_proj_weight.grad, ref.in_proj_weight.grad)
    torch.testing.assert_close(swat.out_proj.weight.grad, ref.out_proj.weight.grad)
    assert (swat.in_proj_weight.grad[~in_mask] != 0).any()
    assert swat.last_stats == {"weight_density": pytest.approx(0.3, abs=0.01), "activation_density": None}


def test_transformer_encoder_attention_converted_weights_only_and_the_report_says_so():
    model = encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused attention converts: nothing to warn about
        apply_swat(model, 0.8, dense_first_layer=False, dense_last_layer=False)
    assert [n for n, _ in swat_layers(model)] == ENCODER_CONVERTED
    x = torch.randn(4, 6, 16)
    report = swat_conversion_report(model, x)
    assert report["skipped"] == []  # out_proj is part of the converted attention
    rows = {r["layer"]: r for r in report["converted"]}
    assert rows["layers.0.self_attn"]["type"] == "SWATMultiheadAttention"
    assert rows["layers.0.linear1"]["activations"] == "compact top-K"
    assert "NOT sparsified or stored compactly, because F.multi_head_attention_forward" in \
        rows["layers.1.self_attn"]["activations"]
    not_covered = {r["layer"]: r for r in report["not_covered"]}
    assert set(not_covered) == {"layers.0.self_attn", "layers.1.self_attn"}  # linear2's input: compact ReLU
    assert not_covered["layers.0.self_attn"]["weights_only_held_bytes"] >= 3 * x.numel() * 4  # q, k, v copies
    assert "layers.0.self_attn sparsifies weights only" in report["text"]
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
    stepwise = encoder()
    apply_swat(stepwise, 0.8, layers=["layers.0.linear1"])
    reasons = {r["layer"]: r["reason"] for r in swat_conversion_report(stepwise)["skipped"]}
    assert reasons["layers.1.self_attn"] == "not named in 'layers'"
    assert "sparsified together with the attention" in reasons["layers.1.self_attn.out_proj"]


def test_transformer_encoder_at_zero_sparsity_equals_dense():
    dense, model = encoder(), encoder()
    apply_swat(model, 0.0, dense_first_layer=False, dense_last_layer=False)
    x = torch.randn(3, 5, 16)
    out_d, out_s = dense(x), model(x)
    torch.testing.assert_close(out_s, out_d)
    out_d.pow(2).sum().backward()
    out_s.pow(2).sum().backward()
    for (name, a), b in zip(model.named_parameters(), dense.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_transformer_encoder_inference_runs_the_sparse_weights_not_the_fused_fast_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2)  # enable_nested_tensor=True: the nested fast path is on
    assert model.use_nested_tensor
    apply_swat(model, 0.8, dense_first_layer=False, dense_last_layer=False).eval()
    assert not model.use_nested_tensor
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with_grad = model(x, src_key_padding_mask=pad)  # PyTorch's reference path
    with torch.no_grad():  # would take the fused kernels, which read the raw dense weights
        no_grad = model(x, src_key_padding_mask=pad)
    torch.testing.assert_close(no_grad, with_grad)
    export_pruned(model)
    assert model.use_nested_tensor  # switched back on: the pruned weights are the real ones
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")
        fused = model(x, src_key_padding_mask=pad)  # the nested fast path, zeros at padded positions
    torch.testing.assert_close(fused[~pad], with_grad.detach()[~pad])


def test_transformer_encoder_export_and_save_pruned_round_trip(tmp_path):
    model = apply_swat(encoder(), 0.8, dense_first_layer=False, dense_last_layer=False).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected = model(x)
    masks = model.layers[1].self_attn.weight_masks()
    export_pruned(model)
    attn = model.layers[1].self_attn
    assert type(attn) is nn.MultiheadAttention and type(attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert torch.equal(attn.in_proj_weight != 0, masks[0]) and torch.equal(attn.out_proj.weight != 0, masks[1])
    assert set(model.state_dict()) == set(encoder().state_dict())
    with torch.no_grad():
        pruned = model(x)  # PyTorch's fused kernels now: the same values up to rounding
    torch.testing.assert_close(pruned, expected)
    path = save_pruned(model, tmp_path / "enc.pt")
    assert isinstance(torch.load(path, weights_only=True)["state"]["layers.0.self_attn.in_proj_weight"], dict)
    fresh = encoder()
    torch.manual_seed(3)
    load_pruned(fresh, path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pruned, rtol=0, atol=0)


def test_mha_with_separate_projection_weights_stays_dense_with_the_reason():
    from leanscale.core.errors import InvalidParameterError

    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
            self.ff, self.out = nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x, memory):
            return self.out(self.ff(self.attn(x, memory, memory)[0]))

    model = CrossAttention()
    with pytest.warns(UserWarning, match=r"apply_swat left 1 layer\(s\).*'attn' \(MultiheadAttention\)"):
        apply_swat(model, 0.5, dense_first_layer=False)
    assert [n for n, _ in swat_layers(model)] == ["ff"]
    reasons = {r["layer"]: r["reason"] for r in swat_conversion_report(model)["skipped"]}
    assert "separate q_proj_weight/k_proj_weight/v_proj_weight" in reasons["attn"]
    with pytest.raises(InvalidParameterError, match=r"'layers \('attn'\)' parameter of apply_swat must be a layer "
                                                    r"SWAT can convert.*separate q/k/v projection weights"):
        apply_swat(CrossAttention(), 0.5, layers=["attn"])
