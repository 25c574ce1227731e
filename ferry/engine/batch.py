"""Batched generation: several sequences share every pass's weight reads.

On an offloaded model a pass streams each streamed layer's bytes once, however many rows it
computes, so B sequences decoding together pay for those bytes once per step, not B times.

`BatchRun` holds the sequences. Each has its own KV cache sized to its own need (its prompt plus
its max new tokens, never the model's context), its sampler, its stop rule and its counters.
Sequences are added at any token boundary (`add`) and leave when they finish; each `step` is one
pass over the sequences that are not done (`forward_batch`). A sequence added since the last
step is prefilled in a full pass of its own kind, together with every other new one.

Modes (the runtime's):
- dense: each step is a full pass, one token per sequence;
- sparse: each step runs the sparse weights, one token per sequence;
- sirius: a round is up to K-1 batched sparse steps (every sequence drafts its chunk), then one
  full pass over every sequence's chunk verifies them all with one weight stream; each sequence
  keeps its own accepted prefix and rolls back its own cache. The period is fixed (period
  "auto" runs its max period) and speculation is off: the adaptive tuner and speculative drafting
  follow one sequence's chunk boundaries, which a batch does not share.

Griffin on a batch: the kept neurons are chosen from the summed activation scores of every prompt
in the first prefill pass (CATS decides per token, unchanged). Sequences that join later run on
that selection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from ferry.engine.generation import Generation, Request, generation_stats, select_neurons, uses_griffin
from ferry.engine.runtime import Context, Runtime, thread_scope
from ferry.engine.text import Detokenizer, encode_prompt
from ferry.errors import FerryError, SettingError
from ferry.model.forward import Segment, forward_batch
from ferry.model.kv_cache import KVCache
from ferry.model.rope import rope_for
from ferry.model.weights import Kind
from ferry.offload.transfer import LinkStats, synchronize
from ferry.scheduler.correction import accepted_prefix, until_stop
from ferry.scheduler.decode import DecodeStats, finished
from ferry.scheduler.drafting import draft_limit
from ferry.scheduler.sampling import Sampler
from ferry.sparse.griffin import griffin_sumsq


@dataclass
class _Seq:
    """One sequence of a batch."""

    request: Request
    ids: list[int]
    cache: KVCache | None  # None once done (freed) or when nothing runs
    sampler: Sampler
    stops: frozenset[int]
    stats: DecodeStats = field(default_factory=DecodeStats)
    new: list[int] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)  # sirius: this round's sparse tokens
    link: LinkStats = field(default_factory=LinkStats)  # its share of the passes it was in
    done: bool = False

    @property
    def last(self) -> int:
        return self.new[-1]

    def commit(self, tokens: list[int]) -> None:
        """Append committed tokens (up to a stop token); finish when a rule says so."""
        self.new += until_stop(tokens, self.stops)
        self.done = finished(self.stats, self.last, len(self.new), self.request.max_new_tokens, self.cache,
                             self.stops)


class BatchRun:
    """Sequences decoding together on one runtime (see the module notes)."""

    def __init__(self, rt: Runtime):
        # a batch replaces the selection and the cache a next prompt could reuse: that cache is
        # dropped, so its memory (planned once for the whole run) goes to the batch's caches
        rt.context = Context()
        self.rt, self.seqs, self.rope = rt, [], None
        self.selected = False  # Griffin: the first prefill pass chose the neurons
        self.mode = rt.config.correction.mode

    @property
    def active(self) -> list[_Seq]:
        return [s for s in self.seqs if not s.done]

    def add(self, request: Request) -> int:
        """Queue a request (checked now: a bad one raises and nothing is added); its index."""
        rt = self.rt
        ids = encode_prompt(rt.tokenizer, request.prompt, request.chat, rt.model.vocab_size)
        if len(ids) > rt.plan.ctx:
            raise FerryError(f"the prompt has {len(ids)} tokens, more than the context of {rt.plan.ctx} tokens")
        stops = frozenset() if request.ignore_eos else rt.stop_ids
        seq = _Seq(request, ids, None, Sampler(request.sampling), stops)
        if request.max_new_tokens == 0:  # nothing to run
            seq.done, seq.stats.finish_reason = True, "length"
        else:  # sized to this sequence's need: prompt and new tokens, within the planned context
            seq.cache = KVCache(rt.model, min(len(ids) + request.max_new_tokens, rt.plan.ctx), rt.dtype, rt.device)
            if self.rope is None or self.rope.cos.shape[0] < seq.cache.capacity:
                self.rope = rope_for(rt.model, seq.cache.capacity, rt.dtype, rt.device)
        self.seqs.append(seq)
        return len(self.seqs) - 1

    def step(self) -> list[int]:
        """One round: prefill the new sequences, else one decode step (or one sirius round).
        Returns the indices of the sequences that finished in it (their caches are freed)."""
        active = self.active
        fresh = [s for s in active if not s.new]
        if fresh:
            self._prefill(fresh)
        elif self.mode == "sirius":
            self._sirius_round(active)
        elif active:
            self._steps(active, Kind.SPARSE if self.mode == "sparse" else Kind.FULL)
        done = [i for i, s in enumerate(self.seqs) if s.done and s.cache is not None]
        for i in done:
            self.seqs[i].cache = None  # the memory goes back for the next sequence
        return done

    def run(self) -> list[Generation]:
        while self.active:
            self.step()
        return [self.result(i) for i in range(len(self.seqs))]

    # --- passes -----------------------------------------------------------------------------
    def _pass(self, seqs: list[_Seq], feeds: list[list[int]], kind: Kind, all_logits: bool,
              observe=None) -> list[torch.Tensor]:
        """One pass over the sequences' new tokens; logits per sequence. Its time and link bytes
        are shared among the sequences in it."""
        rt = self.rt
        segments = [Segment(s.cache, torch.tensor(f, dtype=torch.long, device=rt.device), s.cache.length)
                    for s, f in zip(seqs, feeds)]
        weights = rt.weights if kind == Kind.FULL else rt.sparse_weights
        # the link's counts without waiting for prefetches in flight (the next pass's copies)
        before, t0 = rt.link.stats(wait=False), time.perf_counter()
        with torch.no_grad():
            logits = forward_batch(rt.model, weights, self.rope, segments, all_logits, observe)
        synchronize(rt.device)  # the pass's kernels, not just their queueing (sampling waits anyway)
        spent, link = time.perf_counter() - t0, rt.link.stats(wait=False).minus(before)
        for s, seg in zip(seqs, segments):
            s.cache.wrote(seg.start, seg.tokens.shape[0], full=kind == Kind.FULL)
            s.link = LinkStats(s.link.bytes + link.bytes // len(seqs), s.link.copies, s.link.busy_s + link.busy_s,
                               s.link.stall_s + link.stall_s)
            if s.new:
                s.stats.decode_s += spent
                s.stats.steps += 1
                s.stats.full_passes += kind == Kind.FULL
                s.stats.sparse_steps += kind == Kind.SPARSE
            else:
                s.stats.prefill_s += spent
                s.stats.prefill_bytes += link.bytes // len(seqs)
        return logits

    def _prefill(self, seqs: list[_Seq]) -> None:
        rt = self.rt
        griffin = uses_griffin(rt) and not self.selected
        sums: list[torch.Tensor | None] = [None] * rt.model.num_layers

        def observe(layer: int, a: torch.Tensor, z: torch.Tensor) -> None:
            s = griffin_sumsq(z)  # sums over tokens: a long pass's chunks add up
            sums[layer] = s if sums[layer] is None else sums[layer] + s

        rt.executor.expect([Kind.FULL, Kind.SPARSE if rt.config.sparse else Kind.FULL])
        logits = self._pass(seqs, [s.ids for s in seqs], Kind.FULL, False, observe if griffin else None)
        if griffin:
            t0 = time.perf_counter()
            select_neurons(rt, sums, sum(len(s.ids) for s in seqs))
            self.selected = True
            for s in seqs:
                s.stats.select_s = time.perf_counter() - t0
        for s, lg in zip(seqs, logits):
            s.commit([s.sampler(lg[-1])])

    def _steps(self, seqs: list[_Seq], kind: Kind) -> None:
        self.rt.executor.expect([kind, kind])
        for s, lg in zip(seqs, self._pass(seqs, [[s.last] for s in seqs], kind, False)):
            s.commit([s.sampler(lg[-1])])

    def _sirius_round(self, seqs: list[_Seq]) -> None:
        """Every sequence drafts its chunk (batched sparse steps), then one full pass checks all."""
        period, heads = self.rt.config.correction.period, {id(s): s.cache.length for s in seqs}
        limits = {id(s): draft_limit(period, s.request.max_new_tokens, len(s.new), s.cache.capacity,
                                     s.cache.length) for s in seqs}
        for s in seqs:
            s.drafts = []
        while True:
            drafting = [s for s in seqs if len(s.drafts) < limits[id(s)]
                        and not (s.drafts and s.drafts[-1] in s.stops)]
            if not drafting:
                break
            self.rt.executor.expect([Kind.SPARSE, Kind.FULL])
            feeds = [[s.drafts[-1] if s.drafts else s.last] for s in drafting]
            for s, lg in zip(drafting, self._pass(drafting, feeds, Kind.SPARSE, False)):
                s.drafts.append(s.sampler(lg[-1]))
        for s in seqs:  # the verify pass rewrites every chunk from its head
            s.cache.rollback(heads[id(s)])
        self.rt.executor.expect([Kind.FULL, Kind.SPARSE])
        logits = self._pass(seqs, [[s.last, *s.drafts] for s in seqs], Kind.FULL, True)
        for s, lg in zip(seqs, logits):
            self._accept(s, lg, heads[id(s)])

    def _accept(self, s: _Seq, logits: torch.Tensor, head: int) -> None:
        cfg = self.rt.config.correction
        kept = accepted_prefix(logits, s.drafts, cfg)
        st = s.stats
        st.drafts, st.accepted = st.drafts + len(s.drafts), st.accepted + kept
        st.corrections += kept < len(s.drafts)
        s.cache.rollback(head + 1 + kept)
        commit = s.drafts[:kept]
        if len(s.new) + kept < s.request.max_new_tokens:  # a correction, or a bonus token
            commit.append(s.sampler(logits[kept]))
        s.commit(commit)

    def result(self, index: int) -> Generation:
        """The Generation of sequence `index` (the order of `add`), once it is done."""
        s = self.seqs[index]
        if not s.done:
            raise ValueError(f"sequence {index} is still running")
        detok = Detokenizer(self.rt.tokenizer)
        for token in s.new:
            detok.push(token)
        detok.flush()
        stats = generation_stats(self.rt, len(s.ids), s.new, s.stats, s.link)
        return Generation(s.request.prompt, detok.text, list(s.new), stats)


def generate_batch(rt: Runtime, requests: Iterable[Request],
                   batch_size: int | None = None) -> Iterator[tuple[int, Generation | FerryError]]:
    """(index in `requests`, its Generation) as each finishes, with up to `batch_size` (default:
    the runtime's) running at once: a finished sequence's place goes to the next request at the
    next token boundary. A request refused on its own (a prompt longer than the context) yields
    its FerryError in place of a Generation; the others run on."""
    with thread_scope(rt):
        yield from _refill(rt, requests, batch_size or rt.config.runtime.batch_size)


def _refill(rt: Runtime, requests: Iterable[Request], size: int) -> Iterator[tuple[int, Generation | FerryError]]:
    run = BatchRun(rt)
    pending, index_of = enumerate(requests), {}
    while True:
        while len(run.active) < size:
            nxt = next(pending, None)
            if nxt is None:
                break
            try:
                added = run.add(nxt[1])
            except SettingError:
                raise
            except FerryError as err:
                yield nxt[0], err
                continue
            if run.seqs[added].done:
                yield nxt[0], run.result(added)
            else:
                index_of[added] = nxt[0]
        if not run.active:
            break
        for i in run.step():
            yield index_of[i], run.result(i)
