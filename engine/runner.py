"""ModelRunner: one packed forward per engine step over every scheduled request, then the decoders.

Data flow of a step: the host lists each request's query range (a refresh pass over the whole canvas, or a
block pass) -> one packed forward (variable lengths, K/V written to and read from the paged pool) -> logits only at
the current block's positions -> candidates and scores -> per-row commit selection -> canvas update. The host gets
back one small tensor per step (tokens committed and EOS flags per request).
"""
from __future__ import annotations

import math
from itertools import accumulate
from dataclasses import dataclass

import torch

from .cache_manager import PageAllocator
from .decoding import schedule
from .decoding.candidates import SCORE_CODES, CandidateInputs, candidates
from .decoding.noise import STREAM_GUMBEL, row_keys
from .decoding.select import SelectInputs, select
from .kv_pool import KVPool
from .model.attention import AttnContext
from .model.diffusion_model import DiffusionModel
from .scheduler import RunnerOutput, ScheduledRequest
from .sequence import Sequence


def ranges(starts: list[int], lengths: list[int]) -> torch.Tensor:
    """Concatenation of arange(s, s + n) for each (s, n), built without a Python loop over rows. [sum(n)] int64."""
    lens = torch.tensor(lengths, dtype=torch.long)
    offs = torch.cumsum(lens, 0) - lens  # [R]
    base = torch.repeat_interleave(torch.tensor(starts, dtype=torch.long) - offs, lens)
    return torch.arange(int(lens.sum()), dtype=torch.long) + base


