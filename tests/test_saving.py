"""es.save / es.load: a directory of safetensors + structure.json; bitwise-equal outputs after loading into
the plain architecture (also built on the meta device), and clear errors for a different architecture."""

import json
import re

import pytest
import torch
from torch import nn

import einstruct as es
from einstruct.layers.linear import StructuredLinear


class Net(nn.Module):
    def __init__(self, width=64, head=10):
        super().__init__()
        self.emb = nn.Embedding(50, width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, head)

    def forward(self, t):
        h = self.emb(t)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        h = h + self.mlp(h)
        return self.head(self.norm(h))


def structured():
    """StructuredLinear with weight norm, a BTT-MoE (sparse) and an FFN-MoE, each picked by a different rule."""
    torch.manual_seed(0)
    model = Net()
    es.structure(
        model, "btt", select=lambda n, m: n == "fc1" or (n == "fc2" and es.presets.low_rank(rank=4)), normalize=True
    )
    es.structure(
        model, "btt", select=re.compile(r"mlp\.0"), moe=dict(experts=4, active=2, dispatch="sparse"), normalize=True
    )
    es.structure(model, "btt", select="mlp.2", moe=dict(experts=2, active=1, kind="ffn", hidden_ratio=1))
    with torch.no_grad():  # move every parameter off its init (routers start at zero, gains at one)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


TOKENS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))


def test_save_writes_safetensors_and_a_json_record(tmp_path):
    model = structured()
    out = es.save(model, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "structure.json"]
    doc = json.loads((out / "structure.json").read_text())
    assert doc["format_version"] == 1
    assert list(doc["layers"]) == ["fc1", "fc2", "mlp.0", "mlp.2"]
    assert [doc["layers"][k]["module"] for k in doc["layers"]] == [
        "StructuredLinear",
        "StructuredLinear",
        "BTTMoE",
        "MoE",
    ]
    assert doc["layers"]["fc2"]["spec"]["label"] == "low_rank(rank=4)"
    assert doc["layers"]["mlp.0"]["moe"]["dispatch"] == "sparse"
    from safetensors.torch import load_file

    assert set(load_file(str(out / "model.safetensors"))) == set(model.state_dict())
    assert b"pickle" not in (out / "model.safetensors").read_bytes()[:2000]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_load_into_the_plain_architecture_gives_bitwise_equal_outputs(tmp_path, device):
    model = structured().eval()
    es.save(model, tmp_path / "ckpt")
    with torch.device(device):
        plain = Net()
    loaded = es.load(tmp_path / "ckpt", plain).eval()
    assert loaded is plain
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))
    model.train(), loaded.train()
    assert torch.equal(loaded(TOKENS), model(TOKENS))
    assert loaded.fc1.normalize and loaded.mlp[0].dispatch == "sparse" and loaded.mlp[0].normalize
    es.save(loaded, tmp_path / "again")  # the loaded model carries the record: saving it again gives the same file
    assert json.loads((tmp_path / "again" / "structure.json").read_text()) == json.loads(
        (tmp_path / "ckpt" / "structure.json").read_text()
    )


def test_load_restores_tied_weights(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 64)
            self.body = nn.Linear(64, 64)
            self.head = nn.Linear(64, 32, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(self.body(self.emb(t)))

    torch.manual_seed(2)
    model = es.structure(Tied(), "btt", select="body")
    es.save(model, tmp_path / "t")
    for device in ("cpu", "meta"):
        with torch.device(device):
            plain = Tied()
        loaded = es.load(tmp_path / "t", plain)
        assert loaded.head.weight is loaded.emb.weight
        t = torch.randint(0, 32, (2, 5))
        assert torch.equal(loaded(t), model(t))


def test_a_different_architecture_is_named(tmp_path):
    es.save(structured(), tmp_path / "ckpt")
    with pytest.raises(
        es.SpecError, match=r"module 'fc1' is Linear\(64 -> 32, bias=True\).*structured a Linear\(64 -> 64"
    ):
        wrong = Net()
        wrong.fc1 = nn.Linear(64, 32)
        es.load(tmp_path / "ckpt", wrong)
    with pytest.raises(es.SpecError, match=r"has no module 'mlp\.2'"):
        wrong = Net()
        wrong.mlp = nn.Sequential(nn.Linear(64, 64))
        es.load(tmp_path / "ckpt", wrong)
    with pytest.raises(es.SpecError, match="differs from the saved one at module 'norm' \\(Identity"):
        wrong = Net()
        wrong.norm = nn.Identity()
        es.load(tmp_path / "ckpt", wrong)
    with pytest.raises(es.SpecError, match=r"'emb.weight' has shape \(50, 64\) in the saved weights but \(60, 64\)"):
        wrong = Net()
        wrong.emb = nn.Embedding(60, 64)
        es.load(tmp_path / "ckpt", wrong)
    with pytest.raises(es.SpecError, match=r"does not exist; give a directory written by es\.save"):
        es.load(tmp_path / "nowhere", Net())


def test_bare_layer_and_plain_model_round_trip(tmp_path):
    torch.manual_seed(3)
    layer = es.structure(nn.Linear(64, 48), es.presets.low_rank(rank=3))
    assert isinstance(layer, StructuredLinear)
    es.save(layer, tmp_path / "l")
    back = es.load(tmp_path / "l", nn.Linear(64, 48))
    x = torch.randn(5, 64)
    assert isinstance(back, StructuredLinear) and torch.equal(back(x), layer(x))
    plain = Net()  # nothing structured: an empty record, the weights as they are
    es.save(plain, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "structure.json").read_text())["layers"] == {}
    assert torch.equal(es.load(tmp_path / "p", Net())(TOKENS), plain(TOKENS))


def test_torch_compile_wrapper_is_saved_as_its_module(tmp_path):
    model = structured()
    es.save(torch.compile(model), tmp_path / "c")  # no compilation happens: only the wrapped module is read
    assert torch.equal(es.load(tmp_path / "c", Net())(TOKENS), model(TOKENS))


def test_hugging_face_model_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=97, n_positions=32)
    torch.manual_seed(4)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    es.structure(model, "btt", select="*.mlp.*", normalize=True)  # Conv1D layers, the tied head left alone
    es.structure(model, es.presets.low_rank(rank=8), select="*.attn.c_proj", init="project")
    es.save(model, tmp_path / "gpt2")
    loaded = es.load(tmp_path / "gpt2", transformers.AutoModelForCausalLM.from_config(cfg)).eval()
    err = model.transformer.h[1].attn.c_proj.projection_error
    assert 0 < err < 1 and loaded.transformer.h[1].attn.c_proj.projection_error == err  # kept in the record
    assert isinstance(loaded.transformer.h[0].mlp.c_fc, StructuredLinear)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # the tie survives
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
