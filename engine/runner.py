"""ModelRunner: one packed forward per engine step over every scheduled request, then the decoders.

Data flow of a step: the host lists each request's query range (a refresh pass over the whole canvas, or a
block pass) -> one packed forward (variable lengths, K/V written to and read from the paged pool; its attention
layout built once, in _attn_layout, and carried by the ForwardBatch to every rank) -> logits only at
the current block's positions -> candidates and scores -> per-row commit selection -> canvas update. The host gets
back one small tensor per step (tokens committed and EOS flags per request). The requests' sampling parameters
come from the batched-parameters table (engine/batch_params.py), rebuilt when the batch membership changes; the
scoring and commit rules are the decoding plug-ins (engine/decoding/).
"""
from __future__ import annotations

import os
from itertools import accumulate
from dataclasses import dataclass

import torch

from .batch_params import ParamTable
from .decoding import editing, registry
from .decoding.candidates import CandidateInputs, ShardDecode, candidates, candidates_from_stats
from .decoding.noise import STREAM_GUMBEL, row_keys
from .decoding.select import SelectInputs, select
from .block_graphs import BlockGraphs
from .constraints.decoder import StepConstraints
from .executor.base import Executor
from .forward_batch import ForwardBatch
from .kv_pool import KVPool
from .loaded_model import DiffusionModel
from .scheduler import RunnerOutput, ScheduledRequest
from .sequence import Sequence
from .model.attention import AttnContext
from .shape_buckets import GroupPlan, attention_groups, build_groups, group_upload
from .step_upload import StepUpload

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
        self.row_keys = row_lens  # keys each forward row attends over (host)
        self.row_prompt = torch.tensor([seqs[i].prompt_len for i in self.row_seq], device=dev)  # [R]
        self.row_twin = torch.tensor([r >= len(seqs) for r in range(len(self.row_seq))], device=dev)  # [R]
        gen = [s.gen_len for s in seqs]
        gmax = max(gen)
        gar = torch.arange(gmax)
        self.gen_valid = (gar[None, :] < torch.tensor(gen)[:, None]).to(dev)  # [B, G]
        gen_index = torch.tensor([o + s.prompt_len for o, s in zip(self.offsets, seqs)])[:, None] + gar[None, :]
        self.gen_index = torch.where(self.gen_valid.cpu(), gen_index, 0).to(dev)  # [B, G]
        self.params = ParamTable.build([s.row for s in seqs], dev)
        self.transfer = [registry.transfer(s.params.transfer) for s in seqs]  # each request's transfer rule
        self.host_rule = [t.id for t in self.transfer]
        self.block_causal = any(s.block_causal for s in seqs)
        self.block_len = (torch.tensor([seqs[i].params.block_length for i in self.row_seq], device=dev)
                          if self.block_causal else None)  # [R] block-causal attention per forward row
        self.editing = [registry.editing(s.params.editing) if s.params.editing else None for s in seqs]
        """Each request's token-editing rule (engine/decoding/editing/), None for most."""
        self.any_editing = any(self.editing)
        self.edit_rule = [e.id if e else -1 for e in self.editing]  # host copy of params.editing


LOGIT_ENTRY_BYTES = 64
"""Working memory per (decoded position, vocabulary entry) of one candidate pass: float32 logits, tempered and
filtered copies, the top-k/top-p sort (values, int64 order, cumsum), float64 Gumbel noise and perturbed scores,
softmax and log-softmax. An upper estimate; it sizes the chunks of positions a step decodes at once."""
DEFAULT_LOGITS_MEMORY = 512 << 20


