"""Structured outputs for diffusion decoding: JSON schema, regex, choice, Lark grammar; guaranteed valid.

Where things live (this package's __init__ imports nothing, so torch-free modules can use spec.py): spec.py
(StructuredOutputs: the request option and its grammar text; it also reads and validates the OpenAI-shaped forms,
response_format and tools / a forced tool_choice, and holds the JSON Schemas the HTTP API documents for them),
grammars.py (llguidance tokenizer per model tokenizer, LRU of compiled grammars, compile limits), decoder.py
(Constraint: one request's grammar state and closing path; StepConstraints: the runner's per-step hook), build.py
(compile_for / make_constraint: a request's Constraint for a model). The server's side (request fields -> one
constraint, forced calls back to tool_calls) is server/structured.py.

Design (and why). A diffusion model commits tokens out of order, several per step; an autoregressive grammar engine
(llguidance here) checks a left-to-right prefix. Published ways to reconcile them:
- Mündler, Dekoninck, Vechev 2025 (constrained diffusion with CFGs) keep out-of-order commits and accept a partial
  canvas only if the language intersected with the regular language of its completions is non-empty: exact and
  order-preserving, but a CFG-intersection emptiness check per candidate commit, with their own Rust formal-
  language library;
- DINGO: an exact DP over a DFA within a block (regular constraints only, not JSON schema with recursion);
- Self-adaptive Schema Scaffolding: write the schema's fixed text into the canvas first, decode the value slots.
We keep the constraint exact with a maintained engine (llguidance: fast token masks over 100k+ vocabularies,
JSON schema / regex / Lark, rollback; chosen over xgrammar for its Python API with rollback, forced tokens and
parser limits, and over outlines-core for its Lark/CFG support) by committing a constrained request's tokens only
where their left context is settled: the frontier and the consecutive positions after it, each drawn from its own
logits restricted to the grammar's mask after the tokens before it. So
- every step commits at least one valid token where the schedule asks for any, and every commit is final and
  valid (nothing is ever retracted; streams only grow);
- parallel decoding survives: the run continues while the request's own rule (threshold, factor, the fixed
  schedule's count) holds, with confidences taken under the grammar-restricted distribution, so tokens the grammar
  forces (keys, braces: the scaffold) have confidence 1 and commit together, as in schema scaffolding, without a
  separate pass;
- where the model's own choice is allowed, the constrained candidate is the same token (same logits and noise);
- completion is planned: a closing path (grammars -> decoder.Constraint.closing) bounds the tokens needed to
  reach acceptance; a token that would leave no room for it is replaced by the path's next token, so strings
  and arrays close in time and the answer ends with EOS inside the canvas (finish_reason stop) whenever the first
  path fits. A canvas too short for any path decodes as far as it can and ends with `length`.
The cost is the constrained request's alone: one mask (llguidance compute_bitmask) and one single-row candidate
pass per position it considers, plus a closing rollout when it commits a token off the current closing path;
unconstrained rows of the same batch are untouched (same tensors, same noise, same commits).
"""
