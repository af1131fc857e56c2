"""coord_check(make_model, data=..., loss_fn=...): the check on a user-defined model, its table and plot."""

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import einstruct as es


class Net(nn.Module):
    """A user's own model: input layer, a BTT hidden layer (through es.structure), a zero-initialised head."""

    def __init__(self, width):
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.hidden = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, 1)
        if self.inp.weight.device.type != "meta":
            es.mup_init(self)
        self.inp.requires_grad_(False)  # as es.coord_check's own MLP: the hidden layer's update moves features
        es.structure(self, "btt", select="hidden")

    def forward(self, x):
        return self.head(torch.relu(self.hidden(torch.relu(self.inp(x)))))


def batches(n=30):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 1, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(64, 16, generator=g)
        out.append((x, torch.tanh(x @ teacher)))
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("cc")
    res = es.coord_check(
        Net, widths=(64, 256, 1024), data=batches(), loss_fn=F.mse_loss, steps=30, lr=3e-3, base_width=64, out=out
    )
    return res, out


def test_structure_aware_rates_keep_the_btt_update_flat_and_naive_rates_shrink_it(result):
    res, _ = result
    assert res.layers == ("inp", "hidden", "head")
    assert res.spread("hidden") < 2.0, str(res)
    assert res.ratio("hidden", "naive") < 0.5, str(res)  # ~1/sqrt(16) expected (THEORY 4)
    assert res.delta[0][0] == (0.0, 0.0, 0.0)  # the frozen input layer does not move
    # same first width, same seed: the two rate rules see the same init
    assert res.act[0] == res.act[1]


def test_writes_a_table_and_a_plot(result):
    res, out = result
    with (out / "coord_check.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 3
    got = {(r["rates"], r["layer"], int(r["width"])): float(r["delta"]) for r in rows}
    assert got[("naive", "hidden", 1024)] == pytest.approx(res.delta[1][1][2])
    png = (out / "coord_check.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    text = str(res)
    assert "structure-aware rates" in text and "naive rates" in text and "hidden" in text


def test_is_seeded_and_checks_its_arguments():
    kw = dict(widths=(64,), data=batches(3), loss_fn=F.mse_loss, steps=3)
    assert es.coord_check(Net, **kw).delta == es.coord_check(Net, **kw).delta
    with pytest.raises(es.SpecError, match="needs loss_fn="):
        es.coord_check(Net, widths=(64,), data=batches(3), steps=3)
    with pytest.raises(es.SpecError, match=r"data must yield \(x, y\) pairs"):
        es.coord_check(Net, widths=(64,), data=[torch.zeros(3)], loss_fn=F.mse_loss, steps=3)
    with pytest.raises(es.SpecError, match="for coord_check\\(make_model"):
        es.coord_check("btt", data=batches(3))
