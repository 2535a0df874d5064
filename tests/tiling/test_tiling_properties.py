"""Property tests: random conv/pool/residual stacks, random cuts and tilings, exact results."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from meshci.tiling import (
    block_flops,
    block_input_region,
    block_regions,
    blocks_from_cuts,
    check_tiled,
    redundant_flops,
    run_block,
)
from meshci.trunk import Region, extract_trunk

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


class Residual(nn.Module):
    """relu(main(x) + shortcut(x)); the shortcut is the identity, a strided 1x1 conv + BN,
    or (ResNet-D) a ceil-mode average pooling that ignores padding followed by a 1x1 conv."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, dilation: int, shortcut: str):
        super().__init__()
        pad = dilation * (k - 1) // 2
        self.main = nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, pad, dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        if shortcut == "identity":
            self.shortcut = nn.Identity()
        elif shortcut == "conv":
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False), nn.Conv2d(cin, cout, 1)
            )
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.main(x) + self.shortcut(x))


def _window_fits(n: int, span: int, pad_total: int) -> bool:
    return n + pad_total >= span


@st.composite
def stacks(draw):
    """(model, input shape): 1-6 random local layers on a small random image."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    in_shape = (draw(st.integers(1, 3)), draw(st.integers(5, 36)), draw(st.integers(5, 36)))
    shape = in_shape
    layers = []
    for _ in range(draw(st.integers(1, 6))):
        c, h, w = shape
        kind = draw(st.sampled_from(["conv", "conv", "same", "max", "avg", "act", "bn", "residual"]))
        if kind == "conv":
            k, s, d = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
            p = draw(st.integers(0, d * (k - 1)))
            span = d * (k - 1) + 1
            if not (_window_fits(h, span, 2 * p) and _window_fits(w, span, 2 * p)):
                continue
            cout = draw(st.integers(1, 4))
            groups = draw(st.sampled_from([g for g in (1, 2) if c % g == 0 and cout % g == 0]))
            layers.append(nn.Conv2d(c, cout, k, s, p, d, groups=groups, bias=draw(st.booleans())))
            shape = (cout, (h + 2 * p - span) // s + 1, (w + 2 * p - span) // s + 1)
        elif kind == "same":  # even kernels give asymmetric padding
            k, d = draw(st.integers(1, 4)), draw(st.integers(1, 2))
            cout = draw(st.integers(1, 4))
            layers.append(nn.Conv2d(c, cout, k, 1, "same", d))
            shape = (cout, h, w)
        elif kind in ("max", "avg"):
            k, s = draw(st.integers(1, 4)), draw(st.integers(1, 3))
            d = draw(st.integers(1, 2)) if kind == "max" else 1
            span = d * (k - 1) + 1
            p = draw(st.integers(0, k // 2))  # PyTorch's limit for pooling
            ceil = draw(st.booleans())
            if not (_window_fits(h, span, 2 * p) and _window_fits(w, span, 2 * p)):
                continue
            if kind == "max":
                pool = nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)
            else:
                divisor = draw(st.sampled_from([None, None, 3]))
                pool = nn.AvgPool2d(k, s, p, ceil, draw(st.booleans()), divisor)
            probe = pool(torch.zeros(1, c, h, w))
            layers.append(pool)
            shape = (c, *probe.shape[2:])
        elif kind == "act":
            layers.append(draw(st.sampled_from([nn.ReLU(inplace=True), nn.LeakyReLU(0.1), nn.Tanh(), nn.Hardswish()])))
        elif kind == "bn":
            bn = nn.BatchNorm2d(c)
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
            layers.append(bn)
        else:
            k, s, d = draw(st.sampled_from([1, 3, 5])), draw(st.integers(1, 3)), draw(st.integers(1, 2))
            cout = draw(st.integers(1, 4))
            options = ["conv", "pool"] + (["identity"] if s == 1 and cout == c else [])
            if min(h, w) < s:
                continue
            block = Residual(c, cout, k, s, d, draw(st.sampled_from(options)))
            for m in block.modules():
                if isinstance(m, nn.BatchNorm2d):
                    with torch.no_grad():
                        m.running_var.uniform_(0.5, 2.0)
            layers.append(block)
            shape = (cout, -(-h // s), -(-w // s))
    assume(layers)
    return nn.Sequential(*layers).eval().double(), in_shape


def tilings(height: int, width: int):
    """Row strips, a regular grid, or an irregular grid with random split points."""
    strips = st.integers(1, min(height, 8)).map(
        lambda n: [Region(r0, r1, 0, width) for r0, r1 in _even(height, n)]
    )
    grid = st.tuples(st.integers(1, min(height, 4)), st.integers(1, min(width, 4))).map(
        lambda rc: [Region(r0, r1, c0, c1) for r0, r1 in _even(height, rc[0]) for c0, c1 in _even(width, rc[1])]
    )
    irregular = st.tuples(_splits(height), _splits(width)).map(
        lambda rc: [Region(r0, r1, c0, c1) for r0, r1 in rc[0] for c0, c1 in rc[1]]
    )
    return st.one_of(strips, grid, irregular)


def _even(n: int, k: int) -> list[tuple[int, int]]:
    edges = [round(i * n / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _splits(n: int):
    inner = st.sets(st.integers(1, n - 1), max_size=min(n - 1, 5)) if n > 1 else st.just(set())
    return inner.map(lambda cuts: list(zip([0, *sorted(cuts)], [*sorted(cuts), n])))


@st.composite
def cases(draw, models=None):
    """A random stack (or a draw of `models`), its trunk, an input, and random blocks with random tiles."""
    model, in_shape = draw(models if models is not None else stacks())
    trunk = extract_trunk(model, in_shape, "random")
    n = len(trunk.segments)
    cuts = draw(st.lists(st.integers(1, n - 1), max_size=n)) if n > 1 else []
    blocks = []
    for start, end in blocks_from_cuts(trunk, cuts):
        _, h, w = trunk.boundary_shape(end)
        blocks.append((start, end, draw(tilings(h, w))))
    x = torch.randn((2, *in_shape), dtype=torch.float64)
    return model, trunk, x, blocks


@SETTINGS
@given(cases())
@torch.no_grad()
def test_random_stacks_tile_exactly(case):
    model, trunk, x, blocks = case
    torch.testing.assert_close(trunk.forward(x), model(x), rtol=0, atol=0)
    result = check_tiled(trunk, x, blocks, rtol=1e-10, atol=1e-10)
    assert result.ok, f"max diff {result.max_abs_diff} for {[(s, e, len(t)) for s, e, t in blocks]}"


@SETTINGS
@given(cases(), st.data())
@torch.no_grad()
def test_tiles_read_nothing_outside_their_input_region(case, data):
    assert_tile_reads_only_its_input_region(case, data)


def assert_tile_reads_only_its_input_region(case, data):
    """Poison every input cell outside block_input_region with NaN: the tile must not change."""
    _, trunk, x, blocks = case
    bounds = trunk.forward_boundaries(x)
    start, end, tiles = data.draw(st.sampled_from(blocks))
    out = data.draw(st.sampled_from(tiles))
    need = block_input_region(trunk, start, end, out)
    full = trunk.boundary_region(start)
    poisoned = torch.full_like(bounds[start], float("nan"))
    poisoned[..., need.r0 : need.r1, need.c0 : need.c1] = bounds[start][..., need.r0 : need.r1, need.c0 : need.c1]
    got = run_block(trunk, start, end, poisoned, full, out)
    want = bounds[end][..., out.r0 : out.r1, out.c0 : out.c1]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the same from exactly the needed input, and from a margin-padded one
    exact = bounds[start][..., need.r0 : need.r1, need.c0 : need.c1]
    torch.testing.assert_close(run_block(trunk, start, end, exact, need, out), want, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(cases(), st.data())
def test_regions_are_monotone_and_halo_is_never_negative(case, data):
    _, trunk, _, blocks = case
    start, end, tiles = data.draw(st.sampled_from(blocks))
    out = data.draw(st.sampled_from(tiles))
    _, h, w = trunk.boundary_shape(end)
    r0 = data.draw(st.integers(0, h - 1))
    c0 = data.draw(st.integers(0, w - 1))
    bigger = Region(min(r0, out.r0), max(r0 + 1, out.r1), min(c0, out.c0), max(c0 + 1, out.c1))
    small_regions = block_regions(trunk, start, end, out)
    big_regions = block_regions(trunk, start, end, bigger)
    for k, (a, b) in enumerate(zip(small_regions, big_regions)):
        assert b.contains(a)
        assert trunk.boundary_region(start + k).contains(b)
    assert block_flops(trunk, start, end, out) <= block_flops(trunk, start, end, bigger)
    halo = redundant_flops(trunk, blocks)
    assert halo["total"] == pytest.approx(sum(block_flops(trunk, s, e, t) for s, e, ts in blocks for t in ts))
    windows = [w for seg in trunk.segments for op in seg.ops for w in (getattr(op, "rows", None), getattr(op, "cols", None)) if w]
    if all(w.stride <= w.span for w in windows):
        # untiled work only exceeds the tiles' when windows skip cells (stride > span)
        assert halo["redundant"] >= 0 and halo["total"] >= halo["ideal"] > 0


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad", [False, True])
@torch.no_grad()
def test_avg_pool_divisor_matches_pytorch_at_every_border(ceil_mode, count_include_pad):
    pool = nn.AvgPool2d(3, 2, 1, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    model = nn.Sequential(pool).double()
    trunk = extract_trunk(model, (2, 10, 9))
    x = torch.randn(1, 2, 10, 9, dtype=torch.float64)
    blocks = [(0, 1, [Region(r, r + 1, c, c + 1) for r in range(trunk.boundary_shape(1)[1]) for c in range(trunk.boundary_shape(1)[2])])]
    assert check_tiled(trunk, x, blocks, rtol=1e-12, atol=1e-12).ok
