"""Step streams (`record_steps`, behind `stream_options.include_steps` and the playground) on a block-causal LLaDA2
checkpoint: the block-aligned canvas starts inside the prompt's last block and may run past max_tokens, yet every
recorded position lies in [0, max_tokens) and replaying the steps rebuilds the final output (the LLM's)."""
from __future__ import annotations

import asyncio

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine


def test_step_log_rebuilds_the_output(make_checkpoint):
    path = make_checkpoint("llada2_moe")
    prompt = [11, 12, 13, 14, 15, 16]  # 6 tokens: the first block [4, 8) holds the prompt's tail
    params = SamplingParams(max_tokens=7, block_length=4, temperature=0.0, ignore_eos=True)  # canvas 16 > 6 + 7
    want = LLM(path, page_size=4).generate([prompt], params)[0].token_ids

    async def run():
        async with AsyncEngine.from_model(path, page_size=4) as eng:
            last = None
            async for out in eng.add_request(prompt, params, record_steps=True):
                last = out
            return last, eng.llm.model.config.mask_id

    out, mask_id = asyncio.run(run())
    steps = out.step_log.since(0)
    assert steps and all(0 <= p < 7 for s in steps for p in s.positions)
    assert all(0 <= s.block[0] < s.block[1] <= 7 for s in steps)
    assert out.step_log.canvas(mask_id) == want == out.token_ids
