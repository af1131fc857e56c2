"""structure() as a drop-in on real model code: GPT-2's Conv1D, tied heads, modules it cannot replace, the
default selection (issue #14, defect 5). The transformers tests build tiny models from configs: no download."""

import re
import warnings

import pytest
import torch
from torch import nn

import einstruct as es
from einstruct.layers.linear import StructuredLinear

BTT = es.presets.btt(rank=1)


class Conv1D(nn.Module):
    """The shape of transformers' GPT-2 Conv1D: weight stored (in, out), forward x @ W + b."""

    def __init__(self, nf, nx, dtype=None):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=dtype) * 0.05)
        self.bias = nn.Parameter(torch.randn(nf, dtype=dtype) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class MiniGPT(nn.Module):
    """Embedding -> two Conv1D blocks -> LayerNorm -> Linear head (optionally tied to the embedding)."""

    def __init__(self, width=64, vocab=50, tie=False, dtype=None):
        super().__init__()
        self.wte = nn.Embedding(vocab, width, dtype=dtype)
        self.c_fc = Conv1D(4 * width, width, dtype=dtype)
        self.c_proj = Conv1D(width, 4 * width, dtype=dtype)
        self.ln_f = nn.LayerNorm(width, dtype=dtype)
        self.lm_head = nn.Linear(width, vocab, bias=False, dtype=dtype)
        if tie:
            self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        h = self.wte(ids)
        h = h + self.c_proj(torch.relu(self.c_fc(h)))
        return self.lm_head(self.ln_f(h))


# ---- Conv1D -----------------------------------------------------------------------------------------


def test_conv1d_layers_are_structured_with_their_transposed_shape():
    torch.manual_seed(0)
    model = MiniGPT()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        es.structure(model, BTT)
    assert isinstance(model.c_fc, StructuredLinear) and (model.c_fc.in_features, model.c_fc.out_features) == (64, 256)
    assert isinstance(model.c_proj, StructuredLinear) and model.c_proj.in_features == 256
    assert isinstance(model.lm_head, nn.Linear)  # the default keeps the head dense
    assert model(torch.randint(0, 50, (2, 5))).shape == (2, 5, 50)


def test_conv1d_copy_weights_uses_the_transposed_matrix():
    torch.manual_seed(1)
    model = MiniGPT(dtype=torch.float64)
    ids = torch.randint(0, 50, (3, 7))
    before = model(ids)
    w_fc = model.c_fc.weight.detach().clone()
    es.structure(model, es.presets.dense(), copy_weights=True)
    assert torch.equal(model.c_fc.to_dense(), w_fc.t())  # (out, in) = Conv1D weight transposed
    assert torch.allclose(model(ids), before, atol=1e-12)
    # a Conv1D holding an exact BTT matrix is projected onto it exactly
    src = StructuredLinear(64, 256, BTT, dtype=torch.float64)
    fresh = MiniGPT(dtype=torch.float64)
    with torch.no_grad():
        fresh.c_fc.weight.copy_(src.to_dense().t())
    bias = fresh.c_fc.bias.detach().clone()
    es.structure(fresh, BTT, "c_fc", copy_weights=True)
    assert torch.allclose(fresh.c_fc.to_dense(), src.to_dense(), atol=1e-10)
    assert torch.equal(fresh.c_fc.bias.detach(), bias)


def test_zero_conv1d_keeps_zero_init_and_frozen_flag():
    model = MiniGPT()
    with torch.no_grad():
        model.c_proj.weight.zero_()
    model.c_fc.requires_grad_(False)
    es.structure(model, BTT)
    assert model.c_proj.zero_init and not model.c_fc.zero_init
    assert not any(p.requires_grad for p in model.c_fc.parameters())


def test_a_module_named_conv1d_with_another_shape_is_not_taken_for_one():
    class Conv1D(nn.Module):  # same name, another layout: weight (nf, nx)
        def __init__(self):
            super().__init__()
            self.nf = 8
            self.weight = nn.Parameter(torch.randn(8, 16))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = Conv1D()
            self.fc = nn.Linear(16, 16)
            self.head = nn.Linear(16, 4)

    with pytest.warns(UserWarning, match=r"'odd' \(Conv1D, a module type structure\(\) does not know"):
        model = es.structure(M(), BTT)
    assert isinstance(model.odd, Conv1D) and isinstance(model.fc, StructuredLinear)


# ---- modules it cannot replace -------------------------------------------------------------------


class Proj(nn.Module):
    """An unknown module computing x @ W.T with its own 2-D weight."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x):
        return nn.functional.linear(x, self.weight)


class AttnNet(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.emb = nn.Embedding(10, d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.mix = Proj(d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.fc(self.mix(self.norm(h))))


def test_modules_it_cannot_replace_are_named_in_a_warning():
    with pytest.warns(UserWarning) as rec:
        model = es.structure(AttnNet(), BTT)
    assert len(rec) == 1
    text = str(rec[0].message)
    assert "'attn' (nn.MultiheadAttention" in text and "in_proj_weight" in text
    assert "'mix' (Proj, a module type structure() does not know, with a 2-D parameter 'weight')" in text
    assert "'emb'" not in text and "'norm'" not in text and "'head'" not in text and "'fc'" not in text
    assert rec[0].filename == __file__  # points at the caller
    assert isinstance(model.fc, StructuredLinear) and isinstance(model.attn.out_proj, nn.Linear)
    assert isinstance(model.mix, Proj)


def test_no_warning_for_layers_the_selection_keeps_on_purpose():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = es.structure(AttnNet(), BTT, "fc")  # the pattern leaves attn and mix out
        es.structure(model, BTT, lambda n, m: n == "head")  # callables only see nn.Linear / Conv1D
    assert isinstance(model.fc, StructuredLinear) and isinstance(model.head, StructuredLinear)
    with pytest.warns(UserWarning, match=r"'attn' \(nn\.MultiheadAttention"):
        es.structure(AttnNet(), BTT, "a*")  # a pattern that matches attn says so


def test_recurrent_layers_are_named():
    class RNNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(16, 32)
            self.fc = nn.Linear(32, 32)
            self.head = nn.Linear(32, 4)

    with pytest.warns(UserWarning, match=r"'rnn' \(nn\.LSTM"):
        es.structure(RNNNet(), BTT)


# ---- tied weights ----------------------------------------------------------------------------------


def test_a_tied_head_is_left_dense_with_a_warning_and_untie_forces_it():
    model = MiniGPT(tie=True)
    with pytest.warns(
        UserWarning,
        match=r"left 1 weight-tied layer\(s\) dense.*'lm_head' \(shared with 'wte'\)"
        r".*tied='untie'",
    ):
        es.structure(model, BTT, "all")
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.wte.weight
    assert isinstance(model.c_fc, StructuredLinear)
    forced = MiniGPT(tie=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        es.structure(forced, BTT, "all", tied="untie")
    assert isinstance(forced.lm_head, StructuredLinear) and isinstance(forced.wte, nn.Embedding)
    with pytest.raises(es.SpecError, match="tied must be 'skip'"):
        es.structure(MiniGPT(), BTT, tied="break")


def test_two_linears_sharing_a_weight_are_both_left_dense():
    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = nn.Linear(32, 32)
            self.b.weight = self.a.weight
            self.head = nn.Linear(32, 2)

    with pytest.warns(UserWarning, match=r"'a' \(shared with 'b'\); 'b' \(shared with 'a'\)"):
        model = es.structure(Twin(), BTT)
    assert model.a.weight is model.b.weight


def test_a_shared_module_is_not_a_tie():
    model = MiniGPT()
    model.extra = model.c_fc  # the same module twice: one replacement serves both names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        es.structure(model, BTT, "c_fc")
    assert isinstance(model.extra, StructuredLinear) and model.extra is model.c_fc


# ---- the default selection ------------------------------------------------------------------------


def test_default_select_keeps_the_output_head_dense():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    es.structure(model, BTT)
    assert [type(m).__name__ for m in model] == ["StructuredLinear", "ReLU", "StructuredLinear", "ReLU", "Linear"]


def test_a_mode_that_keeps_every_layer_says_nothing_was_structured():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    with pytest.warns(UserWarning, match=re.escape("select='all_but_last' keeps '0' dense and the model has no other")):
        es.structure(model, BTT)
    assert isinstance(model[0], nn.Linear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(es.structure(nn.Linear(64, 64), BTT), StructuredLinear)  # a bare layer is replaced


# ---- Hugging Face models built from configs (no download) -------------------------------------------


def _gpt2(tie=True):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


GPT2_PROJ = [
    f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


def test_hf_gpt2_conv1d_projections_are_structured_and_the_tied_head_kept():
    model = _gpt2()
    ids = torch.randint(0, 64, (2, 8))
    before = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        es.structure(model, es.presets.dense(), "all_but_last", copy_weights=True)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, StructuredLinear)) == sorted(GPT2_PROJ)
    assert model.transformer.h[0].attn.c_attn.out_features == 96
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.allclose(model(ids).logits, before, atol=1e-5)  # the transposed weights were copied right
    btt = _gpt2()
    with pytest.warns(UserWarning, match=r"'lm_head' \(shared with 'transformer\.wte'\)"):
        es.structure(btt, BTT, "all")
    assert isinstance(btt.lm_head, nn.Linear) and btt.lm_head.weight is btt.transformer.wte.weight
    assert btt(ids).logits.shape == (2, 8, 64)


def test_hf_gpt2_trains_with_param_groups_after_structure():
    model = _gpt2(tie=False)
    es.structure(model, BTT)
    assert isinstance(model.transformer.h[1].mlp.c_proj, StructuredLinear) and isinstance(model.lm_head, nn.Linear)
    base = _gpt2(tie=False)  # same width: a dense Conv1D base for structured layers
    opt = torch.optim.AdamW(es.param_groups(model, 1e-3, base=base, weight_decay=0.1))
    ids = torch.randint(0, 64, (2, 8))
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_hf_llama_tied_head():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        es.structure(model, BTT)
    assert sum(isinstance(m, StructuredLinear) for m in model.modules()) == 14
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.warns(UserWarning, match=r"'lm_head' \(shared with 'model\.embed_tokens'\)"):
        es.structure(model, BTT, "all")
    assert model(torch.randint(0, 64, (1, 6))).logits.shape == (1, 6, 64)
