"""A tiny Vision Transformer whose tensor names are exactly Hugging Face ``ViTForImageClassification``'s.

The demo population is made of real fine-tunes of this model. Matching the HF names (and the HF
architecture: pre-LayerNorm blocks, GELU MLP, a learned CLS token whose final state feeds the
classifier) means the demo checkpoints look like the ones users really pack, without depending
on ``transformers``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

#: Per-head width used by every demo config. It is fixed (rather than stored) so that the number
#: of attention heads can be recovered from a bare state dict, whose shapes do not record it.
HEAD_DIM = 16

#: HF ViT uses this LayerNorm epsilon by default.
LAYER_NORM_EPS = 1e-12


@dataclass(frozen=True)
class TinyViTConfig:
    """The subset of HF ``ViTConfig`` that the tiny model uses (same field names)."""

    image_size: int = 8
    patch_size: int = 2
    num_channels: int = 1
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128
    num_labels: int = 10

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be positive, got {self.num_labels}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --- modules, nested so that state_dict() keys come out with HF's names -----------------------


class _PatchEmbeddings(nn.Module):
    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (n, c, h, w) -> (n, hidden, h/p, w/p) -> (n, patches, hidden), row-major like HF.
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class _Embeddings(nn.Module):
    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.patch_embeddings = _PatchEmbeddings(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings(pixel_values)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embeddings


class _SelfAttention(nn.Module):
    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        n, t, d = hidden.shape
        h = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(n, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.query(hidden)), split(self.key(hidden)), split(self.value(hidden))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        return (weights @ v).transpose(1, 2).reshape(n, t, d)


class _SelfOutput(nn.Module):
    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden)


class _Attention(nn.Module):
    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.attention = _SelfAttention(config)
        self.output = _SelfOutput(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(hidden))


class _Intermediate(nn.Module):
    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(hidden))


class _Output(nn.Module):
    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden)


class _Layer(nn.Module):
    """One pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)), as in HF ``ViTLayer``."""

    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.attention = _Attention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.intermediate = _Intermediate(config)
        self.output = _Output(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attention(self.layernorm_before(hidden))
        return hidden + self.output(self.intermediate(self.layernorm_after(hidden)))


class _Encoder(nn.Module):
    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden)
        return hidden


class _ViTModel(nn.Module):
    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.encoder(self.embeddings(pixel_values)))


class TinyViTForImageClassification(nn.Module):
    """``forward(pixel_values (n, c, h, w)) -> logits (n, num_labels)``, classifying the CLS token."""

    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = _ViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._init_weights()

    def _init_weights(self) -> None:
        # HF ViT's scheme (truncated normal, std 0.02; zero biases; unit LayerNorms). It matters
        # here: PyTorch's default Linear init trains noticeably slower for this tiny transformer.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.vit.embeddings.cls_token, std=0.02)
        nn.init.trunc_normal_(self.vit.embeddings.position_embeddings, std=0.02)

    def reset_classifier(self, num_labels: int) -> None:
        """Replace the head with a fresh, randomly initialised one of ``num_labels`` outputs."""
        head = nn.Linear(self.config.hidden_size, num_labels)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.classifier = head
        self.config = TinyViTConfig(**{**self.config.as_dict(), "num_labels": num_labels})

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.vit(pixel_values)[:, 0])


def build_model(config: TinyViTConfig) -> TinyViTForImageClassification:
    """A freshly initialised model (seed torch yourself beforehand for reproducible weights)."""
    if config.hidden_size != config.num_attention_heads * HEAD_DIM:
        # Not an architectural need, but config_from_state_dict relies on it to recover the heads.
        raise ValueError(
            f"demo configs use {HEAD_DIM}-wide heads: hidden_size must be num_attention_heads * {HEAD_DIM}"
        )
    return TinyViTForImageClassification(config)


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> TinyViTConfig:
    """Recover the config of a tiny-ViT state dict from its tensor shapes.

    Raises ``ValueError`` if a tensor the shapes are read from is missing.
    """
    needed = (
        "vit.embeddings.position_embeddings",
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.encoder.layer.0.intermediate.dense.weight",
        "classifier.weight",
    )
    missing = [name for name in needed if name not in state_dict]
    if missing:
        raise ValueError(f"not a tiny-ViT state dict: missing {', '.join(missing)}")
    hidden, channels, patch, _ = state_dict["vit.embeddings.patch_embeddings.projection.weight"].shape
    num_patches = state_dict["vit.embeddings.position_embeddings"].shape[1] - 1
    side = math.isqrt(num_patches)
    layers = 1 + max(int(name.split(".")[3]) for name in state_dict if name.startswith("vit.encoder.layer."))
    return TinyViTConfig(
        image_size=side * patch,
        patch_size=patch,
        num_channels=channels,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // HEAD_DIM),
        intermediate_size=state_dict["vit.encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_labels=state_dict["classifier.weight"].shape[0],
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(state_dict: dict[str, torch.Tensor], member_name: str) -> tuple[nn.Module, torch.Tensor]:
    """The demo's model factory for ``unipack export --model unipack.demo.model:build``.

    Sized from the member's own weights (heads differ between members), weights not loaded
    (unipack loads them strictly), and one held-out digit of the member's task as the example.
    """
    from unipack.demo.tasks import task_for_member

    images, _ = task_for_member(member_name).data("test")
    return build_model(config_from_state_dict(dict(state_dict))), images[:1]
