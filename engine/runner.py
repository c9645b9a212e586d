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

from .decoding import schedule
from .decoding.candidates import SCORE_CODES, CandidateInputs, candidates
from .decoding.noise import STREAM_GUMBEL, row_keys
from .decoding.select import SelectInputs, select
from .kv_pool import KVPool
from .model.attention import AttnContext
from .model.diffusion_model import DiffusionModel
from .sampling_params import ResolvedParams
from .scheduler import RunnerOutput, ScheduledRequest
from .sequence import Sequence


@dataclass(frozen=True, slots=True)
class ParamRow:
    """One request's numeric sampling parameters, batched by stacking rows (no per-request conversion per step)."""
    ints: torch.Tensor  # [4] int64: seed (two's complement), top_k, score code, tempered (Dream/RND1 scoring)
    floats: torch.Tensor  # [6] float64: temperature, top_p, cfg_scale, threshold (nan = off), factor, alg_temp


def param_row(p: ResolvedParams) -> ParamRow:
    """Build the request's parameter row on the host; raises for a value the engine cannot represent."""
    seed = p.seed - (1 << 64) if p.seed >= 1 << 63 else p.seed  # 64-bit seeds, stored as int64
    ints = torch.tensor([seed, p.top_k, SCORE_CODES[p.remasking], p.algorithm != "llada"], dtype=torch.long)
    floats = torch.tensor([p.temperature, p.top_p, p.cfg_scale, math.nan if p.threshold is None else p.threshold,
                           math.nan if p.factor is None else p.factor, p.alg_temp], dtype=torch.float64)
    return ParamRow(ints, floats)


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
        p = [s.params for s in seqs]
        ints = torch.stack([s.row.ints for s in seqs]).to(dev)  # [B, 4]
        floats = torch.stack([s.row.floats for s in seqs]).to(dev)  # [B, 6]
        self.seed, self.top_k, self.score, self.tempered = ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3].bool()
        self.temperature, self.top_p = floats[:, 0].float(), floats[:, 1].float()
        self.cfg_w = floats[:, 2].float()
        self.threshold, self.factor, self.alg_temp = floats[:, 3], floats[:, 4], floats[:, 5]
        self.score_codes = frozenset(SCORE_CODES[x.remasking] for x in p)
        self.any_tempered = any(x.algorithm != "llada" for x in p)
        self.any_sampling = any(x.temperature > 0 for x in p)
        self.any_filter = any(x.top_k > 0 or x.top_p < 1 for x in p)
        self.any_threshold = any(x.threshold is not None for x in p)
        self.any_factor = any(x.factor is not None for x in p)
        self.any_alg_temp = any(x.alg_temp > 0 for x in p)


LOGIT_ENTRY_BYTES = 64
"""Working memory per (decoded position, vocabulary entry) of one candidate pass: float32 logits, tempered and
filtered copies, the top-k/top-p sort (values, int64 order, cumsum), float64 Gumbel noise and perturbed scores,
softmax and log-softmax. An upper estimate; it sizes the chunks of positions a step decodes at once."""
DEFAULT_LOGITS_MEMORY = 512 << 20


