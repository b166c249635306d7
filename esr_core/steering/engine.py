"""The steering engine: one model + one SAE, shared by every user, steering scoped per request.

One permanent forward hook sits on the SAE's hook point. It does nothing unless the
*calling thread* has an active request context, set only around each forward call, so two
threads (two browser sessions) generating at once with different interventions never see
each other's steering, and the model is clean the moment a call returns or fails.

Generation is our own KV-cached loop over the plain HF forward (HF speed), batched over rows
(a steered and a default run of the same prompt are one batch of two). Every generated token
is fed through the model once more before it is reported, so its SAE readout is the
activation *at that token's position*, prompt-token readouts included.
"""

from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from esr_core.errors import BadInput, EsrError
from esr_core.models.hooks import capture, hook_module, on_output
from esr_core.models.loading import LoadedModel, kv_cache_arg
from esr_core.models.sae import SaeHandle
from esr_core.steering.interventions import (
    Intervention,
    add_direction,
    edit_code,
    position_mask,
    raw_strength,
    validate,
)
from esr_core.steering.median_norm import measure_median_norm
from esr_core.steering.sampling import choose_tokens
from esr_core.steering.spec import (
    MAX_PROMPT_TOKENS,
    GenerationSpec,
    PromptReadout,
    RunResult,
    TokenEvent,
    collect,
)
from esr_core.steering.text_stream import new_piece, run_done

log = logging.getLogger(__name__)

_TLS = threading.local()


@dataclass
class ActsResult:
    token_ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    z: torch.Tensor  # [T, d_sae] readout SAE's code at the readout hook (after any interventions upstream)
    text: str
    # [T, d_sae of the steering SAE] its code at the steering hook, after the steering: a steered latent's own
    # activation (its ids are the steering SAE's, which a readout SAE at another hook does not share)
    z_steer: torch.Tensor | None = None


@dataclass
class _Row:
    run: str
    spec: GenerationSpec
    prompt_ids: list[int]
    rendered: str
    ivs: list[tuple[Intervention, float]]  # (intervention, raw coefficient)


def _keeps_logits(hf_model) -> bool:
    return "logits_to_keep" in inspect.signature(hf_model.forward).parameters


class _Ctx:
    """Per-request state the hook reads: which rows steer what, at which positions."""
    def __init__(self, engine: "Engine", rows: list[_Row], pad_left: list[int]):
        self.engine = engine
        self.rows = rows
        self.pad_left = pad_left
        self.prompt_len = [len(r.prompt_ids) for r in rows]
        self.pos: torch.Tensor | None = None  # [B, T] position of each column within its row (-1 = pad)
        self.last_z: torch.Tensor | None = None  # the readout code of the last forward
        self.need_z = True
        self.steer_z: torch.Tensor | None = None  # the steering SAE's code, kept when want_steer_z
        self.want_steer_z = False


