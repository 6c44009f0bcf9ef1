"""tetsnn.analysis.profile: synaptic operations against a brute-force count, energy, firing rates."""
import itertools

import pytest
import torch
from torch import nn

import tetsnn
from tetsnn.analysis import conv_synops, format_table, profile


def brute_conv_pairs(x, conv):
    """(nonzero input element, weight) pairs by a loop over output positions and kernel taps."""
    n, cin, h, w = x.shape
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw), (dh, dw), g = conv.stride, conv.padding, conv.dilation, conv.groups
    cout = conv.out_channels
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cin_g, cout_g = cin // g, cout // g
    total = 0
    for o, oy, ox, ky, kx in itertools.product(range(cout), range(ho), range(wo), range(kh), range(kw)):
        iy, ix = oy * sh - ph + ky * dh, ox * sw - pw + kx * dw
        if 0 <= iy < h and 0 <= ix < w:
            grp = o // cout_g
            total += int((x[:, grp * cin_g:(grp + 1) * cin_g, iy, ix] != 0).sum())
    return total


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups", [
    (2, 3, 3, 1, 1, 1, 1), (2, 4, 3, 2, 1, 1, 2), (3, 3, 2, 2, 0, 1, 3), (1, 2, 3, 1, 2, 2, 1), (4, 2, (1, 3), (2, 1), (0, 1), 1, 1),
])
def test_conv_synops_matches_brute_force(cin, cout, k, stride, pad, dil, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, pad, dil, groups)
    x = (torch.rand(2, cin, 7, 6) < 0.3).float() * torch.tensor([1.0, 0.25, 0.5])[torch.randint(0, 3, (2, cin, 7, 6))]
    assert conv_synops(conv, x) == brute_conv_pairs(x, conv)


class Tiny(tetsnn.models.SpikingModel):
    """conv(images) -> LIF -> {conv3x3/2 -> LIF, conv1x1/2 -> LIF} -> ADD -> avgpool -> flatten -> fc -> LIF -> fc."""

    def __init__(self, T=3):
        super().__init__(T)
        S = tetsnn.SeqToANNContainer
        self.conv1 = S(nn.Conv2d(2, 4, 3, 1, 1))
        self.sn1 = tetsnn.LIF()
        self.conv2 = S(nn.Conv2d(4, 4, 3, 2, 1))
        self.sn2 = tetsnn.LIF()
        self.conv3 = S(nn.Conv2d(4, 4, 1, 2, 0, bias=False))
        self.sn3 = tetsnn.IF()
        self.pool = S(nn.AvgPool2d(2), nn.Flatten())
        self.fc1 = S(nn.Linear(4 * 2 * 2, 6))
        self.sn4 = tetsnn.LIF()
        self.fc2 = S(nn.Linear(6, 3))
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.mul_(4.0)

    def forward_seq(self, x):
        s1 = self.sn1(self.conv1(x))
        a = self.sn2(self.conv2(s1)) + self.sn3(self.conv3(s1))
        return self.fc2(self.sn4(self.fc1(self.pool(a))))


def flat(x):
    return x.flatten(0, 1)


def test_profile_counts_match_an_independent_count():
    torch.manual_seed(1)
    model = Tiny(T=3).eval()
    x = torch.rand(2, 2, 8, 8)                         # images in [0, 1): the first layer is dense
    N, T = 2, 3
    with torch.no_grad():                              # intermediates, step by step
        xs = tetsnn.add_time_dim(x, T)
        s1 = model.sn1(model.conv1(xs))
        s2, s3 = model.sn2(model.conv2(s1)), model.sn3(model.conv3(s1))
        pooled = model.pool(s2 + s3)
        s4 = model.sn4(model.fc1(pooled))
    assert 0 < s1.mean() < 1 and 0 < s4.mean() < 1
    assert set(pooled.unique().tolist()) - {0, 1}      # pooled sums of spikes: not 0/1 values
    expected_synops = (brute_conv_pairs(flat(s1), model.conv2.module) + brute_conv_pairs(flat(s1), model.conv3.module)
                       + int((pooled != 0).sum()) * 6 + int((s4 != 0).sum()) * 3)
    dense = {"conv1": 8 * 8 * 4 * 2 * 9, "conv2": 4 * 4 * 4 * 4 * 9, "conv3": 4 * 4 * 4 * 4, "fc1": 16 * 6, "fc2": 6 * 3}

    r = profile(model, x)
    assert r["synops"] == expected_synops
    assert r["synops_per_sample"] == expected_synops / N
    assert r["macs_snn"] == dense["conv1"] * T                  # per sample, every time step
    assert r["macs_ann"] == sum(dense.values())                  # the ANN twin: one pass per sample
    rows = {row["layer"]: row for row in r["layers"]}
    assert not rows["conv1.module"]["spike_driven"]
    assert all(rows[n]["spike_driven"] for n in ("conv2.module", "conv3.module", "fc1.module", "fc2.module"))
    assert r["firing_rates"] == pytest.approx({"sn1": s1.mean().item(), "sn2": s2.mean().item(),
                                               "sn3": s3.mean().item(), "sn4": s4.mean().item()})
    assert r["T"] == T and r["samples"] == N and model.training is False
    assert "conv2.module" in format_table(r)


