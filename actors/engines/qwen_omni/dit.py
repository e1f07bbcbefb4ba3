"""The flow-matching DiT of Qwen2.5-Omni's token2wav as an ODE velocity field, prepared once.

``sample()`` integrates the DiT with RK4 over a fixed time grid: 36 evaluations of 22
layers per call, classifier-free guided (conditional and unconditional halves in one
batch). Run through the transformers modules, an evaluation is ~1000 small kernels, and
most of them recompute things that do not depend on the ODE state:

* the time embedding and every layer's AdaLN modulation depend only on ``t``, and the
  grid is fixed: :class:`DiTField` computes them for all 36 times at load;
* the block attention masks, the rotary table and the conditioning part of the input
  projection (codes, speaker, reference-mel features) are the same for all 36
  evaluations of a call: computed once per call (:meth:`DiTField.prepare`);
* per layer, q/k/v are one GEMM whose weights hold the rotary layout of head 0
  (transformers de-interleaves it and rotates it at run time), the modulations and
  gated residuals are single ``addcmul`` kernels, and the masks are additive.

That is ~400 kernels an evaluation instead of ~1000, for the same arithmetic.
:func:`dit_eval` is the reference (the transformers layers themselves);
:meth:`DiTField.check` compares the two on the model at load, and the token2wav falls
back to the reference if they disagree (a transformers version that changed the DiT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def time_points(steps: int, sway: float) -> list[float]:
    """The ODE's time grid, exactly as ``Qwen2_5OmniToken2WavDiTModel.sample`` builds it."""
    t = torch.linspace(0, 1, steps, dtype=torch.float32)
    if sway is not None:
        t = t + sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return [float(v) for v in t]


def eval_times(steps: int, sway: float) -> list[float]:
    """The time of every evaluation of the RK4 integration, in order (4 per interval)."""
    ts = time_points(steps, sway)
    out = []
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        dt = t1 - t0
        out += [t0, t0 + dt / 3, t0 + 2 * dt / 3, t1]
    return out


def block_diff(block_ids: torch.Tensor) -> torch.Tensor:
    """[2B, 1, F, F]: key j's block minus query i's block, for both guidance halves."""
    ids = torch.cat([block_ids, block_ids], dim=0)
    return (ids[:, None, :] - ids[:, :, None])[:, None]


