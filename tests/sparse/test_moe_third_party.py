"""apply_moe on models from other libraries (Hugging Face Llama, GPT-2, BERT built from configs, no
weights; torch's nn.TransformerEncoder/Decoder): upcycled copies with top-2 renormalised gates and no
capacity limit compute exactly what the dense model did; experts keep the model's activation and
form; generate, save_pretrained + moe_from_pretrained, moe_aux_loss / moe_stats; designation by class
and predicate; refusals."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers  # a dev dependency (through sentence-transformers)
from torch import nn

from leanscale.core.errors import DataNotFoundError, InvalidParameterError
from leanscale.core.flops import count_flops
from leanscale.models import GPT, GPTConfig
from leanscale.sparse import (
    MoE,
    MoEMLP,
    MoETransformerDecoderLayer,
    MoETransformerEncoderLayer,
    apply_moe,
    find_ffn_blocks,
    moe_aux_loss,
    moe_from_pretrained,
    moe_layers,
    moe_stats,
    shard_experts,
)

UPCYCLE = {"every": 1, "top_k": 2, "capacity_factor": None, "init": "copy"}


def llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, **kw,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0, activation_function="gelu_new")
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def encoder(seed=0, activation="gelu"):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True, activation=activation)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def idx(seed=1):
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- upcycling == dense


@pytest.mark.parametrize("family", ["leanscale-gpt", "llama", "llama-bias", "gpt2", "bert", "encoder"])
def test_upcycled_copy_with_top2_renormalised_gates_equals_the_dense_model(family):
    if family == "leanscale-gpt":
        torch.manual_seed(0)
        model = GPT(GPTConfig(64, 16, n_layer=2, n_head=2, n_embd=16)).eval()
        run = lambda m: m(idx())[0]
    elif family == "encoder":
        model = encoder()
        x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
        run = lambda m: m(x)
    elif family == "llama-bias":
        model = llama(mlp_bias=True)  # gated experts with biases on all three projections
        run = lambda m: m(idx())[0]
    else:
        model = {"llama": llama, "gpt2": gpt2, "bert": bert}[family]()
        run = lambda m: m(idx())[0]
    with torch.no_grad():
        dense = run(model)
    apply_moe(model, 4, **UPCYCLE)
    assert len(moe_layers(model)) == 2
    with torch.no_grad():
        moe = run(model)
    torch.testing.assert_close(moe, dense, rtol=0, atol=1e-5)
    assert all(r["dropped_fraction"] == 0.0 for r in moe_stats(model))


def test_encoder_with_padding_mask_matches_on_real_tokens():
    # The dense encoder's fused fast path returns 0 at padded positions; the converted one runs
    # the standard path (the fast path reads linear1 directly). Real tokens agree.
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 24, batch_first=True), 2).eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "nested tensors are in prototype stage"
        dense = model(x, src_key_padding_mask=pad)
    with torch.no_grad():
        apply_moe(model, 3, **UPCYCLE)
        moe = model(x, src_key_padding_mask=pad)
    assert isinstance(model.layers[0], MoETransformerEncoderLayer) and model.use_nested_tensor is False
    torch.testing.assert_close(moe[~pad], dense[~pad], rtol=0, atol=1e-5)


def test_decoder_layer_is_converted_faithfully():
    torch.manual_seed(0)
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 24, batch_first=True), 2).eval()
    tgt, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with torch.no_grad():
        dense = dec(tgt, mem)
        apply_moe(dec, 3, **UPCYCLE)
        moe = dec(tgt, mem)
    assert all(isinstance(layer, MoETransformerDecoderLayer) for layer in dec.layers)
    torch.testing.assert_close(moe, dense, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- form and activation


def test_llama_experts_are_gated_with_the_models_silu_and_match_a_hand_written_expert():
    model = llama()
    mlp = model.model.layers[0].mlp
    gate, up, down = (w.detach().clone() for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))
    act = mlp.act_fn  # the model's own SiLU module (hidden_act="silu")
    apply_moe(model, 4, every=1, init="copy")
    moe = model.model.layers[0].mlp.moe
    assert moe.gated and moe.w_gate.shape == (4, 16, 24) and moe.activation is act
    x = torch.randn(5, 16)
    hand = (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()  # Llama's MLP, written out
    torch.testing.assert_close(moe._expert(3, x), hand, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_weights_are_not_transposed_and_its_activation_is_kept():
    model = gpt2()
    mlp = model.transformer.h[1].mlp
    act = mlp.act
    w_fc = mlp.c_fc.weight.detach().clone()  # Conv1D: (in, out), already the expert layout
    apply_moe(model, 2, every=2, init="copy")
    moe = model.transformer.h[1].mlp.moe
    assert moe.activation is act and type(act).__name__ == "NewGELUActivation"
    assert moe.dropout.p == model.config.resid_pdrop
    torch.testing.assert_close(moe.w_fc[1], w_fc)
    assert isinstance(model.transformer.h[0].mlp, transformers.models.gpt2.modeling_gpt2.GPT2MLP)  # every=2


def test_bert_keeps_its_residual_layernorm_and_dropout_in_output():
    model = bert()
    apply_moe(model, 2, every=1)
    layer = model.encoder.layer[0]
    assert isinstance(layer.intermediate, MoEMLP) and isinstance(layer.output.dense, nn.Identity)
    assert isinstance(layer.output.LayerNorm, nn.LayerNorm) and layer.intermediate.moe.dropout.p == 0.0


def test_encoder_relu_function_is_kept():
    model = encoder(activation="relu")  # stored as the function F.relu, not a module
    apply_moe(model, 2, every=1)
    act = model.layers[0].ffn.moe.activation
    assert act[0].fn is F.relu and isinstance(act[1], nn.Dropout)  # linear2(dropout(relu(linear1(x))))


def test_random_init_trains_and_aux_loss_and_stats_work_on_llama():
    model = llama().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    apply_moe(model, 4, every=1, optimizers=opt)  # top-1, capacity 1.25, random experts
    ids = idx()
    assert float(moe_aux_loss(model)) == 0.0  # nothing has run yet
    losses = []
    for _ in range(3):
        out = model(ids, labels=ids)
        aux = moe_aux_loss(model)
        assert aux.requires_grad and aux.detach().item() > 0
        opt.zero_grad()
        (out.loss + aux).backward()
        opt.step()
        losses.append(out.loss.detach().item())
    assert losses[-1] < losses[0]
    stats = moe_stats(model)
    assert [r["name"] for r in stats] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(abs(sum(r["load"]) - 1) < 1e-6 and 1 <= r["max_over_mean_load"] <= 4 for r in stats)


def test_gated_moe_counts_three_matmuls_per_kept_assignment():
    x = torch.randn(10, 8)
    plain, gated = MoE(8, 16, 2, capacity_factor=None), MoE(8, 16, 2, capacity_factor=None, gated=True)
    with torch.no_grad():
        f_plain, f_gated = count_flops(plain, x).forward, count_flops(gated, x).forward
    router = 2 * 8 * 2 * 10
    assert (f_plain - router, f_gated - router) == (2 * 2 * 8 * 16 * 10, 3 * 2 * 8 * 16 * 10)


# ----------------------------------------------------------------------------- HF generate, save / load


def test_generate_after_upcycling_equals_the_dense_models():
    model = llama()
    prompt = idx()[:1, :4]
    dense = model.generate(prompt, max_new_tokens=4, do_sample=False)
    apply_moe(model, 4, **UPCYCLE)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), dense)


def test_save_pretrained_then_moe_from_pretrained_round_trip(tmp_path):
    model = llama()
    apply_moe(model, 4, every=2, top_k=2, capacity_factor=1.5, jitter=0.01)
    with torch.no_grad():
        before = model(idx()).logits
    model.save_pretrained(tmp_path)  # safetensors + config.json with the apply_moe settings
    assert (tmp_path / "model.safetensors").is_file()
    for cls in (transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM):
        loaded = moe_from_pretrained(cls, tmp_path)
        assert not loaded.training
        assert [n for n, _ in moe_layers(loaded)] == ["model.layers.1.mlp"]
        moe = loaded.model.layers[1].mlp.moe
        assert (moe.top_k, moe.capacity_factor, moe.jitter, moe.gated) == (2, 1.5, 0.01, True)
        with torch.no_grad():
            torch.testing.assert_close(loaded(idx()).logits, before, rtol=0, atol=0)
        assert loaded.config.leanscale_moe == model.config.leanscale_moe


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_round_trip_of_tied_gpt2_and_of_bert(tmp_path, family):
    model, cls = (gpt2(), transformers.GPT2LMHeadModel) if family == "gpt2" else (bert(), transformers.BertModel)
    apply_moe(model, 3, every=1, top_k=2, capacity_factor=None, init="copy")
    model.save_pretrained(tmp_path)
    loaded = moe_from_pretrained(cls, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx())[0], model(idx())[0], rtol=0, atol=0)
    if family == "gpt2":  # the head is tied to the embedding (not saved twice) and stays tied
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
        prompt = idx()[:1, :3]
        assert torch.equal(loaded.generate(prompt, max_new_tokens=3, do_sample=False),
                           model.generate(prompt, max_new_tokens=3, do_sample=False))


def test_moe_from_pretrained_refuses_a_dense_checkpoint_and_a_missing_target(tmp_path):
    llama().save_pretrained(tmp_path / "dense")
    with pytest.raises(InvalidParameterError, match="no 'leanscale_moe' settings"):
        moe_from_pretrained(transformers.LlamaForCausalLM, tmp_path / "dense")
    model = llama()
    apply_moe(model, 2, target=lambda name, m: name == "model.layers.0.mlp", every=1)
    model.save_pretrained(tmp_path / "pred")
    with pytest.raises(InvalidParameterError, match="'target' parameter of moe_from_pretrained is required"):
        moe_from_pretrained(transformers.LlamaForCausalLM, tmp_path / "pred")
    loaded = moe_from_pretrained(transformers.LlamaForCausalLM, tmp_path / "pred",
                                 target=lambda name, m: name == "model.layers.0.mlp")
    assert [n for n, _ in moe_layers(loaded)] == ["model.layers.0.mlp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="'path' parameter of moe_from_pretrained"):
        moe_from_pretrained(transformers.LlamaForCausalLM, tmp_path / "empty")


def test_state_dict_round_trip_for_torch_encoder():
    model = encoder()
    apply_moe(model, 3, every=1)
    state = model.state_dict()
    assert not any("linear1" in k for k in state) and "layers.0.ffn.moe.w_fc" in state
    fresh = apply_moe(encoder(seed=5), 3, every=1)
    fresh.load_state_dict(state)
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(model)(x), model(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- target=


def test_target_class_and_predicate_and_sequential():
    model = llama()
    mlp_cls = type(model.model.layers[0].mlp)
    assert find_ffn_blocks(model, target=mlp_cls) == [("model.layers.0.mlp", "gated"), ("model.layers.1.mlp", "gated")]
    apply_moe(model, 2, target=lambda name, m: name.endswith("1.mlp"), every=1)
    assert [n for n, _ in moe_layers(model)] == ["model.layers.1.mlp"]

    torch.manual_seed(0)
    # the first linear has no bias, the second has one: the experts get both, the missing one zero
    net = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 32, bias=False), nn.Tanh(), nn.Dropout(0.1),
                                                       nn.Linear(32, 8)))
    net.eval()
    with pytest.raises(InvalidParameterError, match="no leanscale.models.transformer.MLP to convert nor any other"):
        apply_moe(net, 2, every=1)  # a plain Sequential is converted only when designated
    x = torch.randn(4, 8)
    with torch.no_grad():
        dense = net(x)
        apply_moe(net, 2, target=lambda name, m: name == "1", **UPCYCLE)
        torch.testing.assert_close(net(x), dense, rtol=0, atol=1e-6)
    assert isinstance(net[1], MoEMLP) and isinstance(net[1].moe.activation[0], nn.Tanh)


def test_refusals_name_the_parameter():
    with pytest.raises(InvalidParameterError, match="Searched for: leanscale.models.transformer.MLP; gated MLPs"):
        apply_moe(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 2)
    with pytest.raises(InvalidParameterError, match="'target' parameter of apply_moe must be 'auto'"):
        apply_moe(llama(), 2, target="mlp")
    with pytest.raises(InvalidParameterError, match="half of a BERT-style feed-forward block"):
        apply_moe(bert(), 2, target=transformers.models.bert.modeling_bert.BertIntermediate)
    with pytest.raises(InvalidParameterError, match="selected no module"):
        apply_moe(llama(), 2, target=nn.Conv2d)
    with pytest.raises(InvalidParameterError, match="'moe_kwargs' parameter of apply_moe"):
        apply_moe(llama(), 2, activation=nn.ReLU())  # read from the model, not given


class Swapped(nn.Module):
    """Looks like Llama's MLP, but the activation is on the up projection: not that form."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


