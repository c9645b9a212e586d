"""CUDA graphs of block passes, bucketed by batch size; the eager forward stays the fallback.

A block pass in which every row runs the same number of queries L against its cached K/V has shapes fixed by
(rows, L): one captured graph per (row bucket, L, block-table width bucket) replays the whole network forward
(embedding -> layers with the Triton attention and MoE kernels -> final norm) without a Python op per layer. Rows
are padded up to the bucket: padded rows write their K/V to the pool's scratch slot and read one key of page 0, so
they touch nothing real; their hidden states are dropped. Inputs reach the graph through static buffers filled
with device-to-device copies (no host sync). Refresh passes and mixed query lengths run eagerly.

`capture=False` runs the same padded static-buffer path eagerly (what the CPU tests check against the plain
forward); the CUDA capture itself is only exercised on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .kv_pool import KVPool
from .model.attention import AttnContext
from .model.transformer import Transformer

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class _Graph:
    tokens: torch.Tensor  # [Rb * L] long
    pos: torch.Tensor  # [Rb * L] long
    write: torch.Tensor  # [Rb * L] long pool slots
    cu: torch.Tensor  # [Rb + 1] int32 (constant: every row has L queries)
    table: torch.Tensor  # [Rb, P] int32
    seq_lens: torch.Tensor  # [Rb] int32
    hidden: torch.Tensor | None = None  # [Rb * L, D] output (static when captured)
    graph: "torch.cuda.CUDAGraph | None" = None


class BlockGraphs:
    def __init__(self, net: Transformer, pool: KVPool, device: torch.device, capture: bool = True) -> None:
        self.net, self.pool, self.device = net, pool, device
        self.capture = capture and device.type == "cuda"
        self.graphs: dict[tuple[int, int, int], _Graph] = {}
        self.mempool = None
        self.replays = 0
        """Forwards served by this path (captured or not)."""
        # the RoPE table must not be regrown after capture (the graph holds its address)
        net.rotary.table(torch.zeros(1, dtype=torch.long, device=device), net.cfg.max_position_embeddings)
        self._rope = net.rotary.cos.data_ptr()

    @staticmethod
    def eligible(refresh: list[bool], row_len: list[int]) -> bool:
        return (not any(refresh) and len(set(row_len)) == 1 and len(row_len) <= ROW_BUCKETS[-1])

    def run(self, tokens: torch.Tensor, pos: torch.Tensor, write: torch.Tensor, block_table: torch.Tensor,
            seq_lens_k: torch.Tensor, rows: int, q_len: int) -> torch.Tensor:
        """tokens/pos/write [rows * q_len]; block_table [rows, P]; seq_lens_k [rows] -> hidden [rows * q_len, D]."""
        if self.net.rotary.cos.data_ptr() != self._rope:  # an eager pass regrew the table: recapture
            self.graphs.clear()
            self._rope = self.net.rotary.cos.data_ptr()
        bucket = next(b for b in ROW_BUCKETS if b >= rows)
        width = triton.next_power_of_2(block_table.shape[1])
        key = (bucket, q_len, width)
        g = self.graphs.get(key) or self._build(key)
        T = rows * q_len
        g.tokens[:T].copy_(tokens)
        g.pos[:T].copy_(pos)
        g.write[:T].copy_(write)
        g.write[T:].fill_(self.pool.scratch_slot)  # padded rows: writes go nowhere real ...
        g.table[:rows, :block_table.shape[1]].copy_(block_table)
        g.table[rows:].zero_()
        g.seq_lens[:rows].copy_(seq_lens_k)
        g.seq_lens[rows:].fill_(1)  # ... and read one key of page 0
        if g.graph is not None:
            g.graph.replay()
        else:
            g.hidden = self._forward(g)
        self.replays += 1
        return g.hidden[:T]

    def _forward(self, g: _Graph) -> torch.Tensor:
        rows, q_len = g.seq_lens.shape[0], g.tokens.shape[0] // g.seq_lens.shape[0]
        ctx = AttnContext(None, None, None, rows, q_len, backend="triton", cu_seqlens_q=g.cu, block_table=g.table,
                          seq_lens_k=g.seq_lens, page_size=self.pool.page_size)
        ctx.write_slots, ctx.kv_pool = g.write, self.pool.tensors
        return self.net(g.tokens, g.pos, ctx, max_pos=self.net.cfg.max_position_embeddings - 1)

    def _build(self, key: tuple[int, int, int]) -> _Graph:
        rows, q_len, width = key
        dev, T = self.device, rows * q_len
        g = _Graph(tokens=torch.zeros(T, dtype=torch.long, device=dev),
                   pos=torch.zeros(T, dtype=torch.long, device=dev),
                   write=torch.full((T,), self.pool.scratch_slot, dtype=torch.long, device=dev),
                   cu=(torch.arange(rows + 1, dtype=torch.int32) * q_len).to(dev),
                   table=torch.zeros(rows, width, dtype=torch.int32, device=dev),
                   seq_lens=torch.ones(rows, dtype=torch.int32, device=dev))
        if self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up: compiles the kernels, settles the allocator
                self._forward(g)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                g.hidden = self._forward(g)
            self.mempool = graph.pool()
            g.graph = graph
        self.graphs[key] = g
        return g
