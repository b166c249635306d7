"""Hook points: where an activation named in TransformerLens' scheme lives, and how to read it.

Every residual read in ESR Lab (the engine's readout, catalog builds, SAE training, SAE
metrics, detector searches) goes through :func:`capture`; every residual edit (steering,
the SAE splice of CE-loss recovered) goes through :func:`on_output`. Layers are addressed by
hook name (``blocks.{L}.hook_resid_post``) everywhere; :func:`resid_hook` builds one from an
integer layer.

Residual hooks resolve to the Hugging Face decoder blocks (plain HF speed: resid_pre of block
L is the output of block L-1, of block 0 the embeddings). Any other hook name goes through
TransformerLens' TransformerBridge over the same model (booted lazily by the caller's model).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Sequence

from esr_core.errors import BadInput, Cancelled, ModelUnavailable

RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


class StopForward(Exception):
    """Raised inside a hook once everything asked for is captured: later layers never run."""


def resid_hook(layer: int, kind: str = "post") -> str:
    """``blocks.{layer}.hook_resid_{kind}``."""
    return f"blocks.{int(layer)}.hook_resid_{kind}"


def parse_resid_hook(hook_name: str) -> tuple[int, str] | None:
    """(layer, "pre"/"post") of a residual hook name; None for any other hook."""
    m = RESID_HOOK.match(hook_name or "")
    return (int(m.group(1)), m.group(2)) if m else None


def decoder_layers(hf_model):
    """The list of decoder blocks of an HF causal LM (Llama, Gemma3, Qwen, GPT-2, NeoX)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers"):
        obj = hf_model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise BadInput(f"Cannot find the decoder layers of {type(hf_model).__name__}")


