"""Exact tests of the quantizer math: round trips, packing, zero-point folding, split quantization."""

import pytest
import torch
import torch.nn.functional as F

from mixq.quantizers import (
    activation_qparams,
    activation_qrange,
    check_activation_bits,
    check_weight_bits,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    pack_weight,
    packed_width,
    quantize_activation,
    quantize_weight,
    sqnr_db,
    unpack_weight,
    weight_row_sums,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_quantization_is_symmetric_per_channel_and_round_trips(bits):
    torch.manual_seed(0)
    w = torch.randn(7, 13) * torch.linspace(0.1, 5, 7)[:, None]
    q, scales = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max() == qmax
    # each channel's largest magnitude maps exactly to +-qmax
    assert torch.equal(q.abs().amax(dim=1), torch.full((7,), qmax, dtype=torch.int8))
    assert torch.allclose(scales, w.abs().amax(dim=1) / qmax)
    # dequantized values are within half a step of the original
    err = (dequantize_weight(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-6).all()
    # quantizing the dequantized weight gives the same codes (idempotent)
    q2, _ = quantize_weight(dequantize_weight(q, scales), bits)
    assert torch.equal(q, q2)
    assert torch.equal(fake_quantize_weight(w, bits), dequantize_weight(q, scales))


def test_all_zero_channel_quantizes_to_zero_not_nan():
    w = torch.zeros(2, 5)
    w[1] = torch.arange(5.0)
    q, scales = quantize_weight(w, 4)
    assert torch.isfinite(scales).all() and q[0].eq(0).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k", [1, 3, 8, 17, 64])
def test_pack_unpack_round_trip(bits, k):
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax, qmax + 1, (5, k), dtype=torch.int8)
    packed = pack_weight(q, bits)
    assert packed.shape == (5, packed_width(k, bits))
    assert torch.equal(unpack_weight(packed, bits, k), q)


def test_packing_layout_is_twos_complement_little_end_first():
    # int4: k=0 in the low nibble, k=1 in the high nibble, each a 4-bit two's-complement field
    packed = pack_weight(torch.tensor([[-7, 7, 0]], dtype=torch.int8), 4)
    assert packed.tolist() == [[0b1001 | (0b0111 << 4), 0]]
    # int2: four per byte; padding is 0
    packed = pack_weight(torch.tensor([[1, -1, 0, 1, -1]], dtype=torch.int8), 2)
    assert packed.tolist() == [[0b01 | (0b11 << 2) | (0b00 << 4) | (0b01 << 6), 0b11]]
    assert packed.dtype == torch.uint8


def test_flipping_field_sign_bits_converts_from_offset_binary():
    """Checkpoints before format 3 stored q + 2^(b-1) in each field."""
    from mixq.quantizers import flip_field_sign_bits

    for bits in (2, 4):
        q = torch.randint(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), (5, 16), dtype=torch.int8)
        per_byte = 8 // bits
        offset = ((q.to(torch.int32) + 2 ** (bits - 1)).view(5, -1, per_byte)
                  << (torch.arange(per_byte) * bits)).sum(-1).to(torch.uint8)
        assert torch.equal(flip_field_sign_bits(offset, bits), pack_weight(q, bits))


def test_packed_sizes_reflect_bits():
    q = torch.zeros(4, 64, dtype=torch.int8)
    assert pack_weight(q, 8).numel() == 256
    assert pack_weight(q, 4).numel() == 128
    assert pack_weight(q, 2).numel() == 64


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_params_cover_range_and_represent_zero_exactly(bits):
    qmin, qmax = activation_qrange(bits)
    scale, zero = activation_qparams(-1.5, 6.0, bits)
    assert qmin <= zero <= qmax
    assert quantize_activation(torch.zeros(3), scale, zero, bits).eq(zero).all()
    assert fake_quantize_activation(torch.zeros(3), scale, zero, bits).eq(0).all()
    x = torch.linspace(-1.5, 6.0, 101)
    codes = quantize_activation(x, scale, zero, bits)
    assert codes.min() == qmin and codes.max() == qmax
    assert ((fake_quantize_activation(x, scale, zero, bits) - x).abs() <= scale / 2 + 1e-6).all()
    # out-of-range values clamp
    assert quantize_activation(torch.tensor([1e6, -1e6]), scale, zero, bits).tolist() == [qmax, qmin]


def test_activation_range_is_widened_to_contain_zero():
    scale, zero = activation_qparams(2.0, 10.0, 8)  # all-positive range
    assert zero == -128 and scale == pytest.approx(10.0 / 255)
    scale, zero = activation_qparams(-4.0, -1.0, 8)  # all-negative range
    assert zero == 127 and scale == pytest.approx(4.0 / 255)


def test_zero_point_folding_is_exact():
    torch.manual_seed(1)
    x = torch.randn(9, 33) * 3 + 1
    w = torch.randn(11, 33)
    scale, zero = activation_qparams(float(x.min()), float(x.max()), 8)
    qx = quantize_activation(x, scale, zero, 8).long()
    qw, _ = quantize_weight(w, 4)
    direct = (qx - zero) @ qw.long().t()
    folded = qx @ qw.long().t() - zero * weight_row_sums(qw).long()
    assert torch.equal(direct, folded)


def test_split_activation_quantization_uses_per_part_parameters():
    """cat([hidden, skip]) with very different ranges: per-part parameters quantize each part on
    its own grid, which is exactly quantizing the parts separately and concatenating."""
    from mixq.modules import QConv2d

    torch.manual_seed(2)
    hidden, skip = torch.randn(1, 6, 5, 5) * 0.1, torch.randn(1, 10, 5, 5) * 50
    x = torch.cat([hidden, skip], dim=1)
    conv = torch.nn.Conv2d(16, 8, 1)
    ranges = ([float(hidden.min()), float(skip.min())], [float(hidden.max()), float(skip.max())])
    layer = QConv2d.from_float(conv, 8, 8, *ranges, split_at=6)
    assert layer.part_sizes == [6, 10]
    (s0, z0), (s1, z1) = (activation_qparams(lo, hi, 8) for lo, hi in zip(*ranges))
    expected_input = torch.cat([fake_quantize_activation(hidden, s0, z0, 8), fake_quantize_activation(skip, s1, z1, 8)], 1)
    w_fq = fake_quantize_weight(conv.weight, 8)
    expected = F.conv2d(expected_input, w_fq, conv.bias)
    assert sqnr_db(expected, layer(x)) > 100
    # One shared range flattens the small part to a few codes; per-part ranges keep it.
    unsplit = QConv2d.from_float(conv, 8, 8, [float(x.min())], [float(x.max())])
    hidden_only = torch.cat([hidden, torch.zeros_like(skip)], dim=1)
    reference = conv(hidden_only) - conv.bias.view(1, -1, 1, 1)
    split_error = sqnr_db(reference, layer(hidden_only) - conv.bias.view(1, -1, 1, 1))
    unsplit_error = sqnr_db(reference, unsplit(hidden_only) - conv.bias.view(1, -1, 1, 1))
    assert split_error > 30 and split_error > unsplit_error + 20


def test_sqnr():
    x = torch.ones(100)
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0)


@pytest.mark.parametrize("bad", [1, 3, 5, 6, 32, 0])
def test_unsupported_bit_widths_are_named(bad):
    with pytest.raises(ValueError, match=f"unsupported weight bit-width {bad}"):
        check_weight_bits(bad)
    with pytest.raises(ValueError, match=f"unsupported activation bit-width {bad}"):
        check_activation_bits(bad)
