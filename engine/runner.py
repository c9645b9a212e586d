"""ModelRunner: one packed forward per engine step over every scheduled request, then the decoders.

Data flow of a step: the host lists each request's query range (a refresh pass over the whole canvas, or a
block pass) -> one packed forward (variable lengths, K/V written to and read from the paged pool) -> logits only at
the current block's positions -> candidates and scores -> per-row commit selection -> canvas update. The host gets
back one small tensor per step (tokens committed and EOS flags per request).
"""
from __future__ import annotations

import math
import os
from itertools import accumulate
from dataclasses import dataclass

import torch

from .decoding import schedule
from .decoding.candidates import SCORE_CODES, CandidateInputs, candidates
from .decoding.noise import STREAM_GUMBEL, row_keys
from .decoding.select import SelectInputs, select
from .block_graphs import BlockGraphs
from .kv_pool import KVPool
from .model.attention import AttnContext
from .model.diffusion_model import DiffusionModel
from .scheduler import RunnerOutput, ScheduledRequest
from .sequence import Sequence

GRAPHS_ENV = "UNMASK_CUDA_GRAPHS"


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
        self.block_table = table.to(device=dev, dtype=torch.int32)  # [R, P] (triton attention)
        self.seq_lens_k = torch.tensor(row_lens, dtype=torch.int32, device=dev)  # [R]
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
        self.kernels = model.kernels
        use_graphs = self.device.type == "cuda" and self.kernels == "triton" and os.environ.get(GRAPHS_ENV, "1") != "0"
        self.graphs = BlockGraphs(self.net, pool, self.device) if use_graphs else None
        """Captured block passes (CUDA + Triton kernels; UNMASK_CUDA_GRAPHS=0 turns them off)."""

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
        m = self._sync_members([r.seq for r in reqs])
        hidden, row_base = self._forward(reqs, m)  # [T, D]
        logits, dec = self._block_logits(reqs, m, hidden, row_base)  # [N, V]
        commit = self._commit(reqs, m, logits, dec)  # [B, M]
        eos = self._eos(m)  # [B]
        out = torch.stack([commit.sum(1), eos.long()]).tolist()
        return RunnerOutput(committed=out[0], eos=[bool(x) for x in out[1]])

    def _forward(self, reqs: list[ScheduledRequest], m: _Members) -> tuple[torch.Tensor, list[int]]:
        """One packed forward over every row's query range; K/V written to and read from the pool.
        Returns hidden [T, D] and each row's first index in it."""
        dev, mask_id = self.device, self.cfg.mask_id
        rows_q = [reqs[i].query for i in m.row_seq]
        row_len = [b - a for a, b in rows_q]
        for r in reqs:
            r.seq.stats.positions_computed += (r.query[1] - r.query[0]) * r.seq.num_rows
        tok_idx = ranges([m.offsets[i] + a for i, (a, _) in zip(m.row_seq, rows_q)], row_len).to(dev)  # [T]
        pos = ranges([a for a, _ in rows_q], row_len).to(dev)  # [T]
        row_of_tok = torch.repeat_interleave(torch.arange(len(row_len)), torch.tensor(row_len)).to(dev)  # [T]
        tokens = self.buf[tok_idx]
        if m.cfg_seqs:  # the unconditional twins see their prompt masked
            twin_prompt = m.row_twin[row_of_tok] & (pos < m.row_prompt[row_of_tok])
            tokens = torch.where(twin_prompt, mask_id, tokens)
        write = m.read_slots[row_of_tok, pos]  # [T] pool slot of each token
        row_base = [0, *accumulate(row_len)][:-1]
        if self.shift:  # a block pass's first query (the position before the block) keeps its cached K/V
            shifted_rows = [row_base[r] for r, i in enumerate(m.row_seq) if not reqs[i].refresh]
            keep = torch.zeros(len(tok_idx), dtype=torch.bool)
            keep[shifted_rows] = True
            write = torch.where(keep.to(dev), self.pool.scratch_slot, write)
        if self.graphs is not None and BlockGraphs.eligible([reqs[i].refresh for i in m.row_seq], row_len):
            hidden = self.graphs.run(tokens, pos, write, m.block_table, m.seq_lens_k, len(row_len), row_len[0])
            return hidden, row_base
        if self.kernels == "triton":  # packed layout: no padded query index, keys through the block table
            ctx = AttnContext(None, None, None, len(row_len), max(row_len), backend="triton",
                              cu_seqlens_q=torch.tensor([0, *accumulate(row_len)], dtype=torch.int32).to(dev),
                              block_table=m.block_table, seq_lens_k=m.seq_lens_k, page_size=self.pool.page_size)
        else:
            ctx = AttnContext.from_lengths(row_len, dev)
            ctx.key_valid, ctx.read_slots = m.key_valid, m.read_slots
        ctx.write_slots, ctx.kv_pool = write, self.pool.tensors
        return self.net(tokens, pos, ctx, max_pos=max(m.lens) - 1), row_base

    def _block_logits(self, reqs: list[ScheduledRequest], m: _Members, hidden: torch.Tensor,
                      row_base: list[int]) -> tuple[torch.Tensor, "_Decode"]:
        """Logits [N, V] at the still-masked positions of the current blocks only (CFG combined).

        Each request's masked count is known on the host, so the masked positions are compacted with
        nonzero_static (fixed output size, no device sync)."""
        dev, shift = self.device, self.shift
        blocks = [r.block for r in reqs]
        blen = [e - b for b, e in blocks]
        block_buf = ranges([o + b for o, (b, _) in zip(m.offsets, blocks)], blen).to(dev)  # [Nb]
        counts = [r.seq.masked_in_block for r in reqs]
        n = sum(counts)
        keep = torch.nonzero_static(self.buf[block_buf] == self.cfg.mask_id, size=n)[:, 0]  # [N] into the blocks
        seq = torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor(counts)).to(dev)  # [N]
        block_start = torch.tensor([b for b, _ in blocks], device=dev)
        flat_block_start = torch.tensor([0, *accumulate(blen)][:-1], device=dev)
        pos = block_start[seq] + keep - flat_block_start[seq]  # [N] canvas positions
        dec = _Decode(pos=pos, buf=block_buf[keep], seq=seq, lengths=counts)

        def hidden_rows(rows: list[int]) -> torch.Tensor:
            """Index into hidden of the output that decodes each position, for the given forward rows."""
            first = torch.tensor([row_base[r] - reqs[i].query[0] - shift for r, i in zip(rows, range(len(reqs)))],
                                 device=dev)
            return first[seq] + pos

        logits = self.net.compute_logits(hidden[hidden_rows(list(range(len(reqs))))])  # [N, V]
        if m.cfg_seqs:
            twin_row = [m.twin_row_of.get(i, i) for i in range(len(reqs))]
            sel = torch.nonzero_static(m.cfg_w[seq] > 0, size=sum(counts[i] for i in m.cfg_seqs))[:, 0]  # [Nc]
            un = self.net.compute_logits(hidden[hidden_rows(twin_row)[sel]])
            w = m.cfg_w[seq[sel]][:, None]
            logits[sel] = un + (w + 1) * (logits[sel] - un)
        return logits, dec

    def _commit(self, reqs: list[ScheduledRequest], m: _Members, logits: torch.Tensor, dec: "_Decode"
                ) -> torch.Tensor:
        """Candidates and scores, then each row's selection rule; writes the commits into the canvases.
        Returns the commit mask [B, M] (padded layout)."""
        dev, mask_id = self.device, self.cfg.mask_id
        mmax = max(dec.lengths)
        if mmax == 0:  # nothing masked in any block (a fixed schedule's trailing zero-commit steps)
            return torch.zeros(len(reqs), 0, dtype=torch.bool, device=dev)
        seqs = [r.seq for r in reqs]
        step_no = torch.tensor([s.stats.steps for s in seqs], device=dev)[dec.seq]
        keys = row_keys(m.seed[dec.seq], step_no, dec.pos, STREAM_GUMBEL)  # [N]
        x0, score, conf = candidates(logits, CandidateInputs(
            m.temperature[dec.seq], m.top_k[dec.seq], m.top_p[dec.seq], m.score[dec.seq], m.tempered[dec.seq],
            keys, mask_id, m.any_sampling, m.any_filter, m.score_codes, m.any_tempered, self.kernels))
        pad_valid = (torch.arange(mmax)[None, :] < torch.tensor(dec.lengths)[:, None]).to(dev)  # [B, M]
        flat_start = torch.tensor([0, *accumulate(dec.lengths)][:-1], device=dev)  # [B]
        pad_idx = torch.where(pad_valid, flat_start[:, None] + torch.arange(mmax, device=dev)[None, :], 0)  # [B, M]
        current = self.buf[dec.buf]  # [N]
        selectable = (current == mask_id)[pad_idx] & pad_valid
        counts = [schedule.fixed_count(s) for s in seqs]
        origin = [schedule.origin_prob(s) for s in seqs]
        commit = select(score[pad_idx], conf[pad_idx], selectable, SelectInputs(
            count=torch.tensor(counts, device=dev), max_count=max(counts),
            threshold=m.threshold, factor=m.factor,
            origin_prob=torch.tensor([math.nan if o is None else o for o in origin], dtype=torch.float64,
                                     device=dev),
            alg_temp=m.alg_temp,
            commit_all=torch.tensor([s.is_last_allowed_step and s.params.adaptive for s in seqs], device=dev),
            noise_keys=keys[pad_idx], any_threshold=m.any_threshold, any_factor=m.any_factor,
            any_origin=any(o is not None for o in origin), any_alg_temp=m.any_alg_temp))  # [B, M]
        self.buf[dec.buf] = torch.where(commit[pad_valid], x0, current)
        return commit

    def _eos(self, m: _Members) -> torch.Tensor:
        """[B] bool: a stop token is committed with every generated position before it committed."""
        gen = self.buf[m.gen_index]  # [B, G]
        is_stop = torch.isin(gen, self.stop_ids) & m.gen_valid
        is_mask = (gen == self.cfg.mask_id) & m.gen_valid
        g = torch.arange(gen.shape[1], device=self.device)[None, :]
        first_stop = torch.where(is_stop, g, gen.shape[1]).amin(1, keepdim=True)  # [B, 1]
        return is_stop.any(1) & ~(is_mask & (g < first_stop)).any(1)


@dataclass(slots=True)
class _Decode:
    """The positions decoded this step, flattened over requests ([N] each)."""
    pos: torch.Tensor  # canvas position
    buf: torch.Tensor  # index into the runner's token buffer
    seq: torch.Tensor  # request index
    lengths: list[int]  # positions per request (host): its masked positions in the current block