def n_layers(hf_model) -> int:
    cfg = getattr(hf_model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    return int(n) if n is not None else len(decoder_layers(hf_model))


def check_layer(hf_model, layer) -> int:
    n = n_layers(hf_model)
    try:
        layer = int(layer)
    except (TypeError, ValueError):
        raise BadInput(f"Layer must be an integer, got {layer!r}") from None
    if not 0 <= layer < n:
        raise BadInput(f"Layer {layer} does not exist: this model has layers 0..{n - 1}")
    return layer


def _hf(model):
    return getattr(model, "hf_model", model)


def hook_module(model, hook_name: str):
    """The module whose forward *output* is the activation ``hook_name``.

    ``model`` is a loaded model (with ``hf_model`` and, for non-residual hooks, ``bridge``)
    or a plain HF model (residual hooks only).
    """
    hf = _hf(model)
    parsed = parse_resid_hook(hook_name)
    name = getattr(model, "name", type(hf).__name__)
    if parsed:
        layer, kind = parsed
        n = n_layers(hf)
        if not 0 <= layer < n:
            raise ModelUnavailable(f"Hook '{hook_name}' does not exist on {name}: it has blocks 0..{n - 1}")
        blocks = decoder_layers(hf)
        if kind == "post":
            return blocks[layer]
        return blocks[layer - 1] if layer > 0 else hf.get_input_embeddings()
    bridge = getattr(model, "bridge", None)
    hp = bridge.hook_dict.get(hook_name) if bridge is not None else None
    if hp is None:
        raise ModelUnavailable(f"Hook '{hook_name}' does not exist on {name}; "
                               f"expected e.g. blocks.0..{n_layers(hf) - 1}.hook_resid_post")
    return hp


def output_tensor(out):
    """The activation in a module's output (decoder blocks return tuples on some versions)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def with_tensor(out, h):
    """``out`` with its activation replaced by ``h`` (same container type)."""
    if isinstance(out, tuple):
        return (h,) + tuple(out[1:])
    if isinstance(out, list):
        return [h] + list(out[1:])
    return h


def on_output(model, hook_name: str, fn: Callable[[Any], Any]):
    """Register ``fn(h) -> new h or None`` on ``hook_name``; returns the removable handle."""

    def hook(_module, _inputs, out):
        new = fn(output_tensor(out))
        return None if new is None else with_tensor(out, new)

    return hook_module(model, hook_name).register_forward_hook(hook)


@contextlib.contextmanager
def recording(model, hook_names: Sequence[str], stop_when_done: bool = False) -> Iterator[dict[str, Any]]:
    """Record the activations at ``hook_names`` during any forward run inside the block.

    With ``stop_when_done`` the forward raises :class:`StopForward` as soon as every hook has
    fired, so layers after the last one asked for are never computed.
    """
    names = list(dict.fromkeys(hook_names))
    got: dict[str, Any] = {}
    handles = []

    def make(name):
        def fn(h):
            got[name] = h.detach()
            if stop_when_done and len(got) == len(names):
                raise StopForward
            return None

        return fn

    try:
        for name in names:
            handles.append(on_output(model, name, make(name)))
        yield got
    finally:
        for h in handles:
            h.remove()


def capture(model, hook_names: Sequence[str] | str, input_ids, attention_mask=None,
            stop_early: bool = True, add: tuple[str, Any] | None = None) -> dict[str, Any]:
    """Activations at ``hook_names`` for a batch, ``{name: [B, T, d]}``; unsteered unless ``add``.

    With ``stop_early`` only the layers up to the last hook asked for are run (the LM head
    never is). ``add = (hook_name, vectors [B, d])`` adds one vector per row at every position
    of that hook before anything downstream (or that hook's own record) sees it: the steering
    of the live condition, read back in a batch. The one residual reader of the package.
    """
    import torch  # heavy: torch, only when a model runs

    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    hf = _hf(model)
    base = getattr(hf, "model", hf) if stop_early else hf
    steer = None
    if add is not None:  # registered first, so the recording hook on the same module sees the sum
        vec = add[1]
        steer = on_output(model, add[0], lambda h: h + vec.to(h.dtype).unsqueeze(1))
    try:
        with recording(model, names, stop_when_done=stop_early) as got:
            with torch.no_grad():
                try:
                    base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except StopForward:
                    pass
    finally:
        if steer is not None:
            steer.remove()
    missing = [n for n in names if n not in got]
    if missing:
        raise ModelUnavailable(f"Hook(s) {', '.join(missing)} never fired on {getattr(model, 'name', 'the model')}")
    return dict(got)


def capture_batches(model, hook_name: str | Sequence[str], seqs: list[list[int]], batch_size: int = 8, cancel=None,
                    on_batch: Callable[[int, int], None] | None = None, add: tuple[str, Any] | None = None):
    """Yield ``(index, activation [T_i, d])`` for many token sequences, batched by length.

    With a list of hook names, one forward pass reads them all and each item is
    ``(index, {hook: activation})``. ``add = (hook_name, vectors [N, d])``: one vector per
    sequence added at that hook (see :func:`capture`); a zero row leaves its sequence unsteered.

    Right padding with an attention mask keeps the real tokens exact under causal attention;
    ``cancel`` (a :class:`esr_core.jobs.Cancel`, Event or callable) stops between batches.
    """
    import torch  # heavy: torch, only when a model runs

    tok = getattr(model, "tokenizer", None)
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    device = next(_hf(model).parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    done = 0
    for s in range(0, len(order), batch_size):
        if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
            raise Cancelled("Stopped between batches")
        idx = order[s:s + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, :len(seqs[i])] = torch.tensor(seqs[i])
            att[b, :len(seqs[i])] = 1
        vec = None if add is None else (add[0], add[1][torch.as_tensor(idx)].to(device))
        got = capture(model, hook_name, ids.to(device), att.to(device), add=vec)
        for b, i in enumerate(idx):
            if isinstance(hook_name, str):
                yield i, got[hook_name][b, :len(seqs[i])].float()
            else:
                yield i, {n: got[n][b, :len(seqs[i])].float() for n in hook_name}
        done += len(idx)
        if on_batch is not None:
            on_batch(done, len(seqs))