class ModelRunner:
    def __init__(self, model: DiffusionModel, pool: KVPool, logits_memory: int = DEFAULT_LOGITS_MEMORY) -> None:
        self.model, self.net, self.cfg = model, model.net, model.config
        self.device, self.pool = model.device, pool
        self.canvases: dict[int, torch.Tensor] = {}
        self.buf = torch.empty(0, dtype=torch.long, device=self.device)
        self.members: _Members | None = None
        self.stop_ids = torch.tensor(self.cfg.stop_ids, device=self.device)
        self.shift = 1 if self.cfg.shift_logits else 0
        self.max_logit_rows = max(1, logits_memory // (self.cfg.vocab_size * LOGIT_ENTRY_BYTES))
        """Decoded positions whose logits are materialised at once (logits_memory / (vocab * LOGIT_ENTRY_BYTES))."""

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
        dec = self._decode_positions(reqs, m, hidden, row_base)
        commit = self._commit(reqs, m, hidden, dec)  # [B, M]
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
        ctx = AttnContext.from_lengths(row_len, dev)
        ctx.key_valid, ctx.read_slots, ctx.write_slots = m.key_valid, m.read_slots, write
        ctx.kv_pool = self.pool.tensors
        return self.net(tokens, pos, ctx, max_pos=max(m.lens) - 1), row_base

    def _decode_positions(self, reqs: list[ScheduledRequest], m: _Members, hidden: torch.Tensor,
                      row_base: list[int]) -> "_Decode":
        """The still-masked positions of the current blocks only, and where their logits come from in hidden.

        Each request's masked count is known on the host, so the masked positions are compacted with
        nonzero_static (fixed output size, no device sync). The logits themselves are computed in chunks of
        positions (`_logits`), so the [N, V] working set never exceeds the logits memory budget."""
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

        def hidden_rows(rows: list[int]) -> torch.Tensor:
            """Index into hidden of the output that decodes each position, for the given forward rows."""
            first = torch.tensor([row_base[r] - reqs[i].query[0] - shift for r, i in zip(rows, range(len(reqs)))],
                                 device=dev)
            return first[seq] + pos

        cond = hidden_rows(list(range(len(reqs))))  # [N]
        twin = hidden_rows([m.twin_row_of.get(i, i) for i in range(len(reqs))]) if m.cfg_seqs else cond  # [N]
        return _Decode(pos=pos, buf=block_buf[keep], seq=seq, lengths=counts, cond_rows=cond, twin_rows=twin)

    def _logits(self, m: _Members, hidden: torch.Tensor, dec: "_Decode", a: int, b: int) -> torch.Tensor:
        """Logits [b - a, V] of decoded positions [a, b) (CFG combined: un + (w + 1)(cond - un))."""
        logits = self.net.compute_logits(hidden[dec.cond_rows[a:b]])  # [n, V]
        if m.cfg_seqs:
            starts = [0, *accumulate(dec.lengths)]
            n_cfg = sum(max(0, min(b, starts[i + 1]) - max(a, starts[i])) for i in m.cfg_seqs)  # host-known
            if n_cfg:
                w_all = m.cfg_w[dec.seq[a:b]]  # [n]
                sel = torch.nonzero_static(w_all > 0, size=n_cfg)[:, 0]  # [Nc]
                un = self.net.compute_logits(hidden[dec.twin_rows[a:b][sel]])
                w = w_all[sel][:, None]
                logits[sel] = un + (w + 1) * (logits[sel] - un)
        return logits

    def _commit(self, reqs: list[ScheduledRequest], m: _Members, hidden: torch.Tensor, dec: "_Decode"
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
        n, chunk = len(dec.pos), self.max_logit_rows
        if n <= chunk:
            x0, score, conf = candidates(self._logits(m, hidden, dec, 0, n), self._candidate_inputs(m, dec, keys))
        else:  # bounded working set: one [chunk, V] pass at a time
            x0 = torch.empty(n, dtype=torch.long, device=dev)
            score = torch.empty(n, dtype=torch.float64, device=dev)
            conf = torch.empty(n, dtype=torch.float64, device=dev)
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                x0[a:b], score[a:b], conf[a:b] = candidates(self._logits(m, hidden, dec, a, b),
                                                            self._candidate_inputs(m, dec, keys, a, b))
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

    def _candidate_inputs(self, m: _Members, dec: "_Decode", keys: torch.Tensor, a: int = 0,
                          b: int | None = None) -> CandidateInputs:
        seq = dec.seq[a:b]
        return CandidateInputs(m.temperature[seq], m.top_k[seq], m.top_p[seq], m.score[seq], m.tempered[seq],
                               keys[a:b], self.cfg.mask_id, m.any_sampling, m.any_filter, m.score_codes,
                               m.any_tempered)

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
    cond_rows: torch.Tensor  # index into hidden of the output that decodes each position
    twin_rows: torch.Tensor  # the same in the CFG twin's row (cond_rows for requests without CFG)
