"""Models of the overhead and layout benchmarks, each buildable at any sub-model's size
(the standalone model of a sub-model is built with the same keyword arguments)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FFNStack(nn.Module):
    """Residual MLP blocks (d -> ffn -> d)."""

    def __init__(self, d: int = 256, ffn: int = 1024, n: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Linear(ffn, d)) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


class Attn(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int, causal: bool = True):
        super().__init__()
        self.num_heads, self.head_dim, self.causal = heads, head_dim, causal
        self.q, self.k, self.v = (nn.Linear(d, heads * head_dim) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, d)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm transformer block with separate q/k/v/o projections."""

    def __init__(self, d: int, heads: int, head_dim: int, ffn: int, causal: bool = True):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attn(d, heads, head_dim, causal)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class BlockStack(nn.Module):
    def __init__(self, d: int = 256, heads: int = 8, head_dim: int = 32, ffn: int = 1024, n: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, head_dim, ffn) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class ViT(nn.Module):
    """ViT-tiny-sized encoder (d=192, 12 blocks, 3 heads of 64, MLP 768, 16x16 patches)."""

    def __init__(self, img: int = 224, d: int = 192, depth: int = 12, heads: int = 3, ffn: int = 768,
                 classes: int = 1000):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 16, 16)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (img // 16) ** 2 + 1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, 64, ffn, causal=False) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x[:, 0]))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18 layout (7x7 stem, max-pool, 4 stages of 2 basic blocks); ``mids`` are the inner
    channels of each stage's blocks (the sliced ones; residual channels stay full)."""

    def __init__(self, mids: tuple[int, ...] = (64, 128, 256, 512), classes: int = 100):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        chans, cin, stages = (64, 128, 256, 512), 64, []
        for i, (c, mid) in enumerate(zip(chans, mids)):
            stages.append(nn.Sequential(BasicBlock(cin, mid, c, 1 if i == 0 else 2), BasicBlock(c, mid, c, 1)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(512, classes)

    def forward(self, x):
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        return self.head(x.mean((2, 3)))


def llama_config(**sizes):
    """A Llama-family decoder of ~56M parameters (32k vocabulary, 8 layers of width 512)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=512,
                       tie_word_embeddings=False, **sizes)