def test_binary_input_counts_synops_in_the_first_layer():
    torch.manual_seed(2)
    model = Tiny(T=2)
    frames = (torch.rand(3, 2, 2, 8, 8) < 0.2).float()        # event frames of 0/1: spikes
    r = profile(model, frames)
    row = next(row for row in r["layers"] if row["layer"] == "conv1.module")
    assert row["spike_driven"] and row["macs_per_sample"] == 0
    assert row["synops_per_sample"] == brute_conv_pairs(flat(frames), model.conv1.module) / 3
    assert r["macs_snn"] == 0 and model.training is True       # the training mode is restored


def test_energy_formula():
    torch.manual_seed(3)
    model = Tiny(T=2)
    r = profile(model, torch.rand(2, 2, 8, 8))
    assert r["energy_snn_pj"] == pytest.approx(4.6 * r["macs_snn"] + 0.9 * r["synops_per_sample"])
    assert r["energy_ann_pj"] == pytest.approx(4.6 * r["macs_ann"])
    r2 = profile(model, torch.rand(2, 2, 8, 8), mac_pj=3.0, ac_pj=0.1)
    assert r2["energy_snn_pj"] == pytest.approx(3.0 * r2["macs_snn"] + 0.1 * r2["synops_per_sample"])
    # a single spike-driven Linear: 5 nonzero inputs x 4 outputs = 20 accumulates = 18 pJ
    lin = nn.Sequential(tetsnn.SeqToANNContainer(nn.Linear(3, 4)), tetsnn.LIF())
    x = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    r3 = profile(lin, x, T=2)
    assert r3["synops"] == 20 and r3["synops_per_sample"] == 10
    assert r3["energy_snn_pj"] == pytest.approx(9.0) and r3["energy_ann_pj"] == pytest.approx(4.6 * 12)  # one step: 3 inputs x 4 outputs


class HandSpikes(tetsnn.LIF):
    """A neuron layer that emits given spikes."""

    def __init__(self, spikes):
        super().__init__()
        self.spikes = spikes

    def forward(self, x):
        return self.spikes


def test_firing_rates_of_hand_made_spikes():
    spikes = torch.zeros(2, 4, 5)
    spikes[0, :, 0] = 1          # 4 spikes
    spikes[1, 1, 2:] = 1         # 3 spikes
    model = nn.Sequential(HandSpikes(spikes), tetsnn.SeqToANNContainer(nn.Linear(5, 2)))
    r = profile(model, [torch.zeros(2, 4, 5), torch.zeros(2, 4, 5)], T=4, raster=True)
    assert r["firing_rates"] == {"0": pytest.approx(7 / 40)}
    assert r["samples"] == 4 and r["synops"] == 2 * 7 * 2
    assert torch.equal(r["raster"]["0"], spikes[0].to(torch.uint8))


def test_firing_rates_follow_the_lif_dynamics():
    # tau 0.5, threshold 1, hard reset: input 2.0 fires every step; 0.6 gives u = .6, .9, 1.05 (fires), .6
    x = torch.tensor([2.0, 0.6, 0.0]).expand(1, 4, 3).clone()
    r = profile(nn.Sequential(tetsnn.LIF(), tetsnn.IF(threshold=1.5)), x, T=4)
    assert r["firing_rates"]["0"] == pytest.approx((4 + 1 + 0) / 12)
    # the IF sees the LIF's spikes: [1,1,1,1] fires at steps 2 and 4 (u = 1, 2 -> 0, 1, 2); [0,0,1,0] never
    assert r["firing_rates"]["1"] == pytest.approx(2 / 12)


def test_sew_resnet_every_layer_after_the_stem_is_spike_driven():
    torch.manual_seed(4)
    model = tetsnn.create_model("sew_resnet18", num_classes=10, T=2)
    r = profile(model, torch.randn(1, 3, 32, 32))
    synapses = [row for row in r["layers"] if row["type"] != "neuron"]
    assert [row["layer"] for row in synapses if not row["spike_driven"]] == ["stem.0.module.0"]
    assert len(r["firing_rates"]) == sum(isinstance(m, tetsnn.LIF) for m in model.modules())
    assert r["macs_snn"] == 64 * 16 * 16 * 3 * 49 * 2


def test_profile_errors():
    with pytest.raises(ValueError, match="no LIF/IF layer"):
        profile(nn.Linear(2, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="at least one input batch"):
        profile(Tiny(), [])
    with pytest.raises(ValueError, match="time steps"):
        profile(nn.Sequential(tetsnn.LIF()), torch.zeros(1, 2, 3))