def test_a_lookalike_block_is_refused_and_the_model_left_unchanged():
    model = nn.Sequential(Swapped(), Swapped())
    params = [p.clone() for p in model.parameters()]
    with pytest.raises(InvalidParameterError, match="does not compute what that form computes"):
        apply_moe(model, 2, every=1)
    assert isinstance(model[0], Swapped) and all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_expert_parallel_refuses_gated_experts_instead_of_dropping_the_gate():
    with pytest.raises(InvalidParameterError, match="supports only GELU, non-gated experts"):
        shard_experts(MoE(8, 16, 2, gated=True))


def test_gpt_path_is_unchanged_by_the_new_forms():
    # the leanscale GPT conversion draws exactly the same experts as before (non-gated, GELU, no
    # activation module), so the numbers of existing users do not move
    torch.manual_seed(0)
    model = GPT(GPTConfig(64, 16, n_layer=2, n_head=2, n_embd=16))
    torch.manual_seed(1)
    apply_moe(model, 4)
    moe = model.transformer.h[1].mlp.moe
    assert moe.activation is None and not moe.gated and moe.w_gate is None
    torch.manual_seed(1)
    expected = MoE(16, 64, 4)  # constructor draws, then from_dense draws again with proj_std
    expected.reset_parameters(0.02, 0.02 / (2 * 2) ** 0.5)
    torch.testing.assert_close(moe.w_fc, expected.w_fc)
    torch.testing.assert_close(moe.w_proj, expected.w_proj)


