"""A small pre-norm transformer decoder that cross-attends over the backbone's feature map.

Hand-written (rather than a transformers model) so that the serving loop owns its KV cache: the
cross-attention keys/values are computed once per image, the self-attention cache is preallocated, and
greedy decoding is one small step per token for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from worker.model.config import DecoderConfig


@dataclass
class DecodeState:
    """Per-batch cache: cross K/V per layer (computed once) and preallocated self-attention K/V."""

    cross_k: list[torch.Tensor]
    cross_v: list[torch.Tensor]
    self_k: torch.Tensor  # (layers, B, heads, max_tokens, head_dim)
    self_v: torch.Tensor


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.head_dim = d // cfg.n_heads
        self.ln_self = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.self_out = nn.Linear(d, d)
        self.ln_cross = nn.LayerNorm(d)
        self.cross_q = nn.Linear(d, d)
        self.cross_kv = nn.Linear(d, 2 * d)
        self.cross_out = nn.Linear(d, d)
        self.ln_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, d))
        self.drop = nn.Dropout(cfg.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cross_kv(memory).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def _cross_and_mlp(self, x: torch.Tensor, mk: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.cross_q(self.ln_cross(x)))
        x = x + self.drop(self.cross_out(self._merge(F.scaled_dot_product_attention(q, mk, mv))))
        return x + self.drop(self.mlp(self.ln_mlp(x)))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pass over a whole sequence (training)."""
        q, k, v = (self._heads(t) for t in self.qkv(self.ln_self(x)).chunk(3, dim=-1))
        x = x + self.drop(self.self_out(self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))))
        mk, mv = self.memory_kv(memory)
        return self._cross_and_mlp(x, mk, mv)

    def step(
        self,
        x: torch.Tensor,
        pos: int,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        mk: torch.Tensor,
        mv: torch.Tensor,
    ) -> torch.Tensor:
        """One new token per sequence (x: B x 1 x d); writes its K/V into the cache at `pos`."""
        q, k, v = (self._heads(t) for t in self.qkv(self.ln_self(x)).chunk(3, dim=-1))
        cache_k[:, :, pos : pos + 1] = k
        cache_v[:, :, pos : pos + 1] = v
        # No mask needed: the cache holds only positions <= pos.
        attn = F.scaled_dot_product_attention(q, cache_k[:, :, : pos + 1], cache_v[:, :, : pos + 1])
        x = x + self.self_out(self._merge(attn))
        return self._cross_and_mlp(x, mk, mv)


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.max_tokens, cfg.d_model))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.head_dim = cfg.d_model // cfg.n_heads
        self.ln_f = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)

    def _layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.layers]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # Output projection tied to the input embedding: fewer parameters for a vocabulary of whole words.
        return F.linear(self.ln_f(x), self.tok_emb.weight)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """tokens: B x T (BOS first), memory: B x S x d -> logits B x T x V."""
        x = self.tok_emb(tokens) + self.pos_emb[: tokens.size(1)]
        for layer in self.layers:
            x = layer(x, memory)
        return self._logits(x)

    def start(self, memory: torch.Tensor) -> DecodeState:
        b = memory.size(0)
        kv = [layer.memory_kv(memory) for layer in self._layers()]
        shape = (len(self.layers), b, self.cfg.n_heads, self.cfg.max_tokens, self.head_dim)
        return DecodeState(
            cross_k=[k for k, _ in kv],
            cross_v=[v for _, v in kv],
            self_k=torch.empty(shape, device=memory.device, dtype=memory.dtype),
            self_v=torch.empty(shape, device=memory.device, dtype=memory.dtype),
        )

    def step(self, tokens: torch.Tensor, pos: int, state: DecodeState) -> torch.Tensor:
        """tokens: B (the previous token) -> logits B x V for position `pos`."""
        x = self.tok_emb(tokens).unsqueeze(1) + self.pos_emb[pos]
        x = x.to(state.self_k.dtype)
        for i, layer in enumerate(self._layers()):
            x = layer.step(x, pos, state.self_k[i], state.self_v[i], state.cross_k[i], state.cross_v[i])
        return self._logits(x)[:, 0]

    @torch.no_grad()
    def greedy(
        self, memory: torch.Tensor, *, bos: int, eos: int, pad: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding with the KV cache.

        Returns token ids (B x max_tokens, `pad` after EOS) and the geometric-mean probability of the
        generated tokens (EOS included) as the caption's confidence.
        """
        b = memory.size(0)
        state = self.start(memory)
        out = torch.full((b, self.cfg.max_tokens), pad, dtype=torch.long, device=memory.device)
        logp_sum = torch.zeros(b, device=memory.device)
        n_tokens = torch.zeros(b, device=memory.device)
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        tok = torch.full((b,), bos, dtype=torch.long, device=memory.device)
        for pos in range(self.cfg.max_tokens):
            logp = torch.log_softmax(self.step(tok, pos, state).float(), dim=-1)
            best_logp, nxt = logp.max(dim=-1)
            live = ~done
            nxt = torch.where(live, nxt, torch.full_like(nxt, pad))
            logp_sum += torch.where(live, best_logp, torch.zeros_like(best_logp))
            n_tokens += live.float()
            out[:, pos] = nxt
            done |= nxt == eos
            tok = nxt
            # One host sync per token: it lets a batch of short titles stop early.
            if bool(done.all()):
                break
        return out, torch.exp(logp_sum / n_tokens.clamp(min=1))

    @torch.no_grad()
    def beam(
        self, memory: torch.Tensor, *, bos: int, eos: int, pad: int, beams: int, length_alpha: float = 0.6
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search with the KV cache; the same outputs as `greedy` (which it equals at beams=1).

        The B x k hypotheses share their image's cross-attention K/V (computed once, repeated); at each step
        the self-attention cache is re-ordered to the surviving hypotheses. Finished hypotheses keep their
        score; the best per image is chosen by log-probability / length**length_alpha.
        """
        b, k, device = memory.size(0), beams, memory.device
        vocab = self.tok_emb.num_embeddings
        state = self.start(memory.repeat_interleave(k, dim=0))
        out = torch.full((b * k, self.cfg.max_tokens), pad, dtype=torch.long, device=device)
        score = torch.zeros(b, k, device=device)
        score[:, 1:] = float("-inf")  # all beams start identical: keep one until the first expansion
        length = torch.zeros(b * k, device=device)
        done = torch.zeros(b * k, dtype=torch.bool, device=device)
        tok = torch.full((b * k,), bos, dtype=torch.long, device=device)
        offsets = (torch.arange(b, device=device) * k).unsqueeze(1)
        for pos in range(self.cfg.max_tokens):
            logp = torch.log_softmax(self.step(tok, pos, state).float(), dim=-1)
            # A finished hypothesis continues only with pad, at no cost.
            finished = torch.full_like(logp, float("-inf"))
            finished[:, pad] = 0.0
            logp = torch.where(done.unsqueeze(1), finished, logp)
            total = (score.view(b * k, 1) + logp).view(b, k * vocab)
            score, flat = total.topk(k, dim=1)
            parent = (offsets + flat // vocab).view(-1)
            tok = (flat % vocab).view(-1)
            out = out[parent]
            out[:, pos] = tok
            length = length[parent] + (~done[parent]).float()
            done = done[parent] | (tok == eos)
            state.self_k = state.self_k[:, parent]
            state.self_v = state.self_v[:, parent]
            if bool(done.all()):
                break
        normalised = score.view(-1) / length.clamp(min=1) ** length_alpha
        best = offsets.view(-1) + normalised.view(b, k).argmax(dim=1)
        confidence = torch.exp(score.view(-1)[best] / length[best].clamp(min=1))
        return out[best], confidence
