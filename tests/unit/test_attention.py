"""Packed attention and 3D RoPE against explicit float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sora_lightning.models.layers import RotaryEmbedding3D, apply_rotary, attention, rope_axis_dims
from sora_lightning.models.patches import seqlens_to_cu

HEADS, HEAD_DIM = 3, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_attention(q, k, v, lengths_q: list[int], lengths_k: list[int]) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per sample in float64; zero-key samples give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    outputs, start_q, start_k = [], 0, 0
    for n_q, n_k in zip(lengths_q, lengths_k, strict=True):
        q_i = q[start_q : start_q + n_q].transpose(0, 1)  # heads, n_q, d
        k_i = k[start_k : start_k + n_k].transpose(0, 1)
        v_i = v[start_k : start_k + n_k].transpose(0, 1)
        if n_k == 0:
            outputs.append(torch.zeros(n_q, q.shape[1], q.shape[2], dtype=torch.float64))
        else:
            weights = torch.softmax(q_i @ k_i.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
            outputs.append((weights @ v_i).transpose(0, 1))
        start_q, start_k = start_q + n_q, start_k + n_k
    return torch.cat(outputs)


def random_qkv(lengths_q: list[int], lengths_k: list[int]):
    q = torch.randn(sum(lengths_q), HEADS, HEAD_DIM)
    k = torch.randn(sum(lengths_k), HEADS, HEAD_DIM)
    v = torch.randn(sum(lengths_k), HEADS, HEAD_DIM)
    return q, k, v


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_self_attention_ragged_matches_reference(backend: str) -> None:
    lengths = [5, 1, 17, 9]
    q, k, v = random_qkv(lengths, lengths)
    cu = seqlens_to_cu(lengths)
    out = attention(q, k, v, cu, cu, backend=backend)
    expected = reference_attention(q, k, v, lengths, lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_different_lengths_and_empty_text() -> None:
    lengths_q, lengths_k = [6, 4, 11], [3, 0, 7]
    q, k, v = random_qkv(lengths_q, lengths_k)
    out = attention(q, k, v, seqlens_to_cu(lengths_q), seqlens_to_cu(lengths_k), backend="sdpa")
    expected = reference_attention(q, k, v, lengths_q, lengths_k)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.all(out[6:10] == 0), "a sample with no keys must give zeros, not NaN"


def test_samples_are_isolated() -> None:
    lengths = [7, 5, 9]
    q, k, v = random_qkv(lengths, lengths)
    cu = seqlens_to_cu(lengths)
    base = attention(q, k, v, cu, cu, backend="sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[7:12] += 3.0 * torch.randn(5, HEADS, HEAD_DIM)  # only sample 1's keys and values
    v2[7:12] += 3.0 * torch.randn(5, HEADS, HEAD_DIM)
    changed = attention(q, k2, v2, cu, cu, backend="sdpa")
    assert torch.equal(changed[:7], base[:7]) and torch.equal(changed[12:], base[12:])
    assert not torch.allclose(changed[7:12], base[7:12])


def test_gradients_match_reference() -> None:
    lengths_q, lengths_k = [4, 6], [5, 2]
    q, k, v = (t.double().requires_grad_() for t in random_qkv(lengths_q, lengths_k))
    cu_q, cu_k = seqlens_to_cu(lengths_q), seqlens_to_cu(lengths_k)
    grads = torch.autograd.grad(attention(q, k, v, cu_q, cu_k, backend="sdpa").sum(), (q, k, v))
    ref = torch.autograd.grad(reference_attention(q, k, v, lengths_q, lengths_k).sum(), (q, k, v))
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want)


def test_bad_inputs_raise() -> None:
    q, k, v = random_qkv([4], [4])
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention(q, k, v, seqlens_to_cu([3]), seqlens_to_cu([4]), backend="sdpa")
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, seqlens_to_cu([4]), seqlens_to_cu([4]), backend="xformers")
    with pytest.raises(ValueError, match="CUDA"):
        attention(q, k, v, seqlens_to_cu([4]), seqlens_to_cu([4]), backend="flash")


def test_cpu_sdpa_flops_are_counted() -> None:
    lengths = [6, 10]
    q, k, v = random_qkv(lengths, lengths)
    cu = seqlens_to_cu(lengths)
    with FlopCounterMode(display=False) as counter:
        attention(q, k, v, cu, cu, backend="sdpa")
    assert counter.get_total_flops() == sum(4 * n * n * HEADS * HEAD_DIM for n in lengths)


def test_rope_axis_split_is_even_and_complete() -> None:
    for head_dim in (6, 16, 64, 128):
        dims = rope_axis_dims(head_dim)
        assert sum(dims) == head_dim and all(d % 2 == 0 and d > 0 for d in dims)
    assert rope_axis_dims(128) == (44, 42, 42)  # Wan's split
    with pytest.raises(ValueError):
        rope_axis_dims(7)


def test_rope_matches_complex_rotation_reference() -> None:
    head_dim, grid = 12, (2, 3, 4)
    rope = RotaryEmbedding3D(head_dim, theta=100.0)
    cos, sin = rope(torch.tensor([grid]))
    assert cos.shape == (24, head_dim // 2)
    # position (f, i, j) = (1, 2, 3) is token 1*12 + 2*4 + 3 = 23; axis dims (4, 4, 4)
    freqs = [100.0 ** (-torch.arange(0, 4, 2, dtype=torch.float64) / 4)] * 3
    angles = torch.cat([p * f for p, f in zip((1, 2, 3), freqs, strict=True)])
    torch.testing.assert_close(cos[23].double(), angles.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[23].double(), angles.sin(), atol=1e-6, rtol=0)
    x = torch.randn(24, 2, head_dim)
    rotated = apply_rotary(x, cos, sin)
    expected = torch.view_as_real(
        torch.view_as_complex(x[23].double().unflatten(-1, (-1, 2)).contiguous())
        * torch.polar(torch.ones_like(angles), angles)[None]
    ).flatten(-2)
    torch.testing.assert_close(rotated[23].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # rotation keeps norms


def test_rope_packs_each_sample_from_its_own_grid() -> None:
    rope = RotaryEmbedding3D(16)
    grids = [(1, 2, 3), (3, 1, 2)]
    cos, sin = rope(torch.tensor(grids))
    cos_a, _ = rope(torch.tensor(grids[:1]))
    cos_b, sin_b = rope(torch.tensor(grids[1:]))
    assert (
        torch.equal(cos[:6], cos_a) and torch.equal(cos[6:], cos_b) and torch.equal(sin[6:], sin_b)
    )


def test_rope_scores_depend_only_on_relative_position() -> None:
    rope = RotaryEmbedding3D(18)
    cos, sin = rope(torch.tensor([(3, 4, 5)]))
    q, k = torch.randn(1, 1, 18).expand(60, 1, 18), torch.randn(1, 1, 18).expand(60, 1, 18)
    scores = (apply_rotary(q, cos, sin)[:, None] * apply_rotary(k, cos, sin)[None]).sum(-1)[..., 0]

    def token(f: int, i: int, j: int) -> int:
        return f * 20 + i * 5 + j

    # the same offset (1, -2, 3) at two different absolute places gives the same score
    torch.testing.assert_close(
        scores[token(0, 3, 0), token(1, 1, 3)], scores[token(1, 2, 1), token(2, 0, 4)]
    )
    assert not torch.allclose(scores[token(0, 0, 0), token(0, 0, 1)], scores[0, token(1, 0, 0)])


def _flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _flash_available(), reason="flash-attn varlen needs CUDA and the `gpu` extra"
)
def test_flash_matches_sdpa_and_reference_on_gpu() -> None:
    """On a GPU machine: the flash varlen backend equals SDPA-per-sample (bf16 tolerance)."""
    lengths_q, lengths_k = [5, 9, 3], [4, 0, 7]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lengths_q), HEADS, 64, generator=generator)
    k = torch.randn(sum(lengths_k), HEADS, 64, generator=generator)
    v = torch.randn(sum(lengths_k), HEADS, 64, generator=generator)
    cu_q, cu_k = seqlens_to_cu(lengths_q).cuda(), seqlens_to_cu(lengths_k).cuda()
    args = [t.cuda().bfloat16() for t in (q, k, v)]
    flash = attention(*args, cu_q, cu_k, backend="flash").float().cpu()
    sdpa = attention(*args, cu_q, cu_k, backend="sdpa").float().cpu()
    reference = reference_attention(q, k, v, lengths_q, lengths_k).float()
    torch.testing.assert_close(flash, sdpa, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(flash, reference, atol=3e-2, rtol=3e-2)


def test_equal_length_batched_path_matches_reference() -> None:
    """Several samples of one length take the single batched SDPA call; it must stay isolated."""
    lengths = [5, 5, 5]
    q, k, v = (torch.randn(15, HEADS, HEAD_DIM) for _ in range(3))
    out = attention(q, k, v, seqlens_to_cu(lengths), seqlens_to_cu(lengths), backend="sdpa")
    torch.testing.assert_close(
        out.double(), reference_attention(q, k, v, lengths, lengths), atol=1e-5, rtol=1e-5
    )
