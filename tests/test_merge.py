"""es.merge: structured layers back to nn.Linear with equal outputs; torch.export (and ONNX where the
exporter is installed) of a merged and of an unmerged model."""

import importlib.util

import pytest
import torch
from torch import nn

import einstruct as es
from einstruct.layers.linear import StructuredLinear


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48, bias=False), nn.ReLU(), nn.Linear(48, 10))


X = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))


def structured(**kw):
    model = es.structure(mlp(), "btt", select="0", normalize=True, **kw)
    es.structure(model, es.presets.low_rank(rank=4), select="2")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_merge_gives_nn_linear_holding_the_matrix_with_equal_outputs():
    model = structured()
    matrices = {n: model[int(n)].to_dense().detach() for n in ("0", "2")}
    bias = model[0].bias.detach().clone()
    before = model(X).detach()
    model[2].requires_grad_(False)
    out = es.merge(model)
    assert out is model
    assert all(type(m) is nn.Linear for m in (model[0], model[2], model[4]))
    assert torch.equal(model[0].weight, matrices["0"]) and torch.equal(model[2].weight, matrices["2"])
    assert torch.equal(model[0].bias, bias) and model[2].bias is None
    assert not model[2].weight.requires_grad and model[0].weight.requires_grad
    torch.testing.assert_close(model(X), before, rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, StructuredLinear) for m in model.modules())
    from einstruct.layers.record import model_record

    assert model_record(model)["layers"] == {}


def test_merge_a_bare_layer_and_the_experts_of_an_moe():
    torch.manual_seed(2)
    layer = StructuredLinear(64, 32, "btt")
    dense = es.merge(layer)
    assert type(dense) is nn.Linear and torch.equal(dense.weight, layer.to_dense().detach())
    model = es.structure(mlp(), "btt", select="0", moe=dict(experts=2, active=1, kind="ffn", hidden_ratio=1))
    with torch.no_grad():
        model[0].router.weight.normal_()
    before = model(X).detach()
    es.merge(model)
    assert all(type(m) is nn.Linear for ex in model[0].experts for m in (ex.fc, ex.proj))
    torch.testing.assert_close(model(X), before, rtol=1e-5, atol=1e-6)


def test_merge_keeps_a_btt_moe_and_says_so():
    model = es.structure(mlp(), "btt", select="0", moe=4)
    with pytest.warns(UserWarning, match=r"kept 1 BTTMoE layer\(s\) as they are \('0'\)"):
        es.merge(model)
    assert isinstance(model[0], es.BTTMoE)


def test_merge_restores_hugging_face_conv1d():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    plain_keys = {k: v.shape for k, v in model.state_dict().items()}
    es.structure(model, "btt", select="*.mlp.*")
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
        es.merge(model)
        after = model(ids).logits
    from transformers.pytorch_utils import Conv1D

    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)
    assert {k: v.shape for k, v in model.state_dict().items()} == plain_keys  # loads into stock GPT-2
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merged", [False, True], ids=["structured", "merged"])
def test_torch_export(merged):
    model = structured().eval()
    if merged:
        es.merge(model)
    ref = model(X).detach()
    ep = torch.export.export(model, (X,))
    torch.testing.assert_close(ep.module()(X), ref, rtol=1e-5, atol=1e-6)
    linears = [n for n in ep.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert len(linears) == (3 if merged else 1)  # merged: three dense matmuls; structured: only the head


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason="the ONNX exporter (onnx, onnxscript) is not installed",
)
@pytest.mark.parametrize("merged", [False, True], ids=["structured", "merged"])
def test_onnx_export(tmp_path, merged):
    model = structured().eval()
    if merged:
        es.merge(model)
    torch.onnx.export(model, (X,), str(tmp_path / "m.onnx"), dynamo=True)
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(graph)
    ops = [n.op_type for n in graph.graph.node]
    if merged:  # three dense layers, nothing else but the activations
        assert sorted(ops) == ["Gemm", "Gemm", "Gemm", "Relu", "Relu"]
    else:  # the head is one Gemm; the structured layers are chains of MatMuls
        assert ops.count("Gemm") == 1 and ops.count("MatMul") >= 4