def dit_eval(
    dit: Any,
    x: torch.Tensor,
    t: float,
    code: torch.Tensor,
    spk: torch.Tensor,
    ecapa: torch.Tensor,
    block_ids: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """The reference guided velocity, through the transformers layers. ``x`` [B, F, mel]
    state, ``code`` [B, F/2] codec ids, ``spk`` [B, enc_emb] conditioning, ``ecapa``
    [2B, enc_dim] the speaker encoder on (reference mel; zeros), ``block_ids`` [B, F]."""
    b, f, _ = x.shape
    cond = dit.text_embed(code)  # repeated to frames inside
    uncond = dit.text_embed(code, drop_code=True)
    x2 = torch.cat([x, x], dim=0)
    spk2 = torch.cat([spk, torch.zeros_like(spk)], dim=0)[:, None].expand(2 * b, f, -1)
    ec2 = ecapa[:, None].expand(2 * b, f, -1)
    code2 = torch.cat([cond, uncond], dim=0)
    h = dit.input_embed.proj(torch.cat((x2, ec2, code2, spk2), dim=-1))
    ts = torch.full((2 * b,), t, dtype=x.dtype, device=x.device)
    temb = dit.time_embed(ts)
    pos = torch.arange(f, device=x.device)[None].expand(2 * b, f)
    rope = dit.rotary_embed(h, pos)
    diff = block_diff(block_ids)
    for blk in dit.transformer_blocks:
        h = blk(h, temb, position_embeddings=rope, block_diff=diff)
    h = dit.norm_out(h, temb)
    out = dit.proj_out(h)
    guided, null = torch.chunk(out, 2, dim=0)
    return guided + (guided - null) * guidance


@dataclass(slots=True)
class Prepared:
    """What one call's 36 evaluations share."""

    cond: torch.Tensor  # [2, B, F, H] the input projection of everything but the state
    masks: list[torch.Tensor]  # per layer: [2B, 1, F, F] additive attention mask
    cos: torch.Tensor  # [F, head_dim]
    sin: torch.Tensor


class DiTField:
    """The guided velocity of ``dit`` at the evaluation times of one RK4 grid (see module docstring)."""

    def __init__(self, dit: Any, steps: int, sway: float, guidance: float) -> None:
        self.dit = dit
        self.guidance = guidance
        self.steps, self.sway = steps, sway
        self.times = time_points(steps, sway)
        self.evals = eval_times(steps, sway)
        p = next(dit.parameters())
        self.device, self.dtype = p.device, p.dtype
        cfg = dit.config
        self.heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.head_dim)
        self.inner = self.heads * self.head_dim
        self.hidden = int(cfg.hidden_size)
        self.mel = int(cfg.mel_dim)
        self.blocks = list(dit.transformer_blocks)
        with torch.no_grad():
            self._fuse_qkv()
            self._split_input()
            self._modulations()

    # ------------------------------------------------------------------ prepared once
    def _fuse_qkv(self) -> None:
        """Per layer: [q | k | v | rot(q head 0) | rot(k head 0)] weights of one GEMM, with head 0
        of q and k in the half-split rotary layout transformers reaches by de-interleaving."""
        d, inner = self.head_dim, self.inner
        perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)]).to(self.device)

        def head0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h0 = w[:d][perm]  # de-interleaved rows
            rot = torch.cat([-h0[d // 2 :], h0[: d // 2]])  # rotate_half as rows
            return torch.cat([h0, w[d:]]), rot

        self.qkv_w: list[torch.Tensor] = []
        self.qkv_b: list[torch.Tensor] = []
        for blk in self.blocks:
            a = blk.attn
            wq, rq = head0(a.to_q.weight)
            wk, rk = head0(a.to_k.weight)
            bq, brq = head0(a.to_q.bias[:, None])
            bk, brk = head0(a.to_k.bias[:, None])
            self.qkv_w.append(torch.cat([wq, wk, a.to_v.weight, rq, rk]).contiguous())
            self.qkv_b.append(torch.cat([bq[:, 0], bk[:, 0], a.to_v.bias, brq[:, 0], brk[:, 0]]).contiguous())
        assert self.qkv_w[0].shape[0] == 3 * inner + 2 * d

    def _split_input(self) -> None:
        """The input projection's weight by the parts of its input (state | ecapa | codes | speaker)."""
        proj = self.dit.input_embed.proj
        cfg = self.dit.config
        sizes = [int(cfg.mel_dim), int(cfg.enc_dim), int(cfg.emb_dim), int(cfg.enc_emb_dim)]
        w = proj.weight
        assert w.shape[1] == sum(sizes), "DiT input projection layout changed"
        self.w_x, self.w_ec, self.w_code, self.w_spk = (p.contiguous() for p in torch.split(w, sizes, dim=1))
        self.b_in = proj.bias

    def _modulations(self) -> None:
        """Every layer's AdaLN shift / (1 + scale) / gate at every evaluation time."""
        dit = self.dit
        ts = torch.tensor(self.evals, dtype=self.dtype, device=self.device)
        temb = dit.time_embed(ts)  # [E, H]
        per_layer = []
        for blk in self.blocks:
            n = blk.attn_norm
            emb = n.linear(n.silu(temb))
            sm, scm, gm, sf, scf, gf = torch.chunk(emb, 6, dim=1)
            per_layer.append(torch.stack([sm, 1 + scm, gm, sf, 1 + scf, gf], dim=1))  # [E, 6, H]
        self.mods = torch.stack(per_layer, dim=1).contiguous()  # [E, layers, 6, H]
        fo = dit.norm_out
        scale, shift = torch.chunk(fo.linear(fo.silu(temb)), 2, dim=1)
        self.final = torch.stack([1 + scale, shift], dim=1).contiguous()  # [E, 2, H]
        self.pairs = [(int(b.look_backward_block), int(b.look_ahead_block)) for b in self.blocks]

    # ------------------------------------------------------------------ per call
    def prepare(self, code: torch.Tensor, spk: torch.Tensor, ecapa: torch.Tensor,
                block_ids: torch.Tensor) -> Prepared:
        dit = self.dit
        b, f = block_ids.shape
        cond = dit.text_embed(code)
        uncond = dit.text_embed(code, drop_code=True)
        code2 = torch.cat([cond, uncond], dim=0)  # [2B, F, emb]
        spk2 = torch.cat([spk, torch.zeros_like(spk)], dim=0)  # [2B, enc_emb]
        rows = F.linear(ecapa, self.w_ec, self.b_in) + F.linear(spk2, self.w_spk)  # [2B, H]
        rows_f = rows[:, None].expand(2 * b, f, self.hidden).reshape(2 * b * f, self.hidden)
        c = torch.addmm(rows_f, code2.reshape(2 * b * f, -1), self.w_code.t())
        diff = block_diff(block_ids)
        made: dict[tuple[int, int], torch.Tensor] = {}
        for back, ahead in self.pairs:
            if (back, ahead) not in made:
                allowed = (diff >= -back) & (diff <= ahead)
                zero = torch.zeros((), dtype=self.dtype, device=self.device)
                made[(back, ahead)] = torch.where(allowed, zero, float("-inf")).to(self.dtype)
        masks = [made[p] for p in self.pairs]
        pos = torch.arange(f, device=self.device)[None]
        probe = torch.empty(1, f, self.hidden, dtype=self.dtype, device=self.device)
        cos, sin = dit.rotary_embed(probe, pos)
        return Prepared(c.view(2, b, f, self.hidden), masks, cos[0].to(self.dtype), sin[0].to(self.dtype))

    def velocity(self, k: int, x: torch.Tensor, prep: Prepared) -> torch.Tensor:
        """The guided velocity at evaluation ``k`` of the grid (time ``self.evals[k]``)."""
        b, f, _ = x.shape
        d, inner, heads = self.head_dim, self.inner, self.heads
        h = (prep.cond + F.linear(x, self.w_x)).view(2 * b, f, self.hidden)
        mods = self.mods[k]
        for i, blk in enumerate(self.blocks):
            shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mods[i]
            y = torch.addcmul(shift_a, blk.attn_norm.norm(h), scale_a)
            qkv = F.linear(y, self.qkv_w[i], self.qkv_b[i])  # [2B, F, 3I + 2d]
            q0 = qkv[..., :d]
            k0 = qkv[..., inner : inner + d]
            q0.mul_(prep.cos).addcmul_(qkv[..., 3 * inner : 3 * inner + d], prep.sin)
            k0.mul_(prep.cos).addcmul_(qkv[..., 3 * inner + d :], prep.sin)
            q = qkv[..., :inner].view(2 * b, f, heads, d).transpose(1, 2)
            kk = qkv[..., inner : 2 * inner].view(2 * b, f, heads, d).transpose(1, 2)
            v = qkv[..., 2 * inner : 3 * inner].view(2 * b, f, heads, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, kk, v, attn_mask=prep.masks[i])
            o = blk.attn.to_out[0](o.transpose(1, 2).reshape(2 * b, f, inner))
            h = torch.addcmul(h, gate_a, o)
            y = torch.addcmul(shift_f, blk.ff_norm(h), scale_f)
            h = torch.addcmul(h, gate_f, blk.ff(y))
        scale, shift = self.final[k]
        out = self.dit.proj_out(torch.addcmul(shift, self.dit.norm_out.norm(h), scale))
        guided, null = out[:b], out[b:]
        return guided + (guided - null) * self.guidance

    def ode(self, noise: torch.Tensor, code: torch.Tensor, spk: torch.Tensor, ecapa: torch.Tensor,
            block_ids: torch.Tensor) -> torch.Tensor:
        """The RK4 integration of ``sample()``: noise [B, F, mel] → mel [B, F, mel]."""
        with torch.no_grad():
            return self._ode(noise, code, spk, ecapa, block_ids)

    def _ode(self, noise: torch.Tensor, code: torch.Tensor, spk: torch.Tensor, ecapa: torch.Tensor,
             block_ids: torch.Tensor) -> torch.Tensor:
        prep = self.prepare(code, spk, ecapa, block_ids)
        y = noise
        k = 0
        for t0, t1 in zip(self.times[:-1], self.times[1:], strict=True):
            dt = t1 - t0
            k1 = self.velocity(k, y, prep)
            k2 = self.velocity(k + 1, y + dt * k1 / 3, prep)
            k3 = self.velocity(k + 2, y + dt * (k2 - k1 / 3), prep)
            k4 = self.velocity(k + 3, y + dt * (k1 - k2 + k3), prep)
            y = y + (k1 + 3 * (k2 + k3) + k4) * dt / 8
            k += 4
        return y

    # ------------------------------------------------------------------ self-check
    def check(self, frames: int = 48) -> float:
        """Relative difference between this field and :func:`dit_eval` on a random window
        (two blocks, one of them padding) at the first and the last evaluation time."""
        with torch.no_grad():
            return self._check(frames)

    def _check(self, frames: int) -> float:
        g = torch.Generator(device="cpu").manual_seed(0)
        cfg = self.dit.config

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(self.device, self.dtype)

        n = frames // self.dit.repeats
        code = torch.randint(0, int(cfg.num_embeds), (1, n), generator=g).to(self.device)
        x, spk, ecapa = rand(1, frames, self.mel), rand(1, int(cfg.enc_emb_dim)), rand(2, int(cfg.enc_dim))
        bid = torch.arange(frames, device=self.device) // int(self.dit.block_size)
        bid[frames // 2 :] = 1 << 20
        bid = bid[None]
        prep = self.prepare(code, spk, ecapa, bid)
        worst = 0.0
        for k in (0, len(self.evals) - 1):
            want = dit_eval(self.dit, x, self.evals[k], code, spk, ecapa, bid, self.guidance).float()
            got = self.velocity(k, x, prep).float()
            worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-6)))
        return worst


def ode_mel(
    dit: Any,
    noise: torch.Tensor,
    code: torch.Tensor,
    spk: torch.Tensor,
    ecapa: torch.Tensor,
    block_ids: torch.Tensor,
    steps: int,
    guidance: float,
    sway: float,
    field: DiTField | None = None,
) -> torch.Tensor:
    """The RK4 flow-matching integration of ``sample()``: noise → mel [B, F, mel], with the
    prepared field (built here if not given)."""
    field = field or DiTField(dit, steps, sway, guidance)
    return field.ode(noise, code, spk, ecapa, block_ids)


def reference_ode_mel(
    dit: Any,
    noise: torch.Tensor,
    code: torch.Tensor,
    spk: torch.Tensor,
    ecapa: torch.Tensor,
    block_ids: torch.Tensor,
    steps: int,
    guidance: float,
    sway: float,
) -> torch.Tensor:
    """:func:`ode_mel` through the transformers layers (the fallback, and the check)."""
    ts = time_points(steps, sway)
    y = noise
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        dt = t1 - t0

        def f(t: float, z: torch.Tensor) -> torch.Tensor:
            return dit_eval(dit, z, t, code, spk, ecapa, block_ids, guidance)

        k1 = f(t0, y)
        k2 = f(t0 + dt / 3, y + dt * k1 / 3)
        k3 = f(t0 + 2 * dt / 3, y + dt * (k2 - k1 / 3))
        k4 = f(t1, y + dt * (k1 - k2 + k3))
        y = y + (k1 + 3 * (k2 + k3) + k4) * dt / 8
    return y