class _Members:
    """Per-membership static tensors (rebuilt only when the set of running requests changes)."""

    def __init__(self, runner: "ModelRunner", seqs: list[Sequence]) -> None:
        dev, ps, pool = runner.device, runner.pool.page_size, runner.pool
        self.key = tuple(id(s) for s in seqs)
        self.lens = [s.canvas_len for s in seqs]
        self.offsets = [0] * len(seqs)
        acc = 0
        for i, n in enumerate(self.lens):
            self.offsets[i], acc = acc, acc + n
        self.cfg_seqs = [i for i, s in enumerate(seqs) if s.params.cfg_scale > 0]
        self.row_seq = list(range(len(seqs))) + self.cfg_seqs  # forward rows: canvases, then CFG twins
        self.twin_row_of = {i: len(seqs) + j for j, i in enumerate(self.cfg_seqs)}
        tables, row_lens = [], []
        for r, i in enumerate(self.row_seq):
            s, n_pages = seqs[i], -(-self.lens[i] // ps)
            pages = s.pages[:n_pages] if r < len(seqs) else s.pages[n_pages:2 * n_pages]
            tables.append(pages)
            row_lens.append(self.lens[i])
        max_pages = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (max_pages - len(t)) for t in tables], dtype=torch.long)  # [R, P]
        lk = max(row_lens)
        ar = torch.arange(lk)
        key_valid = ar[None, :] < torch.tensor(row_lens)[:, None]  # [R, Lk]
        slots = table[:, ar // ps] * ps + ar % ps  # [R, Lk]
        self.read_slots = torch.where(key_valid, slots, pool.scratch_slot).to(dev)
        self.key_valid = key_valid.to(dev)
        self.row_prompt = torch.tensor([seqs[i].prompt_len for i in self.row_seq], device=dev)  # [R]
        self.row_twin = torch.tensor([r >= len(seqs) for r in range(len(self.row_seq))], device=dev)  # [R]
        gen = [s.gen_len for s in seqs]
        gmax = max(gen)
        gar = torch.arange(gmax)
        self.gen_valid = (gar[None, :] < torch.tensor(gen)[:, None]).to(dev)  # [B, G]
        gen_index = torch.tensor([o + s.prompt_len for o, s in zip(self.offsets, seqs)])[:, None] + gar[None, :]
        self.gen_index = torch.where(self.gen_valid.cpu(), gen_index, 0).to(dev)  # [B, G]
        f64 = dict(dtype=torch.float64, device=dev)
        p = [s.params for s in seqs]
        self.temperature = torch.tensor([x.temperature for x in p], dtype=torch.float32, device=dev)
        self.top_k = torch.tensor([x.top_k for x in p], device=dev)
        self.top_p = torch.tensor([x.top_p for x in p], dtype=torch.float32, device=dev)
        self.score = torch.tensor([SCORE_CODES[x.remasking] for x in p], device=dev)
        self.tempered = torch.tensor([x.algorithm != "llada" for x in p], device=dev)
        self.seed = torch.tensor([x.seed for x in p], device=dev)
        self.cfg_w = torch.tensor([x.cfg_scale for x in p], dtype=torch.float32, device=dev)
        self.threshold = torch.tensor([math.nan if x.threshold is None else x.threshold for x in p], **f64)
        self.factor = torch.tensor([math.nan if x.factor is None else x.factor for x in p], **f64)
        self.alg_temp = torch.tensor([x.alg_temp for x in p], **f64)
        self.score_codes = frozenset(SCORE_CODES[x.remasking] for x in p)
        self.any_tempered = any(x.algorithm != "llada" for x in p)
        self.any_sampling = any(x.temperature > 0 for x in p)
        self.any_filter = any(x.top_k > 0 or x.top_p < 1 for x in p)
        self.any_threshold = any(x.threshold is not None for x in p)
        self.any_factor = any(x.factor is not None for x in p)
        self.any_alg_temp = any(x.alg_temp > 0 for x in p)


class ModelRunner:
    def __init__(self, model: DiffusionModel, pool: KVPool) -> None:
        self.model, self.net, self.cfg = model, model.net, model.config
        self.device, self.pool = model.device, pool
        self.canvases: dict[int, torch.Tensor] = {}
        self.buf = torch.empty(0, dtype=torch.long, device=self.device)
        self.members: _Members | None = None
        self.stop_ids = torch.tensor(self.cfg.stop_ids, device=self.device)
        self.shift = 1 if self.cfg.shift_logits else 0

    # canvases -------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        ids = seq.prompt_ids + [self.cfg.mask_id] * seq.gen_len
        self.canvases[id(seq)] = torch.tensor(ids, dtype=torch.long, device=self.device)

    def remove(self, seq: Sequence) -> list[int]:
        """Drop a request's canvas; returns its generated region (host list)."""
        canvas = self.canvases.pop(id(seq))
        self.members = None if self.members and id(seq) in self.members.key else self.members
        return canvas[seq.prompt_len:].tolist()

    def generated(self, seq: Sequence) -> list[int]:
        return self.canvases[id(seq)][seq.prompt_len:].tolist()

    def _sync_members(self, seqs: list[Sequence]) -> _Members:
        key = tuple(id(s) for s in seqs)
        if self.members is None or self.members.key != key:
            self.buf = torch.cat([self.canvases[id(s)] for s in seqs])
            self.members = _Members(self, seqs)
            for s, off, n in zip(seqs, self.members.offsets, self.members.lens):
                self.canvases[id(s)] = self.buf[off:off + n]
        return self.members

    # one step -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, reqs: list[ScheduledRequest]) -> RunnerOutput:
        seqs = [r.seq for r in reqs]
        m = self._sync_members(seqs)
        dev, B, shift, mask_id = self.device, len(seqs), self.shift, self.cfg.mask_id
        qr = [r.query for r in reqs]
        refresh = [r.refresh for r in reqs]
        rows_q = [qr[i] for i in m.row_seq]
        row_len = [b - a for a, b in rows_q]
        row_off = [m.offsets[i] for i in m.row_seq]
        for s, (a, b) in zip(seqs, qr):
            s.stats.positions_computed += (b - a) * s.num_rows

        # packed forward over every row's query range
        tok_idx = ranges([o + a for o, (a, _) in zip(row_off, rows_q)], row_len).to(dev)  # [T]
        pos = ranges([a for a, _ in rows_q], row_len).to(dev)  # [T]
        row_of_tok = torch.repeat_interleave(torch.arange(len(row_len)), torch.tensor(row_len)).to(dev)  # [T]
        tokens = self.buf[tok_idx]
        if m.cfg_seqs:
            twin_prompt = m.row_twin[row_of_tok] & (pos < m.row_prompt[row_of_tok])
            tokens = torch.where(twin_prompt, mask_id, tokens)
        write = m.read_slots[row_of_tok, pos]  # [T]
        if shift:
            row_start = torch.tensor([0] + row_len[:-1]).cumsum(0)
            shift_rows = torch.tensor([not refresh[i] for i in m.row_seq])
            first = torch.zeros(len(tok_idx), dtype=torch.bool)
            first[row_start[shift_rows]] = True
            write = torch.where(first.to(dev), self.pool.scratch_slot, write)
        ctx = AttnContext.from_lengths(row_len, dev)
        ctx.key_valid, ctx.read_slots, ctx.write_slots = m.key_valid, m.read_slots, write
        ctx.kv_pool = self.pool.tensors
        hidden = self.net(tokens, pos, ctx, max_pos=max(m.lens) - 1)  # [T, D]

        # logits at the current blocks only
        blocks = [r.block for r in reqs]
        blen = [e - b for b, e in blocks]
        row_base = [0, *accumulate(row_len)][:-1]
        dec_pos_cpu = ranges([b for b, _ in blocks], blen)  # [N] canvas positions
        dec_pos = dec_pos_cpu.to(dev)
        dec_buf = ranges([o + b for o, (b, _) in zip(m.offsets, blocks)], blen).to(dev)  # [N]
        hid_idx = ranges([row_base[i] + b - shift - qr[i][0] for i, (b, _) in enumerate(blocks)], blen).to(dev)
        logits = self.net.compute_logits(hidden[hid_idx])  # [N, V]
        dec_seq = torch.repeat_interleave(torch.arange(B), torch.tensor(blen)).to(dev)  # [N]
        if m.cfg_seqs:
            blen_start = [0, *accumulate(blen)]
            starts = [blen_start[i] for i in m.cfg_seqs]
            sel = ranges(starts, [blen[i] for i in m.cfg_seqs]).to(dev)
            twin_idx = ranges([row_base[m.twin_row_of[i]] + blocks[i][0] - shift - qr[i][0] for i in m.cfg_seqs],
                              [blen[i] for i in m.cfg_seqs]).to(dev)
            un = self.net.compute_logits(hidden[twin_idx])
            w = m.cfg_w[dec_seq[sel]][:, None]
            logits[sel] = un + (w + 1) * (logits[sel] - un)

        step_no = torch.tensor([s.stats.steps for s in seqs], device=dev)[dec_seq]
        keys = row_keys(m.seed[dec_seq], step_no, dec_pos, STREAM_GUMBEL)
        x0, score, conf = candidates(logits, CandidateInputs(
            m.temperature[dec_seq], m.top_k[dec_seq], m.top_p[dec_seq], m.score[dec_seq], m.tempered[dec_seq],
            keys, mask_id, m.any_sampling, m.any_filter, m.score_codes, m.any_tempered))

        # per-row commit selection in a padded [B, M] layout
        mmax = max(blen)
        pad_valid = (torch.arange(mmax)[None, :] < torch.tensor(blen)[:, None]).to(dev)  # [B, M]
        flat_start = torch.tensor([0] + blen[:-1]).cumsum(0).to(dev)
        pad_idx = torch.where(pad_valid, flat_start[:, None] + torch.arange(mmax, device=dev)[None, :], 0)  # [B, M]
        current = self.buf[dec_buf]  # [N]
        selectable = (current == mask_id)[pad_idx] & pad_valid
        counts = [schedule.fixed_count(s) for s in seqs]
        origin = [schedule.origin_prob(s) for s in seqs]
        f64 = dict(dtype=torch.float64, device=dev)
        commit = select(score[pad_idx], conf[pad_idx], selectable, SelectInputs(
            count=torch.tensor(counts, device=dev), max_count=max(counts),
            threshold=m.threshold, factor=m.factor,
            origin_prob=torch.tensor([math.nan if o is None else o for o in origin], **f64),
            alg_temp=m.alg_temp,
            commit_all=torch.tensor([s.is_last_allowed_step and s.params.adaptive for s in seqs], device=dev),
            noise_keys=keys[pad_idx], any_threshold=m.any_threshold, any_factor=m.any_factor,
            any_origin=any(o is not None for o in origin), any_alg_temp=m.any_alg_temp))  # [B, M]
        commit_flat = commit[pad_valid]  # [N]
        self.buf[dec_buf] = torch.where(commit_flat, x0, current)

        # EOS: a stop token with every generated position before it committed
        gen = self.buf[m.gen_index]  # [B, G]
        is_stop = torch.isin(gen, self.stop_ids) & m.gen_valid
        is_mask = (gen == mask_id) & m.gen_valid
        g = torch.arange(gen.shape[1], device=dev)[None, :]
        first_stop = torch.where(is_stop, g, gen.shape[1]).amin(1, keepdim=True)  # [B, 1]
        eos_done = is_stop.any(1) & ~(is_mask & (g < first_stop)).any(1)
        out = torch.stack([commit.sum(1), eos_done.long()]).tolist()
        return RunnerOutput(committed=out[0], eos=[bool(x) for x in out[1]])