def test_moe_form_arguments_and_load_expert_weights_are_checked():
    with pytest.raises(InvalidParameterError, match="'gated' parameter of MoE"):
        MoE(8, 16, 2, gated="yes")
    with pytest.raises(InvalidParameterError, match="'activation' parameter of MoE"):
        MoE(8, 16, 2, activation="relu")
    moe = MoE(8, 16, 2, gated=True)
    with pytest.raises(InvalidParameterError, match="'w_gate' parameter of MoE.load_expert_weights is required"):
        moe.load_expert_weights(torch.zeros(8, 16), torch.zeros(16, 8))
    with pytest.raises(InvalidParameterError, match="'w_proj' parameter of MoE.load_expert_weights must have shape"):
        moe.load_expert_weights(torch.zeros(8, 16), torch.zeros(8, 16), w_gate=torch.zeros(8, 16))
    with pytest.raises(InvalidParameterError, match="'b_fc' parameter of MoE.load_expert_weights must be None"):
        moe.load_expert_weights(torch.zeros(8, 16), torch.zeros(16, 8), b_fc=torch.zeros(16), w_gate=torch.zeros(8, 16))
    relu = MoE(8, 16, 2, activation=torch.relu)  # a function is kept as a module
    x = torch.randn(3, 8)
    torch.testing.assert_close(relu._expert(1, x), torch.relu(x @ relu.w_fc[1]) @ relu.w_proj[1])
