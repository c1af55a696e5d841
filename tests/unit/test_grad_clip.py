"""DiTModule clips gradients with the norm it already computed for `train/grad_norm` (one norm
per step instead of two) and gets exactly what `clip_grad_norm_` gives."""

from __future__ import annotations

import dataclasses

import torch

from sora_lightning.models.dit import DiTConfig
from sora_lightning.train.dit_module import DiTModule


def test_clipping_reuses_the_logged_norm_and_matches_clip_grad_norm() -> None:
    config = dataclasses.asdict(DiTConfig(hidden_size=32, depth=1, num_heads=2, text_dim=8))
    module = DiTModule(config, {"stages": [{"name": "images", "steps": 1, "frames": [1, 1]}]})
    torch.manual_seed(0)
    for param in module.dit.parameters():
        param.grad = torch.randn_like(param) * 10
    norm = torch.nn.utils.get_total_norm([p.grad for p in module.dit.parameters()])
    reference = [
        p.grad * torch.clamp(1.0 / (norm + 1e-6), max=1.0) for p in module.dit.parameters()
    ]
    optimizer = torch.optim.SGD(module.dit.parameters(), lr=0.1)
    module.on_before_optimizer_step(optimizer)
    assert module._grad_norm is not None
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    assert module._grad_norm is None  # consumed: the next step computes its own
    clipped = [p.grad for p in module.dit.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(clipped, reference, strict=True))
    assert torch.nn.utils.get_total_norm(clipped) < 1.0 + 1e-4 < float(norm)