class ModelRunner:
    def __init__(self, model: DiffusionModel, pool: KVPool, executor: Executor,
                 logits_memory: int = DEFAULT_LOGITS_MEMORY) -> None:
        self.model, self.net, self.cfg = model, model.net, model.config
        self.executor = executor
        """Runs each step's ForwardBatch: in this process or on every tensor-parallel rank (engine/executor)."""
        executor.init_pool(pool.num_pages, pool.page_size)
        self.device, self.pool = model.device, pool
        self._canvases: dict[int, torch.Tensor] = {}
        """Each running request's canvas [prompt_len + gen_len] long (views into `buf` once batched)."""
        self.buf = torch.empty(0, dtype=torch.long, device=self.device)
        self.members: _Members | None = None
        self.stop_ids = torch.tensor(self.cfg.stop_ids, device=self.device)
        self.kernels = model.kernels
        self.upload = StepUpload(self.device)
        use_graphs = (self.device.type == "cuda" and self.kernels == "triton" and executor.world_size == 1
                      and not self.cfg.block_causal and os.environ.get(GRAPHS_ENV, "1") != "0")
        self.graphs = BlockGraphs(self.net, pool, self.device) if use_graphs else None
        """Captured block passes (CUDA + Triton kernels, one process; UNMASK_CUDA_GRAPHS=0 turns them off)."""
        self.shift = 1 if self.cfg.shift_logits else 0
        self.max_logit_rows = max(1, logits_memory // (self.cfg.vocab_size * LOGIT_ENTRY_BYTES))
        """Decoded positions whose logits are materialised at once (logits_memory / (vocab * LOGIT_ENTRY_BYTES))."""

    # canvases: the runner owns every running request's canvas; the engine goes through these methods --------
    def add(self, seq: Sequence) -> None:
        """Give an admitted request its canvas (prompt, then masks; block-causal: up to whole blocks), unless it has
        one (a resumed request)."""
        if id(seq) not in self._canvases:
            ids = seq.prompt_ids + [self.cfg.mask_id] * (seq.canvas_len - seq.prompt_len)
            self._canvases[id(seq)] = torch.tensor(ids, dtype=torch.long, device=self.device)

    def has(self, seq: Sequence) -> bool:
        return id(seq) in self._canvases

    @property
    def num_canvases(self) -> int:
        return len(self._canvases)

    def remove(self, seq: Sequence) -> list[int]:
        """Drop a request's canvas; returns its generated region (host list)."""
        canvas = self._canvases.pop(id(seq))
        self.members = None if self.members and id(seq) in self.members.key else self.members
        return canvas[seq.prompt_len:seq.prompt_len + seq.gen_len].tolist()

    def discard(self, seq: Sequence) -> None:
        """Drop a request's canvas if it has one."""
        if self.has(seq):
            self.remove(seq)

    def reset_layout(self) -> None:
        """Forget the batch layout: the next step rebuilds it (and the token buffer) from the canvases."""
        self.members = None

    def generated(self, seq: Sequence) -> list[int]:
        """The request's generated region as it stands (masks included), host list."""
        return self._canvases[id(seq)][seq.prompt_len:seq.prompt_len + seq.gen_len].tolist()

    def block_tokens(self, seq: Sequence, block: tuple[int, int]) -> torch.Tensor:
        """[block length] long, a view of canvas positions [a, b) on the device (changes with later steps)."""
        return self._canvases[id(seq)][block[0]:block[1]]

    def _sync_members(self, seqs: list[Sequence]) -> _Members:
        key = tuple(id(s) for s in seqs)
        if self.members is None or self.members.key != key:
            self.buf = torch.cat([self._canvases[id(s)] for s in seqs])
            self.members = _Members(self, seqs)
            for s, off, n in zip(seqs, self.members.offsets, self.members.lens):
                self._canvases[id(s)] = self.buf[off:off + n]
        return self.members

    # one step -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, reqs: list[ScheduledRequest]) -> RunnerOutput:
        m = self._sync_members([r.seq for r in reqs])
        t = m.params
        plan = self._plan(reqs, m)  # host metadata -> device, one copy
        batch, dec = self._inputs(reqs, m, plan)
        keys = (row_keys(t.seed[dec.seq], plan.dev["step_no"][dec.seq], dec.pos, STREAM_GUMBEL) if plan.mmax
                else torch.zeros(0, dtype=torch.long, device=self.device))  # [N] counter-based noise keys
        constrained = StepConstraints.of(reqs, plan.counts)  # structured-output rows (None: none in this step)
        if self.executor.world_size > 1 and not t.any_filter and constrained is None:  # reduce each
            # vocabulary shard on its rank (constrained rows need their full logits)
            batch.shard_decode = ShardDecode(self.cfg.mask_id, t.temperature[dec.seq], t.tempered[dec.seq], keys,
                                             t.any_sampling, t.any_tempered)
        x0, score, conf = self._candidates(reqs, m, batch, dec, keys, plan, constrained)  # [N] each
        commit, edit = self._commit(reqs, m, dec, x0, score, conf, keys, plan, constrained)  # [B, M] each
        eos = self._eos(m)  # [B]
        out = torch.stack([commit.sum(1), eos.long(), edit.sum(1)]).tolist()
        return RunnerOutput(committed=out[0], eos=[bool(x) for x in out[1]],
                            edited=out[2] if m.any_editing else None)

    def _plan(self, reqs: list[ScheduledRequest], m: _Members) -> "_Plan":
        """Everything the host knows about this step, built as host tensors and sent in one StepUpload copy."""
        shift = self.shift
        rows_q = [reqs[i].query for i in m.row_seq]
        row_len = [b - a for a, b in rows_q]
        row_base = [0, *accumulate(row_len)]
        T = row_base[-1]
        host: dict[str, torch.Tensor] = {
            "tok_idx": ranges([m.offsets[i] + a for i, (a, _) in zip(m.row_seq, rows_q)], row_len),  # [T]
            "pos": ranges([a for a, _ in rows_q], row_len),  # [T]
            "row_of_tok": torch.repeat_interleave(torch.arange(len(row_len)), torch.tensor(row_len)),  # [T]
        }
        if shift:  # a block pass's first query (the position before the block) keeps its cached K/V
            keep = torch.zeros(T, dtype=torch.bool)
            keep[[row_base[r] for r, i in enumerate(m.row_seq) if not reqs[i].refresh]] = True
            host["keep_cached"] = keep
        row_end = [b for _, b in rows_q]
        if m.block_causal:  # keys past a row's query end are later blocks: never read (never written either)
            host["row_end"] = torch.tensor(row_end)  # [R]
        if self.kernels == "triton":
            host["cu_seqlens_q"] = torch.tensor(row_base, dtype=torch.int32)  # [R + 1]
        else:  # SDPA's padded layouts, one per (query, key) length bucket, riding in the same copy; block-causal
            # rows read keys up to their query end only
            keys = row_end if m.block_causal else m.row_keys
            # a refresh pass over the whole canvas attends over exactly its own new K/V (a shifted family's block
            # pass can start at 0 too, but keeps its first position's cached K/V: not self-keyed)
            own = [reqs[i].refresh and a == 0 and n == k for i, (a, _), n, k in zip(m.row_seq, rows_q, row_len, keys)]
            groups = attention_groups(row_len, keys, own)
            host.update(group_upload(groups))
        # the positions decoded this step: each request's still-masked block positions (counts known here)
        blocks = [r.block for r in reqs]
        blen = [e - b for b, e in blocks]
        host["block_buf"] = ranges([o + b for o, (b, _) in zip(m.offsets, blocks)], blen)  # [Nb]
        if m.any_editing:  # editing rows also score their block's committed positions from the rule's start on
            edit_from = [e.scored_from(r.seq) if e else b for e, r, (_, b) in zip(m.editing, reqs, blocks)]
            counts = [r.seq.masked_in_block if e is None else b - max(a, f)
                      for e, r, (a, b), f in zip(m.editing, reqs, blocks, edit_from)]
            block_seq = torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor(blen))  # [Nb]
            host["block_edit"] = ranges([b for b, _ in blocks], blen) >= torch.tensor(edit_from)[block_seq]  # [Nb]
        else:
            counts = [r.seq.masked_in_block for r in reqs]
        host["dec_seq"] = torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor(counts))  # [N]
        host["block_start"] = torch.tensor([b for b, _ in blocks])  # [B]
        host["flat_block_start"] = torch.tensor([0, *accumulate(blen)][:-1])  # [B]
        host["first"] = torch.tensor([row_base[i] - reqs[i].query[0] - shift for i in range(len(reqs))])  # [B]
        if m.cfg_seqs:
            twin = [m.twin_row_of.get(i, i) for i in range(len(reqs))]
            host["first_twin"] = torch.tensor([row_base[r] - reqs[i].query[0] - shift for i, r in enumerate(twin)])
        mmax = max(counts)
        seqs = [r.seq for r in reqs]
        if mmax:
            lens = torch.tensor(counts)
            pad_valid = torch.arange(mmax)[None, :] < lens[:, None]  # [B, M]
            flat_start = torch.tensor([0, *accumulate(counts)][:-1])  # [B]
            host["pad_valid"] = pad_valid
            host["pad_idx"] = torch.where(pad_valid, flat_start[:, None] + torch.arange(mmax)[None, :], 0)  # [B, M]
            host["step_no"] = torch.tensor([s.stats.steps for s in seqs])  # [B]
            values = [t.step_value(s) for t, s in zip(m.transfer, seqs)]  # each row's transfer rule, this step
            host["rule_value"] = torch.tensor(values, dtype=torch.float64)  # [B]
            host["commit_all"] = torch.tensor([s.is_last_allowed_step and t.adaptive and not s.block_causal
                                               for t, s in zip(m.transfer, seqs)])
        else:
            values = []
        for r in reqs:
            r.seq.stats.positions_computed += (r.query[1] - r.query[0]) * r.seq.num_rows
        # no-cache requests recompute every position each step and never read the pool: a step of only those
        # (all self-keyed groups) skips writing K/V there
        write_pool = self.kernels == "triton" or any(r.seq.params.cache != "none" for r in reqs)
        return _Plan(self.upload.send(host), row_len, counts, mmax, values, groups if self.kernels != "triton" else [],
                     write_pool)

    def _inputs(self, reqs: list[ScheduledRequest], m: _Members, plan: "_Plan") -> tuple[ForwardBatch, "_Decode"]:
        """The step's forward inputs: one packed forward over every row's query range (K/V written to and read
        from the pool), with logits wanted at the still-masked positions of the current blocks only.

        Each request's masked count is known on the host, so the masked positions are compacted with
        nonzero_static (fixed output size, no device sync)."""
        d, mask_id, counts = plan.dev, self.cfg.mask_id, plan.counts
        tokens, pos, row_of_tok = self.buf[d["tok_idx"]], d["pos"], d["row_of_tok"]
        if m.cfg_seqs:  # the unconditional twins see their prompt masked
            twin_prompt = m.row_twin[row_of_tok] & (pos < m.row_prompt[row_of_tok])
            tokens = torch.where(twin_prompt, mask_id, tokens)
        write = m.read_slots[row_of_tok, pos]  # [T] pool slot of each token
        if self.shift:
            write = torch.where(d["keep_cached"], self.pool.scratch_slot, write)
        block_buf, seq = d["block_buf"], d["dec_seq"]
        n = sum(counts)
        decoded = self.buf[block_buf] == mask_id  # [Nb]
        if m.any_editing:
            decoded = decoded | d["block_edit"]
        keep = torch.nonzero_static(decoded, size=n)[:, 0]  # [N] into the blocks
        dpos = d["block_start"][seq] + keep - d["flat_block_start"][seq]  # [N] canvas positions
        dec = _Decode(pos=dpos, buf=block_buf[keep], seq=seq, lengths=counts)
        batch = ForwardBatch(tokens, pos, self._attn_layout(m, plan, write), max_pos=max(m.lens) - 1,
                             logit_rows=d["first"][seq] + dpos, logit_chunk=self.max_logit_rows)
        if m.cfg_seqs:
            sel = torch.nonzero_static(m.params.cfg_w[seq] > 0, size=sum(counts[i] for i in m.cfg_seqs))[:, 0]  # [Nc]
            batch.twin_rows, batch.cfg_sel = (d["first_twin"][seq] + dpos)[sel], sel
            batch.cfg_w = m.params.cfg_w[seq[sel]][:, None]
            # host-known: the guided positions before each chunk boundary, indexing batch.cfg_sel
            starts, chunk = [0, *accumulate(counts)], self.max_logit_rows
            bounds = [*range(0, n, chunk), n]
            batch.cfg_splits = [sum(max(0, min(x, starts[i + 1]) - starts[i]) for i in m.cfg_seqs) for x in bounds]
        return batch, dec

    def _attn_layout(self, m: _Members, plan: "_Plan", write: torch.Tensor) -> AttnContext:
        """The step's attention layout, built once here and carried by the ForwardBatch to every rank: packed
        offsets and block tables (triton), or per-length-bucket SDPA groups (torch; block-causal groups carry their
        rows' block lengths and each rank derives their masks when it binds the layout). write [T] pool slots."""
        d, rows = plan.dev, len(plan.row_len)
        if self.kernels == "triton":  # packed layout: no padded query index, keys through the block table
            ctx = AttnContext(None, None, None, rows, max(plan.row_len), backend="triton",
                              cu_seqlens_q=d["cu_seqlens_q"], block_table=m.block_table, seq_lens_k=m.seq_lens_k,
                              page_size=self.pool.page_size)
        else:  # SDPA per length-bucket group, so a row's attention does not depend on the batch (in bf16 too)
            slots, valid = m.read_slots, m.key_valid  # [R, Lk]
            if m.block_causal:  # point unwritten later-block keys at the zeroed scratch slot (no garbage, even masked)
                live = torch.arange(slots.shape[1], device=self.device)[None, :] < d["row_end"][:, None]  # [R, Lk]
                slots, valid = torch.where(live, slots, self.pool.scratch_slot), valid & live
            ctx = AttnContext(None, None, None, rows, max(plan.row_len),
                              groups=build_groups(plan.groups, d, slots, valid, self.pool.scratch_slot, m.block_len))
        ctx.write_slots, ctx.block_len = (write if plan.write_pool else None), m.block_len
        return ctx

    def _candidates(self, reqs: list[ScheduledRequest], m: _Members, batch: ForwardBatch, dec: "_Decode",
                    keys: torch.Tensor, plan: "_Plan", constrained: StepConstraints | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the step's forward and score its decoded positions: candidate token, score and confidence [N] each.
        The logits (or, with shard_decode, the vocabulary shards' statistics [R, n, 8]) arrive in chunks of at most
        batch.logit_chunk positions, each scored as it arrives, so the [N, V] working set stays within the logits
        memory budget whatever the batch."""
        dev, n = self.device, len(dec.pos)
        x0 = torch.empty(n, dtype=torch.long, device=dev)
        score = torch.empty(n, dtype=torch.float64, device=dev)
        conf = torch.empty(n, dtype=torch.float64, device=dev)
        score_chunk = candidates if batch.shard_decode is None else candidates_from_stats

        t = m.params

        def consume(a: int, b: int, logits: torch.Tensor) -> None:
            seq = dec.seq[a:b]
            inputs = CandidateInputs(t.temperature[seq], t.top_k[seq], t.top_p[seq], t.remasking[seq],
                                     t.tempered[seq], keys[a:b], self.cfg.mask_id, t.any_sampling, t.any_filter,
                                     t.remasking_ids, t.any_tempered, self.kernels)
            x0[a:b], score[a:b], conf[a:b] = score_chunk(logits, inputs)
            if constrained is not None:
                constrained.consume(a, b, logits, inputs)

        row_len = plan.row_len
        if self.graphs is not None and BlockGraphs.eligible([reqs[i].refresh for i in m.row_seq], row_len):
            graphs = self.graphs

            def forward(b: ForwardBatch) -> torch.Tensor:  # a captured block pass -> hidden [T, D]
                return graphs.run(b.tokens, b.positions, b.attn.write_slots, m.block_table, m.seq_lens_k, len(row_len),
                                  row_len[0])

            self.executor.run(batch, self.pool.tensors, consume, forward)
        else:
            self.executor.run(batch, self.pool.tensors, consume)
        return x0, score, conf

    def _commit(self, reqs: list[ScheduledRequest], m: _Members, dec: "_Decode", x0: torch.Tensor,
                score: torch.Tensor, conf: torch.Tensor, keys: torch.Tensor, plan: "_Plan",
                constrained: StepConstraints | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's selection rule over the scored positions; writes the commits (and token edits) into the
        canvases. Returns the commit and edit masks [B, M] (padded layout)."""
        dev, mask_id, d = self.device, self.cfg.mask_id, plan.dev
        if plan.mmax == 0:  # nothing masked in any block (a fixed schedule's trailing zero-commit steps)
            none = torch.zeros(len(reqs), 0, dtype=torch.bool, device=dev)
            return none, none
        pad_valid, pad_idx = d["pad_valid"], d["pad_idx"]  # [B, M]
        current = self.buf[dec.buf]  # [N]
        selectable = (current == mask_id)[pad_idx] & pad_valid
        t = m.params
        commit = select(score[pad_idx], conf[pad_idx], selectable, SelectInputs(
            rule=t.transfer, value=d["rule_value"], host_value=plan.rule_values, host_rule=m.host_rule,
            alg_temp=t.alg_temp, commit_all=d["commit_all"], noise_keys=keys[pad_idx],
            any_alg_temp=t.any_alg_temp, threshold=t.threshold))  # [B, M]
        if constrained is not None:  # structured-output rows: their left-to-right grammar-checked commits
            commit = constrained.apply(x0, commit)
        edit = torch.zeros_like(commit)
        if m.any_editing:  # each row's token-editing rule, one vectorised pass per rule present
            edit = editing.edit(editing.EditContext(current[pad_idx], x0[pad_idx], conf[pad_idx], pad_valid,
                                                    t.edit_threshold, mask_id), t.editing, m.edit_rule)
        self.buf[dec.buf] = torch.where((commit | edit)[pad_valid], x0, current)
        return commit, edit

    def _eos(self, m: _Members) -> torch.Tensor:
        """[B] bool: a stop token is committed with every generated position before it committed."""
        gen = self.buf[m.gen_index]  # [B, G]
        is_stop = torch.isin(gen, self.stop_ids) & m.gen_valid
        is_mask = (gen == self.cfg.mask_id) & m.gen_valid
        g = torch.arange(gen.shape[1], device=self.device)[None, :]
        first_stop = torch.where(is_stop, g, gen.shape[1]).amin(1, keepdim=True)  # [B, 1]
        return is_stop.any(1) & ~(is_mask & (g < first_stop)).any(1)


@dataclass(slots=True)
class _Plan:
    """A step's host-known layout: `dev` holds the device copies (StepUpload), the rest stays on the host."""
    dev: dict[str, torch.Tensor]
    row_len: list[int]  # query tokens per forward row
    counts: list[int]  # positions decoded per request
    mmax: int  # max(counts)
    rule_values: list[float]  # each request's transfer-rule value this step (host copy of dev["rule_value"])
    groups: list[GroupPlan]  # attention groups (torch kernels)
    write_pool: bool = True  # False: every request is no-cache (torch kernels): the step's K/V skip the pool


@dataclass(slots=True)
class _Decode:
    """The positions decoded this step, flattened over requests ([N] each)."""
    pos: torch.Tensor  # canvas position
    buf: torch.Tensor  # index into the runner's token buffer
    seq: torch.Tensor  # request index
    lengths: list[int]  # positions per request (host): its masked positions in the current block