class Engine:
    """A model and an SAE with steering and per-token SAE readout. Thread-safe.

    ``sae`` steers; ``read_sae`` (optional, any hook) is read by a second, encode-only hook: watched
    ids, top-k and :meth:`activations` are then its code at ``read_hook_name``, in the same forward
    (after the steering; a hook before the steering's is allowed and sees none). Else ``read_sae is sae``.
    """
    def __init__(self, model: LoadedModel, sae: SaeHandle, read_sae: SaeHandle | None = None):
        for role, s in (("SAE", sae), ("Readout SAE", read_sae)):
            if s is not None and s.d_in != model.d_model:
                raise EsrError(f"{role} input width {s.d_in} does not match {model.name}'s d_model {model.d_model}")
        same = read_sae is None or read_sae is sae or (read_sae.hook_name, read_sae.key) == (sae.hook_name, sae.key)
        self.model, self.sae, self.hook_name = model, sae, sae.hook_name
        self.read_sae, self.has_readout_sae = (sae, False) if same else (read_sae, True)
        self.read_hook_name = self.read_sae.hook_name
        self.device = next(model.hf_model.parameters()).device
        W = sae.W_dec.detach().to(self.device, torch.float32)
        self._W_dec = W
        self._dec_norm = W.norm(dim=1)
        self._median_norm = sae.median_resid_norm
        if not same:
            hook_module(model, self.read_hook_name)  # a missing hook fails before any hook is on
        self._handle = on_output(model, self.hook_name, self._hook)  # first: a readout at its hook reads after it
        self._read_handle = None if same else on_output(model, self.read_hook_name, self._read_hook)
        self._busy = 0
        self._busy_lock = threading.Lock()
        self.closed = False
        self._eos_ids = self._eos_token_ids()
        self._special_ids = set(model.tokenizer.all_special_ids)  # a property HF rebuilds on every read
        # the loop reads the last position's logits only: a model that can skip the others does
        # (the prompt's lm_head is most of a batched prefill's work)
        self.last_logits_only = _keeps_logits(model.hf_model)
        self._kv_arg = kv_cache_arg(model.hf_model)

    # ------------------------------------------------------------------ set-up helpers
    def _eos_token_ids(self) -> set[int]:
        tok = self.model.tokenizer
        ids = set()
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        gen_eos = getattr(self.model.hf_model.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            ids.update(int(x) for x in gen_eos)
        return ids

    @property
    def W_dec(self) -> torch.Tensor:
        """The SAE decoder [d_sae, d_model] in float32 on the model's device (read-only)."""
        return self._W_dec

    def decoder_norms(self) -> np.ndarray:
        """Norm of each latent's decoder row (the unit of ``raw`` vs ``norm`` strengths)."""
        return self._dec_norm.detach().cpu().numpy()

    @property
    def median_norm(self) -> float:
        """Median residual norm at the hook (position 0 excluded): the unit of ``norm`` strengths."""
        if self._median_norm is None:
            self._median_norm = measure_median_norm(self)
        return float(self._median_norm)

    def residual(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unsteered residual at the hook for one sequence, [T, d_model]."""
        return capture(self.model, self.hook_name, input_ids)[self.hook_name][0].float()

    # ------------------------------------------------------------------ the hooks
    def _hook(self, h: torch.Tensor) -> torch.Tensor | None:
        """Apply the request's interventions to the residual ``h`` [B, T, d] (and read it, if no readout SAE)."""
        ctx: _Ctx | None = getattr(_TLS, "ctx", None)
        if ctx is None or ctx.engine is not self:
            return None
        h = h.clone()
        pos = ctx.pos  # [B, T]
        for b, row in enumerate(ctx.rows):
            for iv, coef in row.ivs:
                if iv.mode == "add":
                    add_direction(h[b], position_mask(pos[b], ctx.prompt_len[b], iv.positions), coef,
                                  self._W_dec[iv.latent])
        z = None
        if (ctx.need_z and not self.has_readout_sae) or any(iv.mode != "add" for r in ctx.rows for iv, _ in r.ivs):
            z = self.sae.encode(h).float()
            for b, row in enumerate(ctx.rows):
                for iv, coef in row.ivs:
                    if iv.mode != "add":
                        edit_code(h[b], z[b], position_mask(pos[b], ctx.prompt_len[b], iv.positions), iv.mode,
                                  coef, iv.latent, self._W_dec[iv.latent])
        if not self.has_readout_sae:
            ctx.last_z = z
        elif ctx.want_steer_z:
            ctx.steer_z = z if z is not None else self.sae.encode(h).float()
        return h

    def _read_hook(self, h: torch.Tensor) -> None:
        """The readout SAE's code of the residual at the readout hook (never edits it)."""
        ctx: _Ctx | None = getattr(_TLS, "ctx", None)
        if ctx is not None and ctx.engine is self and ctx.need_z:
            ctx.last_z = self.read_sae.encode(h).float()

    def _forward(self, ctx: _Ctx, **kw):
        if self.closed:
            raise EsrError(f"{self.model.name} was unloaded to free memory; choose it again in the sidebar")
        _TLS.ctx = ctx
        try:
            with torch.inference_mode():
                return self.model.hf_model(**kw)
        finally:
            _TLS.ctx = None

    # ------------------------------------------------------------------ prompts
    def render_prompt(self, prompt: str, chat: bool = True, system_prompt: str | None = None) -> str:
        """The exact text the model sees (chat templates may inject default system text)."""
        tok = self.model.tokenizer
        if chat and self.model.has_chat_template:
            msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": prompt}]
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return prompt

    def _prompt_ids(self, rendered: str, chat: bool) -> list[int]:
        tok = self.model.tokenizer
        templated = chat and self.model.has_chat_template
        return list(tok(rendered, add_special_tokens=not templated).input_ids)

    def prompt_tokens(self, spec: GenerationSpec) -> tuple[str, list[int]]:
        """The rendered prompt and its token ids; a prompt over the limit raises, or with
        ``truncate="keep_end"`` loses its beginning (the task usually sits at the end)."""
        rendered = self.render_prompt(spec.sent_prompt(), spec.chat, spec.system_prompt)
        ids = self._prompt_ids(rendered, spec.chat)
        if len(ids) <= MAX_PROMPT_TOKENS:
            return rendered, ids
        if spec.truncate != "keep_end":
            raise BadInput(f"The prompt is {len(ids):,} tokens; the limit is {MAX_PROMPT_TOKENS:,} "
                           "(truncate it to keep its end)")
        tok = self.model.tokenizer
        user = tok(spec.sent_prompt(), add_special_tokens=False).input_ids
        overhead = len(ids) - len(user)
        keep = max(1, MAX_PROMPT_TOKENS - overhead - 2)
        while True:
            text = tok.decode(user[-keep:], skip_special_tokens=True).lstrip("\ufffd")
            rendered = self.render_prompt(text, spec.chat, spec.system_prompt)
            ids = self._prompt_ids(rendered, spec.chat)
            if len(ids) <= MAX_PROMPT_TOKENS or keep <= 1:
                return rendered, ids
            keep -= len(ids) - MAX_PROMPT_TOKENS

    def compile_interventions(self, ivs: list[Intervention]) -> list[tuple[Intervention, float]]:
        out = []
        for iv in ivs:
            if isinstance(iv, dict):
                iv = Intervention.from_dict(iv)
            validate(iv, self.sae.d_sae)
            needs_norm = iv.units == "norm" and iv.mode in ("add", "clamp")
            med = self.median_norm if needs_norm else None
            out.append((iv, raw_strength(iv, float(self._dec_norm[iv.latent]), med)))
        return out

    def _check_watch(self, watch: list[int]) -> list[int]:
        what = f"the readout SAE at {self.read_hook_name}" if self.has_readout_sae else "this SAE"
        return [self.read_sae.check_latent(i, what) for i in watch]  # watched ids are the readout SAE's

    # ------------------------------------------------------------------ generation
    def stream(self, spec: GenerationSpec, cancel: threading.Event | None = None) -> Iterator:
        """Stream PromptReadout, TokenEvent and RunDone objects for every run of ``spec``."""
        yield from self.stream_batch([spec], cancel=cancel)

    def generate(self, spec: GenerationSpec, cancel: threading.Event | None = None) -> dict[str, RunResult]:
        return collect(self.stream(spec, cancel), spec)

    def generate_batch(self, specs: list[GenerationSpec], cancel: threading.Event | None = None,
                       compact: bool = False) -> list[dict[str, RunResult]]:
        """Run many specs as one batch (left-padded); results per spec, as with :meth:`generate`.

        ``compact`` (the experiment path) drops finished rows from the batch as it goes: faster,
        and deterministic, but a row's numerics then depend on when its companions end."""
        if not specs:
            return []
        tagged: list[list] = [[] for _ in specs]
        for ev in self.stream_batch(specs, cancel=cancel, tag=True, compact=compact, stream=not compact):
            i, e = ev
            tagged[i].append(e)
        return [collect(evs, s) for evs, s in zip(tagged, specs)]

    def _rows(self, specs: list[GenerationSpec]) -> tuple[list[_Row], list[int]]:
        rows, owner = [], []
        for si, spec in enumerate(specs):
            if not isinstance(spec, GenerationSpec):
                raise BadInput("generate needs a GenerationSpec")
            spec.validate()
            spec.watch = self._check_watch(list(spec.watch))
            rendered, ids = self.prompt_tokens(spec)
            for run in spec.runs:
                rows.append(_Row(run=run, spec=spec, prompt_ids=ids, rendered=rendered,
                                 ivs=self.compile_interventions(spec.interventions_for(run))))
                owner.append(si)
        return rows, owner

    def stream_batch(self, specs: list[GenerationSpec], cancel: threading.Event | None = None, tag: bool = False,
                     compact: bool = False, stream: bool = True):
        """Stream every run of every spec as one left-padded batch (events tagged by spec if ``tag``).

        ``compact`` drops rows from the batch (and their KV cache) as they finish; ``stream``
        False leaves token events' text empty (the final text is decoded once)."""
        self._enter()
        try:
            yield from self._stream_batch(specs, cancel, tag, compact, stream)
        finally:
            self._leave()

    def _stream_batch(self, specs: list[GenerationSpec], cancel, tag: bool, compact: bool = False,
                      stream: bool = True):
        rows, owner = self._rows(specs)
        B = len(rows)
        tok = self.model.tokenizer
        dev = self.device
        lens = [len(r.prompt_ids) for r in rows]
        L = max(lens)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        pad_left = [L - n for n in lens]
        input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, pad_left[b]:] = torch.tensor(r.prompt_ids)
            attn[b, pad_left[b]:] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        ctx = _Ctx(self, rows, pad_left)
        ctx.pos = torch.where(attn.bool(), pos, torch.full_like(pos, -1)).to(dev)
        ctx.need_z = any(r.spec.watch or r.spec.top_k > 0 for r in rows)  # experiments read no latents

        def emit(i, ev):
            return (owner[i], ev) if tag else ev

        from transformers import DynamicCache  # heavy: transformers

        cache = DynamicCache()
        last = {"logits_to_keep": 1} if self.last_logits_only else {}
        kw = {"input_ids": input_ids.to(dev), "position_ids": pos.to(dev), "use_cache": True, self._kv_arg: cache,
              **last}
        if any(pad_left):
            kw["attention_mask"] = attn.to(dev)
        out = self._forward(ctx, **kw)
        z = ctx.last_z
        for b, r in enumerate(rows):
            acts, tops = self._readout(None if z is None else z[b, pad_left[b]:], r.spec, len(r.prompt_ids))
            yield emit(b, PromptReadout(run=r.run, rendered_prompt=r.rendered, token_ids=list(r.prompt_ids),
                                        tokens=[tok.decode([t]) for t in r.prompt_ids], acts=acts, top=tops))
        logits = out.logits[:, -1, :].float()
        gens = [torch.Generator().manual_seed(int(r.spec.seed)) for r in rows]
        history = [list(r.prompt_ids) for r in rows]
        new_ids: list[list[int]] = [[] for _ in rows]
        emitted = ["" for _ in rows]
        done = [False] * B
        live = list(range(B))  # the rows still in the batch (all of them unless ``compact``)
        next_pos = torch.tensor(lens, dtype=torch.long)
        step = 0
        while True:
            if cancel is not None and cancel.is_set():
                for b, r in enumerate(rows):
                    if not done[b]:
                        done[b] = True
                        yield emit(b, run_done(tok, r.run, new_ids[b], emitted[b], "cancelled"))
                return
            n = len(live)
            act = [k for k, b in enumerate(live) if not done[b]]
            chosen = [pad_id] * n
            picks = choose_tokens(logits[act] if len(act) < n else logits, [rows[live[k]].spec for k in act],
                                  [gens[live[k]] for k in act], [history[live[k]] for k in act])
            for k, t in zip(act, picks):
                chosen[k] = t
            # feed the chosen tokens: their readout is at their own position
            gone = torch.tensor([done[b] for b in live])
            ctx.pos = torch.where(gone, torch.full((n,), -1), next_pos).view(n, 1).to(dev)
            attn = torch.cat([attn, (~gone).long().view(n, 1)], dim=1)
            kw = {"input_ids": torch.tensor(chosen, dtype=torch.long).view(n, 1).to(dev),
                  "position_ids": next_pos.view(n, 1).to(dev), "use_cache": True, self._kv_arg: cache, **last}
            if any(pad_left[b] for b in live) or bool(gone.any()):
                kw["attention_mask"] = attn.to(dev)
            out = self._forward(ctx, **kw)
            logits = out.logits[:, -1, :].float()
            z = ctx.last_z
            for k, b in enumerate(live):
                if done[b]:
                    continue
                r = rows[b]
                t = int(chosen[k])
                is_eos = t in self._eos_ids
                history[b].append(t)
                new_ids[b].append(t)
                acts, tops = self._readout(None if z is None else z[k], r.spec)
                if is_eos and r.spec.stop_at_eos:
                    piece, special = "", True
                elif stream:
                    piece = new_piece(tok, new_ids[b], emitted[b])
                    emitted[b] += piece
                    special = t in self._special_ids
                else:  # nobody reads the pieces: the final text is decoded once at the end
                    piece, special = "", t in self._special_ids
                yield emit(b, TokenEvent(run=r.run, step=step, token_id=t, text=piece,
                                         acts={i: float(acts[0, j]) for j, i in enumerate(r.spec.watch)},
                                         top=tops[0], special=special))
                stop = None
                if is_eos and r.spec.stop_at_eos:
                    stop = "eos"
                elif len(new_ids[b]) >= r.spec.max_new_tokens:
                    stop = "max_new_tokens"
                if stop:
                    done[b] = True
                    yield emit(b, run_done(tok, r.run, new_ids[b], emitted[b], stop))
            next_pos = next_pos + 1
            step += 1
            if all(done):
                return
            keep = [k for k, b in enumerate(live) if not done[b]]
            if compact and len(keep) < len(live):  # drop finished rows: the batch shrinks as rows end
                idx = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(idx.to(dev))
                attn, next_pos, logits = attn[idx], next_pos[idx], logits[idx.to(logits.device)]
                live = [live[k] for k in keep]
                ctx.rows = [rows[b] for b in live]
                ctx.prompt_len = [len(rows[b].prompt_ids) for b in live]
                ctx.pad_left = [pad_left[b] for b in live]

    def _readout(self, z: torch.Tensor | None, spec: GenerationSpec,
                 n: int = 1) -> tuple[np.ndarray, list[list[tuple[int, float]]]]:
        """Watched-latent activations and top-k active latents for each row of ``z`` [T, d_sae]
        (``z`` None: nobody in the batch reads latents, so the SAE was not run; ``n`` rows)."""
        if z is None:
            return np.zeros((n, 0), dtype=np.float32), [[] for _ in range(n)]
        if spec.watch:
            acts = z[:, spec.watch].cpu().numpy().astype(np.float32)
        else:
            acts = np.zeros((z.shape[0], 0), dtype=np.float32)
        tops: list[list[tuple[int, float]]] = []
        if spec.top_k > 0:
            v, i = torch.topk(z, min(spec.top_k, z.shape[-1]), dim=-1)
            v, i = v.cpu().tolist(), i.cpu().tolist()
            for vr, ir in zip(v, i):
                tops.append([(int(a), float(b)) for a, b in zip(ir, vr) if b > 0])
        else:
            tops = [[] for _ in range(z.shape[0])]
        return acts, tops

    # ------------------------------------------------------------------ analysis of given text
    def activations(self, text: str | None = None, messages: list[dict] | None = None,
                    interventions: list[Intervention] | tuple = (), add_generation_prompt: bool = False,
                    ) -> ActsResult:
        """Readout SAE code at ``read_hook_name`` for every token of ``text`` or chat ``messages`` (one forward)."""
        tok = self.model.tokenizer
        if messages is not None:
            if not self.model.has_chat_template:
                text = "\n\n".join(m.get("content", "") for m in messages)
                special = True
            else:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
                special = False
        else:
            special = True
        if not text or not str(text).strip():
            raise BadInput("The text is empty")
        enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
        ids = list(enc.input_ids)
        if len(ids) > MAX_PROMPT_TOKENS * 2:
            raise BadInput(f"The text is {len(ids):,} tokens; the limit is {MAX_PROMPT_TOKENS * 2:,}")
        spec = GenerationSpec(prompt=text or " ", interventions=list(interventions), runs=("steered",))
        row = _Row(run="steered", spec=spec, prompt_ids=ids, rendered=text,
                   ivs=self.compile_interventions(list(interventions)))
        ctx = _Ctx(self, [row], [0])
        ctx.pos = torch.arange(len(ids)).view(1, -1).to(self.device)
        ctx.want_steer_z = self.has_readout_sae
        self._enter()
        try:
            self._forward(ctx, input_ids=torch.tensor([ids], device=self.device))
        finally:
            self._leave()
        z = ctx.last_z[0].cpu()
        z_steer = ctx.steer_z[0].cpu() if ctx.steer_z is not None else z
        offsets = [tuple(map(int, o)) for o in enc.get("offset_mapping", [(0, 0)] * len(ids))]
        return ActsResult(token_ids=ids, tokens=[tok.decode([t]) for t in ids], offsets=offsets, z=z, text=text,
                          z_steer=z_steer)

    @property
    def busy(self) -> bool:
        """True while a request is generating or reading activations."""
        return self._busy > 0

    def _enter(self) -> None:
        if self.closed:
            raise EsrError(f"{self.model.name} was unloaded to free memory; choose it again in the sidebar")
        with self._busy_lock:
            self._busy += 1

    def _leave(self) -> None:
        with self._busy_lock:
            self._busy -= 1

    def close(self) -> None:
        """Remove the steering and readout hooks (the engine can no longer steer; a new one must be made)."""
        self.closed = True
        self._handle.remove()
        if self._read_handle is not None:
            self._read_handle.remove()
